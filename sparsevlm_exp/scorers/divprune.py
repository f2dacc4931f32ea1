"""DivPrune (Alvar et al., CVPR 2025, "DivPrune: Diversity-based Visual Token Pruning
for Large Multimodal Models"): before the LLM, keep the max-min diversity subset of the
projected visual features, found greedily (farthest point first) on cosine distance.
"""
from __future__ import annotations

import torch

from ..contracts import STAGE_PRE_LLM, LayerView, Scorer


def cosine_distance(x: torch.Tensor) -> torch.Tensor:
    """[N, N] fp32 1 - cos(x_i, x_j) of the rows of x [N, D] (0 on the diagonal, in [0, 2])."""
    unit = torch.nn.functional.normalize(x.float(), dim=-1)
    return 1.0 - unit @ unit.T


def max_min_diverse(x: torch.Tensor, n: int) -> torch.LongTensor:
    """[n] rows of x [N, D] picked greedily for the max-min diversity problem (DivPrune's
    rule, in pick order):
      first: the row whose nearest OTHER row is farthest (argmax_i min_{j != i} d_ij);
      then:  repeatedly the row farthest from the picked set (argmax_i min_{s in S} d_is).
    d = cosine distance. Ties go to the lower index (torch.argmax). O(N^2) memory and time.
    """
    N = x.shape[0]
    n = min(n, N)
    if n <= 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    dist = cosine_distance(x)                                                         # [N, N]
    nearest_other = dist.masked_fill(torch.eye(N, dtype=torch.bool, device=x.device), float("inf")).amin(dim=1)
    first = int(nearest_other.argmax()) if N > 1 else 0
    picked = [first]
    to_set = dist[first].clone()                                                      # [N] distance to the picked set
    to_set[first] = -float("inf")
    for _ in range(n - 1):
        pick = int(to_set.argmax())
        picked.append(pick)
        to_set = torch.minimum(to_set, dist[pick])
        to_set[pick] = -float("inf")
    return torch.tensor(picked, dtype=torch.long, device=x.device)


class DivPruneScorer(Scorer):
    """Pre-LLM (layer=-1): the n most diverse visual tokens (max-min cosine distance of
    the projected features, view.visual_features [B, N, D]); n comes from the keep
    policy. The recorded score of a token is its cosine distance to its nearest other
    token (the quantity the first greedy pick maximises). Needs no attention and no
    instruction. Batch rows are selected one by one."""

    stages = (STAGE_PRE_LLM,)
    selects = True

    def __call__(self, view: LayerView) -> torch.Tensor:
        out = []
        for x in view.visual_features:                                                # [N, D]
            dist = cosine_distance(x)
            out.append(dist.masked_fill(torch.eye(x.shape[0], dtype=torch.bool, device=x.device),
                                        float("inf")).amin(dim=1))
        return torch.stack(out)                                                       # [B, N]

    def select(self, scores: torch.Tensor, view: LayerView, n: int) -> torch.LongTensor:
        return torch.stack([max_min_diverse(x, n) for x in view.visual_features])    # [B, n]
