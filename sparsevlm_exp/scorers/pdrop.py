"""PyramidDrop (Xing et al., CVPR 2025, "PyramidDrop: Accelerating Your Large
Vision-Language Models via Pyramid Visual Redundancy Reduction"; official code
Cooperx521/PyramidDrop).

Score = attention of the LAST instruction token (the prompt's last token) on each visual
token, averaged over heads, computed with the NEXT layer's input norm and q/k
projections on this layer's output (the official `rank_layer = layer_idx + 1`): a cut
after layer K ranks with layer K+1 and drops before it. The stages (drop before layers
8/16/24 of LLaVA-1.5-7B, keep 0.5/0.25/0.125) are the preset `+experiment=pdrop`.
"""
from __future__ import annotations

import torch

from ..contracts import LayerView, Scorer
from ..kernels import text_visual_attention


class PDropScorer(Scorer):
    reads_next_layer = True

    def query_rows(self, embeds, visual_index, text_index):
        return torch.full((embeds.shape[0], 1), embeds.shape[1] - 1, dtype=torch.long, device=embeds.device)

    def __call__(self, view: LayerView) -> torch.Tensor:
        return text_visual_attention(view.q, view.k, view.query_index, view.visual_index,
                                     key_mask=view.key_mask).mean(dim=1)   # [B, N]
