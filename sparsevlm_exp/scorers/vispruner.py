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

import torch

from ..contracts import STAGE_PRE_LLM, LayerView, Scorer


def deduplicate(features: torch.Tensor, ranked: torch.LongTensor, n: int, step: int = 8) -> torch.LongTensor:
    """n of the rows `ranked` [R] of features [N, D] (R in the official order: by vision
    attention, highest first), by repeated bipartite de-duplication:
      A = rest[0::2], B = rest[1::2]; s_a = max cosine of a to B;
      drop the r = min(step, |rest| - n) members of A with the highest s_a;
      rest = (A's survivors by s_a descending) + B; repeat until |rest| = n.
    Returns the surviving rows (in `rest` order)."""
    if n <= 0:
        return ranked[:0]
    unit = torch.nn.functional.normalize(features[ranked].detach().float(), dim=-1)
    cosine = unit @ unit.T                                                            # [R, R], computed once
    rest = torch.arange(ranked.shape[0], device=ranked.device)                        # places in `ranked`
    while rest.shape[0] > n:
        a, b = rest[0::2], rest[1::2]
        r = min(step, rest.shape[0] - n, a.shape[0])
        similarity = cosine.index_select(0, a).index_select(1, b).amax(dim=1)          # [|A|]
        survivors = a[similarity.argsort(descending=True, stable=True)[r:]]
        rest = torch.cat([survivors, b])
    return ranked[rest]


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
