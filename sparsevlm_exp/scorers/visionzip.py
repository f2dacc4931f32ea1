"""VisionZip (Yang et al., CVPR 2025, "VisionZip: Longer is Better but Not Necessary in
Vision Language Models"; official code dvlab-research/VisionZip): before the LLM, keep
  dominant tokens   - the visual tokens that receive the most attention in the vision
                      encoder ([CLS] attention for CLIP/LLaVA), and
  contextual tokens - the remaining tokens merged by similarity: targets are taken
                      uniformly (every step-th of the remaining, in sequence order),
                      every other remaining token joins its most similar target, and a
                      contextual token is the mean of its target and the tokens that
                      joined it.
Official split: 54 dominant + 10 contextual for 64 (108 + 20 for 128, 162 + 30 for 192),
i.e. contextual = round(n * 10/64).

Substitutes (recorded in the config as `dominant_signal` / `merge_space`):
- the dominant signal is the family's `vision_attention` hook: LLaVA - the [CLS] row of
  the CLIP layer feeding the projector; Qwen2-VL / 2.5-VL have no [CLS] - the mean
  attention each patch receives in the last full-attention ViT block, 2x2-pooled.
- similarity and merging use the PROJECTED features (LLM width, what the view carries)
  with cosine similarity, where the official code compares the ViT layer's keys and
  merges ViT hidden states before the projector.
- placement: a contextual token takes its target's slot (the target's original position
  and sequence place) instead of being appended after the dominant tokens; the
  engine writes the merged features there (LayerView.outputs["kept_features"]).
"""
from __future__ import annotations

import torch

from ..contracts import STAGE_PRE_LLM, LayerView, Scorer


def visionzip_select(attention: torch.Tensor, features: torch.Tensor, n: int,
                     contextual_fraction: float = 10 / 64) -> tuple[torch.LongTensor, torch.Tensor]:
    """(kept [n] ascending local indices, features [n, D] to put in their place).

    attention [N] vision-encoder attention received, features [N, D]. Dominant = top
    (n - c) by attention, c = round(n * contextual_fraction); of the remaining R tokens
    the targets are remaining[::max(1, R // c)][:c]; every other remaining token joins
    the target with the highest cosine similarity; a target's feature becomes the mean
    of itself and its members. Dominant features are unchanged.
    """
    N = features.shape[0]
    n = min(n, N)
    c = min(int(round(n * contextual_fraction)), n)
    if n == N or c == 0:
        kept = attention.topk(n).indices.sort().values
        return kept, features[kept]
    dominant = attention.topk(n - c).indices
    is_rest = torch.ones(N, dtype=torch.bool, device=features.device)
    is_rest[dominant] = False
    rest = is_rest.nonzero()[:, 0]                                                    # [R] ascending
    step = max(1, rest.shape[0] // c)
    targets = rest[::step][:c]                                                        # [c]
    is_member = is_rest.clone()
    is_member[targets] = False
    members = is_member.nonzero()[:, 0]                                               # [R - c]
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    join = (unit[members] @ unit[targets].T).argmax(dim=1)                            # [R - c] target number
    sums = features[targets].float().clone()
    sums.index_add_(0, join, features[members].float())
    counts = 1 + torch.bincount(join, minlength=c)
    merged = (sums / counts[:, None]).to(features.dtype)                              # [c, D]
    kept = torch.cat([dominant, targets])
    out = torch.cat([features[dominant], merged])
    order = kept.argsort()
    return kept[order], out[order]


class VisionZipScorer(Scorer):
    """Pre-LLM (layer=-1): dominant + contextual tokens, see the module docstring.
    The recorded score is the vision attention received (the dominant signal)."""

    stages = (STAGE_PRE_LLM,)
    reads_vision_attention = True
    selects = True

    def __init__(self, contextual_fraction: float = 10 / 64, dominant_signal: str = "vision_attention",
                 merge_space: str = "projected_features"):
        if isinstance(contextual_fraction, bool) or not 0 <= contextual_fraction < 1:
            raise ValueError(f"scorer.contextual_fraction={contextual_fraction!r} is not allowed: a float in [0, 1)")
        self.contextual_fraction = float(contextual_fraction)
        self.dominant_signal, self.merge_space = dominant_signal, merge_space

    def __call__(self, view: LayerView) -> torch.Tensor:
        if view.vision_attention is None:
            raise ValueError("scorer=visionzip: this model family exposes no vision-tower attention")
        return view.vision_attention.float()                                          # [B, N]

    def select(self, scores, view: LayerView, n: int) -> torch.LongTensor:
        picks = [visionzip_select(scores[b], view.visual_features[b], n, self.contextual_fraction)
                 for b in range(scores.shape[0])]
        view.outputs["kept_features"] = torch.stack([f for _, f in picks])           # [B, n, D]
        return torch.stack([k for k, _ in picks])                                     # [B, n] ascending
