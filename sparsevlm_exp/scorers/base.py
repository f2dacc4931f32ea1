"""The scorer contract: which query rows a scorer needs, and one score per visual token.

A scorer sees tensors (a LayerView), never a model class. Attention-based scorers
ask for query rows once, from the input embeddings; the adapter then hands them the
post-rotary queries of exactly those rows and the layer's keys, and they call
`kernels.text_visual_attention` - never an L x L attention map.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..models.base import LayerView


class Scorer(ABC):
    def query_rows(self, embeds: torch.Tensor, visual_index: torch.LongTensor,
                   text_index: torch.LongTensor) -> torch.LongTensor:
        """[B, T] sequence indices of the rows whose attention this scorer reads.

        embeds [B, L, D] are the input embeddings (images spliced in); visual_index
        [B, N]; text_index [B, T_all] the instruction tokens after the first image.
        Default: no rows (scorers that do not read attention).
        """
        return torch.zeros(embeds.shape[0], 0, dtype=torch.long, device=embeds.device)

    @abstractmethod
    def __call__(self, view: LayerView) -> torch.Tensor:
        """[B, N_cur] scores of the alive visual tokens; higher = keep."""
