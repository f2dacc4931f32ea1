"""The contracts every part is written against: the types that travel through the
engine and the abstract bases of the plug-in parts.

This is the bottom layer of the package: it imports nothing else from
sparsevlm_exp, so a scorer, a policy, a pruner, a decoder, a dataset or a metric
can depend on it without pulling in a model family, the engine or the runner.

    data (Sample) -> adapter.encode -> EncodedRequest -> engine.prefill
        (LoopState, cut by Pruner at the stages KeepPolicy names, scored by Scorer
         from a LayerView) -> PrefillState -> Decoder.generate -> tokens -> Metric

Stages: `layer = K >= 0` scores from decoder layer K's attention and layers K+1..
see only the kept tokens (docs/ARCHITECTURE.md, "Stages"). `layer = PRE_LLM = -1` cuts the
visual tokens after the vision tower and projector, before decoder layer 0, so
every LLM layer sees only the kept tokens. -1 reads as "the layer before layer 0",
keeps `layer` a plain int in every config, sorts before every decoder layer in a
schedule, and keeps `layer_counts` / `prune_layers` records numeric.

Every tensor keeps its leading batch dimension. A request may carry LEFT pads
(EncodedRequest.attention_mask -> LoopState.key_mask -> PrefillState.key_masks).
Scorers, policies and pruners see one request at a time; batching.prefill_batch runs
several requests through the decoder layers together, each cut on its own.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Protocol, Sequence

import torch
from PIL import Image

# The cut point before the LLM (see the module docstring).
PRE_LLM = -1
STAGE_PRE_LLM = "pre_llm"      # layer == PRE_LLM
STAGE_LLM = "llm"              # layer >= 0

# Which prompt tokens are the instruction a scorer reads (rater candidates, text pivots,
# text embeddings): Scorer.instruction_tokens, EncodedRequest.instruction(rule).
USER_TURN = "user_turn"                  # the user's text, wherever it stands around the images
AFTER_FIRST_IMAGE = "after_first_image"  # official SparseVLM: every non-image token after the first image
INSTRUCTION_RULES = (USER_TURN, AFTER_FIRST_IMAGE)


def stage_of(layer: int) -> str:
    """"pre_llm" for layer == PRE_LLM, "llm" for a decoder layer >= 0."""
    return STAGE_PRE_LLM if layer == PRE_LLM else STAGE_LLM


# --------------------------------------------------------------------------------------
# Data: what a dataset yields and how it is scored
# --------------------------------------------------------------------------------------
# A box in pixel coordinates of the sample's image: (x0, y0, x1, y1), x1/y1 exclusive.
Box = tuple[int, int, int, int]


@dataclass
class Video:
    """One clip, already decoded and sampled (data/video.py): the frames a model sees.

    frames: uint8 array [T, H, W, 3] (RGB), T >= 1, in time order.
    timestamps: [T] seconds of each frame from the start of the source video (Qwen3-VL
    writes them into the prompt; Qwen2.5-VL derives its temporal position step from them).
    """

    frames: Any
    timestamps: list[float]
    # Frames per second of the sampled frames as transformers' VideoMetadata.sampled_fps
    # defines it: sampled count / source frame count * source fps. Qwen2.5-VL's temporal
    # position step is temporal_patch_size / fps seconds (second_per_grid_ts).
    fps: float
    source: str = ""                   # file or directory it came from (for messages)


@dataclass
class Sample:
    id: str
    question: str                      # the full user text, prompt suffix included
    images: list[Image.Image]          # zero, one or several images, in prompt order
    answers: list[str]                 # reference answers (VQA: the 10 human answers)
    # Boxes of the image regions the answer depends on, per image (shapes dataset);
    # None where the dataset has no evidence annotation.
    evidence: list[list[Box]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)   # question type, category, ...
    # Video clips, shown BEFORE the images in the prompt (a clip counts as one "image"
    # wherever images are counted: coords, per-image keep allocation, pictures).
    videos: list[Video] = field(default_factory=list)


# A Sample.meta key: this sample's own generation length (an int), which the runner's
# decoder then uses instead of decoder.max_new_tokens (dataset=lmms_eval sets it from the
# task's generation_kwargs.max_new_tokens, so each task generates what lmms-eval would).
MAX_NEW_TOKENS = "max_new_tokens"


class Metric(Protocol):
    name: str

    def score(self, prediction: str, sample: Sample) -> float:
        """Per-sample score in [0, 1] (written to samples.jsonl)."""

    def summarize(self, records: Sequence[dict]) -> dict[str, float]:
        """Dataset-level numbers from the per-sample records (each has 'prediction',
        'answers', 'score', 'meta'). Must contain 'accuracy' (POPE adds F1, MME its score...)."""


class VQADataset(Protocol):
    """Indexable, and cheap to construct: images are decoded in __getitem__, so a
    corrupt image fails that one sample (recorded, the run goes on) and resuming
    skips finished samples by index without decoding them."""

    metric: Metric

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...

    def __iter__(self) -> Iterator[Sample]: ...


# --------------------------------------------------------------------------------------
# What a family adapter hands to the engine
# --------------------------------------------------------------------------------------
@dataclass
class EncodedRequest:
    """One request, encoded by a family adapter and ready for the LLM."""

    input_ids: torch.LongTensor            # [B, L]
    model_inputs: dict[str, Any]           # processor output (pixel values, grids, ...)
    visual_index: torch.LongTensor         # [B, N] sequence indices of visual tokens (sorted)
    # [B, N, 4]: (image number, row, column, frame) of each visual token in its image's
    # token grid (after the 2x2 merge for Qwen); a video clip is one "image" whose
    # tokens also carry their frame (temporal token index, 0 for a still image) - for
    # per-image allocation, uniform sampling, evidence recall and pictures.
    visual_coords: torch.LongTensor
    image_grids: list[tuple[int, int]]     # (rows, columns) of each image's (or clip frame's) token grid
    # [B, T] the user's instruction tokens, wherever they stand in the user turn (before,
    # between or after images); no system prompt, chat-template or vision markers
    # (FamilyAdapter.instruction_indices). Rater candidates by default.
    text_index: torch.LongTensor
    # [B, T'] every non-image token after the first image (SparseVLM's official H_t, which
    # includes the template's "\n" and " ASSISTANT:"); None: same as text_index.
    after_image_index: torch.LongTensor | None = None
    # [B, L] 1 for a real token, 0 for a LEFT pad (one row of a processor-padded batch);
    # None = no padding. Pads are never visual, never raters, never scored, never kept,
    # and no real token attends to them (issue 15 item 1).
    attention_mask: torch.LongTensor | None = None

    def instruction(self, rule: str) -> torch.LongTensor:
        """The instruction tokens under `rule` (Scorer.instruction_tokens): [B, T]."""
        if rule == AFTER_FIRST_IMAGE and self.after_image_index is not None:
            return self.after_image_index
        return self.text_index

    def key_mask(self, device=None) -> torch.BoolTensor:
        """[B, L] True for real tokens (all True without an attention_mask)."""
        if self.attention_mask is None:
            return torch.ones(self.input_ids.shape, dtype=torch.bool, device=device)
        return self.attention_mask.to(device=device).bool()


@dataclass
class RopeSpec:
    """Enough of the rotary embedding to recompute RoPE-only logits (v2's correction)."""

    inv_freq: torch.Tensor                 # [d/2]
    # M-RoPE: how many of the d/2 frequencies use the t, h, w position (Qwen: e.g. [16, 24, 24]);
    # None for plain 1-D RoPE.
    mrope_section: list[int] | None
    head_dim: int
    # How the sections lie across the d/2 frequencies. False (Qwen2-VL, Qwen2.5-VL):
    # blocked, the first mrope_section[0] frequencies read t, the next ones h, then w.
    # True (Qwen3-VL's interleaved M-RoPE): frequency k reads h if k % 3 == 1 and
    # k < 3 * mrope_section[1], w if k % 3 == 2 and k < 3 * mrope_section[2], t otherwise
    # (transformers' Qwen3VLTextRotaryEmbedding.recomposition_frequencies).
    mrope_interleaved: bool = False


@dataclass
class LayerView:
    """What a scorer and a keep policy may look at, at one cut point. Tensors only.

    Indices are into the CURRENT sequence at this stage (earlier cuts may already
    have shortened it); the pruner maps them back to the original sequence.

    In-LLM stage (layer >= 0): q/k/query_index are set when the scorer asked for
    query rows. Pre-LLM stage (layer == PRE_LLM): q/k are None; `visual_features`
    and `text_embeds` are set, and `vision_attention` where the family exposes it.
    """

    layer: int
    n_visual: int                          # visual tokens BEFORE any cut (what `keep` fractions refer to)
    visual_index: torch.LongTensor         # [B, N_cur] alive visual tokens in the current sequence
    visual_coords: torch.LongTensor        # [B, N_cur, 4] (image, row, col, frame) of those tokens
    positions: torch.LongTensor            # [P, B, L_cur] ORIGINAL rotary positions (P=3 for M-RoPE, 1 for 1-D)
    rope: RopeSpec
    generator: torch.Generator             # seeded, for random baselines
    # [B, L_cur] True for real tokens, False for LEFT pads (never visual, never raters);
    # an attention scorer passes it to kernels.text_visual_attention so that a row's
    # softmax runs over real keys only, as the model's own attention does. None = no pads.
    key_mask: torch.BoolTensor | None = None
    # ---- in-LLM stage, when the scorer asked for query rows ---------------------------
    q: torch.Tensor | None = None                 # [B, Hq, T, d] post-rotary queries of the query rows
    k: torch.Tensor | None = None                 # [B, Hkv, L_cur, d] post-rotary keys of this layer
    query_index: torch.LongTensor | None = None   # [B, T] positions of the query rows in the current sequence
    # ---- pre-LLM stage only ----------------------------------------------------------
    visual_features: torch.Tensor | None = None   # [B, N, D] projected vision features (LLM width)
    text_embeds: torch.Tensor | None = None       # [B, T_all, D] embeddings of the instruction tokens
    # [B, N] attention each visual token RECEIVES in the family's named vision block
    # (heads averaged; see the adapter's `vision_attention`), None where not exposed.
    vision_attention: torch.Tensor | None = None
    # ---- in-LLM stage, when the scorer sets reads_hidden -------------------------------
    # [B, L_cur, D] the cut layer's OUTPUT hidden states passed through the model's final
    # norm (DART's "last_layer_state": what the next layer would see, normalised).
    hidden: torch.Tensor | None = None
    # What the keep policy asked the scorer to hand over (KeepPolicy.needs), filled
    # by the scorer so that the policy never recomputes it, e.g.
    # "rater_attention": [B, T, N] head-averaged rater->visual attention probabilities.
    # A merging selector may put "kept_features": [B, n, D] new features for the kept
    # tokens (in the order its select returns them); the engine writes them in place
    # after the cut.
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    wants: tuple[str, ...] = ()

    def subset(self, local: torch.LongTensor) -> "LayerView":
        """The view of the alive visual tokens `local` [N_j] (indices into them, ascending)
        only - one image's tokens when a selecting scorer runs per image. The per-visual-
        token fields (visual_index, visual_coords, visual_features, vision_attention) are
        cut to those tokens; the sequence-level ones (positions, q, k, query_index, hidden,
        text_embeds) stay, since their indices are into the current sequence; `outputs`
        starts empty, so a scorer's cached [N, N] matrices never leak into a subset."""
        def cut(t):
            return None if t is None else t[:, local]
        return replace(self, visual_index=cut(self.visual_index), visual_coords=cut(self.visual_coords),
                       visual_features=cut(self.visual_features), vision_attention=cut(self.vision_attention),
                       outputs={})


@dataclass
class PruneEvent:
    layer: int
    kept_index: torch.LongTensor           # [B, n_kept] ORIGINAL sequence indices of kept visual tokens (sorted)
    scores: torch.Tensor                   # [B, N_cur] scores of the visual tokens alive before this cut
    scored_index: torch.LongTensor         # [B, N_cur] original indices of those tokens
    n_recycled: int = 0                    # merged tokens appended after the kept ones (recycle pruner)


@dataclass
class LayerPositions:
    """Per-layer rotary positions of the next generated token, for when the decoder
    layers do not agree (renumbered positions, the official SparseVLM v1/v1.5 rule:
    each layer decodes at its own cache length; pruners.POSITIONS).

    Few distinct values (one per stretch of layers between cuts), so decoding
    computes cos/sin once per distinct value, not once per layer.
    """

    next: torch.LongTensor                 # [G, B] the distinct next positions
    layer_group: tuple[int, ...]           # [n_layers] the row of `next` each decoder layer uses

    def __add__(self, steps: int) -> "LayerPositions":
        """The positions `steps` tokens later (every layer's cache grows by one per token)."""
        return LayerPositions(next=self.next + steps, layer_group=self.layer_group)

    def at_layer(self, i: int) -> torch.LongTensor:
        """[B] next position at decoder layer i."""
        return self.next[self.layer_group[i]]


@dataclass
class PrefillState:
    """The result of a sparsified prefill, ready for decoding."""

    cache: Any                             # transformers DynamicCache (ragged: shorter after a cut)
    next_logits: torch.Tensor              # [B, V] logits for the first generated token
    next_position: torch.LongTensor        # [B] rotary position of the first generated token (at the last layer)
    n_visual: int                          # visual tokens before pruning
    layer_counts: list[int]                # visual tokens alive after each decoder layer (input to the next)
    seq_lens: list[int]                    # REAL tokens each layer processed during prefill, left pads not counted (for FLOPs)
    events: list[PruneEvent] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    # Set only when layers decode at different positions (renumbered positions after a
    # cut); None: every layer decodes at next_position.
    layer_positions: LayerPositions | None = None

    def decode_position(self) -> "torch.LongTensor | LayerPositions":
        """What engine.decode_step takes for the first generated token: [B] for every
        layer, or the per-layer LayerPositions. Add 1 per generated token."""
        return self.layer_positions if self.layer_positions is not None else self.next_position.clone()
    # Per decoder layer, [B, L_i] True for the real keys of that layer's cache (L_i = its
    # own length after the cuts); decode_step appends a True column per generated token.
    # None when the prompt has no padding (every key is real: no mask is built at all).
    key_masks: list[torch.BoolTensor] | None = None
    # A batched prefill (batching.prefill_batch): per request n_visual, layer_counts and
    # events (batching.RowPrefill); None for a batch-1 prefill.
    rows: list[Any] | None = None


@dataclass
class LoopState:
    """The running state of the prefill, which pruners cut.

    Every per-token tensor is aligned with the current sequence; a pruner cuts all of
    them with the same indices. `planes` holds a family's extra per-token tensors
    (e.g. Qwen3-VL's DeepStack features, [B, L_cur, D] each), which `after_layer`
    reads; pruners cut them like `hidden` (cut_planes in pruners.py).
    """

    hidden: torch.Tensor                   # [B, L_cur, D]
    positions: torch.LongTensor            # [P, B, L_cur] original rotary positions
    orig_index: torch.LongTensor           # [B, L_cur] original sequence index of each current token
    is_visual: torch.BoolTensor            # [B, L_cur]
    visual_coords: torch.LongTensor        # [B, N_cur, 4] coords of the alive visual tokens, in order
    cache: Any                             # transformers DynamicCache
    # [B, L_cur] True for tokens a recycling pruner inserted (merged deleted tokens);
    # None until one does. They are visual tokens (is_visual) with a repeated orig_index.
    is_recycled: torch.BoolTensor | None = None
    planes: dict[str, torch.Tensor] = field(default_factory=dict)   # name -> [B, L_cur, ...]
    # [B, L_cur] True for real tokens, False for left pads (EncodedRequest.attention_mask);
    # cut with the same indices as `hidden`. None = no pads (hand-built states in tests).
    key_mask: torch.BoolTensor | None = None
    # The key mask each decoder layer's cache was written with ([B, L_i], appended by the
    # engine after layer i runs); a pruner that rewrites caches (kv_only) cuts them too.
    layer_key_masks: list[torch.BoolTensor] = field(default_factory=list)

    @property
    def visual_index(self) -> torch.LongTensor:
        # [B, N_cur]; batch 1, so every row has the same count
        return self.is_visual.nonzero()[:, 1].view(self.is_visual.shape[0], -1)


# --------------------------------------------------------------------------------------
# The plug-in parts (Hydra `_target_`s): one class + one yaml each
# --------------------------------------------------------------------------------------
class Scorer(ABC):
    """One score per alive visual token; higher = keep.

    A scorer sees tensors (a LayerView), never a model class. Attention-based
    scorers ask for query rows once, from the input embeddings; the engine then hands
    them the post-rotary queries of exactly those rows and the layer's keys, and they
    call `kernels.text_visual_attention` - never an L x L attention map.

    `stages`: where the scorer can run (STAGE_LLM, STAGE_PRE_LLM); a config that
    asks for another stage is refused before any weights load (engine.check_parts).
    `provides`: what it can hand a keep policy through `view.outputs` (KeepPolicy.needs).
    """

    stages: tuple[str, ...] = (STAGE_LLM,)
    provides: tuple[str, ...] = ()
    # True: the engine fills view.vision_attention at the pre-LLM stage (it costs a
    # recomputation of one vision block's attention, so only scorers that read it ask).
    reads_vision_attention: bool = False
    # True: the engine fills view.hidden at an in-LLM cut (the final norm of the layer output).
    reads_hidden: bool = False
    # True: at a cut after layer K the view's q/k are those layer K+1 WOULD compute from
    # layer K's output (its input norm and q/k projections), so the drop happens before
    # layer K+1 with that layer's own ranking (PyramidDrop's rank_layer = layer + 1).
    reads_next_layer: bool = False
    # True: the method's selection is not a top-k of a per-token score (DART's pivot
    # neighbourhoods, DivPrune's max-min diversity, a DPP): the engine asks the policy
    # only HOW MANY to keep (n_keep) and calls `select(scores, view, n)` instead of
    # policy.select - once per image with that image's share under the policy's
    # `allocation: per_image` (view.subset of its tokens), once over all of them under
    # `global`. `scores` are still recorded in the PruneEvent.
    selects: bool = False
    # Which tokens the engine hands over as the instruction (query_rows' text_index, the
    # pre-LLM view's text_embeds): USER_TURN or AFTER_FIRST_IMAGE (EncodedRequest.instruction).
    instruction_tokens: str = USER_TURN

    def select(self, scores: torch.Tensor, view: LayerView, n: int) -> torch.LongTensor:
        """[B, n] distinct indices in 0..N-1 into the view's alive visual tokens (any
        order; the engine sorts them and raises RuntimeError on a repeat, which would keep
        fewer tokens than every count reports, or on an index out of range). Only called
        when `selects` is True, and only with 0 < n < N. Under per-image allocation `view` is a subset (LayerView.subset: one image's tokens, empty
        `outputs`) and `scores` [B, N_j] its columns, so a select that reuses what
        __call__ cached in view.outputs must recompute it when it is absent."""
        raise NotImplementedError(f"{type(self).__name__} sets selects=True but does not implement select")

    def query_rows(self, embeds: torch.Tensor, visual_index: torch.LongTensor,
                   text_index: torch.LongTensor) -> torch.LongTensor:
        """[B, T] sequence indices of the rows whose attention this scorer reads.

        embeds [B, L, D] are the input embeddings (images spliced in); visual_index
        [B, N]; text_index [B, T_all] the instruction tokens (`instruction_tokens` rule).
        Default: no rows (scorers that do not read attention).
        """
        return torch.zeros(embeds.shape[0], 0, dtype=torch.long, device=embeds.device)

    @abstractmethod
    def __call__(self, view: LayerView) -> torch.Tensor:
        """[B, N_cur] scores of the alive visual tokens; higher = keep."""


class KeepPolicy(ABC):
    """Where the cuts happen, how many visual tokens survive, and which ones.

    `select` is the whole selection: the default is the top-k of the scores with
    k = n_keep; a non-top-k selector (duplication-aware, max-min diversity, a DPP)
    overrides `select` and nothing else. `needs` names what the scorer must hand
    over through `view.outputs` (checked against Scorer.provides before weights load).
    """

    needs: tuple[str, ...] = ()

    @abstractmethod
    def layers(self, n_layers: int) -> list[int]:
        """The cut points in increasing order: decoder layers, or PRE_LLM (-1) first."""

    @abstractmethod
    def n_keep(self, layer: int, *, n_visual: int, scores: torch.Tensor, view) -> int:
        """Visual tokens to keep after `layer` (n_visual = the count before any pruning)."""

    def check(self, n_layers: int) -> None:
        """Raise ConfigError if the policy cannot run on a model with n_layers layers."""

    # "per_image": the n_keep tokens are split over the images in proportion to their
    # alive visual tokens (largest remainders, summing exactly to n_keep) and each image
    # keeps its own top-k, as "fraction of each image's visual tokens" promises;
    # "global": one top-k over all images together (one image may take every slot).
    allocation: str = "per_image"

    def select(self, scores: torch.Tensor, view: LayerView) -> torch.LongTensor:
        """[B, n] indices into the alive visual tokens (0..N_cur-1), ascending.
        Default: the n_keep highest scores (ties as torch.topk breaks them), per image
        or over all images together as `allocation` says."""
        n = min(self.n_keep(view.layer, n_visual=view.n_visual, scores=scores, view=view), scores.shape[1])
        if self.allocation == "per_image" and view.visual_coords is not None:
            return per_image_top_k(scores, view.visual_coords[0, :, 0], n)
        return scores.topk(n, dim=1).indices.sort(dim=1).values


def take_tokens(x: torch.Tensor, index: torch.LongTensor) -> torch.Tensor:
    """x [B, L, ...] at the sequence positions index [B, n] of each row: [B, n, ...], the
    same values as x.gather(1, index expanded to x's trailing dims).

    Why not that gather: it reads the expanded index once per ELEMENT, ~20x slower on a
    CPU than index_select (batch 1: 0.48 ms vs 0.02 ms for 292 of 1,060 rows of width 512,
    one core), and the pre-LLM cut takes three such slices of the hidden states. Batches
    use advanced indexing (one kernel, ~4x faster than the gather)."""
    if x.shape[0] == 1:
        return x.index_select(1, index[0])
    return x[torch.arange(x.shape[0], device=x.device)[:, None], index]


def split_by_share(counts: list[int], total: int) -> list[int]:
    """`total` slots split over groups in proportion to `counts` (Hamilton's largest
    remainders: floors first, then one more slot to the largest fractional parts, ties
    to the earlier group). Sums exactly to min(total, sum(counts)); no group gets more
    than its count. E.g. counts [256, 64], total 80 -> [64, 16]; [3, 3, 3], 4 -> [2, 1, 1]."""
    pool = sum(counts)
    total = min(total, pool)
    if pool == 0:
        return [0] * len(counts)
    quotas = [total * c / pool for c in counts]
    shares = [int(q) for q in quotas]
    by_remainder = sorted(range(len(counts)), key=lambda j: (-(quotas[j] - shares[j]), j))
    for j in by_remainder[: total - sum(shares)]:
        shares[j] += 1
    return shares


def image_shares(image: torch.LongTensor, n: int) -> list[tuple[torch.LongTensor, int]]:
    """Per image, in image-number order: (members [N_j] ascending indices of its alive
    visual tokens, k_j its share of the n kept slots). image: [N] the image number of
    each alive visual token (visual_coords[0, :, 0]). The shares come from
    split_by_share over the images' token counts, so they sum exactly to min(n, N)."""
    members = [(image == j).nonzero().view(-1) for j in image.unique(sorted=True).tolist()]
    return list(zip(members, split_by_share([int(m.numel()) for m in members], n)))


def per_image_top_k(scores: torch.Tensor, image: torch.LongTensor, n: int) -> torch.LongTensor:
    """[1, n] ascending indices: each image's own top-k of `scores` [1, N], with the n
    slots split over images by their token counts (image_shares). image: [N] the
    image number of each alive visual token (visual_coords[..., 0])."""
    if image.unique().numel() <= 1:        # one image: exactly the plain top-k
        return scores.topk(n, dim=1).indices.sort(dim=1).values
    kept = [m[scores[:, m].topk(k, dim=1).indices[0]] for m, k in image_shares(image, n) if k > 0]
    return torch.cat(kept).sort().values.view(1, -1)


class Pruner(ABC):
    @abstractmethod
    def cut(self, state: LoopState, keep_local: torch.LongTensor, scores: torch.Tensor,
            view: LayerView) -> PruneEvent:
        """Keep the visual tokens keep_local [B, n] (indices into the alive ones) at view.layer.
        Every per-token field of `state` (planes included) is cut with the same indices."""

    def finish(self, state: LoopState) -> None:
        """Called once after the last layer of the prefill."""

    def check_positions(self, position_dims: int) -> None:
        """Raise ConfigError (one line) if this pruner's position rule cannot run on a
        family with position_dims rotary rows (3 = M-RoPE, 1 = 1-D RoPE). Cheap:
        called before any weights load. Default: every family is fine."""


class Decoder(ABC):
    @abstractmethod
    def generate(self, adapter, state: PrefillState) -> torch.LongTensor:
        """Generated tokens [B, n] from a prefilled state; `adapter.decode_step` runs the model."""
