"""FastV: attention the LAST token pays to each visual token (official code), averaged over heads."""
from __future__ import annotations

import torch

from ..kernels import text_visual_attention
from ..contracts import LayerView, Scorer


class FastVScorer(Scorer):
    def query_rows(self, embeds, visual_index, text_index):
        last = embeds.shape[1] - 1
        return torch.full((embeds.shape[0], 1), last, dtype=torch.long, device=embeds.device)

    def __call__(self, view: LayerView) -> torch.Tensor:
        return text_visual_attention(view.q, view.k, view.query_index, view.visual_index,
                                     key_mask=view.key_mask).mean(dim=1)
