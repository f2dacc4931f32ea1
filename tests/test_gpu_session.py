"""scripts/gpu_session.sh, the one-call runner of the GPU measurements (issues #3, #6).

A GPU is never here, so SMOKE=1 runs its steps on CPU at toy sizes: this checks the
script's wiring (stages, output files, the package kept to its own run), not speed."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_session.sh"


def _run(*args, tmp_path, smoke=True, timeout=300):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "SMOKE": "1" if smoke else "0"}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_unknown_stage_is_refused_in_one_line(tmp_path):
    done = _run("everything", tmp_path=tmp_path)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "usage: bash scripts/gpu_session.sh kernels|speed|throughput (got 'everything')"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_real_run_without_cuda_is_refused_before_any_work(tmp_path):
    done = _run("kernels", tmp_path=tmp_path, smoke=False)
    assert done.returncode == 2 and "CUDA is not available" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not any((tmp_path / "out").glob("*.json"))


def test_kernels_stage_smoke_writes_both_benchmarks(tmp_path):
    done = _run("kernels", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    kernels = json.loads((out / "bench_kernels.json").read_text())
    gather = json.loads((out / "bench_kv_gather.json").read_text())
    assert kernels["rows"][0]["torch_ms"] > 0 and gather["rows"][0]["compact_cache_ms"] > 0
    log = (out / "log.txt").read_text()
    assert "exit status" not in log and gather["verdict"] in log and "torch 2." in log


@pytest.mark.slow
def test_speed_stage_smoke_writes_bench_rows_of_every_method(tmp_path):
    done = _run("speed", tmp_path=tmp_path, timeout=1200)     # ten bench runs, each a fresh interpreter
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    speed = json.loads((out / "bench_speed.json").read_text())
    assert {r["method"] for r in speed} == {"hf", "ours", "kv_only"}
    assert all(r["error"] is None for r in speed)
    assert json.loads((out / "bench_speed_env.json").read_text())
    for scorer in ("divprune", "visionzip", "cdpruner", "vispruner"):   # the pre-LLM peers, cut at layer -1
        peers = json.loads((out / f"bench_peers_{scorer}.json").read_text())
        assert peers and all(r["error"] is None and r["layer"] == -1 for r in peers), scorer
    qwen3 = json.loads((out / "bench_speed_qwen3_vl.json").read_text())
    assert {r["method"] for r in qwen3} == {"hf", "ours"} and all(r["error"] is None for r in qwen3)
    for name in ("bench_speed_video", "bench_speed_video_qwen3_vl", "bench_speed_qwen3_5"):
        rows = json.loads((out / f"{name}.json").read_text())
        assert {r["method"] for r in rows} == {"hf", "ours"} and all(r["error"] is None for r in rows), name
        assert all(r["frames"] == (8 if "video" in name else None) for r in rows), name
    log = (out / "log.txt").read_text()
    assert "exit status" not in log
    if (REPO / ".whl_pkg").is_dir() and any((REPO / ".whl_pkg").glob("sparsevlm-*.whl")):
        pkg = json.loads((out / "bench_pkg.json").read_text())
        assert {r["method"] for r in pkg} == {"hf", "ours", "sparsevlm_pkg"}
    else:  # a fresh clone has no wheels: the script says so instead of failing
        assert "the sparsevlm_pkg rows were not run" in log


@pytest.mark.slow
def test_throughput_stage_smoke_compares_batch_1_with_batch_b(tmp_path):
    """The batched-inference rows (issue 22): each run writes batch 1 and batch B side by
    side, and the batched answers equal the one-at-a-time answers request by request."""
    done = _run("throughput", tmp_path=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    for keep in ("1.0", "0.25"):
        result = json.loads((out / f"throughput_224px_b2_keep{keep}.json").read_text())
        assert result["batch_1"]["samples"] == result["batch_2"]["samples"] == 4
        assert result["identical"] and result["batch_2"]["samples_per_s"] > 0
    assert "exit status" not in (out / "log.txt").read_text()
