"""DivPrune (Alvar et al., CVPR 2025, "DivPrune: Diversity-based Visual Token Pruning
for Large Multimodal Models"): before the LLM, keep the max-min diversity subset of the
projected visual features, found greedily (farthest point first) on cosine distance.
"""
from __future__ import annotations

import torch

from ..contracts import STAGE_PRE_LLM, LayerView, Scorer


def cosine_distance(x: torch.Tensor) -> torch.Tensor:
    """[N, N] fp32 1 - cos(x_i, x_j) of the rows of x [N, D] (0 on the diagonal, in [0, 2])."""
    unit = torch.nn.functional.normalize(x.detach().float(), dim=-1)   # selection: no autograd
    return 1.0 - unit @ unit.T


def max_min_diverse(x: torch.Tensor, n: int, dist: torch.Tensor | None = None) -> torch.LongTensor:
    """[n] rows of x [N, D] picked greedily for the max-min diversity problem (DivPrune's
    rule, in pick order):
      first: the row whose nearest OTHER row is farthest (argmax_i min_{j != i} d_ij);
      then:  repeatedly the row farthest from the picked set (argmax_i min_{s in S} d_is).
    d = cosine distance (`dist` [N, N] if already computed). Ties go to the lower index
    (torch.argmax). O(N^2) memory and time.
    """
    N = x.shape[0]
    n = min(n, N)
    if n <= 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    dist = cosine_distance(x) if dist is None else dist                              # [N, N]
    nearest_other = dist.masked_fill(torch.eye(N, dtype=torch.bool, device=x.device), float("inf")).amin(dim=1)
    picked = torch.empty(n, dtype=torch.long, device=x.device)
    picked[0] = nearest_other.argmax() if N > 1 else 0
    to_set = dist[picked[0]].clone()                                                  # [N] distance to the picked set
    to_set[picked[0]] = -float("inf")
    # tensor ops only in the loop (no host round trips): it runs n times
    for k in range(1, n):
        pick = to_set.argmax()
        picked[k] = pick
        torch.minimum(to_set, dist[pick], out=to_set)
        to_set[pick] = -float("inf")
    return picked


class DivPruneScorer(Scorer):
    """Pre-LLM (layer=-1): the n most diverse visual tokens (max-min cosine distance of
    the projected features, view.visual_features [B, N, D]); n comes from the keep
    policy. The recorded score of a token is its cosine distance to its nearest other
    token (the quantity the first greedy pick maximises). Needs no attention and no
    instruction. Batch rows are selected one by one."""

    stages = (STAGE_PRE_LLM,)
    selects = True

    def __call__(self, view: LayerView) -> torch.Tensor:
        dist = torch.stack([cosine_distance(x) for x in view.visual_features])        # [B, N, N]
        view.outputs["cosine_distance"] = dist                                        # reused by select
        eye = torch.eye(dist.shape[1], dtype=torch.bool, device=dist.device)
        return dist.masked_fill(eye, float("inf")).amin(dim=2)                        # [B, N]

    def select(self, scores: torch.Tensor, view: LayerView, n: int) -> torch.LongTensor:
        # absent on a per-image subset view (its distances are the sub-block; recomputed)
        dist = view.outputs.pop("cosine_distance", None)
        if dist is None:
            dist = torch.stack([cosine_distance(x) for x in view.visual_features])
        return torch.stack([max_min_diverse(x, n, d) for x, d in zip(view.visual_features, dist)])   # [B, n]
