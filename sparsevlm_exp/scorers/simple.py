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


def lattice_level(row: torch.LongTensor, col: torch.LongTensor, frame: torch.LongTensor | None = None,
                  max_level: int = 16) -> torch.LongTensor:
    """Largest s such that 2^s divides row, col and frame (all zero gets max_level).
    Tokens on coarser lattices get higher levels, so taking the top-k by level picks
    a coarse, evenly spread grid first and refines it as k grows - in space and, for a
    video clip, in time (a still image has frame 0 everywhere: the 2-D lattice)."""
    frame = torch.zeros_like(row) if frame is None else frame
    level = torch.zeros_like(row)
    for s in range(1, max_level + 1):
        on_lattice = (row % (1 << s) == 0) & (col % (1 << s) == 0) & (frame % (1 << s) == 0)
        level = torch.where(on_lattice, torch.full_like(level, s), level)
    return level


class UniformScorer(Scorer):
    """Evenly spaced over each image's token grid (and over a clip's frames): like
    downsampling the image or the clip, blind to content. Ties within a lattice level are
    broken by a fixed pseudo-random permutation, so a partial level is spread over the
    image instead of filling the top rows first."""

    stages = (STAGE_LLM, STAGE_PRE_LLM)   # reads only coordinates: any cut point

    def __call__(self, view: LayerView) -> torch.Tensor:
        coords = view.visual_coords                                                  # [B, N, 4] (image, row, col, frame)
        frame = coords[..., 3] if coords.shape[-1] > 3 else None
        level = lattice_level(coords[..., 1], coords[..., 2], frame).float()
        jitter = torch.rand(level.shape, generator=torch.Generator().manual_seed(0)).to(level.device)
        return level + jitter
