"""Fused text-to-visual attention scoring: Triton kernel, launcher and dispatch.

What it computes is defined by `text_visual_attention_ref` (the torch twin in
text_visual_attention_ref.py): for each query head, the mean over T query rows
of the causal softmax probability on N visual columns, optionally divided by a
correction. The kernel never builds the [T, L] probability matrix of a head.

Design (two launches, no atomics):

  pass 1  `_row_stats_kernel`, grid (B*Hq, row blocks, splits):
          flash-attention style online softmax over the causal key span of a
          row block, split along the keys ("flash-decoding") so that a handful
          of rows x heads still fills the GPU. Each program writes the running
          max m and denominator l of its split: two fp32 [B, Hq, S, T] tensors,
          S small (<= 64), i.e. O(B*Hq*T) extra memory.
  pass 2  `_visual_mass_kernel`, grid (B*Hq, visual blocks):
          merges the S partial (m, l) pairs of each row into the row's log-sum-
          exp, gathers the k rows of one block of visual tokens ONCE, loops over
          all T rows recomputing only the visual logits, exponentiates with the
          final normaliser, divides by the correction, and sums over rows in
          registers. One program owns an output block, so it writes out[b, h, n]
          exactly once: no atomics, deterministic results, and the launch is
          idempotent, which autotuning (it replays launches) needs.

Merging the splits inside pass 2 instead of with torch ops avoids a chain of
small launches and their [B, Hq, S, T] temporaries; the merge is S scalar
steps per row, negligible next to the [rows x d] x [d x visual] dot.

Triton is optional: without it (or on CPU) the torch reference runs.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Optional

import torch

from sparsevlm_exp.errors import bad_value
from sparsevlm_exp.kernels.text_visual_attention_ref import (
    Correction,
    check_index_ranges,
    check_inputs,
    text_visual_attention_ref,
    visual_correction,
)

try:  # triton ships with the `gpu`/`dev` extras only; the torch path must work without it
    import triton
    import triton.language as tl

    HAS_TRITON = True
    TRITON_VERSION = triton.__version__  # recorded beside every GPU timing
except ImportError:  # pragma: no cover - exercised in a subprocess by the tests
    triton = None
    tl = None
    HAS_TRITON = False
    TRITON_VERSION = None

# Triton decides interpreter vs compiled mode when a kernel is decorated, i.e.
# when this module is imported; remember what it decided.
INTERPRET = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")

BACKENDS = ("auto", "triton", "torch")
LOG2E = 1.4426950408889634
# A split shorter than this spends more time on setup and on the merge than on keys.
MIN_KEYS_PER_SPLIT = 1024
MAX_SPLITS = 64
# Floating-point contraction (a*b+c as one FMA) stays ON, chosen here rather than left to
# Triton's default, which flips from on to off in Triton 3.10 (3.9 warns while it is
# unset). On: it is what every CI compile and tolerance test of this kernel was built
# with, one rounding instead of two is at least as close to the fp32 torch reference, and
# cuBLAS (the reference's matmul on a GPU) contracts too. Passed at every launch.
FP_FUSION = True


def _pass1_configs():
    if INTERPRET:  # the interpreter runs programs one by one: one small config, no tuning
        return [triton.Config({"BLOCK_L": 16}, num_warps=1, num_stages=1)]
    return [
        triton.Config({"BLOCK_L": block_l}, num_warps=warps, num_stages=stages)
        for block_l, warps, stages in [(64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 2), (128, 8, 3), (64, 8, 3)]
    ]


def _pass2_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 16}, num_warps=1, num_stages=1)]
    return [
        triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
        for block_n, warps, stages in [(32, 4, 2), (64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 2), (64, 8, 3)]
    ]


if HAS_TRITON:

    @triton.jit
    def _dot(a, b, EXACT_FP32: tl.constexpr, UPCAST_DOT: tl.constexpr):
        # fp32 inputs: exact fp32 products (the tf32 default would drift ~1e-3
        # from the reference). fp16/bf16: tensor cores, fp32 accumulation. The
        # option is left unset for those, as not every backend accepts "tf32".
        # UPCAST_DOT (interpreter + bf16 only, never on a GPU): the CPU interpreter
        # keeps bf16 as uint16 and its tl.dot multiplies the raw bit patterns
        # (triton-lang/triton#11584, unsupported upstream), so the interpreter tests
        # take the dot in fp32 - what the GPU's bf16 dot with fp32 accumulation
        # computes up to summation order - and still cover every bf16 load.
        if UPCAST_DOT:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        if EXACT_FP32:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.autotune(configs=_pass1_configs(), key=["T_BUCKET", "KV_BUCKET", "BLOCK_D", "BLOCK_T"])
    @triton.jit
    def _row_stats_kernel(
        q_ptr, k_ptr, qidx_ptr, m_ptr, l_ptr,
        Hq, T, kv_len, num_splits,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_kl, stride_kd,
        stride_ib, stride_it,
        stride_sb, stride_sh, stride_ss, stride_st,
        qk_scale,  # softmax scale * log2(e): the kernel works in base 2 (exp2 is the native op)
        T_BUCKET, KV_BUCKET,  # autotune keys only: power-of-2 buckets, so a new length does not re-tune
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, EXACT_FP32: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)
        pid_t = tl.program_id(1)
        pid_s = tl.program_id(2)
        b = (pid_bh // Hq).to(tl.int64)  # int64 base offsets: B*H*L*d can pass 2**31
        h = pid_bh % Hq
        kvh = (h // GROUP).to(tl.int64)  # HF repeat_kv pairing
        h = h.to(tl.int64)

        rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
        row_ok = rows < T
        dims = tl.arange(0, BLOCK_D)  # [BLOCK_D]; BLOCK_D = next pow2 of d, masked beyond d
        dim_ok = dims < HEAD_DIM

        q_ptrs = q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + dims[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)  # [BLOCK_T, BLOCK_D]
        # Padded rows get position -1: they see no key and are never stored.
        qpos = tl.load(qidx_ptr + b * stride_ib + rows * stride_it, mask=row_ok, other=-1)  # [BLOCK_T]

        # This split's keys, clipped to the causal span of the row block: keys
        # after the block's last row position are never needed, nor loaded.
        keys_per_split = tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_L) * BLOCK_L
        lo = pid_s * keys_per_split
        hi = tl.minimum(lo + keys_per_split, tl.max(qpos, axis=0) + 1)

        # A finite "minus infinity" for the running max: a row that sees no key
        # in this split keeps m = -1e30, l = 0, and exp2(-inf - m) stays 0
        # instead of the NaN that -inf - -inf would give.
        m_i = tl.full([BLOCK_T], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_T], dtype=tl.float32)
        k_base = k_ptr + b * stride_kb + kvh * stride_kh
        for start in range(lo, hi, BLOCK_L):
            keys = start + tl.arange(0, BLOCK_L)  # [BLOCK_L]
            k_ptrs = k_base + keys[:, None] * stride_kl + dims[None, :] * stride_kd
            k_blk = tl.load(k_ptrs, mask=(keys < hi)[:, None] & dim_ok[None, :], other=0.0)  # [BLOCK_L, BLOCK_D]
            s = _dot(q, tl.trans(k_blk), EXACT_FP32, UPCAST_DOT) * qk_scale  # [BLOCK_T, BLOCK_L]
            s = tl.where(keys[None, :] <= qpos[:, None], s, float("-inf"))  # causal, per row
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
            m_i = m_new

        stat_off = b * stride_sb + h * stride_sh + pid_s * stride_ss + rows * stride_st
        tl.store(m_ptr + stat_off, m_i, mask=row_ok)
        tl.store(l_ptr + stat_off, l_i, mask=row_ok)

    @triton.autotune(configs=_pass2_configs(), key=["T_BUCKET", "N_BUCKET", "BLOCK_D", "BLOCK_T", "HAS_CORRECTION"])
    @triton.jit
    def _visual_mass_kernel(
        q_ptr, k_ptr, qidx_ptr, vidx_ptr, m_ptr, l_ptr, corr_ptr, out_ptr,
        Hq, T, N, num_splits,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_kl, stride_kd,
        stride_ib, stride_it,
        stride_vb, stride_vn,
        stride_sb, stride_sh, stride_ss, stride_st,
        stride_cb, stride_ct, stride_cn,
        stride_ob, stride_oh, stride_on,
        qk_scale,
        T_BUCKET, N_BUCKET,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_CORRECTION: tl.constexpr, EXACT_FP32: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)
        pid_n = tl.program_id(1)
        b = (pid_bh // Hq).to(tl.int64)
        h = pid_bh % Hq
        kvh = (h // GROUP).to(tl.int64)
        h = h.to(tl.int64)

        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] visual slots
        col_ok = cols < N
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < HEAD_DIM
        # Sequence positions of these visual tokens; padded slots read key 0 (in
        # bounds) and are masked out of every sum below.
        vpos = tl.load(vidx_ptr + b * stride_vb + cols * stride_vn, mask=col_ok, other=0)  # [BLOCK_N]
        kv_ptrs = k_ptr + b * stride_kb + kvh * stride_kh + vpos[:, None] * stride_kl + dims[None, :] * stride_kd
        k_vis = tl.load(kv_ptrs, mask=col_ok[:, None] & dim_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D], gathered once

        acc = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum over rows of (corrected) probabilities
        for t0 in range(0, T, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            row_ok = rows < T
            q_ptrs = q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + dims[None, :] * stride_qd
            q = tl.load(q_ptrs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)  # [BLOCK_T, BLOCK_D]
            qpos = tl.load(qidx_ptr + b * stride_ib + rows * stride_it, mask=row_ok, other=-1)

            # Merge the per-split (max, denominator) pairs into each row's
            # base-2 log-sum-exp over its whole causal row.
            m_i = tl.full([BLOCK_T], -1.0e30, dtype=tl.float32)
            l_i = tl.zeros([BLOCK_T], dtype=tl.float32)
            stat_ptrs = b * stride_sb + h * stride_sh + rows * stride_st
            for sp in range(0, num_splits):
                m_s = tl.load(m_ptr + stat_ptrs + sp * stride_ss, mask=row_ok, other=-1.0e30)
                l_s = tl.load(l_ptr + stat_ptrs + sp * stride_ss, mask=row_ok, other=0.0)
                m_new = tl.maximum(m_i, m_s)
                l_i = l_i * tl.exp2(m_i - m_new) + l_s * tl.exp2(m_s - m_new)
                m_i = m_new
            lse = m_i + tl.log2(tl.where(row_ok, l_i, 1.0))  # padded rows: keep it finite

            s = _dot(q, tl.trans(k_vis), EXACT_FP32, UPCAST_DOT) * qk_scale  # [BLOCK_T, BLOCK_N]
            # Padded rows have qpos = -1 < every position, so this also drops them.
            visible = (vpos[None, :] <= qpos[:, None]) & col_ok[None, :]
            # Mask before exp2 (not after) so that masked entries cannot overflow.
            p = tl.exp2(tl.where(visible, s - lse[:, None], float("-inf")))
            if HAS_CORRECTION:
                # Divide visible entries only (as the reference does); masked ones read 1.
                c_ptrs = corr_ptr + b * stride_cb + rows[:, None] * stride_ct + cols[None, :] * stride_cn
                p = p / tl.load(c_ptrs, mask=visible, other=1.0)
            acc += tl.sum(p, axis=0)

        out_ptrs = out_ptr + b * stride_ob + h * stride_oh + cols * stride_on
        tl.store(out_ptrs, acc / T, mask=col_ok)


_SM_COUNT: dict[int, int] = {}


def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: any small number will do
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _row_block(T: int) -> int:
    # tl.dot needs every tile side >= 16; 64 rows cover the usual 16..64 raters
    # in one block. The interpreter keeps 16 so that tiny tests span row blocks.
    if INTERPRET:
        return 16
    return min(64, max(16, triton.next_power_of_2(T)))


def _default_num_splits(programs: int, kv_len: int, device: torch.device) -> int:
    # Enough key splits for about two programs per multiprocessor, but no split
    # shorter than MIN_KEYS_PER_SPLIT keys. Stats memory is 2 * S * B*Hq*T fp32.
    wanted = triton.cdiv(2 * _multiprocessors(device), programs)
    return max(1, min(wanted, kv_len // MIN_KEYS_PER_SPLIT, MAX_SPLITS))


def text_visual_attention_triton(q: torch.Tensor, k: torch.Tensor, query_index: torch.Tensor,
                                 visual_index: torch.Tensor, *, scale: Optional[float] = None,
                                 correction: Correction = None,
                                 num_splits: Optional[int] = None) -> torch.Tensor:
    """The Triton path of `text_visual_attention` (same contract as the reference).

    `num_splits` (key splits of pass 1) is for tests; None picks it from the GPU size.
    """
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the triton package (pip install 'sparsevlm_exp[gpu]'); "
                           "use backend='torch' or 'auto'")
    if not q.is_cuda and not INTERPRET:
        raise RuntimeError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton "
                           f"is imported (CPU interpreter, for tests); got tensors on {q.device}")
    B, Hq, Hkv, T, L, N, d = check_inputs(q, k, query_index, visual_index)
    kv_len = check_index_ranges(query_index, visual_index, L)  # max(query_index) + 1 <= L
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    corr = visual_correction(correction, query_index, visual_index, L)  # [B, T, N] fp32 or None

    out = torch.empty((B, Hq, N), dtype=torch.float32, device=q.device)  # [B, Hq, N]
    if N == 0:
        return out

    block_t = _row_block(T)
    block_d = max(16, triton.next_power_of_2(d))
    row_blocks = triton.cdiv(T, block_t)
    if num_splits is None:
        num_splits = _default_num_splits(B * Hq * row_blocks, kv_len, q.device)
    num_splits = max(1, min(int(num_splits), kv_len))
    # Per-split running max and denominator, [B, Hq, S, T] fp32 each (rows last: contiguous loads).
    m_part = torch.empty((B, Hq, num_splits, T), dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)

    qk_scale = scale * LOG2E
    exact_fp32 = q.dtype == torch.float32
    upcast_dot = INTERPRET and q.dtype == torch.bfloat16  # see _dot: an interpreter bug, not a GPU path
    t_bucket = triton.next_power_of_2(T)
    group = Hq // Hkv

    _row_stats_kernel[(B * Hq, row_blocks, num_splits)](
        q, k, query_index, m_part, l_part,
        Hq, T, kv_len, num_splits,
        *q.stride(), *k.stride(), *query_index.stride(), *m_part.stride(),
        qk_scale,
        t_bucket, triton.next_power_of_2(kv_len),
        GROUP=group, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_T=block_t, EXACT_FP32=exact_fp32, UPCAST_DOT=upcast_dot,
        enable_fp_fusion=FP_FUSION,
    )

    corr_arg = corr if corr is not None else out  # unused pointer when HAS_CORRECTION is False
    corr_strides = corr.stride() if corr is not None else (0, 0, 0)
    _visual_mass_kernel[lambda meta: (B * Hq, triton.cdiv(N, meta["BLOCK_N"]))](
        q, k, query_index, visual_index, m_part, l_part, corr_arg, out,
        Hq, T, N, num_splits,
        *q.stride(), *k.stride(), *query_index.stride(), *visual_index.stride(),
        *m_part.stride(), *corr_strides, *out.stride(),
        qk_scale,
        t_bucket, triton.next_power_of_2(N),
        GROUP=group, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_T=block_t,
        HAS_CORRECTION=corr is not None, EXACT_FP32=exact_fp32, UPCAST_DOT=upcast_dot,
        enable_fp_fusion=FP_FUSION,
    )
    return out


_warned_no_triton = False


def text_visual_attention(q: torch.Tensor, k: torch.Tensor, query_index: torch.Tensor,
                          visual_index: torch.Tensor, *, scale: Optional[float] = None,
                          correction: Correction = None, backend: str = "auto",
                          key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over query rows of the causal softmax probability on visual columns.

    q: [B, Hq, T, d] post-rotary queries of the T query rows; query_index: [B, T]
    their sequence positions. k: [B, Hkv, L, d] post-rotary keys (Hq % Hkv == 0,
    query head h reads kv head h // (Hq // Hkv)). visual_index: [B, N] sequence
    positions of the visual tokens. scale defaults to 1/sqrt(d). correction: None,
    a [B, T, L] tensor, or a callable (query_index, visual_index) -> [B, T, N];
    visible probabilities are divided by it before the mean over rows.
    key_mask: None, or [B, L] bool with False on LEFT pad keys (the engine's
    LoopState.key_mask): a row's softmax then runs over its real keys only, exactly
    as the model's own padded attention does. Pads are only ever at the left, so
    each row is computed on its keys from the first real one on (both backends, no
    masked kernel needed); ValueError for a pad after a real key.
    Returns [B, Hq, N] fp32.

    backend: "auto" (Triton on CUDA tensors, the torch reference otherwise),
    "triton" (CUDA, or CPU under TRITON_INTERPRET=1), or "torch".
    """
    if key_mask is not None and not bool(key_mask.all()):
        return _without_left_pads(q, k, query_index, visual_index, key_mask, scale=scale, correction=correction,
                                  backend=backend)
    global _warned_no_triton
    if backend not in BACKENDS:
        raise bad_value("backend", backend, "one of " + ", ".join(BACKENDS))
    if backend == "auto":
        if q.is_cuda and not HAS_TRITON and not _warned_no_triton:
            warnings.warn("triton is not installed: text_visual_attention uses the torch reference, "
                          "which materialises [B, Hq, T, L] logits", RuntimeWarning, stacklevel=2)
            _warned_no_triton = True
        backend = "triton" if (q.is_cuda and HAS_TRITON) else "torch"
    if backend == "torch":
        return text_visual_attention_ref(q, k, query_index, visual_index, scale=scale, correction=correction)
    return text_visual_attention_triton(q, k, query_index, visual_index, scale=scale, correction=correction)


def _without_left_pads(q, k, query_index, visual_index, key_mask, *, scale, correction, backend) -> torch.Tensor:
    """text_visual_attention of rows whose first `start` keys are pads: each group of
    rows with the same pad count runs on k[..., start:, :] with every index shifted
    by -start; a correction is evaluated once on the ORIGINAL indices (v2's gravity
    reads positions by sequence index) and handed over as its [B, T, N] values."""
    key_mask = key_mask.to(q.device).bool()
    L = k.shape[2]
    if key_mask.shape != (k.shape[0], L):
        raise ValueError(f"key_mask must have shape {(k.shape[0], L)}; got {tuple(key_mask.shape)}")
    starts = (~key_mask).sum(dim=1)                                                   # [B] pads per row
    first_real = key_mask.int().argmax(dim=1)
    if not torch.equal(starts, first_real):
        raise ValueError("key_mask has a pad after a real key: only left padding is supported")
    values = visual_correction(correction, query_index, visual_index, L)              # [B, T, N] or None
    out = torch.empty(q.shape[0], q.shape[1], visual_index.shape[1], dtype=torch.float32, device=q.device)
    for start in starts.unique().tolist():
        rows = (starts == start).nonzero().view(-1)
        part = values[rows] if values is not None else None
        out[rows] = text_visual_attention(
            q[rows], k[rows, :, start:], query_index[rows] - start, visual_index[rows] - start, scale=scale,
            correction=(lambda qi, vi, part=part: part) if part is not None else None, backend=backend)
    return out
