"""Nothing lost, nothing mixed: a run dir holds one configuration, a second process
is refused, records are written once, results are strict JSON, and a local sweep runs
every job. Unit tests first (no model), then the CLI on the tiny model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

from sparsevlm_exp.errors import ConfigError
from sparsevlm_exp.records import SampleRecord
from sparsevlm_exp.rundir import config_differences, open_run_dir, write_json
from sparsevlm_exp.tracking import SampleLog
from tiny_models import noise_image

CONFIG = {"keep": 0.25, "layer": 2, "scorer": {"_target_": "V15Scorer"}, "limit": None, "threads": None,
          "logger": {"mode": "offline"}, "viz": {"n": 4}, "resume": False}


def strict_json(path: Path):
    def refuse(constant):
        raise ValueError(f"{path} holds the non-JSON constant {constant}")
    return json.loads(Path(path).read_text(), parse_constant=refuse)


# ---- unit: the run dir rules -------------------------------------------------------
def test_fresh_dir_is_opened_and_the_config_stored(tmp_path):
    with open_run_dir(tmp_path / "run", CONFIG, resume=False):
        pass
    assert strict_json(tmp_path / "run" / "run_config.json")["config"] == CONFIG
    # a run that stopped before its first record (the model did not load) left nothing
    # to lose: the next start may use the dir, with another config too
    (tmp_path / "run" / "samples.jsonl").write_text("")
    with open_run_dir(tmp_path / "run", {**CONFIG, "keep": 0.5}, resume=False):
        pass
    assert strict_json(tmp_path / "run" / "run_config.json")["config"]["keep"] == 0.5


def test_dir_with_results_is_refused_without_resume_and_nothing_is_deleted(tmp_path):
    with open_run_dir(tmp_path, CONFIG, resume=False):
        (tmp_path / "samples.jsonl").write_text('{"index": 0}\n')
    with pytest.raises(ConfigError, match="already holds results: add resume=true") as err:
        open_run_dir(tmp_path, CONFIG, resume=False)
    assert "\n" not in str(err.value)
    assert (tmp_path / "samples.jsonl").read_text() == '{"index": 0}\n'


def test_resume_with_another_config_names_the_differing_keys(tmp_path):
    with open_run_dir(tmp_path, CONFIG, resume=False):
        (tmp_path / "samples.jsonl").write_text('{"index": 0}\n')
    other = {**CONFIG, "keep": 0.9, "scorer": {"_target_": "RandomScorer"}}
    with pytest.raises(ConfigError) as err:
        open_run_dir(tmp_path, other, resume=True)
    message = str(err.value)
    assert "keep: 0.25 -> 0.9" in message and "scorer._target_: 'V15Scorer' -> 'RandomScorer'" in message
    assert "layer" not in message.split("holds another configuration")[1]


def test_resume_ignores_keys_that_do_not_change_results(tmp_path):
    with open_run_dir(tmp_path, CONFIG, resume=False):
        (tmp_path / "samples.jsonl").write_text('{"index": 0}\n')
    neutral = {**CONFIG, "limit": 5, "threads": 1, "logger": {"mode": "disabled"}, "viz": {"n": 0}, "resume": True}
    assert config_differences(CONFIG, neutral) == []
    with open_run_dir(tmp_path, neutral, resume=True):
        pass


def test_a_second_holder_of_the_lock_is_refused(tmp_path):
    holder = FileLock(str(tmp_path / ".lock"))
    holder.acquire()
    try:
        with pytest.raises(ConfigError, match="in use by another process"):
            open_run_dir(tmp_path, CONFIG, resume=False)
    finally:
        holder.release()
    with open_run_dir(tmp_path, CONFIG, resume=False):      # free again
        pass


def test_refusal_puts_back_hydra_files(tmp_path):
    hydra = tmp_path / ".hydra"
    hydra.mkdir()
    (hydra / "overrides.yaml").write_text("- keep=0.25\n")
    with open_run_dir(tmp_path, CONFIG, resume=False, hydra_files={"overrides.yaml": "- keep=0.25\n"}):
        (tmp_path / "samples.jsonl").write_text('{"index": 0}\n')
    (hydra / "overrides.yaml").write_text("- keep=0.9\n")        # what Hydra writes for the next launch
    with pytest.raises(ConfigError):
        open_run_dir(tmp_path, {**CONFIG, "keep": 0.9}, resume=True)
    assert (hydra / "overrides.yaml").read_text() == "- keep=0.25\n"


def test_results_json_never_holds_bare_nan(tmp_path):
    write_json(tmp_path / "r.json", {"accuracy": float("nan"), "x": [float("inf"), 1.0], "p": tmp_path})
    assert strict_json(tmp_path / "r.json") == {"accuracy": None, "x": [None, 1.0], "p": str(tmp_path)}


def test_retried_failed_sample_replaces_its_record(tmp_path):
    book = SampleLog(tmp_path)
    book.append(SampleRecord(index=0, id="a", score=1.0))
    book.append(SampleRecord(index=1, id="b", error="OSError: corrupt"))
    book.close()
    book = SampleLog(tmp_path)                         # resume: index 1 is retried
    assert book.done == {0}
    book.append(SampleRecord(index=1, id="b", score=0.0))
    book.close()
    lines = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [(r["index"], r["error"]) for r in lines] == [(0, None), (1, None)]
    # a line cut by a kill is dropped on reopening, the rest kept once
    with open(tmp_path / "samples.jsonl", "a") as f:
        f.write('{"index": 2, "id": "c", "sco')
    assert [r.index for r in SampleLog(tmp_path).records] == [0, 1]


# ---- the CLI ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("rundir_data")
    with open(root / "questions.jsonl", "w") as f:
        for i in range(3):
            noise_image(112, 84, seed=i).save(root / f"img{i}.png")
            f.write(json.dumps({"id": f"q{i}", "image": f"img{i}.png", "question": "what colour is the circle",
                                "answers": ["red"]}) + "\n")
    return root


def cli(tiny_dir, data, *extra, cwd, timeout=300):
    flags = [e for e in extra if e.startswith("-")]     # Hydra reads -m before the overrides
    extra = [e for e in extra if not e.startswith("-")]
    args = [sys.executable, "-m", "sparsevlm_exp", *flags, f"model.pretrained={tiny_dir}", "dataset=folder",
            f"dataset.path={data}", "layer=1", "logger=none", "viz.n=0", *extra]
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "WANDB_SILENT": "true"})


@pytest.fixture(scope="module")
def finished_run(tiny_qwen_dirs, data_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    proc = cli(tiny_qwen_dirs["qwen2_5_vl"], data_dir, "keep=0.25", f"hydra.run.dir={run_dir}", cwd=run_dir.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {name: (run_dir / name).read_bytes() for name in ("samples.jsonl", "results.json", ".hydra/overrides.yaml")}


@pytest.mark.parametrize("extra, expected", [
    ([], "already holds results: add resume=true"),                               # re-run without resume
    (["dtype=float8"], "dtype='float8' is not allowed"),                          # a formerly late error
    (["resume=true", "keep=0.5", "scorer=random"], "keep: 0.25 -> 0.5"),          # resume, other config
])
def test_finished_run_is_never_touched(tiny_qwen_dirs, data_dir, finished_run, extra, expected):
    before = snapshot(finished_run)
    proc = cli(tiny_qwen_dirs["qwen2_5_vl"], data_dir, "keep=0.25", f"hydra.run.dir={finished_run}", *extra,
               cwd=finished_run.parent)
    assert proc.returncode == 2 and expected in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Loading weights" not in proc.stderr + proc.stdout
    assert snapshot(finished_run) == before
    assert len(strict_json(finished_run / "results.json")["config"]) > 0


def test_second_process_in_the_same_dir_is_refused(tiny_qwen_dirs, data_dir, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with FileLock(str(run_dir / ".lock")):            # as a running first process holds it
        proc = cli(tiny_qwen_dirs["qwen2_5_vl"], data_dir, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 2 and "in use by another process" in proc.stderr
    assert not (run_dir / "samples.jsonl").exists()


def test_default_run_dirs_of_one_second_differ(tiny_qwen_dirs, data_dir, tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from sparsevlm_exp.rundir import register_resolvers

    register_resolvers()
    conf = Path(__file__).resolve().parent.parent / "conf"
    dirs = set()
    for _ in range(2):
        with initialize_config_dir(version_base="1.3", config_dir=str(conf)):
            cfg = compose(config_name="config", return_hydra_config=True)
        dirs.add(OmegaConf.select(cfg, "hydra.run.dir").split("_")[-1])
    assert len(dirs) == 2


def test_local_sweep_runs_every_job_and_lists_failures(tiny_qwen_dirs, data_dir, tmp_path):
    sweep = tmp_path / "sweep"
    proc = cli(tiny_qwen_dirs["qwen2_5_vl"], data_dir, "-m", "keep=1.5,0.5", f"hydra.sweep.dir={sweep}",
               "limit=1", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert strict_json(sweep / "1" / "results.json")["n_samples"] == 1          # the job after the refusal ran
    assert not (sweep / "0" / "results.json").exists()
    assert "1 job(s) failed" in proc.stderr and "job 0: keep=1.5 is not allowed" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_foreign_line_in_samples_jsonl_is_refused_not_dropped(tmp_path):
    good = json.dumps(SampleRecord(index=0, id="a", score=1.0).to_dict())
    (tmp_path / "samples.jsonl").write_text('{"id": "no index"}\n' + good + "\n")
    before = (tmp_path / "samples.jsonl").read_text()
    with pytest.raises(ConfigError, match="samples.jsonl:1 is not a sample record"):
        SampleLog(tmp_path)
    (tmp_path / "samples.jsonl").write_text("{cut in the middle\n" + good + "\n")
    with pytest.raises(ConfigError, match="samples.jsonl:1 is not valid JSON and is not the last line"):
        SampleLog(tmp_path)
    (tmp_path / "samples.jsonl").write_text(before)
    with pytest.raises(ConfigError):
        SampleLog(tmp_path)
    assert (tmp_path / "samples.jsonl").read_text() == before


def test_two_processes_started_together_leave_one_record_per_sample(tiny_qwen_dirs, data_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "sparsevlm_exp", f"model.pretrained={tiny_qwen_dirs['qwen2_5_vl']}",
            "dataset=folder", f"dataset.path={data_dir}", "layer=1", "logger=none", "viz.n=0",
            f"hydra.run.dir={run_dir}"]
    procs = [subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outcomes = sorted((p.wait(timeout=300), p.stderr.read()) for p in procs)
    assert [code for code, _ in outcomes] == [0, 2], outcomes[1][1][-2000:]
    assert "in use by another process" in outcomes[1][1] or "already holds results" in outcomes[1][1]
    lines = (run_dir / "samples.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["index"] for line in lines) == [0, 1, 2]
