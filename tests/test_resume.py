"""Nothing lost: an interrupted run (SIGTERM, SIGKILL) resumed with resume=true ends
with the same records as an uninterrupted run; a failing sample is recorded and the
run goes on with a non-zero exit code."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiny_models import noise_image

N_SAMPLES = 10


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_data")
    with open(root / "questions.jsonl", "w") as f:
        for i in range(N_SAMPLES):
            noise_image(224, 224, seed=i).save(root / f"img{i}.png")
            f.write(json.dumps({"id": f"q{i}", "image": f"img{i}.png", "question": "what colour is the circle",
                                "answers": ["red"]}) + "\n")
    return root


def cli(tiny_dir, data_dir, run_dir, *extra):
    # scorer=random: resuming must also reproduce the random choices
    return [sys.executable, "-m", "sparsevlm_exp", f"model.pretrained={tiny_dir}", "dataset=folder",
            f"dataset.path={data_dir}", "scorer=random", "keep=0.3", "layer=1", "decoder.max_new_tokens=24",
            "logger=none", f"hydra.run.dir={run_dir}", *extra]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


def comparable(recs):
    return sorted((r["index"], r["id"], r["prediction"], r["score"], tuple(r["kept"])) for r in recs)


@pytest.fixture(scope="module")
def uninterrupted(tiny_qwen_dirs, dataset_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full") / "run"
    proc = subprocess.run(cli(tiny_qwen_dirs["qwen2_5_vl"], dataset_dir, run_dir), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_interrupted_run_resumes_to_the_same_results(tiny_qwen_dirs, dataset_dir, uninterrupted, tmp_path, sig):
    run_dir = tmp_path / "run"
    args = cli(tiny_qwen_dirs["qwen2_5_vl"], dataset_dir, run_dir)
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples = run_dir / "samples.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        if samples.exists() and len(samples.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    done_before = len(records(run_dir))
    assert 2 <= done_before < N_SAMPLES, "the run must be interrupted part way"
    assert not (run_dir / "results.json").exists()

    resumed = subprocess.run(args + ["resume=true"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = records(run_dir)
    assert len(after) == N_SAMPLES and len({r["index"] for r in after}) == N_SAMPLES      # no duplicates
    assert comparable(after) == comparable(records(uninterrupted))
    full = json.loads((uninterrupted / "results.json").read_text())
    res = json.loads((run_dir / "results.json").read_text())
    assert res["accuracy"] == full["accuracy"] and res["n_samples"] == N_SAMPLES


def test_failing_sample_is_recorded_and_the_run_goes_on(tiny_qwen_dirs, dataset_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    lines = (dataset_dir / "questions.jsonl").read_text().splitlines()[:3]
    for i in range(3):
        (data / f"img{i}.png").write_bytes((dataset_dir / f"img{i}.png").read_bytes())
    (data / "img1.png").write_bytes(b"not a png")                          # corrupt image
    (data / "questions.jsonl").write_text("\n".join(lines) + "\n")
    run_dir = tmp_path / "run"
    proc = subprocess.run(cli(tiny_qwen_dirs["qwen2_5_vl"], data, run_dir), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1
    recs = records(run_dir)
    assert [r["index"] for r in recs] == [0, 1, 2]
    assert recs[1]["error"] and "img1.png" in recs[1]["error"] or "identify" in recs[1]["error"]
    assert recs[0]["error"] is None and recs[2]["error"] is None
    assert recs[1]["id"] == "q1"          # the failed record names its own sample, not "#1"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["n_failed"] == 1 and results["n_samples"] == 3
    # resuming retries the failed sample; its new (still failed) record replaces the old one
    again = subprocess.run(cli(tiny_qwen_dirs["qwen2_5_vl"], data, run_dir) + ["resume=true"], capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 1, again.stderr[-2000:]
    recs_again = records(run_dir)
    assert [r["index"] for r in recs_again] == [0, 1, 2]                   # once each, no duplicate
    assert recs_again[0] == recs[0] and recs_again[2] == recs[2]           # finished ones untouched
    results = json.loads((run_dir / "results.json").read_text())
    assert results["n_failed"] == 1 and results["n_samples"] == 3 and results["failed_this_run"] == 1
