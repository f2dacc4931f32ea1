"""VisPruner (Zhang et al., ICCV 2025, "Beyond Text-Visual Attention: Exploiting Visual
Cues for Effective Token Pruning in VLMs"; official code Theia-4869/VisPruner): before
the LLM, keep
  important tokens - the top `important_ratio` of the budget by the vision encoder's
                     attention ([CLS] attention for CLIP/LLaVA), and
  diverse tokens   - from the rest (ranked by attention), by similarity-based
                     de-duplication: split the remaining tokens alternately into A (even
                     places) and B (odd places), drop the 8 tokens of A most similar
                     (cosine, max over B) to B, and repeat until the budget is left.
Official defaults: important_ratio 0.5, 8 tokens dropped per round, the important count
truncated (int(n * ratio)).

Substitutes (recorded in the config): the attention signal is the family's
`vision_attention` hook (Qwen has no [CLS]: attention received in the last
full-attention ViT block); similarity uses the projected features (the official code
compares the vision encoder's output features, before the projector).
"""
from __future__ import annotations

import numbers

import numpy as np
import torch

from ..contracts import STAGE_PRE_LLM, LayerView, Scorer
from .similarity import compiled, cosine_matrix


def deduplicate(features: torch.Tensor, ranked: torch.LongTensor, n: int, step: int = 8) -> torch.LongTensor:
    """n of the rows `ranked` [R] of features [N, D] (R in the official order: by vision
    attention, highest first), by repeated bipartite de-duplication:
      A = rest[0::2], B = rest[1::2]; s_a = max cosine of a to B;
      drop the r = min(step, |rest| - n) members of A with the highest s_a;
      rest = (A's survivors by s_a descending, ties in A's order) + B; repeat until |rest| = n.
    Returns the surviving rows (in `rest` order).

    The cosine matrix [R, R] is computed once (similarity.cosine_matrix); the rounds only
    read it. On a CPU they run compiled with nearest-neighbour lists (_rounds_host, the
    same s_a exactly), elsewhere as device ops (_rounds_device, also the plain reference).
    Raises ValueError for step < 1 (no round would shrink `rest`: the compiled rounds would
    loop forever, deaf to Ctrl-C, or grow `rest` without bound)."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 1:
        raise ValueError(f"step={step!r} is not allowed: an int >= 1 (tokens dropped per round)")
    if n <= 0:
        return ranked[:0]
    # = features[ranked]; index_select is ~4x faster than advanced indexing on a CPU
    rows = features.detach().index_select(0, ranked.to(features.device))
    unit = torch.nn.functional.normalize(rows.float(), dim=-1)
    cosine = cosine_matrix(unit)                                                      # [R, R], computed once
    # A NaN or infinite feature makes its unit row, so its own diagonal entry, NaN; NaN cosines
    # compare and sort differently in the compiled rounds and in torch, so such input takes the
    # device rounds. A finite diagonal means finite unit rows, so every cosine is finite.
    host = cosine.device.type == "cpu" and bool(np.isfinite(np.diagonal(cosine.numpy())).all())
    rest = _rounds_host(cosine, n, step) if host else _rounds_device(cosine, n, step)
    return ranked[rest.to(ranked.device)]


def _rounds_device(cosine: torch.Tensor, n: int, step: int) -> torch.LongTensor:
    """The de-duplication rounds written plainly on the [R, R] cosine matrix: each round
    gathers the |A| x |B| block and takes its row maxima. Returns places (rows of cosine)."""
    rest = torch.arange(cosine.shape[0], device=cosine.device)                        # places in `ranked`
    while rest.shape[0] > n:
        a, b = rest[0::2], rest[1::2]
        r = min(step, rest.shape[0] - n, a.shape[0])
        similarity = cosine.index_select(0, a).index_select(1, b).amax(dim=1)          # [|A|]
        survivors = a[similarity.argsort(descending=True, stable=True)[r:]]
        rest = torch.cat([survivors, b])
    return rest


def _rounds_host(cosine: torch.Tensor, n: int, step: int, width: int = 10) -> torch.LongTensor:
    """The same rounds on a CPU, compiled (_rounds_steps, numba), without gathering the
    |A| x |B| blocks (~96 rounds at 1,024 tokens, keep 0.25). cosine [R, R] float32,
    finite; its diagonal is overwritten with -inf (no copy of the matrix).

    Each row's w = min(width, R - 1) largest cosines other than its own are listed once,
    in descending order (torch.topk; the diagonal set to -inf first, which the rounds never
    read: a row of A is never in B). s_a = max over B of cosine[a, b] is then the FIRST
    listed value of row a whose column is in B: every later listed value is not larger (the
    list is sorted) and every unlisted value of the row is not larger than the smallest
    listed one; so which of several equal values is listed, and in which order, does not
    change s_a. Only a row whose list holds no member of B (most rows late on, as the near
    duplicates are the ones dropped) reads its |B| entries of the matrix. s_a is a value
    read from the same matrix either way, so every round ranks, drops and orders exactly
    as _rounds_device does (a stable descending sort in both): no arithmetic, so the
    compiled rounds keep the very tokens the numpy rounds kept before them.
    Speed (896 rows, 96 rounds, AMD EPYC, numba 0.68, torch 2.13 with 2 threads, median of
    60 interleaved calls, 2026-11-30): lists 1.9 ms by torch.topk right after the cosine
    product (2.5 ms for a compiled one-core insertion scan, which torch's OpenMP threads
    leave no second core for), rounds 1.6 ms with the integer-key sort (2.2 ms with numba's
    mergesort argsort; list widths 6-12 are within 0.2 ms of each other), against ~10 ms as
    numpy calls and ~25 ms for _rounds_device. Raises TypeError unless cosine is float32
    (the sort keys are its bits)."""
    if cosine.dtype != torch.float32:
        raise TypeError(f"_rounds_host: cosine must be float32 (the sort keys are its bits), not {cosine.dtype}")
    R = cosine.shape[0]
    # r <= |A| <= R, and no round runs once n >= R: clamped to R as ints, any integral n and
    # step (past int64, numpy uint64) reach numba as int64, as the device rounds take them
    n, step = int(min(n, R)), int(min(step, R))
    w = max(min(width, R - 1), 0)                                                     # R = 0 or 1: empty lists
    listed_value, listed_column = torch.topk(cosine.fill_diagonal_(-float("inf")), w, dim=1)   # [R, w], descending
    return torch.from_numpy(_rounds_steps(cosine.numpy(), listed_value.numpy(), listed_column.numpy(), n, step))


@compiled
def _rounds_steps(matrix, listed_value, listed_column, n, step):
    """The de-duplication rounds on the cosine matrix [R, R] (float32, finite off the
    diagonal, which is never read) with each row's neighbour list (listed_value /
    listed_column [R, w], values descending, the row itself left out): the surviving
    places (int64, `rest` order) once n are left (_rounds_host).

    Each round's stable descending order of s_a is an ascending sort of unique uint64 keys:
    the high 32 bits order s_a descending (its float32 bits mapped to an order-keeping
    uint32, then inverted; -0.0 made +0.0 first, as the float comparison has them equal),
    the low 32 bits are the place in A (ties in A's order). Exactly argsort(-s_a,
    kind="mergesort"), ~1.5x faster on ~440 values (numba's integer sort against its
    mergesort argsort); A and B are copied out contiguously each round."""
    R = matrix.shape[0]
    w = listed_value.shape[1]
    in_b = np.zeros(R, np.bool_)
    rest = np.arange(R)
    similarity = np.empty(R, np.float32)                                               # s_a, [|A|] used
    bits = similarity.view(np.uint32)
    keys = np.empty(R, np.uint64)
    low = np.uint64(0xFFFFFFFF)
    while rest.shape[0] > n:
        m = rest.shape[0]
        n_a = (m + 1) // 2
        a = np.empty(n_a, np.int64)                                                  # rest[0::2]
        b = np.empty(m // 2, np.int64)                                               # rest[1::2]
        for i in range(n_a):
            a[i] = rest[2 * i]
        for i in range(m // 2):
            b[i] = rest[2 * i + 1]
        r = min(step, m - n, n_a)
        for x in b:
            in_b[x] = True
        for i in range(n_a):
            row = a[i]
            listed = False
            for q in range(w):
                if in_b[listed_column[row, q]]:                                       # first listed member of B
                    similarity[i] = listed_value[row, q]
                    listed = True
                    break
            if not listed:                                                            # read B's entries
                entries = matrix[row]
                best = -np.inf
                for x in b:
                    if entries[x] > best:
                        best = entries[x]
                similarity[i] = best
        for x in b:
            in_b[x] = False
        for i in range(n_a):
            if similarity[i] == 0:
                similarity[i] = 0.0                                                   # -0.0 -> +0.0
            u = bits[i]
            ascending = u ^ np.uint32(0xFFFFFFFF) if u & np.uint32(0x80000000) else u | np.uint32(0x80000000)
            keys[i] = (np.uint64(np.uint32(0xFFFFFFFF) - ascending) << np.uint64(32)) | np.uint64(i)
        order = keys[:n_a]
        order.sort()
        survivors = np.empty(m - r, np.int64)
        for i in range(r, n_a):
            survivors[i - r] = a[np.int64(order[i] & low)]
        survivors[n_a - r:] = b
        rest = survivors
    return rest


def vispruner_select(attention: torch.Tensor, features: torch.Tensor, n: int, important_ratio: float = 0.5,
                     step: int = 8) -> torch.LongTensor:
    """[n] ascending: the top int(n * important_ratio) by attention [N] (official: int,
    i.e. floor), the rest by `deduplicate` over the remaining tokens ranked by attention."""
    N = features.shape[0]
    n = min(n, N)
    n_important = min(n, int(n * important_ratio))
    ranked = attention.argsort(descending=True, stable=True)
    diverse = deduplicate(features, ranked[n_important:], n - n_important, step)
    return torch.cat([ranked[:n_important], diverse]).sort().values


class VisPrunerScorer(Scorer):
    """Pre-LLM (layer=-1): important + diverse tokens, see the module docstring. The
    recorded score is the vision attention received."""

    stages = (STAGE_PRE_LLM,)
    reads_vision_attention = True
    selects = True

    def __init__(self, important_ratio: float = 0.5, step: int = 8,
                 attention_signal: str = "vision_attention", similarity_space: str = "projected_features"):
        if isinstance(important_ratio, bool) or not 0 <= important_ratio <= 1:
            raise ValueError(f"scorer.important_ratio={important_ratio!r} is not allowed: a float in [0, 1]")
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(f"scorer.step={step!r} is not allowed: an int >= 1")
        self.important_ratio, self.step = float(important_ratio), step
        self.attention_signal, self.similarity_space = attention_signal, similarity_space

    def __call__(self, view: LayerView) -> torch.Tensor:
        if view.vision_attention is None:
            raise ValueError("scorer=vispruner: this model family exposes no vision-tower attention")
        return view.vision_attention.float()

    def select(self, scores, view: LayerView, n: int) -> torch.LongTensor:
        return torch.stack([vispruner_select(scores[b], view.visual_features[b], n, self.important_ratio, self.step)
                            for b in range(scores.shape[0])])
