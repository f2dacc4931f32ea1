"""KV-cache compaction (pruners.compact_cache) and its measurement script,
scripts/bench_kv_gather.py (issue #3: a Triton gather only if one could beat torch
by >= 1.5x)."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sparsevlm_exp.pruners import compact_cache

REPO = Path(__file__).resolve().parents[1]


def _layers(B, L, n_layers=3, H=2, d=5):
    g = torch.Generator().manual_seed(0)
    return [SimpleNamespace(keys=torch.randn(B, H, L, d, generator=g), values=torch.randn(B, H, L, d, generator=g))
            for _ in range(n_layers)]


@pytest.mark.parametrize("idx", [[[0, 2, 3, 7, 9]], [[0, 2, 3, 7, 9], [1, 4, 5, 6, 8]]], ids=["batch1", "batch2"])
def test_compact_cache_keeps_exactly_the_given_positions(idx):
    idx = torch.tensor(idx)
    layers = _layers(idx.shape[0], 10)
    full = [(layer.keys.clone(), layer.values.clone()) for layer in layers]
    compact_cache(layers, idx)
    for layer, (keys, values) in zip(layers, full):
        for b, row in enumerate(idx):
            # the reference: plain indexing of each batch row's sequence axis
            assert torch.equal(layer.keys[b], keys[b][:, row]) and torch.equal(layer.values[b], values[b][:, row])
        assert layer.keys.shape == (idx.shape[0], 2, 5, 5)


def _bench_module():
    # Imported in-process (not a subprocess): a second torch import costs seconds on 2 cores.
    spec = importlib.util.spec_from_file_location("bench_kv_gather", REPO / "scripts" / "bench_kv_gather.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_verdict_follows_the_headroom_bar():
    bench = _bench_module()
    assert bench.verdict([{"L": 1024, "headroom": 1.2}, {"L": 4096, "headroom": 1.49}]).startswith("keep torch")
    says = bench.verdict([{"L": 1024, "headroom": 1.2}, {"L": 4096, "headroom": 1.5}])
    assert says.startswith("a fused gather could") and "[4096]" in says


def test_make_cache_keeps_prefix_text_and_the_asked_share_of_visual_tokens():
    layers, idx = _bench_module().make_cache(L=262, n_layers=2, keep=0.25, dtype=torch.float32, device="cpu")
    n_visual = 262 - 30 - 32
    assert idx.shape == (1, 30 + 50 + 32) and bool((idx[0, 1:] > idx[0, :-1]).all())
    assert idx[0, :30].tolist() == list(range(30)) and idx[0, -32:].tolist() == list(range(230, 262))
    assert bool(((idx[0, 30:-32] >= 30) & (idx[0, 30:-32] < 30 + n_visual)).all())
    assert layers[0].keys.shape == (1, 4, 262, 128)


def test_bench_script_cpu_small_writes_rows_and_a_verdict(tmp_path, capsys):
    out = tmp_path / "kv.json"
    code = _bench_module().main(["--device", "cpu", "--small", "--lengths", "256", "--layers", "2",
                                 "--warmup", "1", "--iters", "2", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    record = json.loads(out.read_text())
    (row,) = record["rows"]
    assert row["L"] == 256 and row["layers"] == 2 and row["compact_cache_ms"] > 0 and row["copy_bound_ms"] > 0
    assert row["headroom"] == pytest.approx(row["compact_cache_ms"] / row["copy_bound_ms"])
    assert record["verdict"] in printed
    assert record["device"].endswith(f"{os.cpu_count()} cores")   # what it ran on, for the record


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_bench_script_refuses_without_cuda_in_one_line(tmp_path, capsys):
    assert _bench_module().main(["--out", str(tmp_path / "never.json")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "CUDA is not available" in err
    assert not (tmp_path / "never.json").exists()
