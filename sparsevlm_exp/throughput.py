"""python -m sparsevlm_exp.throughput: samples/s and tokens/s at batch 1 vs batch B, in one run.

    python -m sparsevlm_exp.throughput                               # embedded model, 500 test questions, B=8
    python -m sparsevlm_exp.throughput batch_size=16 dataset.size=100 scorer=v15 keep=0.3 layer=1

Composes the same config tree as the CLI (conf/config.yaml; `batch_size` is the B compared
with 1), loads the model once, then answers every sample twice through the runner's own
sample loop: one at a time and in length-grouped batches of B, chunk by chunk (one
grouping window of 8 B samples at a time, both modes back to back, so that the two are
measured side by side). Prints and writes
(`--out`, default throughput.json in the working directory) per mode: wall-clock seconds,
samples/s, generated tokens/s, and whether every prediction and kept count of batch B
equals batch 1's. Wall clock includes image decoding and encoding (as a real run does).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from .errors import ConfigError, build


def measure(overrides: list[str]) -> dict:
    """{"batch_1": {...}, "batch_B": {...}, "identical": bool, "speedup": float} (module docstring)."""
    from omegaconf import open_dict

    from .api import compose_config
    from .runner import GROUPING_WINDOW, Experiment

    cfg = compose_config(overrides + ["logger=none", "viz.n=0"])
    B = int(cfg.batch_size)
    if B < 2:
        raise ConfigError(f"batch_size={B} is not allowed here: the bench compares batch 1 with batch_size >= 2")
    with tempfile.TemporaryDirectory() as tmp:
        exp = Experiment(cfg, Path(tmp))
        adapter = build(cfg.model, "model")
        text_cfg = exp.model_config.get_text_config()
        todo = list(range(len(exp.dataset) if cfg.limit is None else min(cfg.limit, len(exp.dataset))))
        if cfg.threads is not None:
            torch.set_num_threads(int(cfg.threads))
        # Side by side: the samples go in chunks of one grouping window (the batches batch B
        # forms in a whole run), each chunk answered at batch 1 and at batch B back to back,
        # which goes first alternating (1, B, B, 1, ...). A slow spell of a shared machine then
        # slows both modes alike instead of one whole pass, and neither mode always meets
        # the dataset's caches cold.
        chunk = GROUPING_WINDOW * B
        seconds, records = {1: 0.0, B: 0.0}, {1: {}, B: {}}
        for k, start in enumerate(range(0, len(todo), chunk)):
            for size in ((1, B) if k % 2 == 0 else (B, 1)):
                with open_dict(exp.cfg):
                    exp.cfg.batch_size = size
                begin = time.perf_counter()
                records[size].update(exp._records(adapter, todo[start:start + chunk], text_cfg))
                seconds[size] += time.perf_counter() - begin
        result = {}
        for size in (1, B):
            done = records[size]
            tokens = sum(r.new_tokens or 0 for r in done.values())
            result[f"batch_{size}"] = {
                "batch_size": size, "samples": len(done), "seconds": seconds[size],
                "samples_per_s": len(done) / seconds[size], "tokens_per_s": tokens / seconds[size],
                "failed": sum(1 for r in done.values() if not r.ok),
                "accuracy": sum(r.score or 0 for r in done.values()) / max(1, len(done)),
                "_records": done,
            }
    one, many = result["batch_1"].pop("_records"), result[f"batch_{B}"].pop("_records")
    same = [i for i in todo if one[i].prediction == many[i].prediction and one[i].kept == many[i].kept]
    result["identical"] = len(same) == len(todo)
    result["n_identical"] = len(same)
    result["speedup"] = result[f"batch_{B}"]["samples_per_s"] / result["batch_1"]["samples_per_s"]
    result["config"] = {"overrides": overrides, "batch_size": B, "device": str(adapter.device),
                        "threads": torch.get_num_threads()}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsevlm_exp.throughput", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="throughput.json", help="where to write the numbers (JSON)")
    parser.add_argument("overrides", nargs="*", help="config overrides as on the CLI (default batch_size=8)")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if not any(o.startswith("batch_size=") for o in overrides):
        overrides.append("batch_size=8")
    try:
        result = measure(overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    B = result["config"]["batch_size"]
    for key in ("batch_1", f"batch_{B}"):
        r = result[key]
        print(f"{key:>9}: {r['samples']} samples in {r['seconds']:.1f} s = {r['samples_per_s']:.2f} samples/s, "
              f"{r['tokens_per_s']:.1f} tokens/s, accuracy {r['accuracy']:.3f}, failed {r['failed']}")
    print(f"speedup {result['speedup']:.2f}x; identical predictions and kept counts: "
          f"{result['n_identical']}/{result[f'batch_{B}']['samples']}")
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
