"""The family adapter: the hooks through which the engine (engine.py) runs a VLM family.

A family adapter (qwen2_vl.py, llava.py) says how to encode a sample, how to embed
images into the text sequence, which position ids the tokens get, and - where the
family differs from a Llama-style decoder - how to recompute a layer's queries and
what to do after a layer. The loop over decoder layers, the cuts, the ragged KV
cache and greedy decoding live in engine.py and are the same for every family, so
that `layer=K` means the same thing for every model (docs/ARCHITECTURE.md).

Hooks (abstract ones marked *):
    encode(sample)*          -> EncodedRequest (processor + chat template)
    embed(req)*              -> [B, L, D] input embeddings, vision features spliced in
    positions(req)*          -> [P, B, L] rotary position ids
    rotary(hidden, pos)*     -> (cos, sin) [B, L, d] each
    rope_spec()*             -> RopeSpec
    layer_queries(i, rows, cos_sin_rows) -> [B, Hq, T, d]; default: Llama-style attention
                                without q_norm (a family with q_norm overrides it)
    after_layer(i, state)    -> None; default no-op (DeepStack-style injections; extra
                                per-token planes live in state.planes, which pruners cut)
    token_planes(req)        -> {name: [B, L, ...]}; default {} (the planes after_layer reads)
    vision_attention_block() -> the vision module whose input the pre-LLM stage reads; default None
    vision_attention(req, args, kwargs) -> [B, N] attention each visual token receives there

Left padding: `run_layer` takes the key mask of the call (causal + padding mask, built
by `attention_mask`); batching.prefill_batch uses it to run several requests with
different kept counts through one padded batch.
"""
from __future__ import annotations

import inspect
import math
import warnings
from abc import ABC, abstractmethod
from typing import Any, Callable

import torch

from ..contracts import EncodedRequest, LoopState, PrefillState, RopeSpec
from .. import engine
from .prompting import chat_messages


# --------------------------------------------------------------------------------------
# Pieces every family adapter needs to build an EncodedRequest and its embeddings
# --------------------------------------------------------------------------------------
def grid_coords(grids: list[tuple[int, int]], frames: list[int] | None = None) -> torch.LongTensor:
    """[1, N, 4] (image number, row, column, frame) of every visual token, images in
    prompt order, each image's tokens in raster order, frame by frame where frames > 1
    (a video clip: frames[i] temporal tokens of grids[i] each; a still image has frame 0)."""
    coords = []
    for image_no, (rows, cols) in enumerate(grids):
        t = frames[image_no] if frames else 1
        ff, rr, cc = torch.meshgrid(torch.arange(t), torch.arange(rows), torch.arange(cols), indexing="ij")
        coords.append(torch.stack([torch.full_like(rr, image_no), rr, cc, ff], -1).view(-1, 4))
    return (torch.cat(coords) if coords else torch.zeros(0, 4, dtype=torch.long)).unsqueeze(0)


def instruction_index(is_image: torch.BoolTensor, skip: torch.BoolTensor | None = None) -> torch.LongTensor:
    """[1, T] the tokens after the first image that are not image tokens (nor `skip`,
    e.g. vision start/end markers, which carry no question, and pad tokens): the official SparseVLM rule
    for H_t (`hidden_states[:, text_token_start:]` in the official LLaVA code: the "\\n"
    after the image, the question and " ASSISTANT:"). instruction_tokens=after_first_image.
    is_image, skip: [L] for one request."""
    visual = is_image.nonzero()
    if visual.numel() == 0:
        return torch.zeros(1, 0, dtype=torch.long)
    keep = (torch.arange(is_image.shape[0]) > visual[0, 0]) & ~is_image
    if skip is not None:
        keep &= ~skip
    return keep.nonzero().view(1, -1)


def request_attention_mask(inputs: dict, input_ids: torch.LongTensor) -> torch.LongTensor | None:
    """The processor's attention_mask [B, L] (1 real, 0 pad) checked for what the engine
    supports, or None when absent. Raises ValueError (one line) for a shape other than
    input_ids' or for RIGHT padding (a 0 after a 1): left padding is what HF generate
    needs for decoder-only models and what processors give with padding_side="left"."""
    mask = inputs.get("attention_mask")
    if mask is None:
        return None
    mask = torch.as_tensor(mask)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but input_ids {tuple(input_ids.shape)}: "
                         "they must match")
    real = mask.bool()
    # left padding: once a row has a real token, every later one is real
    if (real.long().cummax(dim=1).values.bool() & ~real).any():
        raise ValueError("attention_mask has a pad (0) after a real token (right padding); only LEFT padding is "
                         "supported (set the processor's tokenizer.padding_side='left', as HF generate needs)")
    if not real.any(dim=1).all():
        raise ValueError("attention_mask has a row with no real token")
    return mask.long()
def common_prefix_length(a: list[int], b: list[int]) -> int:
    """Number of leading entries a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def user_turn_index(ids: list[int], frame: tuple[list[int], list[int]], is_vision: torch.BoolTensor,
                    is_space: "Callable[[int], bool]") -> torch.LongTensor | None:
    """[1, T] the user's instruction tokens: those inside the user turn, wherever they
    stand around the images, or None when `ids` do not sit inside `frame`.

    ids: the prompt's token ids (pads removed), length L; frame = (prefix, suffix): the
    token ids the chat template puts before and after the user's content (system turn,
    "<|im_start|>user\\n" / "USER:", and "<|im_end|>\\n<|im_start|>assistant\\n" /
    " ASSISTANT:"), from FamilyAdapter.prompt_frame. is_vision [L]: image/video tokens and
    their markers (<|vision_start|>, <|vision_end|>). is_space(token_id): True for a
    whitespace-only token; those at the edges of each text run between images are layout
    the template adds (LLaVA's "<image>\\n", the space before it), never instruction, and
    are left out; whitespace inside a run (between a question's options) stays.

    Raises ValueError (one line) for a multi-turn prompt (an earlier assistant turn, i.e.
    the frame's suffix, inside the user's content): its end-of-turn and role markers and
    the earlier answers would silently become raters; only one user turn is supported.
    """
    prefix, suffix = frame
    L = len(ids)
    start, end = len(prefix), L - len(suffix)
    if start > end or ids[:start] != prefix or ids[end:] != suffix:
        return None
    n = len(suffix)
    if n and any(ids[i:i + n] == suffix for i in range(start, end - n + 1)):
        raise ValueError("the prompt has several turns (an assistant turn inside the user's content): multi-turn "
                         "prompts are not supported by the pruned pipeline, whose raters are one user turn's "
                         "instruction; give one user turn (earlier turns as text in it, if needed)")
    keep, run = [], []
    for i in list(range(start, end)) + [None]:          # None closes the last run
        if i is None or bool(is_vision[i]):
            while run and is_space(ids[run[0]]):
                run.pop(0)
            while run and is_space(ids[run[-1]]):
                run.pop()
            keep += run
            run = []
        else:
            run.append(i)
    return torch.tensor(keep, dtype=torch.long).view(1, -1)


def row_slices(inputs: dict, b: int) -> tuple[torch.BoolTensor, dict]:
    """(real [L] mask of row b, the row's per-token tensors without its pads): input_ids,
    attention_mask (all ones) and mm_token_type_ids where present, each [1, L_b].
    Raises ValueError (one line) for an attention_mask or mm_token_type_ids whose shape is
    not input_ids' (a row would be cut with another length's mask)."""
    ids = inputs["input_ids"]
    for key in ("attention_mask", "mm_token_type_ids"):
        value = inputs.get(key)
        shape = tuple(torch.as_tensor(value).shape) if value is not None else None
        if shape is not None and shape != tuple(ids.shape):
            raise ValueError(f"{key} has shape {shape} but input_ids {tuple(ids.shape)}: they must match")
    mask = inputs.get("attention_mask")
    real = torch.as_tensor(mask[b]).bool() if mask is not None else torch.ones(ids.shape[1], dtype=torch.bool)
    row = {"input_ids": ids[b][real][None], "attention_mask": torch.ones(1, int(real.sum()), dtype=torch.long)}
    if inputs.get("mm_token_type_ids") is not None:
        row["mm_token_type_ids"] = inputs["mm_token_type_ids"][b][real][None]
    return real, row


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


def attention_received(q: torch.Tensor, k: torch.Tensor, rows_per_chunk: int = 1024) -> torch.Tensor:
    """[Tk] attention each key receives, softmax(q k^T / sqrt(d)) averaged over heads
    and query rows. q [H, Tq, d], k [H, Tk, d] (one image's tokens, no mask: vision
    towers attend bidirectionally). Computed in float32, `rows_per_chunk` query rows
    at a time, so memory stays O(H * rows_per_chunk * Tk) instead of O(H * Tq * Tk)."""
    q, k = q.float(), k.float()
    total = torch.zeros(k.shape[1], device=k.device)
    for start in range(0, q.shape[1], rows_per_chunk):
        logits = q[:, start:start + rows_per_chunk] @ k.transpose(1, 2) / math.sqrt(q.shape[-1])   # [H, t, Tk]
        total += torch.softmax(logits, dim=-1).sum(dim=(0, 1))
    return total / (q.shape[0] * q.shape[1])


def rotate_queries(q: torch.Tensor, cos_sin) -> torch.Tensor:
    """Llama-style rotary embedding applied to q [B, H, T, d] with (cos, sin) [B, T, d]."""
    cos, sin = cos_sin
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q1, q2 = q[..., : q.shape[-1] // 2], q[..., q.shape[-1] // 2 :]
    return q * cos + torch.cat((-q2, q1), dim=-1) * sin


class FamilyAdapter(ABC):
    """Base class of the family adapters: the hooks the engine calls (module docstring).

    Subclasses set `self.model`, `self.processor` and implement the abstract hooks.
    """

    model: Any
    processor: Any
    position_dims: int = 1   # rows of the rotary position ids: 3 for M-RoPE (t, h, w), 1 for 1-D RoPE

    # ---- family-specific (implemented by subclasses) --------------------------------
    @abstractmethod
    def encode(self, sample) -> EncodedRequest:
        """Processor + chat template: the request for one Sample."""

    @abstractmethod
    def embed(self, req: EncodedRequest) -> torch.Tensor:
        """Input embeddings [B, L, D] with the image features (vision tower + projector)
        spliced in over the image tokens."""

    @abstractmethod
    def positions(self, req: EncodedRequest) -> torch.LongTensor:
        """Rotary position ids [P, B, L] of the prompt (P = position_dims)."""

    @abstractmethod
    def rope_spec(self) -> RopeSpec:
        """The rotary frequencies and sections (for v2's gravity correction)."""

    @abstractmethod
    def rotary(self, hidden: torch.Tensor, positions: torch.LongTensor):
        """(cos, sin), each [B, L, d], for the given position ids [P, B, L]."""

    def split_inputs(self, inputs: dict) -> list[dict]:
        """A processor's batched output (B rows, left padded, attention_mask) as B batch-1
        processor outputs without pads, each with its own images and clips (batching,
        sparse_generate with a batch). Families implement it; default: NotImplementedError."""
        raise NotImplementedError(f"{type(self).__name__} cannot split a batched processor output")

    # ---- hooks with a default ---------------------------------------------------------
    def layer_queries(self, i: int, hidden_rows: torch.Tensor, cos_sin_rows) -> torch.Tensor:
        """Post-rotary queries [B, Hq, T, d] of a few rows at layer i, recomputed from
        the layer's input hidden states [B, T, D]: the cheap way to score, which
        works with SDPA/FlashAttention (no attention maps are ever requested).

        Default: Llama-style attention (input_layernorm, q_proj, rotate-half RoPE).
        A family whose attention normalises q (Qwen3's q_norm) must override this,
        or its scores would silently be wrong; hence the check below."""
        layer = self.layers[i]
        attn = layer.self_attn
        if getattr(attn, "q_norm", None) is not None:
            raise NotImplementedError(f"{type(attn).__name__} has a q_norm: {type(self).__name__} must override "
                                      "layer_queries to apply it")
        x = layer.input_layernorm(hidden_rows)
        B, T, _ = x.shape
        q = attn.q_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)          # [B, Hq, T, d]
        return rotate_queries(q, cos_sin_rows)

    def layer_keys(self, i: int, hidden: torch.Tensor, cos_sin) -> torch.Tensor:
        """Post-rotary keys [B, Hkv, L, d] that layer i WOULD compute from hidden [B, L, D]
        (input_layernorm, k_proj, RoPE) - for scorers that rank with the next layer's
        projections before that layer runs (PyramidDrop). Same family caveat as
        layer_queries (a k_norm must be applied by an override)."""
        layer = self.layers[i]
        attn = layer.self_attn
        if getattr(attn, "k_norm", None) is not None:
            raise NotImplementedError(f"{type(attn).__name__} has a k_norm: {type(self).__name__} must override "
                                      "layer_keys to apply it")
        x = layer.input_layernorm(hidden)
        B, L, _ = x.shape
        k = attn.k_proj(x).view(B, L, -1, attn.head_dim).transpose(1, 2)          # [B, Hkv, L, d]
        return rotate_queries(k, cos_sin)

    def after_layer(self, i: int, state: LoopState) -> None:
        """Called by the engine right after decoder layer i ran (state.hidden is its
        output) and before a cut at layer i. Default: nothing. DeepStack-style
        families add their per-token planes (state.planes) to state.hidden here."""

    def check_pruner(self, pruner) -> None:
        """Raise ConfigError (one line) for a pruner this family cannot run; called by
        engine.prefill and batching.prefill_batch before any work. Default: any pruner
        (Qwen3.5 refuses kv_only: a recurrent state cannot drop tokens)."""

    def token_planes(self, req: EncodedRequest) -> dict[str, torch.Tensor]:
        """Extra per-token planes {name: [B, L, ...]} aligned with the prompt, cut by
        pruners alongside the hidden states. Default: none."""
        return {}

    def vision_attention_block(self):
        """The vision-tower module whose forward input the pre-LLM stage reads
        attention from, or None where the family exposes none (the default)."""
        return None

    def vision_attention(self, req: EncodedRequest, args: tuple, kwargs: dict) -> torch.Tensor:
        """[B, N] attention each visual token receives in vision_attention_block(),
        recomputed from that block's captured forward input (args, kwargs): only the
        query rows needed, never all attention maps."""
        raise NotImplementedError(f"{type(self).__name__} exposes no vision attention")

    def probe_prompt(self, question: str) -> list[int]:
        """Token ids of this family's prompt for one user turn holding only `question`
        (no image), built exactly as `encode` builds prompts. Default: the processor's
        chat template on chat_messages; a family with another prompt path overrides it."""
        inputs = self.processor.apply_chat_template(chat_messages([], question), tokenize=True,
                                                    add_generation_prompt=True, return_dict=True,
                                                    return_tensors="pt")
        return inputs["input_ids"][0].tolist()

    def probe_system_prompt(self, system: str, question: str) -> list[int]:
        """Token ids of this family's prompt with a system turn holding `system` and one
        user turn holding only `question` (no image). Default: the processor's chat
        template with a system message; a family with another prompt path overrides it."""
        messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] + chat_messages([], question)
        inputs = self.processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                    return_dict=True, return_tensors="pt")
        return inputs["input_ids"][0].tolist()

    # ---- shared ---------------------------------------------------------------------
    PROBE_WORDS = ("yes", "no")   # one token each in every vocabulary we meet, and different

    def user_header(self) -> list[int] | None:
        """The token ids the chat template puts between the END of a system turn's text
        and the user's content (Qwen: "<|im_end|>\\n<|im_start|>user\\n"; LLaVA: " USER:"),
        or None where it cannot be read. Lets a prompt whose system prompt is not the
        adapter's own (a library call with the user's system message) still locate the
        user turn. Read like prompt_frame: two prompts with different one-word system
        texts and the same one-word question; what they share at the back, less the
        question and the assistant suffix. Computed once per adapter."""
        if not hasattr(self, "_user_header"):
            self._user_header = None
            frame = self.prompt_frame()
            if frame is not None:
                try:
                    a, b = (self.probe_system_prompt(word, self.PROBE_WORDS[0]) for word in self.PROBE_WORDS)
                except Exception:        # a template without a system role: no header to read
                    a = b = None
                if a is not None:
                    tail = self.probe_prompt(self.PROBE_WORDS[0])[len(frame[0]):]   # question + suffix
                    back = common_prefix_length(a[::-1], b[::-1])
                    if back > len(tail) and a[len(a) - len(tail):] == tail:
                        self._user_header = a[len(a) - back:len(a) - len(tail)]
        return self._user_header


    def prompt_frame(self) -> tuple[list[int], list[int]] | None:
        """(prefix, suffix): the token ids the chat template puts before and after the
        user's content, or None (no processor, or a tokenizer that cannot tell the probe
        words apart). Read from the template itself, not from a list of marker ids: the
        prompt is rendered for two one-word questions (PROBE_WORDS); what the two share at
        the front is the prefix (system turn and the user-turn header), what they share at
        the back the suffix (end of the turn and the assistant prefix). One word rather
        than an empty question, so the junctions tokenize as in a real prompt (SentencePiece
        merges the double space an empty question leaves). Computed once per adapter."""
        if not hasattr(self, "_prompt_frame"):
            self._prompt_frame = None
            if self.processor is not None:
                a, b = (self.probe_prompt(word) for word in self.PROBE_WORDS)
                front = common_prefix_length(a, b)
                back = min(common_prefix_length(a[::-1], b[::-1]), len(a) - front)
                if front < len(a):
                    self._prompt_frame = (a[:front], a[len(a) - back:])
        return self._prompt_frame

    def instruction_indices(self, inputs: dict, is_image: torch.BoolTensor,
                            markers: torch.BoolTensor | None = None) -> tuple[torch.LongTensor, torch.LongTensor]:
        """(user_turn [1, T], after_first_image [1, T']) sequence indices of the two rater
        candidate sets (Scorer.instruction_tokens picks one):
        - user_turn: the user's instruction tokens wherever they stand in the user turn
          (before, between or after images); never the system prompt, the chat-template
          markers, the assistant prefix, vision markers or image tokens (user_turn_index);
        - after_first_image: the official SparseVLM rule (instruction_index).
        is_image, markers [L]: image tokens and the family's vision start/end markers.
        Pads (attention_mask 0) are never candidates. A system prompt other than the
        adapter's own (a library call with the user's system message) is found through the
        template's user-turn header (user_header). When the prompt does not come from this
        adapter's chat template at all (synthetic ids, another template) the user turn
        cannot be located: user_turn falls back to after_first_image, with a warning once
        per adapter. A multi-turn prompt: ValueError (user_turn_index)."""
        mask = inputs.get("attention_mask")
        pads = mask[0].cpu() == 0 if mask is not None else None
        skip = markers.cpu() if markers is not None else None
        if pads is not None:
            skip = pads if skip is None else skip | pads
        after = instruction_index(is_image.cpu(), skip=skip)
        if self.processor is None:         # synthetic requests (bench): no template to read
            return after, after
        frame = self.prompt_frame()
        ids = inputs["input_ids"][0].cpu()
        real = (mask[0].bool().cpu() if mask is not None else torch.ones_like(ids, dtype=torch.bool)).nonzero().view(-1)
        is_vision = is_image if markers is None else is_image | markers
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        def is_space(token):
            return tokenizer.decode([token]).strip() == ""
        real_ids = ids[real].tolist()
        local = None if frame is None else user_turn_index(real_ids, frame, is_vision.cpu()[real], is_space)
        header = self.user_header() if local is None and frame is not None else None
        if header:
            # another system prompt than the adapter's own: the user turn starts right after
            # the first user-turn header (the system text before it is never a candidate)
            h = len(header)
            at = next((p for p in range(len(real_ids) - h + 1) if real_ids[p:p + h] == header), None)
            if at is not None:
                local = user_turn_index(real_ids, (real_ids[:at + h], frame[1]), is_vision.cpu()[real], is_space)
        if local is None:
            if not getattr(self, "_warned_frame", False):
                self._warned_frame = True
                warnings.warn(f"{type(self).__name__}: the prompt does not sit inside this model's chat template "
                              "(system turn, user turn, assistant prefix), so the user's instruction tokens cannot "
                              "be located; rater candidates are the tokens after the first image instead")
            return after, after
        return real[local], after

    def embed_and_vision_attention(self, req: EncodedRequest):
        """(embed(req), [B, N] vision attention or None): runs the vision tower once,
        capturing the named block's input on the way."""
        block = self.vision_attention_block()
        if block is None or req.visual_index.shape[1] == 0:
            return self.embed(req), None
        captured = []

        def capture(module, args, kwargs):
            captured.append((args, kwargs))

        handle = block.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            embeds = self.embed(req)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(f"the vision block ran {len(captured)} times in one embed (expected once)")
        args, kwargs = captured[0]
        return embeds, self.vision_attention(req, args, kwargs)

    def prefill(self, req: EncodedRequest, **parts) -> PrefillState:
        """engine.prefill(self, req, scorer=, policy=, pruner=, generator=): a shortcut."""
        return engine.prefill(self, req, **parts)

    def decode_step(self, token: torch.LongTensor, position, cache,
                    key_masks: list[torch.BoolTensor] | None = None) -> torch.Tensor:
        """engine.decode_step(self, ...): a shortcut for decoders."""
        return engine.decode_step(self, token, position, cache, key_masks)

    @property
    def language_model(self):
        return self.model.model.language_model

    @property
    def text_config(self):
        return self.model.config.text_config

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

    def embed_tokens(self, token_ids: torch.LongTensor) -> torch.Tensor:
        """[B, L, D] text embeddings of token ids [B, L] (moved to the model's device)."""
        return self.language_model.embed_tokens(token_ids.to(self.device))

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, L, D] the language model's final norm of hidden [B, L, D] (DART's pivots read it)."""
        return self.language_model.norm(hidden)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, V] float32 logits of the LAST position of hidden [B, L, D] (final norm + lm_head)."""
        return self.model.lm_head(self.language_model.norm(hidden[:, -1:]))[:, -1].float()

    def _causal_mask(self, length: int, dtype: torch.dtype) -> torch.Tensor | None:
        # SDPA and FlashAttention take is_causal when no mask is given; eager needs
        # an explicit additive mask [1, 1, L, L].
        if self.model.config._attn_implementation != "eager" or length <= 1:
            return None
        mask = torch.full((length, length), torch.finfo(dtype).min, device=self.device, dtype=dtype)
        return torch.triu(mask, diagonal=1)[None, None]

    def attention_mask(self, key_mask: torch.BoolTensor | None, q_len: int, dtype: torch.dtype):
        """The 4-D mask of one attention call: q_len new queries (the LAST q_len of the
        keys) over keys with key_mask [B, K] (True = real token, False = pad).

        None key_mask: the plain causal mask (_causal_mask). Otherwise query i (at key
        slot K - q_len + i) sees key j iff j <= that slot and key j is real - what HF
        builds from a 2-D attention_mask (masking_utils: causal AND padding). A pad query
        also sees itself, so no row is fully masked (an all-masked SDPA row gives NaN,
        which would reach real rows through 0 * NaN); real rows never see a pad, so this
        changes nothing they compute. eager: additive float [B, 1, q, K] (0 / dtype min);
        other implementations: boolean [B, 1, q, K] (True = attend), as HF passes SDPA."""
        if key_mask is None:
            return self._causal_mask(q_len, dtype)
        B, K = key_mask.shape
        key_mask = key_mask.to(self.device)
        slot = torch.arange(K - q_len, K, device=self.device)[:, None]               # [q, 1]
        key = torch.arange(K, device=self.device)[None, :]                            # [1, K]
        allowed = ((key <= slot)[None] & key_mask[:, None, :]) | (key == slot)[None]  # [B, q, K]
        allowed = allowed[:, None]                                                     # [B, 1, q, K]
        if self.model.config._attn_implementation == "eager":
            return torch.zeros(allowed.shape, dtype=dtype, device=self.device).masked_fill(
                ~allowed, torch.finfo(dtype).min)
        return allowed

    def run_layer(self, i: int, hidden, cos_sin, cache, key_mask: torch.BoolTensor | None = None) -> torch.Tensor:
        """Decoder layer i on hidden [B, L, D], appending its keys/values to `cache`.

        key_mask [B, K]: True for the real keys of this call, the cached ones first and
        then the L new ones (K = cached + L); None = no padding anywhere (plain causal)."""
        layer = self.layers[i]
        if not hasattr(self, "_cache_kw"):
            self._cache_kw = cache_keyword(layer)
        return layer(
            hidden,
            attention_mask=self.attention_mask(key_mask, hidden.shape[1], hidden.dtype),
            position_embeddings=cos_sin,
            position_ids=None,
            use_cache=True,
            **{self._cache_kw: cache},
        )
