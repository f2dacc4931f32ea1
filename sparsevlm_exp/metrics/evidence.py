"""Evidence recall: did the pruner keep the visual tokens the answer depends on?

A visual token covers one cell of its image's token grid (for Qwen, 28x28 pixels of
the resized image = a 2x2 group of 14-pixel patches). It is an evidence token if
its cell overlaps an evidence box (boxes in the ORIGINAL image's pixels, so cells
are scaled back by the image size / grid size).
"""
from __future__ import annotations

import torch

from ..contracts import Box


def evidence_token_mask(evidence: list[list[Box]], image_sizes: list[tuple[int, int]],
                        image_grids: list[tuple[int, int]], visual_coords: torch.LongTensor) -> torch.BoolTensor:
    """[N] True for visual tokens whose cell overlaps an evidence box of their image.

    evidence: boxes per image; image_sizes: (width, height) per image;
    image_grids: (rows, cols) per image; visual_coords: [N, 3 or 4] (image, row, col[, frame]).
    """
    mask = torch.zeros(visual_coords.shape[0], dtype=torch.bool)
    for image_no, boxes in enumerate(evidence):
        if not boxes or image_no >= len(image_grids):
            continue
        (w, h), (rows, cols) = image_sizes[image_no], image_grids[image_no]
        on_image = visual_coords[:, 0] == image_no
        r, c = visual_coords[:, 1].float(), visual_coords[:, 2].float()
        cell_w, cell_h = w / cols, h / rows
        x0, x1, y0, y1 = c * cell_w, (c + 1) * cell_w, r * cell_h, (r + 1) * cell_h
        for bx0, by0, bx1, by1 in boxes:
            overlaps = (x0 < bx1) & (x1 > bx0) & (y0 < by1) & (y1 > by0)
            mask |= on_image & overlaps
    return mask


def evidence_recall(evidence_index: torch.LongTensor, kept_index: torch.LongTensor) -> float | None:
    """Fraction of the evidence tokens (original sequence indices) that were kept;
    None when the question has no evidence tokens (e.g. "is there a ...?" -> no)."""
    if evidence_index.numel() == 0:
        return None
    return float(torch.isin(evidence_index, kept_index).float().mean())


class RecallRoseError(RuntimeError):
    """Evidence recall rose from one cut to the next: a later cut kept an evidence token
    an earlier cut had dropped, which no pruner may do (a kept set can only shrink)."""


def check_recall_never_rises(sample_id, layers: list[int], recalls: list[float | None]) -> None:
    """Raise RecallRoseError naming the sample, the two layers and their recalls if the
    evidence recall of a cut is larger than that of the cut before it. layers[k] is the
    layer of the k-th cut, recalls[k] its recall (None: no evidence tokens, nothing to check)."""
    for k in range(1, len(recalls)):
        before, after = recalls[k - 1], recalls[k]
        if before is not None and after is not None and after > before:
            raise RecallRoseError(f"sample {sample_id}: evidence recall rose from {before:.4f} after the cut at "
                                  f"layer {layers[k - 1]} to {after:.4f} after the cut at layer {layers[k]}; "
                                  "a later cut kept a visual token an earlier cut had dropped (a pruner bug)")
