"""Baselines that read no attention: random (seeded) and uniform (evenly spaced).

Both are strong baselines in the pruning literature (UniPruneBench: random;
VTC-Bench: plain downsampling), so every comparison should include them.
"""
from __future__ import annotations

import torch

from ..contracts import STAGE_LLM, STAGE_PRE_LLM, LayerView, Scorer


class RandomScorer(Scorer):
    stages = (STAGE_LLM, STAGE_PRE_LLM)   # reads no attention: any cut point

    def __call__(self, view: LayerView) -> torch.Tensor:
        B, N = view.visual_index.shape
        return torch.rand(B, N, generator=view.generator).to(view.visual_index.device)


def lattice_level(row: torch.LongTensor, col: torch.LongTensor, max_level: int = 16) -> torch.LongTensor:
    """Largest s such that 2^s divides both row and col (row = col = 0 gets max_level).
    Tokens on coarser lattices get higher levels, so taking the top-k by level picks
    a coarse, evenly spread grid first and refines it as k grows."""
    level = torch.zeros_like(row)
    for s in range(1, max_level + 1):
        on_lattice = (row % (1 << s) == 0) & (col % (1 << s) == 0)
        level = torch.where(on_lattice, torch.full_like(level, s), level)
    return level


class UniformScorer(Scorer):
    """Evenly spaced over each image's token grid: like downsampling the image, blind
    to content. Ties within a lattice level are broken by a fixed pseudo-random
    permutation, so a partial level is spread over the image instead of filling
    the top rows first."""

    stages = (STAGE_LLM, STAGE_PRE_LLM)   # reads only coordinates: any cut point

    def __call__(self, view: LayerView) -> torch.Tensor:
        coords = view.visual_coords                                                  # [B, N, 3]
        level = lattice_level(coords[..., 1], coords[..., 2]).float()
        jitter = torch.rand(level.shape, generator=torch.Generator().manual_seed(0)).to(level.device)
        return level + jitter
