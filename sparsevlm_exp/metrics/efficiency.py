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


def prefill_flops(seq_lens: list[int], hidden: int, intermediate: int) -> float:
    """Prefill FLOPs of the decoder layers, as the SparseVLM paper counts them:
    per layer 4 n d^2 + 2 n^2 d + 3 n d m, with n that layer's sequence length,
    d the hidden size and m the MLP intermediate size (multiply-adds counted once)."""
    d, m = hidden, intermediate
    return float(sum(4 * n * d * d + 2 * n * n * d + 3 * n * d * m for n in seq_lens))
