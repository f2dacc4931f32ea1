"""Qwen video inputs without torchvision: pixel values, grids and prompt placeholders.

transformers 5.x builds Qwen video inputs with a video processor whose resize and
normalise run on torchvision (Qwen2VLVideoProcessor imports it at module level;
Qwen3VLVideoProcessor constructs without it but fails on its first call). torchvision
has no CPU wheel that leaves our CPU torch alone, so the same steps are written here
in plain torch, following transformers 5.24 models/qwen2_vl/video_processing_qwen2_vl.py
and models/qwen3_vl/video_processing_qwen3_vl.py:

1. resize every frame of a clip to one (H', W'), multiples of patch * merge:
   Qwen2-VL/2.5-VL: per-frame `smart_resize(h, w, factor, min_pixels, max_pixels)`;
   Qwen3-VL/3.5: clip-level `smart_resize(t, h, w, temporal, factor, min, max)`, whose
   pixel budget counts every frame. Bicubic with antialias on the uint8 frames, rounded
   back to uint8 (what torchvision's resize does to a uint8 tensor).
2. rescale and normalise: (x / 255 - mean) / std per channel, in float32.
3. patchify: pad the frame count to a multiple of temporal_patch_size by repeating the
   last frame, then cut (t, 2-frame, C, h-blocks, merge, patch, w-blocks, merge, patch)
   and flatten to [grid_t * grid_h * grid_w, C * temporal * patch * patch] in the
   merge-group order the ViT expects.

tests/test_video.py checks steps 1 and 3 (and the frame sampling) against transformers'
own functions where they import without torchvision, and the token layout against
the models' get_rope_index / forward (the HF generate oracle).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..contracts import Video

# transformers 5.24 video processor defaults (class attributes `size`): shortest_edge is
# min_pixels, longest_edge max_pixels. Qwen2-VL/2.5-VL: per frame; Qwen3-VL: whole clip.
QWEN2_VIDEO_PIXELS = (128 * 28 * 28, 28 * 28 * 768)
QWEN3_VIDEO_PIXELS = (128 * 32 * 32, 32 * 32 * 768)


@dataclass
class VideoSpec:
    """How one family turns frames into ViT patches (read from the image processor and
    the model config; pixel budgets from the video processor defaults above)."""

    patch_size: int
    merge_size: int
    temporal_patch_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    min_pixels: int
    max_pixels: int
    clip_budget: bool          # True: Qwen3-style clip-level smart_resize; False: per frame


def smart_resize_frame(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(H', W') multiples of `factor`, aspect kept, H'*W' within [min_pixels, max_pixels]:
    Qwen2-VL's smart_resize (per frame). ValueError for an aspect ratio above 200."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def smart_resize_clip(num_frames: int, height: int, width: int, temporal: int, factor: int,
                      min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(H', W') for a whole clip: Qwen3-VL's video smart_resize, whose budget is
    frames * H' * W' (frames rounded to the temporal patch). Frames smaller than one
    factor are scaled up first. ValueError for fewer frames than `temporal` or an aspect
    ratio above 200 (the caller pads a short clip first)."""
    if num_frames < temporal:
        raise ValueError(f"t:{num_frames} must be larger than temporal_factor:{temporal}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t_bar = round(num_frames / temporal) * temporal
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(videos: torch.Tensor, patch: int, merge: int, temporal: int) -> tuple[torch.Tensor, int, int, int]:
    """videos [B, T, C, H, W] -> ([B, t*h*w, C*temporal*patch*patch], t, h, w) with h, w in
    patches and t = ceil(T / temporal) (the last frame repeated to fill the last pair);
    the rows run over merge groups (2x2 patches consecutive), as the Qwen ViT reads them."""
    B, T, C, H, W = videos.shape
    if pad := -T % temporal:
        videos = torch.cat((videos, videos[:, -1:].expand(-1, pad, -1, -1, -1)), dim=1)
        T += pad
    t, h, w = T // temporal, H // patch, W // patch
    x = videos.reshape(B, t, temporal, C, h // merge, merge, patch, w // merge, merge, patch)
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return x.reshape(B, t * h * w, C * temporal * patch * patch), t, h, w


def video_pixels(video: Video, spec: VideoSpec) -> tuple[torch.Tensor, list[int]]:
    """(pixel_values_videos [t*h*w, C*temporal*patch^2] float32, [t, h, w] the grid in
    patches) for one clip: resize, rescale + normalise, patchify (module docstring)."""
    frames = torch.from_numpy(np.ascontiguousarray(video.frames)).permute(0, 3, 1, 2)   # [T, 3, H, W] uint8
    T, _, H, W = frames.shape
    factor = spec.patch_size * spec.merge_size
    if spec.clip_budget:
        # a clip shorter than one temporal patch is padded by patchify; its budget counts it padded
        new_h, new_w = smart_resize_clip(max(T, spec.temporal_patch_size), H, W, spec.temporal_patch_size, factor,
                                         spec.min_pixels, spec.max_pixels)
    else:
        new_h, new_w = smart_resize_frame(H, W, factor, spec.min_pixels, spec.max_pixels)
    x = frames.float()
    if (new_h, new_w) != (H, W):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        x = x.round().clamp(0, 255)                                                   # back to uint8 values
    mean = torch.tensor(spec.image_mean).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(spec.image_std).view(1, 3, 1, 1) * 255.0
    x = (x - mean) / std                                                              # = (x/255 - m) / s
    patches, t, h, w = patchify(x[None], spec.patch_size, spec.merge_size, spec.temporal_patch_size)
    return patches[0], [t, h, w]


def temporal_timestamps(video: Video, temporal: int) -> list[float]:
    """[t] seconds of each temporal token of a clip: the mean of the first and last frame
    times in its temporal patch (the frame list padded with its last frame), as Qwen3-VL's
    processor `_calculate_timestamps` writes them into the prompt."""
    times = list(video.timestamps)
    if pad := -len(times) % temporal:
        times += [times[-1]] * pad
    return [(times[i] + times[i + temporal - 1]) / 2 for i in range(0, len(times), temporal)]


def qwen2_placeholder(grid: list[int], merge: int, vision_start: str, video_pad: str, vision_end: str) -> str:
    """Qwen2-VL/2.5-VL: one run of t*h*w/merge^2 video pads between the vision markers."""
    t, h, w = grid
    return vision_start + video_pad * (t * h * w // merge ** 2) + vision_end


def qwen3_placeholder(grid: list[int], merge: int, timestamps: list[float], vision_start: str, video_pad: str,
                      vision_end: str) -> str:
    """Qwen3-VL/3.5: per temporal token "<{s:.1f} seconds>" then its own marked run of
    h*w/merge^2 video pads (the processor's replace_video_token)."""
    t, h, w = grid
    per_frame = h * w // merge ** 2
    return "".join(f"<{timestamps[j]:.1f} seconds>" + vision_start + video_pad * per_frame + vision_end
                   for j in range(t))
