"""Shared arithmetic of the similarity-based selectors (DivPrune, CDPruner, VisPruner):
the cosine matrix of the visual tokens, and numba compilation of their sequential loops.

Why numba: those selectors end in a loop of 96-256 dependent steps (a greedy pick, a
de-duplication round), each a handful of operations on ~1,000 numbers. Written as numpy
or torch calls, the per-call overhead (1-5 us) was most of the loop and kept the CPU
selection above 5% of the pruned prefill (docs/BENCHMARKS.md, runs 7-9). Compiled, a step
costs its arithmetic only. numba is imported on first use, so GPU runs (device loops) and
every other method never load it.
"""
from __future__ import annotations

import functools
import warnings

import torch


def cosine_matrix(unit: torch.Tensor) -> torch.Tensor:
    """[..., N, N] S_ij = <u_i, u_j> of unit-norm rows unit [..., N, D] (the cosine matrix),
    in unit's dtype and device.

    Computed as two products, [:h] x all and [h:] x [h:] (h = N // 2), with the block
    S[h:, :h] copied as the transpose of S[:h, h:] (S is symmetric): 3/4 of the
    multiply-adds of unit @ unit.T; N = 1,024 / 896, D = 512, fp32, torch 2.13 CPU with 2
    threads on 2 AMD EPYC cores, median of 100 interleaved calls: 6.8 / 5.0 ms against
    7.6 / 5.6 ms (2026-11-30). Each entry is the same dot
    product as in unit @ unit.T; which of the two BLAS calls computed it can change its
    last bit, so S is not always bit-equal to unit @ unit.T (every selector of this
    project uses this one function, so they agree). Differentiable like unit @ unit.mT."""
    N = unit.shape[-2]
    h = N // 2
    if h == 0:
        return unit @ unit.mT
    out = unit.new_empty(*unit.shape[:-2], N, N)
    if unit.dim() == 2 and not (unit.requires_grad and torch.is_grad_enabled()):      # mm(out=) refuses autograd
        torch.mm(unit[:h], unit.T, out=out[:h])                                        # rows [:h], all columns
    else:
        out[..., :h, :] = unit[..., :h, :] @ unit.mT
    out[..., h:, h:] = unit[..., h:, :] @ unit[..., h:, :].mT
    out[..., h:, :h] = out[..., :h, h:].mT
    return out


def compiled(fn):
    """fn compiled by numba.njit(cache=True, nogil=True) on its first call (numba is
    imported then, not at import time); `.py_func` is fn itself (the same code, run by
    Python: slow, but a reference on small inputs) and, once called, `.dispatcher` the
    numba dispatcher. The compiled code is cached next to the module (__pycache__) or,
    where that is read-only, in the user's cache directory (NUMBA_CACHE_DIR overrides
    both), so later processes load it in about a second instead of compiling (~2-10 s for
    the two loops, once). With no writable cache directory at all, each process compiles
    again (one warning says so). Raises ImportError (one line) without numba."""

    @functools.wraps(fn)
    def call(*args):
        if call.dispatcher is None:
            try:
                import numba
            except ImportError as error:   # a dependency of this package: a broken install
                raise ImportError(f"{fn.__module__}.{fn.__name__} runs compiled with numba, which is not "
                                  f"importable ({error}): pip install 'numba>=0.60'") from error
            try:
                call.dispatcher = numba.njit(cache=True, nogil=True)(fn)
            except RuntimeError as error:   # no writable cache directory (read-only install and home)
                warnings.warn(f"{fn.__name__}: numba cannot cache compiled code here ({error}); it compiles "
                              "in every process. Set NUMBA_CACHE_DIR to a writable directory to keep it.",
                              stacklevel=2)
                call.dispatcher = numba.njit(cache=False, nogil=True)(fn)
        return call.dispatcher(*args)

    call.py_func = fn
    call.dispatcher = None
    return call
