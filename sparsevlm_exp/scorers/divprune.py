"""DivPrune (Alvar et al., CVPR 2025, "DivPrune: Diversity-based Visual Token Pruning
for Large Multimodal Models"): before the LLM, keep the max-min diversity subset of the
projected visual features, found greedily (farthest point first) on cosine distance.
"""
from __future__ import annotations

import numpy as np
import torch

from ..contracts import STAGE_PRE_LLM, LayerView, Scorer
from .similarity import cosine_matrix


def cosine_distance(x: torch.Tensor) -> torch.Tensor:
    """[..., N, N] fp32 1 - cos(x_i, x_j) of the rows of x [..., N, D] (~0 on the
    diagonal, in [0, 2])."""
    unit = torch.nn.functional.normalize(x.detach().float(), dim=-1)   # selection: no autograd
    return cosine_matrix(unit).neg_().add_(1.0)   # = 1 - cos bit for bit, without a second [N, N]


def nearest_other_distance(dist: torch.Tensor) -> torch.Tensor:
    """[..., N] min_{j != i} d_ij of distance matrices [..., N, N] (+inf where N = 1)."""
    eye = torch.eye(dist.shape[-1], dtype=torch.bool, device=dist.device)
    return dist.masked_fill(eye, float("inf")).amin(dim=-1)


def max_min_diverse(x: torch.Tensor, n: int, dist: torch.Tensor | None = None,
                    nearest_other: torch.Tensor | None = None) -> torch.LongTensor:
    """[n] rows of x [N, D] picked greedily for the max-min diversity problem (DivPrune's
    rule, in pick order):
      first: the row whose nearest OTHER row is farthest (argmax_i min_{j != i} d_ij);
      then:  repeatedly the row farthest from the picked set (argmax_i min_{s in S} d_is).
    d = cosine distance: `dist` [N, N] if already computed (not modified; its diagonal is
    never read), `nearest_other` [N] = nearest_other_distance(dist) if already computed.
    Ties go to the lower index. O(N^2) memory, O(N^2 D + n N) time.
    """
    N = x.shape[0]
    n = min(n, N)
    if n <= 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    if N == 1:
        return torch.zeros(1, dtype=torch.long, device=x.device)
    dist = cosine_distance(x) if dist is None else dist                              # [N, N]
    nearest_other = nearest_other_distance(dist) if nearest_other is None else nearest_other
    first = nearest_other.argmax(dim=0, keepdim=True)                                 # [1]
    greedy = _farthest_first_host if dist.device.type == "cpu" else _farthest_first_device
    return greedy(dist, first, n)


def _farthest_first_device(dist: torch.Tensor, first: torch.LongTensor, n: int) -> torch.LongTensor:
    """The greedy steps after the first pick as device ops with no host round trip (for
    accelerators): the distance of every row to the picked set is one [N] vector, lowered
    by each new pick's row (a min, exact in any order); picked rows are set to -inf so they
    are never picked again. Each step is argmax, index_select, minimum, index_fill_ on
    1-element index tensors (Python indexing with a tensor may sync and costs more)."""
    picks = [first]
    to_set = dist.index_select(0, first)[0]                                           # [N] a copy
    to_set.index_fill_(0, first, -float("inf"))
    for _ in range(1, n):
        pick = to_set.argmax(dim=0, keepdim=True)
        picks.append(pick)
        torch.fmin(to_set, dist.index_select(0, pick)[0], out=to_set)   # fmin: a NaN never revives a -inf
        to_set.index_fill_(0, pick, -float("inf"))
    return torch.cat(picks)


def _farthest_first_host(dist: torch.Tensor, first: torch.LongTensor, n: int) -> torch.LongTensor:
    """The same steps on a CPU tensor through numpy views of it (no copy of `dist`): a torch
    op costs ~3-5 us of dispatch for a 1,024-element vector, numpy's ~1 us, and the loop is
    n steps deep (~9x faster at 256 of 1,024). Identical picks: min and first-index argmax
    (both libraries return the first maximum) are exact. Both loops take the min with fmin,
    which equals minimum on numbers but keeps a picked row's -inf against a NaN distance
    (NaN features): with minimum, min(-inf, NaN) = NaN put picked rows back in play and
    the picks repeated (0, 1, 0, 1, ...)."""
    d = dist.detach().numpy()
    pick = int(first)
    picks = [pick]
    to_set = d[pick].copy()
    to_set[pick] = -np.inf
    for _ in range(1, n):
        pick = int(to_set.argmax())
        picks.append(pick)
        np.fmin(to_set, d[pick], out=to_set)       # fmin: a NaN never revives a picked row's -inf
        to_set[pick] = -np.inf
    return torch.tensor(picks, dtype=torch.long)


class DivPruneScorer(Scorer):
    """Pre-LLM (layer=-1): the n most diverse visual tokens (max-min cosine distance of
    the projected features, view.visual_features [B, N, D]); n comes from the keep
    policy. The recorded score of a token is its cosine distance to its nearest other
    token (the quantity the first greedy pick maximises). Needs no attention and no
    instruction. Batch rows are selected one by one."""

    stages = (STAGE_PRE_LLM,)
    selects = True

    def __call__(self, view: LayerView) -> torch.Tensor:
        dist = cosine_distance(view.visual_features)                                  # [B, N, N]
        # A token is not its own nearest other. The greedy never reads the diagonal, so it
        # is set to +inf in place (no masked [N, N] copy) and the matrix reused by select.
        dist.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))
        view.outputs["cosine_distance"] = dist
        return dist.amin(dim=-1)                                                      # [B, N]

    def select(self, scores: torch.Tensor, view: LayerView, n: int) -> torch.LongTensor:
        dist = view.outputs.pop("cosine_distance", None)
        if dist is None:   # a per-image subset view: its own distances and nearest others
            return torch.stack([max_min_diverse(x, n) for x in view.visual_features])
        # the full view: __call__'s distances, and its scores are the nearest-other distances
        return torch.stack([max_min_diverse(x, n, d, s) for x, d, s in zip(view.visual_features, dist, scores)])
