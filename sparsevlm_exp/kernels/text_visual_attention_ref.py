"""Text-to-visual attention scores: the plain torch reference (the definition).

For each query head this returns the MEAN, over a few query rows (SparseVLM's
text "raters", or only the last token), of the causal softmax probability that
the row puts on each visual token. Row t's softmax runs over keys
0..query_index[b, t] inclusive - the whole causal row, not only the visual keys -
so the scores are the true post-softmax attention the model computed.

This file is the twin that defines correctness (flash-linear-attention's
naive.py pattern); `text_visual_attention.py` holds the Triton kernel that must
match it. The reference materialises the [B, Hq, T, L] logits on purpose: it is
short and obviously right, not fast. The input checks and the correction
handling live here too so that both backends share exactly one definition.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch

# A correction is either a [B, T, L] tensor indexed by (row, key position), or a
# callable that builds only the [B, T, N] values the visual columns need (the
# gravity correction of SparseVLM v2.0 depends on positions alone, so building
# the full [B, T, L] table would waste memory).
Correction = Union[None, torch.Tensor, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_inputs(q: torch.Tensor, k: torch.Tensor, query_index: torch.Tensor,
                 visual_index: torch.Tensor) -> tuple[int, int, int, int, int, int, int]:
    """Validate shapes/dtypes/devices; return (B, Hq, Hkv, T, L, N, d).

    Index VALUES are checked by `check_index_ranges`, which needs a device sync.
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-D [B, H, *, d]; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    B, Hq, T, d = q.shape
    Bk, Hkv, L, dk = k.shape
    if Bk != B or dk != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head dim")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({Hkv}) for GQA")
    if q.dtype != k.dtype or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q and k must share one dtype among fp16/bf16/fp32; got {q.dtype}, {k.dtype}")
    if q.device != k.device or query_index.device != q.device or visual_index.device != q.device:
        raise ValueError("q, k, query_index and visual_index must be on one device")
    if query_index.shape != (B, T) or query_index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"query_index must be an integer tensor of shape {(B, T)}; "
                         f"got {tuple(query_index.shape)} {query_index.dtype}")
    if visual_index.dim() != 2 or visual_index.shape[0] != B or visual_index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"visual_index must be an integer tensor of shape (B={B}, N); "
                         f"got {tuple(visual_index.shape)} {visual_index.dtype}")
    if T == 0:
        raise ValueError("at least one query row is needed: the score is a mean over rows")
    if L == 0:
        raise ValueError("k has no keys (L=0)")
    N = visual_index.shape[1]
    return B, Hq, Hkv, T, L, N, d


def check_index_ranges(query_index: torch.Tensor, visual_index: torch.Tensor, L: int) -> int:
    """Check 0 <= indices < L and return max(query_index) + 1, the causal key span.

    One host sync for all four bounds: an out-of-range index would make the
    Triton kernel read outside k, so it is worth the few microseconds.
    """
    bounds = [query_index.min(), query_index.max()]
    if visual_index.numel() > 0:
        bounds += [visual_index.min(), visual_index.max()]
    values = torch.stack(bounds).tolist()
    q_min, q_max = values[0], values[1]
    if q_min < 0 or q_max >= L:
        raise ValueError(f"query_index values must lie in [0, {L}); got [{q_min}, {q_max}]")
    if len(values) == 4 and (values[2] < 0 or values[3] >= L):
        raise ValueError(f"visual_index values must lie in [0, {L}); got [{values[2]}, {values[3]}]")
    return q_max + 1


def visual_correction(correction: Correction, query_index: torch.Tensor, visual_index: torch.Tensor,
                      L: int) -> Optional[torch.Tensor]:
    """The correction at the visual columns only: [B, T, N] fp32 contiguous, or None."""
    if correction is None:
        return None
    B, T = query_index.shape
    N = visual_index.shape[1]
    if callable(correction) and not isinstance(correction, torch.Tensor):
        values = correction(query_index, visual_index)
        if not isinstance(values, torch.Tensor) or values.shape != (B, T, N):
            got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise ValueError(f"a callable correction must return a tensor of shape {(B, T, N)}; got {got}")
    elif isinstance(correction, torch.Tensor):
        if correction.shape != (B, T, L):
            raise ValueError(f"a correction tensor must have shape (B, T, L) = {(B, T, L)}; "
                             f"got {tuple(correction.shape)}")
        # [B, T, L] -> [B, T, N]: only the visual columns are ever divided.
        columns = visual_index.long()[:, None, :].expand(B, T, N)
        values = torch.gather(correction, 2, columns)
    else:
        raise TypeError(f"correction must be None, a tensor or a callable; got {type(correction).__name__}")
    if values.device != query_index.device:
        raise ValueError(f"correction is on {values.device}, the inputs on {query_index.device}")
    return values.to(torch.float32).contiguous()


def text_visual_attention_ref(q: torch.Tensor, k: torch.Tensor, query_index: torch.Tensor,
                              visual_index: torch.Tensor, *, scale: Optional[float] = None,
                              correction: Correction = None) -> torch.Tensor:
    """Mean over query rows of the causal softmax probability on visual columns.

    q: [B, Hq, T, d] post-rotary queries; k: [B, Hkv, L, d] post-rotary keys.
    query_index: [B, T] sequence positions of the rows; visual_index: [B, N].
    Returns [B, Hq, N] fp32. A visual column after a row's position contributes 0
    for that row (it still counts in the mean over T rows). A correction divides
    the VISIBLE probabilities only, so that a zero correction value on a masked
    (future) entry cannot turn an exact 0 into NaN.
    """
    B, Hq, Hkv, T, L, N, d = check_inputs(q, k, query_index, visual_index)
    check_index_ranges(query_index, visual_index, L)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    group = Hq // Hkv
    corr = visual_correction(correction, query_index, visual_index, L)  # [B, T, N] or None

    # GQA as in HF repeat_kv: query head h reads kv head h // group. Viewing q as
    # [B, Hkv, group, T, d] gives that pairing without copying k `group` times.
    qf = q.float().reshape(B, Hkv, group, T, d)
    kf = k.float()
    logits = torch.einsum("bkgtd,bkld->bkgtl", qf, kf).reshape(B, Hq, T, L) * scale  # [B, Hq, T, L]

    key_pos = torch.arange(L, device=q.device)
    visible = key_pos[None, None, :] <= query_index[:, :, None]  # [B, T, L]
    logits = logits.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # [B, Hq, T, L]; key 0 is always visible, no NaN rows

    columns = visual_index.long()[:, None, None, :].expand(B, Hq, T, N)
    vis_probs = torch.gather(probs, 3, columns)  # [B, Hq, T, N]
    if corr is not None:
        vis_visible = visual_index[:, None, :] <= query_index[:, :, None]  # [B, T, N]
        vis_probs = torch.where(vis_visible[:, None], vis_probs / corr[:, None], torch.zeros_like(vis_probs))
    return vis_probs.mean(dim=2)  # [B, Hq, N]
