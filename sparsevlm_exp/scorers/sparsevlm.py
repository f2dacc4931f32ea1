"""SparseVLM's scorers: v1.5 (text raters) and v2.0 ("SparseVLM+": RoPE gravity
correction and priority heads). Facts in DESIGN.md section 6."""
from __future__ import annotations

import math

import torch

from ..errors import bad_value
from ..kernels import text_visual_attention
from ..contracts import INSTRUCTION_RULES, USER_TURN, LayerView, RopeSpec, Scorer


def select_raters(embeds: torch.Tensor, visual_index: torch.LongTensor,
                  text_index: torch.LongTensor) -> torch.LongTensor:
    """SparseVLM's text raters, chosen once from the input embeddings.

    r_j = mean over visual tokens v of softmax_j(H_v . H_t^T) (no 1/sqrt(d), as the
    official code); text token j rates the image if r_j > mean(r). Returns [B, T_r]
    sequence indices (batch 1: a ragged count per sample is not padded).
    """
    if text_index.shape[1] == 0:
        return text_index
    dim = embeds.shape[-1]
    hv = embeds.gather(1, visual_index.unsqueeze(-1).expand(-1, -1, dim)).float()   # [B, N, D]
    ht = embeds.gather(1, text_index.unsqueeze(-1).expand(-1, -1, dim)).float()     # [B, T, D]
    relevance = torch.softmax(hv @ ht.transpose(1, 2), dim=-1).mean(dim=1)          # [B, T]
    is_rater = relevance > relevance.mean(dim=-1, keepdim=True)
    if not bool(is_rater.any()):      # all equal (e.g. a one-token question): everyone rates
        return text_index
    return text_index[is_rater].view(text_index.shape[0], -1)


def checked_instruction_tokens(value) -> str:
    """`scorer.instruction_tokens`, or ConfigError naming the allowed rules."""
    if value not in INSTRUCTION_RULES:
        raise bad_value("scorer.instruction_tokens", value, " or ".join(INSTRUCTION_RULES))
    return value


def rater_visual_attention(view: LayerView) -> torch.Tensor:
    """P [B, T, N] fp32: post-softmax causal attention of each query row (SparseVLM's
    raters) on each alive visual token, averaged over heads - the matrix whose rank
    v1 reads. Same math as kernels.text_visual_attention_ref, but without the mean
    over rows (rank needs the rows); T is a few dozen, so [B, Hq, T, L] is small."""
    q, k = view.q.float(), view.k.float()                                          # [B, Hq, T, d], [B, Hkv, L, d]
    B, Hq, T, d = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    logits = torch.einsum("bkgtd,bkld->bkgtl", q.reshape(B, Hkv, Hq // Hkv, T, d), k).reshape(B, Hq, T, L)
    visible = torch.arange(L, device=q.device)[None, None, :] <= view.query_index[:, :, None]   # [B, T, L]
    if view.key_mask is not None:                                                  # pads are never attended to
        visible = visible & view.key_mask[:, None, :]
    probs = torch.softmax((logits / math.sqrt(d)).masked_fill(~visible[:, None], float("-inf")), dim=-1)
    probs = probs.mean(dim=1)                                                      # [B, T, L]
    return probs.gather(2, view.visual_index[:, None, :].expand(B, T, -1))         # [B, T, N]


class V15Scorer(Scorer):
    """Score = rater->visual attention probability, averaged over heads and raters.

    When the keep policy wants the per-rater matrix (v1's rank-adaptive count), it is
    computed once here and both the scores and view.outputs["rater_attention"] come
    from it; otherwise the fused kernel averages over raters on the fly."""

    provides = ("rater_attention",)

    def __init__(self, instruction_tokens: str = USER_TURN):
        # rater candidates: user_turn (the user's text wherever it stands) or
        # after_first_image (the official rule); conf/scorer/v15.yaml
        self.instruction_tokens = checked_instruction_tokens(instruction_tokens)

    def query_rows(self, embeds, visual_index, text_index):
        return select_raters(embeds, visual_index, text_index)

    def __call__(self, view: LayerView) -> torch.Tensor:
        if "rater_attention" in view.wants:
            P = rater_visual_attention(view)                                       # [B, T, N]
            view.outputs["rater_attention"] = P
            return P.mean(dim=1)
        attn = text_visual_attention(view.q, view.k, view.query_index, view.visual_index,
                                     key_mask=view.key_mask)  # [B, Hq, N]
        return attn.mean(dim=1)


def frequency_axes(rope: RopeSpec, n_freq: int) -> torch.LongTensor:
    """[n_freq] which position row (0 = t, 1 = h, 2 = w) each rotary frequency reads:
    all 0 for 1-D RoPE, consecutive blocks of mrope_section for Qwen2(.5)-VL, the
    interleaved t/h/w pattern for Qwen3-VL (RopeSpec.mrope_interleaved)."""
    if not rope.mrope_section:
        return torch.zeros(n_freq, dtype=torch.long)
    sections = rope.mrope_section
    if not rope.mrope_interleaved:
        return torch.repeat_interleave(torch.arange(len(sections)), torch.tensor(sections))
    k = torch.arange(n_freq)
    axes = torch.zeros(n_freq, dtype=torch.long)
    axes[(k % 3 == 1) & (k < 3 * sections[1])] = 1
    axes[(k % 3 == 2) & (k < 3 * sections[2])] = 2
    return axes


def rope_gravity(rope: RopeSpec, q_pos: torch.LongTensor, k_pos: torch.LongTensor) -> torch.Tensor:
    """RoPE-only attention logits R = (2/sqrt(d)) * sum_k cos((p_i - p_j) theta_k)
    (the logit q.k of q = k = ones after rotation, scaled as attention scales it).

    q_pos [P, B, T], k_pos [P, B, N] rotary positions (P = 3 for M-RoPE, where
    frequency k uses the t, h or w position of its section; 1 for 1-D RoPE).
    Returns [B, T, N] float32. Loops over the d/2 frequencies so that memory stays
    O(B*T*N) instead of O(B*T*N*d).
    """
    inv_freq = rope.inv_freq.float()
    component = frequency_axes(rope, inv_freq.numel()) % q_pos.shape[0]            # [d/2]
    out = torch.zeros(q_pos.shape[1], q_pos.shape[2], k_pos.shape[2], device=q_pos.device)
    deltas = (q_pos.unsqueeze(-1) - k_pos.unsqueeze(-2)).float()                     # [P, B, T, N]
    for k, theta in enumerate(inv_freq.tolist()):
        out += torch.cos(deltas[int(component[k])] * theta)
    return out * (2.0 / math.sqrt(rope.head_dim))


class V2Scorer(Scorer):
    """v1.5 + gravity correction (attention divided by the RoPE-only logits, so
    distant visual tokens are not penalised for being far from the text) + priority
    heads (only the heads that look at the image most are averaged).

    gravity_guard: the official correction divides by R, which turns negative beyond
    ~1707 tokens of distance (d=128, base 1e4) and flips the sign of the score there.
    With the guard, R is clamped to >= gravity_floor (default 1.0, the value R decays
    to around 1,000-1,500 tokens for d=128), so no probability is amplified by more
    than 1/gravity_floor. gravity_guard=false reproduces the official formula.

    Priority heads: head_count (an int) OR head_fraction (of the layer's query heads),
    never both. The official v2.0 code keeps a hard-coded 14 heads, written for
    LLaVA-1.5-7B's 32 heads (so 14/32, not half); the v2 preset sets head_count=14 with
    reference_heads=32, which is exactly 14 on 32 heads and scales on other models
    (see n_priority_heads).
    """

    provides = ("rater_attention",)   # the UNcorrected matrix, as v1's rank reads it

    def __init__(self, gravity: bool = True, gravity_guard: bool = True, gravity_floor: float = 1.0,
                 head_fraction: float | None = 0.5, head_count: int | None = None,
                 reference_heads: int | None = None, instruction_tokens: str = USER_TURN):
        self.instruction_tokens = checked_instruction_tokens(instruction_tokens)
        if head_count is not None and head_fraction is not None:
            # Two answers to one question: refuse rather than guess which one the user meant.
            raise bad_value("scorer.head_count", head_count,
                            f"null while scorer.head_fraction={head_fraction} is set: give one of the two "
                            "(e.g. scorer.head_fraction=null scorer.head_count=14)")
        if head_count is None and head_fraction is None:
            raise bad_value("scorer.head_fraction", head_fraction,
                            "a float in (0, 1] when scorer.head_count is null (one of the two must be set)")
        if head_fraction is not None and (isinstance(head_fraction, bool) or not 0 < head_fraction <= 1):
            raise bad_value("scorer.head_fraction", head_fraction, "a float in (0, 1]")
        if head_count is not None and (isinstance(head_count, bool) or not isinstance(head_count, int)
                                       or head_count < 1):
            raise bad_value("scorer.head_count", head_count, "an int >= 1 (at most the model's attention heads)")
        if reference_heads is not None:
            if isinstance(reference_heads, bool) or not isinstance(reference_heads, int) or reference_heads < 1:
                raise bad_value("scorer.reference_heads", reference_heads, "null or an int >= 1")
            if head_count is None or head_count > reference_heads:
                raise bad_value("scorer.reference_heads", reference_heads,
                                f"null, or an int >= scorer.head_count (head_count={head_count}) when "
                                "head_count is given out of reference_heads heads")
        self.gravity, self.gravity_guard, self.gravity_floor = gravity, gravity_guard, gravity_floor
        self.head_fraction, self.head_count, self.reference_heads = head_fraction, head_count, reference_heads

    def n_priority_heads(self, n_heads: int) -> int:
        """Heads averaged out of the layer's n_heads query heads:
        - head_count with reference_heads: "head_count of reference_heads", scaled to the
          model: max(1, floor(head_count * n_heads / reference_heads + 1/2)); exact (14) on
          32 heads with the v2 preset's 14/32, 2 on the embedded model's 4 heads;
        - head_count alone: exactly head_count (ConfigError if the model has fewer heads);
        - head_fraction: max(1, ceil(head_fraction * n_heads)).
        """
        if self.head_count is not None and self.reference_heads is not None:
            return max(1, math.floor(self.head_count * n_heads / self.reference_heads + 0.5))   # half up
        if self.head_count is not None:
            if self.head_count > n_heads:
                raise bad_value("scorer.head_count", self.head_count,
                                f"an int in [1, {n_heads}] (the model has {n_heads} attention heads)")
            return self.head_count
        return max(1, math.ceil(self.head_fraction * n_heads))

    def check_heads(self, n_heads: int) -> None:
        """Raise ConfigError now (before any weights load) if head_count exceeds the
        model's n_heads query heads."""
        self.n_priority_heads(n_heads)

    def query_rows(self, embeds, visual_index, text_index):
        return select_raters(embeds, visual_index, text_index)

    def correction(self, view: LayerView):
        if not self.gravity:
            return None

        def divide_by(query_index, visual_index):                                    # -> [B, T, N]
            P = view.positions.shape[0]
            q_pos = view.positions.gather(2, query_index.unsqueeze(0).expand(P, -1, -1))
            k_pos = view.positions.gather(2, visual_index.unsqueeze(0).expand(P, -1, -1))
            r = rope_gravity(view.rope, q_pos, k_pos)
            return r.clamp(min=self.gravity_floor) if self.gravity_guard else r

        return divide_by

    def __call__(self, view: LayerView) -> torch.Tensor:
        if "rater_attention" in view.wants:
            view.outputs["rater_attention"] = rater_visual_attention(view)            # [B, T, N]
        attn = text_visual_attention(view.q, view.k, view.query_index, view.visual_index,
                                     correction=self.correction(view), key_mask=view.key_mask)   # [B, Hq, N]
        return priority_head_mean(attn, self.n_priority_heads(attn.shape[1]))


def priority_head_mean(attn: torch.Tensor, n_heads: int) -> torch.Tensor:
    """v2.0's priority heads: attn [B, H, N] (per head, rater->visual attention) ->
    [B, N], the mean over the n_heads heads with the largest total mass on the
    visual tokens (sum over N); the other heads are ignored."""
    head_mass = attn.sum(dim=-1)                                                      # [B, H]
    top = head_mass.topk(n_heads, dim=1).indices                                      # [B, n_heads]
    return attn.gather(1, top.unsqueeze(-1).expand(-1, -1, attn.shape[-1])).mean(dim=1)
