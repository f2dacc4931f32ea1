"""Benchmark the text-to-visual attention scoring kernel against its torch reference.

Qwen2.5-VL-7B attention shapes (28 query heads, 4 KV heads, head dim 128,
batch 1): a 30-token prefix, one visual span of N = L - T - 32 tokens, and the
last T tokens as query rows (text raters after the image). For every
(L, T) it reports the median time of the Triton kernel and of the reference
(CUDA events, after warm-up; the first kernel call compiles and autotunes), the
peak extra memory of each (torch.cuda.max_memory_allocated minus what was
allocated before the call: inputs; the output is included), and the largest
difference between the two.

    python scripts/bench_kernels.py --out outputs/bench_kernels.json        # GPU
    python scripts/bench_kernels.py --device cpu --small                    # reference only, tiny sizes

Without CUDA (and without --device cpu --small) it refuses in one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sparsevlm_exp.kernels import HAS_TRITON, TRITON_VERSION, text_visual_attention_ref  # noqa: E402
from sparsevlm_exp.kernels.text_visual_attention import text_visual_attention_triton  # noqa: E402
from sparsevlm_exp.metrics.efficiency import device_description, median_call_ms  # noqa: E402

HQ, HKV, HEAD_DIM = 28, 4, 128  # Qwen2.5-VL-7B
PREFIX = 30  # system prompt + <|vision_start|> before the image tokens
FULL_LENGTHS = [1024, 4096, 16384, 65536]
FULL_ROWS = [16, 64, 256]
SMALL_LENGTHS = [128, 256]
SMALL_ROWS = [4, 16]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--small", action="store_true", help="tiny sizes (L in 128, 256; T in 4, 16)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--lengths", type=int, nargs="+", help="override the sequence lengths L")
    p.add_argument("--rows", type=int, nargs="+", help="override the query-row counts T")
    p.add_argument("--correction", action="store_true", help="also divide by a gravity-like correction")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_kernels.json")
    return p.parse_args(argv)


def refusal(args) -> str | None:
    if args.device == "cpu" and not args.small:
        return "bench_kernels: --device cpu runs the torch reference only and needs --small"
    if args.device == "cuda" and not torch.cuda.is_available():
        return ("bench_kernels: CUDA is not available; run it on a GPU, "
                "or use --device cpu --small for a reference-only smoke run")
    if args.device == "cuda" and not HAS_TRITON:
        return "bench_kernels: triton is not installed (pip install 'sparsevlm_exp[gpu]')"
    return None


def make_inputs(L: int, T: int, dtype: torch.dtype, device: str, seed: int = 0):
    n_visual = L - T - PREFIX - 2
    if n_visual < 1:
        raise ValueError(f"L={L} is too short for T={T} query rows and a visual span")
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, HQ, T, HEAD_DIM, generator=g).to(device=device, dtype=dtype)  # [B, Hq, T, d]
    k = torch.randn(1, HKV, L, HEAD_DIM, generator=g).to(device=device, dtype=dtype)  # [B, Hkv, L, d]
    query_index = torch.arange(L - T, L, device=device)[None]  # [B, T]: the text after the image
    visual_index = torch.arange(PREFIX, PREFIX + n_visual, device=device)[None]  # [B, N]
    return q, k, query_index, visual_index


def gravity_like(query_index, visual_index):
    # Positive and position-only, like SparseVLM v2.0's guarded gravity correction.
    distance = (query_index[:, :, None] - visual_index[:, None, :]).float()  # [B, T, N]
    return 1.5 + torch.cos(0.01 * distance)


def extra_memory_bytes(fn) -> int:
    """Peak bytes allocated by one call beyond what was live before it (the output included)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak


def bench_one(L: int, T: int, args) -> dict:
    dtype = DTYPES[args.dtype]
    q, k, qi, vi = make_inputs(L, T, dtype, args.device)
    correction = gravity_like if args.correction else None
    row = {"L": L, "T": T, "N": vi.shape[1], "output_bytes": HQ * vi.shape[1] * 4}

    def reference():
        return text_visual_attention_ref(q, k, qi, vi, correction=correction)

    def kernel():
        return text_visual_attention_triton(q, k, qi, vi, correction=correction)

    try:
        row["torch_ms"] = median_call_ms(reference, args.device, args.warmup, args.iters)
        row["torch_extra_bytes"] = extra_memory_bytes(reference) if args.device == "cuda" else None
        want = reference()
    except torch.cuda.OutOfMemoryError:
        row["torch_ms"], row["torch_extra_bytes"], want = None, "OOM", None
        torch.cuda.empty_cache()

    if args.device == "cuda":
        row["triton_ms"] = median_call_ms(kernel, args.device, args.warmup, args.iters)
        row["triton_extra_bytes"] = extra_memory_bytes(kernel)
        got = kernel()
        row["max_abs_diff"] = float((got - want).abs().max()) if want is not None else None
        row["speedup"] = row["torch_ms"] / row["triton_ms"] if row["torch_ms"] else None
        # Target: extra memory <= 2x the output + O(L); this ratio is the first part.
        row["triton_extra_over_output"] = row["triton_extra_bytes"] / row["output_bytes"]
    return row


def _fmt(value, spec):
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return format(value, spec)


def _mib(value):
    return value if isinstance(value, str) or value is None else value / 2**20


def markdown(rows: list[dict], device: str) -> str:
    if device == "cpu":
        lines = ["| L | T | N | torch ms |", "|---:|---:|---:|---:|"]
        lines += [f"| {r['L']} | {r['T']} | {r['N']} | {_fmt(r['torch_ms'], '.3f')} |" for r in rows]
        return "\n".join(lines)
    lines = ["| L | T | N | triton ms | torch ms | speedup | triton extra MiB | torch extra MiB | "
             "triton extra / output | max abs diff |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['L']} | {r['T']} | {r['N']} | {_fmt(r['triton_ms'], '.3f')} | {_fmt(r['torch_ms'], '.3f')} | "
            f"{_fmt(r['speedup'], '.2f')} | {_fmt(_mib(r['triton_extra_bytes']), '.2f')} | "
            f"{_fmt(_mib(r['torch_extra_bytes']), '.2f')} | {_fmt(r['triton_extra_over_output'], '.2f')} | "
            f"{_fmt(r['max_abs_diff'], '.1e')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    reason = refusal(args)
    if reason:
        print(reason, file=sys.stderr)
        return 2
    lengths = args.lengths or (SMALL_LENGTHS if args.small else FULL_LENGTHS)
    rows_counts = args.rows or (SMALL_ROWS if args.small else FULL_ROWS)

    rows = [bench_one(L, T, args) for L in lengths for T in rows_counts]
    table = markdown(rows, args.device)
    print(table)

    record = {
        "device": device_description(args.device),
        "torch": torch.__version__,
        "triton": TRITON_VERSION,
        "dtype": args.dtype,
        "heads": {"query": HQ, "kv": HKV, "head_dim": HEAD_DIM},
        "correction": args.correction,
        "warmup": args.warmup,
        "iters": args.iters,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
