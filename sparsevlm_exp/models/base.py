"""The decoder-layer loop shared by every VLM family, and the contracts around it.

A family adapter (qwen2_vl.py, llava.py) says how to encode a sample, how to embed
images into the text sequence and which position ids the tokens get. Everything
after that - the loop over decoder layers, scoring at a pruning layer, cutting the
sequence, the ragged KV cache and greedy decoding - is the same for every
Llama-style decoder and lives here, so that `layer=K` means the same thing for
every model: layer K's attention produces the scores, layers K+1..L-1 see only the
kept tokens (DESIGN.md section 3).

Batch size is 1 in the pruned path (the runner rejects batch_size > 1 before any
model loads): per-sample kept counts may differ, and a ragged batch would need a
padding mask per layer length.
"""
from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from ..metrics.efficiency import StageTimer


# --------------------------------------------------------------------------------------
# What a family adapter hands to the shared loop
# --------------------------------------------------------------------------------------
@dataclass
class EncodedRequest:
    """One request, encoded by a family adapter and ready for the LLM."""

    input_ids: torch.LongTensor            # [B, L]
    model_inputs: dict[str, Any]           # processor output (pixel values, grids, ...)
    visual_index: torch.LongTensor         # [B, N] sequence indices of visual tokens (sorted)
    # [B, N, 3]: (image number, row, column) of each visual token in its image's
    # token grid (after the 2x2 merge for Qwen) - for uniform sampling, evidence
    # recall and pictures.
    visual_coords: torch.LongTensor
    image_grids: list[tuple[int, int]]     # (rows, columns) of each image's token grid
    text_index: torch.LongTensor           # [B, T] instruction tokens after the first image


@dataclass
class LayerView:
    """What a scorer may look at, at one pruning layer. Tensors only, no model classes.

    Indices are into the CURRENT sequence at this layer (earlier pruning may already
    have shortened it); `orig_index` maps them back to the original sequence.
    """

    layer: int
    n_layers: int
    q: torch.Tensor | None                 # [B, Hq, T, d] post-rotary queries of the query rows
    k: torch.Tensor | None                 # [B, Hkv, L_cur, d] post-rotary keys of this layer
    query_index: torch.LongTensor | None   # [B, T] positions of the query rows in the current sequence
    visual_index: torch.LongTensor         # [B, N_cur] alive visual tokens in the current sequence
    visual_coords: torch.LongTensor        # [B, N_cur, 3] (image, row, col) of those tokens
    image_grids: list[tuple[int, int]]
    positions: torch.LongTensor            # [P, B, L_cur] ORIGINAL rotary positions (P=3 for M-RoPE, 1 for 1-D)
    hidden: torch.Tensor                   # [B, L_cur, D] the layer's input hidden states
    rope: "RopeSpec"
    generator: torch.Generator             # seeded, for random baselines


@dataclass
class RopeSpec:
    """Enough of the rotary embedding to recompute RoPE-only logits (v2's correction)."""

    inv_freq: torch.Tensor                 # [d/2]
    # M-RoPE: how many of the d/2 frequencies use the t, h, w position (Qwen: e.g. [16, 24, 24]);
    # None for plain 1-D RoPE.
    mrope_section: list[int] | None
    head_dim: int


@dataclass
class PruneEvent:
    layer: int
    kept_index: torch.LongTensor           # [B, n_kept] ORIGINAL sequence indices of kept visual tokens (sorted)
    scores: torch.Tensor                   # [B, N_cur] scores of the visual tokens alive before this cut
    scored_index: torch.LongTensor         # [B, N_cur] original indices of those tokens
    n_recycled: int = 0                    # merged tokens appended after the kept ones (recycle pruner)


@dataclass
class PrefillState:
    """The result of a sparsified prefill, ready for decoding."""

    cache: DynamicCache
    next_logits: torch.Tensor              # [B, V] logits for the first generated token
    next_position: torch.LongTensor        # [B] rotary position of the first generated token
    n_visual: int                          # visual tokens before pruning
    layer_counts: list[int]                # visual tokens alive after each decoder layer (input to the next)
    seq_lens: list[int]                    # tokens each layer processed during prefill (for FLOPs)
    events: list[PruneEvent] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------
# Pieces every family adapter needs to build an EncodedRequest and its embeddings
# --------------------------------------------------------------------------------------
def grid_coords(grids: list[tuple[int, int]], frames: list[int] | None = None) -> torch.LongTensor:
    """[1, N, 3] (image number, row, column) of every visual token, images in prompt
    order, each image's tokens in raster order (repeated per frame where frames > 1)."""
    coords = []
    for image_no, (rows, cols) in enumerate(grids):
        t = frames[image_no] if frames else 1
        _, rr, cc = torch.meshgrid(torch.arange(t), torch.arange(rows), torch.arange(cols), indexing="ij")
        coords.append(torch.stack([torch.full_like(rr, image_no), rr, cc], -1).view(-1, 3))
    return (torch.cat(coords) if coords else torch.zeros(0, 3, dtype=torch.long)).unsqueeze(0)


def instruction_index(is_image: torch.BoolTensor, skip: torch.BoolTensor | None = None) -> torch.LongTensor:
    """[1, T] the tokens after the first image that are not image tokens (nor `skip`,
    e.g. vision start/end markers, which carry no question): SparseVLM's H_t.
    is_image, skip: [L] for one request."""
    visual = is_image.nonzero()
    if visual.numel() == 0:
        return torch.zeros(1, 0, dtype=torch.long)
    keep = (torch.arange(is_image.shape[0]) > visual[0, 0]) & ~is_image
    if skip is not None:
        keep &= ~skip
    return keep.nonzero().view(1, -1)


def splice_image_features(embeds: torch.Tensor, input_ids: torch.LongTensor, image_token_id: int,
                          features: torch.Tensor) -> torch.Tensor:
    """Text embeddings [B, L, D] with the image features [N, D] written over the image tokens."""
    mask = (input_ids == image_token_id).unsqueeze(-1)
    return embeds.masked_scatter(mask, features.to(embeds.dtype))


def cache_keyword(layer: torch.nn.Module) -> str:
    """The keyword under which a decoder layer's forward takes the KV cache.

    transformers 5.24 renamed it from `past_key_values` to `cache` (the old name warns
    until 5.40, then goes); older 5.x releases only know `past_key_values`. Read from
    the installed layer's signature, so every supported version gets its own keyword
    and no deprecation warning.
    """
    return "cache" if "cache" in inspect.signature(layer.forward).parameters else "past_key_values"


# --------------------------------------------------------------------------------------
# The running state of the layer loop, which pruners cut
# --------------------------------------------------------------------------------------
@dataclass
class LoopState:
    hidden: torch.Tensor                   # [B, L_cur, D]
    positions: torch.LongTensor            # [P, B, L_cur] original rotary positions
    orig_index: torch.LongTensor           # [B, L_cur] original sequence index of each current token
    is_visual: torch.BoolTensor            # [B, L_cur]
    visual_coords: torch.LongTensor        # [B, N_cur, 3] coords of the alive visual tokens, in order
    cache: DynamicCache
    layer: int = 0                         # the layer about to run next
    # [B, L_cur] True for tokens a recycling pruner inserted (merged deleted tokens);
    # None until one does. They are visual tokens (is_visual) with a repeated orig_index.
    is_recycled: torch.BoolTensor | None = None

    @property
    def visual_index(self) -> torch.LongTensor:
        # [B, N_cur]; batch 1, so every row has the same count
        return self.is_visual.nonzero()[:, 1].view(self.is_visual.shape[0], -1)


class DecoderLoopAdapter(ABC):
    """Base class of the family adapters: owns the loop over decoder layers.

    Subclasses set `self.model`, `self.processor` and implement `encode`,
    `embed` (text + visual embeddings and position ids) and `rope_spec`.
    """

    model: Any
    processor: Any
    position_dims: int = 1   # rows of the rotary position ids: 3 for M-RoPE (t, h, w), 1 for 1-D RoPE

    # ---- family-specific (implemented by subclasses) --------------------------------
    @abstractmethod
    def encode(self, sample) -> EncodedRequest:
        """Processor + chat template: the request for one Sample."""

    @abstractmethod
    def embed(self, req: EncodedRequest) -> tuple[torch.Tensor, torch.LongTensor]:
        """Input embeddings [B, L, D] with the image features spliced in, and the
        rotary position ids [P, B, L]."""

    @abstractmethod
    def rope_spec(self) -> RopeSpec:
        """The rotary frequencies and sections (for v2's gravity correction)."""

    @abstractmethod
    def rotary(self, hidden: torch.Tensor, positions: torch.LongTensor):
        """(cos, sin), each [B, L, d], for the given position ids."""

    # ---- shared ---------------------------------------------------------------------
    @property
    def language_model(self):
        return self.model.model.language_model

    @property
    def layers(self):
        return self.language_model.layers

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def device(self) -> torch.device:
        return self.language_model.embed_tokens.weight.device

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.model.config.text_config.eos_token_id
        return [eos] if isinstance(eos, int) else list(eos or [])

    def _causal_mask(self, length: int, dtype: torch.dtype) -> torch.Tensor | None:
        # SDPA and FlashAttention take is_causal when no mask is given; eager needs
        # an explicit additive mask [1, 1, L, L].
        if self.model.config._attn_implementation != "eager" or length <= 1:
            return None
        mask = torch.full((length, length), torch.finfo(dtype).min, device=self.device, dtype=dtype)
        return torch.triu(mask, diagonal=1)[None, None]

    def _run_layer(self, i: int, hidden, cos_sin, cache) -> torch.Tensor:
        layer = self.layers[i]
        if not hasattr(self, "_cache_kw"):
            self._cache_kw = cache_keyword(layer)
        return layer(
            hidden,
            attention_mask=self._causal_mask(hidden.shape[1], hidden.dtype),
            position_embeddings=cos_sin,
            position_ids=None,
            use_cache=True,
            **{self._cache_kw: cache},
        )

    def _layer_queries(self, i: int, hidden_rows: torch.Tensor, cos_sin_rows) -> torch.Tensor:
        """Post-rotary queries [B, Hq, T, d] of a few rows at layer i, recomputed from
        the layer's input hidden states [B, T, D]: the cheap way to score, which
        works with SDPA/FlashAttention (no attention maps are ever requested)."""
        layer = self.layers[i]
        attn = layer.self_attn
        x = layer.input_layernorm(hidden_rows)
        B, T, _ = x.shape
        q = attn.q_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)     # [B, Hq, T, d]
        cos, sin = cos_sin_rows
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q1, q2 = q[..., : q.shape[-1] // 2], q[..., q.shape[-1] // 2 :]
        return q * cos + torch.cat((-q2, q1), dim=-1) * sin

    @torch.no_grad()
    def prefill(self, req: EncodedRequest, *, scorer=None, policy=None, pruner=None, generator=None) -> PrefillState:
        """Run the LLM over the prompt, pruning visual tokens where the policy says.

        With no scorer/policy/pruner (or a sample without images) this is a plain,
        full prefill.
        """
        timer = StageTimer(self.device)
        with timer("vision"):
            embeds, positions = self.embed(req)
        B, L, _ = embeds.shape
        is_visual = torch.zeros(B, L, dtype=torch.bool, device=self.device)
        is_visual.scatter_(1, req.visual_index.to(self.device), True)
        n_visual = int(req.visual_index.shape[1])
        pruning = scorer is not None and policy is not None and pruner is not None and n_visual > 0
        prune_layers = set(policy.layers(self.n_layers)) if pruning else set()

        state = LoopState(
            hidden=embeds,
            positions=positions,
            orig_index=torch.arange(L, device=self.device).expand(B, L),
            is_visual=is_visual,
            visual_coords=req.visual_coords.to(self.device),
            cache=DynamicCache(config=self.model.config.text_config),
        )
        layer_counts, seq_lens, events = [], [], []
        # timings["score"] (query rows, scores, top-k, the cut) is a part of timings["prefill"].
        with timer("prefill"):
            query_rows = None  # [B, T] ORIGINAL indices of the query rows
            if pruning:
                # Rows are chosen once, from the input embeddings (SparseVLM's raters, or the
                # last token for FastV); pruning never removes text tokens, so they stay valid.
                with timer("score"):
                    query_rows = scorer.query_rows(embeds, req.visual_index.to(self.device),
                                                   req.text_index.to(self.device))
            cos_sin = self.rotary(state.hidden, state.positions)
            n_alive = n_visual                  # visual tokens alive (recycled ones included)
            for i in range(self.n_layers):
                state.layer = i
                layer_input = state.hidden
                seq_lens.append(layer_input.shape[1])
                state.hidden = self._run_layer(i, layer_input, cos_sin, state.cache)
                if i in prune_layers and n_alive > 0:
                    with timer("score"):
                        view = self._layer_view(i, state, layer_input, cos_sin, query_rows, req.image_grids,
                                                generator)
                        scores = scorer(view)                                     # [B, N_cur]
                        n_keep = policy.n_keep(i, n_visual=n_visual, scores=scores, view=view)
                        keep_local = scores.topk(min(n_keep, scores.shape[1]), dim=1).indices.sort(dim=1).values
                        event = pruner.cut(state, keep_local, scores, view)
                    events.append(event)
                    # after any cut: a recycling pruner may change positions without
                    # changing the length (one deleted token merged into one new one)
                    cos_sin = self.rotary(state.hidden, state.positions)
                    # counted on the host only after a cut: a sync per layer would stall the GPU
                    n_alive = int(state.is_visual[0].sum())
                layer_counts.append(n_alive)
            if pruning:
                with timer("score"):
                    pruner.finish(state)           # kv_only cuts every layer's cache here
            last = self.language_model.norm(state.hidden[:, -1:])
            next_logits = self.model.lm_head(last)[:, -1].float()
        # The last prompt token is text (never pruned) and holds the largest position:
        # decoding continues right after it - the ORIGINAL next position unless a
        # pruner renumbered positions (an ablation).
        next_position = state.positions.amax(dim=(0, 2)) + 1                     # [B]
        return PrefillState(
            cache=state.cache,
            next_logits=next_logits,
            next_position=next_position,
            n_visual=n_visual,
            layer_counts=layer_counts,
            seq_lens=seq_lens,
            events=[e for e in events if e is not None],
            timings=timer.ms,
        )

    def _layer_view(self, i, state: LoopState, layer_input, cos_sin, query_rows, image_grids, generator) -> LayerView:
        q = k = rows = None
        if query_rows is not None and query_rows.shape[1] > 0:
            B = layer_input.shape[0]
            # Query rows are kept as original indices; earlier cuts moved them.
            rows = torch.searchsorted(state.orig_index.contiguous(), query_rows)  # [B, T]
            gather = rows.unsqueeze(-1)
            hidden_rows = layer_input.gather(1, gather.expand(-1, -1, layer_input.shape[-1]))
            cos, sin = cos_sin
            cos_rows = cos.expand(B, -1, -1).gather(1, gather.expand(-1, -1, cos.shape[-1]))
            sin_rows = sin.expand(B, -1, -1).gather(1, gather.expand(-1, -1, sin.shape[-1]))
            q = self._layer_queries(i, hidden_rows, (cos_rows, sin_rows))
            k = state.cache.layers[i].keys                                        # [B, Hkv, L_cur, d]
        return LayerView(
            layer=i,
            n_layers=self.n_layers,
            q=q,
            k=k,
            query_index=rows,
            visual_index=state.visual_index,
            visual_coords=state.visual_coords,
            image_grids=image_grids,
            positions=state.positions,
            hidden=layer_input,
            rope=self.rope_spec(),
            generator=generator if generator is not None else torch.Generator().manual_seed(0),
        )

    # ---- decoding -------------------------------------------------------------------
    @torch.no_grad()
    def decode_step(self, token: torch.LongTensor, position: torch.LongTensor, cache: DynamicCache) -> torch.Tensor:
        """One greedy step: token [B, 1], position [B] -> logits [B, V].

        Each layer attends to its own cache, whose length differs before and after
        the pruning layer; a single new token needs no mask.
        """
        hidden = self.language_model.embed_tokens(token)
        positions = position.view(1, -1, 1).expand(self.position_dims, -1, 1)
        cos_sin = self.rotary(hidden, positions)
        for i in range(self.n_layers):
            hidden = self._run_layer(i, hidden, cos_sin, cache)
        hidden = self.language_model.norm(hidden)
        return self.model.lm_head(hidden)[:, -1].float()
