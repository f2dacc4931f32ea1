"""Pre-LLM scorers: they cut visual tokens after the vision tower and projector,
before decoder layer 0 (`layer=-1`), so every LLM layer sees only the kept tokens.
"""
from __future__ import annotations

import torch

from ..contracts import STAGE_PRE_LLM, LayerView, Scorer


class VisionAttentionScorer(Scorer):
    """Score = attention a visual token receives inside the vision tower, in the
    family's named block (VisionZip's "dominant tokens" signal, Yang et al. 2024,
    without its contextual-token merging): LLaVA-1.5 - the [CLS] query's attention in
    the CLIP layer whose output feeds the projector (the penultimate); Qwen2-VL /
    Qwen2.5-VL - no [CLS], so the mean attention received from every patch of the
    same image in the last full-attention block, pooled over each 2x2 merge group.
    The adapter recomputes only that block's attention (models/*.py
    `vision_attention`). Raises ValueError for a family that exposes none."""

    stages = (STAGE_PRE_LLM,)
    reads_vision_attention = True

    def __call__(self, view: LayerView) -> torch.Tensor:
        if view.vision_attention is None:
            raise ValueError("scorer=vision_attn: this model family exposes no vision-tower attention")
        return view.vision_attention.float()                                          # [B, N]
