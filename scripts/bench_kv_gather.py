"""Should KV-cache compaction get a Triton gather? Measure what one could gain.

After a `kv_only` prune every layer's keys and values [B, Hkv, L, d] are cut to the
kept positions (`sparsevlm_exp.pruners.compact_cache`, plain torch gathers, two per
layer). Issue #3 asks for a Triton gather only if it would beat torch indexing by
>= 1.5x over all layers. Rather than write a kernel to find out, this script bounds
what any kernel could do: a gather must read and write at least the bytes it
keeps, so ONE contiguous copy of all layers' kept bytes (a single launch, the best
case of a fused kernel) is a lower bound on its time. The headroom

    headroom = compact_cache time / copy-bound time

is the most any gather kernel could gain over torch. Below 1.5 at every length,
no kernel can meet the issue's bar and torch stays; at or above it, a fused
gather could win there, and is worth writing and measuring.

Qwen2.5-VL-7B cache shapes (28 layers, 4 KV heads, head dim 128, batch 1, bf16 by
default); a 30-token prefix, then N = L - 62 visual tokens, then 32 text tokens;
`--keep` of the visual tokens kept (random, sorted positions). Also timed, for
the record: the same cut as a gather with the index expanded to every element
(`expanded_gather`, compact_cache's spelling before it used index_select for
batch 1).

    python scripts/bench_kv_gather.py --out outputs/bench_kv_gather.json        # GPU
    python scripts/bench_kv_gather.py --device cpu --small                      # smoke run on CPU

Without CUDA (and without --device cpu --small) it refuses in one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sparsevlm_exp.metrics.efficiency import device_description, median_call_ms  # noqa: E402
from sparsevlm_exp.pruners import compact_cache  # noqa: E402

LAYERS, HKV, HEAD_DIM = 28, 4, 128  # Qwen2.5-VL-7B
PREFIX, SUFFIX = 30, 32
FULL_LENGTHS = [1024, 4096, 16384, 65536]
SMALL_LENGTHS = [256, 1024]
SMALL_LAYERS = 4
BAR = 1.5  # the threshold for writing a Triton gather
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--small", action="store_true", help=f"tiny sizes (L in {SMALL_LENGTHS}, {SMALL_LAYERS} layers)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--lengths", type=int, nargs="+", help="override the cache lengths L")
    p.add_argument("--layers", type=int, help=f"override the number of layers ({LAYERS}; {SMALL_LAYERS} with --small)")
    p.add_argument("--keep", type=float, default=0.25, help="fraction of the visual tokens kept")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_kv_gather.json")
    return p.parse_args(argv)


def refusal(args) -> str | None:
    if args.device == "cpu" and not args.small:
        return "bench_kv_gather: --device cpu is a smoke run and needs --small"
    if args.device == "cuda" and not torch.cuda.is_available():
        return "bench_kv_gather: CUDA is not available; run it on a GPU, or use --device cpu --small for a smoke run"
    if not 0.0 < args.keep <= 1.0:
        return f"bench_kv_gather: --keep={args.keep} must be in (0, 1]"
    return None


def make_cache(L: int, n_layers: int, keep: float, dtype, device: str, seed: int = 0):
    """Returns (layers: objects with .keys/.values [1, Hkv, L, d], idx [1, L_new] kept positions)."""
    n_visual = L - PREFIX - SUFFIX
    if n_visual < 1:
        raise ValueError(f"L={L} is too short for a visual span")
    g = torch.Generator().manual_seed(seed)
    layers = [SimpleNamespace(keys=torch.randn(1, HKV, L, HEAD_DIM, generator=g).to(device, dtype),
                              values=torch.randn(1, HKV, L, HEAD_DIM, generator=g).to(device, dtype))
              for _ in range(n_layers)]
    n_keep = max(1, round(keep * n_visual))
    kept_visual = PREFIX + torch.randperm(n_visual, generator=g)[:n_keep]
    idx = torch.cat([torch.arange(PREFIX), kept_visual.sort().values, torch.arange(L - SUFFIX, L)])
    return layers, idx[None].to(device)


def bench_one(L: int, n_layers: int, args) -> dict:
    dtype = DTYPES[args.dtype]
    layers, idx = make_cache(L, n_layers, args.keep, dtype, args.device)
    L_new = idx.shape[1]
    kept_bytes = 2 * n_layers * HKV * L_new * HEAD_DIM * layers[0].keys.element_size()

    def torch_gather():
        # compact_cache replaces .keys/.values, so hand it fresh holders of the same tensors.
        holders = [SimpleNamespace(keys=layer.keys, values=layer.values) for layer in layers]
        compact_cache(holders, idx)
        return holders

    def expanded_gather():
        expand = idx[:, None, :, None].expand(-1, HKV, -1, HEAD_DIM)
        return [(layer.keys.gather(2, expand), layer.values.gather(2, expand)) for layer in layers]

    src = torch.empty(kept_bytes, dtype=torch.uint8, device=args.device)
    dst = torch.empty_like(src)

    def copy_bound():
        dst.copy_(src)

    # The measurement is only worth its name if the torch paths cut correctly.
    cut = torch_gather()
    for layer, holder, (k_sel, v_sel) in zip(layers, cut, expanded_gather()):
        want = layer.keys[:, :, idx[0]]
        if not (torch.equal(holder.keys, want) and torch.equal(k_sel, want)
                and torch.equal(holder.values, layer.values[:, :, idx[0]])
                and torch.equal(v_sel, layer.values[:, :, idx[0]])):
            raise AssertionError("compact_cache or the expanded gather did not keep the right positions")

    row = {"L": L, "L_kept": L_new, "layers": n_layers, "kept_bytes": kept_bytes}
    row["compact_cache_ms"] = median_call_ms(torch_gather, args.device, args.warmup, args.iters)
    row["expanded_gather_ms"] = median_call_ms(expanded_gather, args.device, args.warmup, args.iters)
    row["copy_bound_ms"] = median_call_ms(copy_bound, args.device, args.warmup, args.iters)
    row["headroom"] = row["compact_cache_ms"] / row["copy_bound_ms"]
    row["expanded_gather_over_compact_cache"] = row["expanded_gather_ms"] / row["compact_cache_ms"]
    row["copy_bound_GBps"] = 2 * kept_bytes / row["copy_bound_ms"] / 1e6  # read + write
    return row


def verdict(rows: list[dict]) -> str:
    worth = [r["L"] for r in rows if r["headroom"] >= BAR]
    if not worth:
        best = max(r["headroom"] for r in rows)
        return (f"keep torch: no gather kernel can beat compact_cache by {BAR}x at any length "
                f"(largest headroom {best:.2f}x)")
    return (f"a fused gather could beat compact_cache by >= {BAR}x at L = {worth}: "
            "write it and measure it against these rows")


def markdown(rows: list[dict]) -> str:
    lines = ["| L | kept | layers | compact_cache ms | copy bound ms | headroom | copy GB/s | "
             "expanded gather ms | expanded / compact_cache |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['L']} | {r['L_kept']} | {r['layers']} | {r['compact_cache_ms']:.3f} | "
                     f"{r['copy_bound_ms']:.3f} | {r['headroom']:.2f} | {r['copy_bound_GBps']:.0f} | "
                     f"{r['expanded_gather_ms']:.3f} | {r['expanded_gather_over_compact_cache']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    reason = refusal(args)
    if reason:
        print(reason, file=sys.stderr)
        return 2
    lengths = args.lengths or (SMALL_LENGTHS if args.small else FULL_LENGTHS)
    n_layers = args.layers or (SMALL_LAYERS if args.small else LAYERS)
    rows = [bench_one(L, n_layers, args) for L in lengths]
    print(markdown(rows))
    decision = verdict(rows)
    print(decision)
    record = {
        "device": device_description(args.device),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "keep": args.keep,
        "cache": {"layers": n_layers, "kv_heads": HKV, "head_dim": HEAD_DIM, "batch": 1},
        "warmup": args.warmup,
        "iters": args.iters,
        "verdict": decision,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
