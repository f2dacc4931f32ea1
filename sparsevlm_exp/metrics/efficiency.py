"""Efficiency measurements: stage timers, peak memory, and the prefill FLOPs estimate.

On CUDA, timers synchronise before reading the clock (kernels are asynchronous, so
an unsynchronised perf_counter measures launch time, not work); on CPU,
perf_counter is exact enough.
"""
from __future__ import annotations

import os
import statistics
import time
from contextlib import contextmanager

import torch


class StageTimer:
    """Accumulates wall-clock milliseconds per named stage."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self.ms: dict[str, float] = {}

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    @contextmanager
    def __call__(self, stage: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.ms[stage] = self.ms.get(stage, 0.0) + (time.perf_counter() - start) * 1e3


def median_call_ms(fn, device: torch.device | str, warmup: int, iters: int) -> float:
    """Median milliseconds of `iters` calls of fn() after `warmup` untimed ones (the first
    calls compile, autotune and warm caches). CUDA: events around each call; CPU:
    perf_counter. For micro-benchmarks of one operation (scripts/bench_*.py)."""
    for _ in range(warmup):
        fn()
    times = []
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cpu_model_name() -> str | None:
    """The CPU's model name from /proc/cpuinfo (platform.processor() says only 'x86_64')."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def device_description(device: torch.device | str) -> str:
    """What a timing ran on, for the record: the GPU's name, or the CPU's model and core count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model_name() or 'unknown CPU'}, {os.cpu_count()} cores"


def reset_peak_memory(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device | str) -> int | None:
    """Peak allocated GPU memory since the last reset; None on CPU (no allocator stats)."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def prefill_flops(seq_lens: list[int], hidden: int, intermediate: int, *, n_heads: int,
                  n_kv_heads: int | None = None, head_dim: int | None = None) -> float:
    """Prefill multiply-adds of the decoder layers, exact for grouped-query attention
    (GQA: Qwen2.5-VL-7B has 28 query heads and 4 KV heads). The unit is the paper's:
    one multiply-add counted once (torch's FlopCounterMode counts 2 per multiply-add).

    Per layer, with n that layer's sequence length (seq_lens: one entry per layer),
    d = hidden, m = intermediate, a = n_heads * head_dim, g = n_kv_heads * head_dim:
        q and o projections        2 n d a
        k and v projections        2 n d g      (sized by the KV heads)
        scores QK^T and weights.V  2 n^2 a      (the full square, as the paper and
                                                 FlopCounterMode count attention)
        gated MLP (gate, up, down) 3 n d m
    Biases, norms, rotary and softmax are not counted (elementwise, O(n d)).
    n_kv_heads defaults to n_heads (plain multi-head attention) and head_dim to
    hidden // n_heads; with both defaults this equals `prefill_flops_paper`.
    """
    n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
    head_dim = hidden // n_heads if head_dim is None else head_dim
    d, m, a, g = hidden, intermediate, n_heads * head_dim, n_kv_heads * head_dim
    return float(sum(2 * n * d * a + 2 * n * d * g + 2 * n * n * a + 3 * n * d * m for n in seq_lens))


def prefill_flops_of(seq_lens: list[int], text_config) -> float:
    """`prefill_flops` with the sizes read from a transformers text config
    (hidden_size, intermediate_size, num_attention_heads, num_key_value_heads, head_dim)."""
    return prefill_flops(seq_lens, text_config.hidden_size, text_config.intermediate_size,
                         n_heads=text_config.num_attention_heads,
                         n_kv_heads=getattr(text_config, "num_key_value_heads", None),
                         head_dim=getattr(text_config, "head_dim", None))


def prefill_flops_paper(seq_lens: list[int], hidden: int, intermediate: int) -> float:
    """Prefill FLOPs as the SparseVLM paper counts them (for comparison with its
    4.62T -> 2.14T): per layer 4 n d^2 + 2 n^2 d + 3 n d m, multiply-adds counted
    once. It treats K/V projections as full width (d x d), so on GQA models it
    overstates the attention projections (Qwen2.5-VL-7B: 4 n d^2 where the exact
    count is n d (2*3584 + 2*512)); `prefill_flops` is exact."""
    d, m = hidden, intermediate
    return float(sum(4 * n * d * d + 2 * n * n * d + 3 * n * d * m for n in seq_lens))
