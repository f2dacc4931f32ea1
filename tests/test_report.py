"""report.py on a synthetic sweep dir: the table repeats the jobs' numbers, a job
without results.json is listed as missing, the plots are real PNGs."""
import csv
import json
import math

import pytest
from PIL import Image

from sparsevlm_exp import report

SCORER_TARGETS = {"v15": "sparsevlm_exp.scorers.V15Scorer", "random": "sparsevlm_exp.scorers.RandomScorer",
                  "v2": "sparsevlm_exp.scorers.V2Scorer"}


def fake_results(scorer: str, keep: float, accuracy: float, kept: float, recall: float, prefill_ms: float) -> dict:
    """A results.json as Experiment.summarize writes it (shapes dataset, one pruning layer)."""
    return {
        "accuracy": accuracy, "n": 20.0, "n_samples": 20, "n_failed": 0, "failed_this_run": 0,
        "evidence_recall": {"2": recall},
        "n_visual": 64.0,
        "kept": {"2": kept},
        "equivalent_tokens": 64 * 3 / 8 + kept * 5 / 8,
        "prefill_tflops": 0.001 * kept,
        "vision_ms": 5.0, "prefill_ms": prefill_ms, "decode_ms_per_token": 2.5,
        "peak_memory_bytes": 0, "device": "cpu", "env": {},
        "config": {
            "keep": keep, "layer": 2, "seed": 0,
            "scorer": {"_target_": SCORER_TARGETS[scorer]},
            "policy": {"_target_": "sparsevlm_exp.policies.FixedPolicy", "layer": 2, "keep": keep},
            "pruner": {"_target_": "sparsevlm_exp.pruners.DropPruner"},
            "dataset": {"_target_": "sparsevlm_exp.data.shapes.ShapesDataset"},
            "model": {"_target_": "sparsevlm_exp.models.qwen2_vl.Qwen2VLAdapter.load", "pretrained": "asset:shapes_vlm"},
        },
    }


# (job num, scorer, keep, accuracy, kept, evidence recall, prefill ms); None = job without results
JOBS = [
    ("0", "v15", 0.5, 0.90, 32.0, 0.95, 40.0),
    ("1", "v15", 0.25, 0.80, 16.0, 0.70, 30.0),
    ("2", "random", 0.5, 0.60, 32.0, 0.50, 39.0),
    ("3", "random", 0.25, None, None, None, None),
]


def write_job(sweep, num, scorer, keep, *numbers):
    job = sweep / num
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(f"- scorer={scorer}\n- keep={keep}\n- limit=20\n")
    if numbers[0] is None:
        (job / "samples.jsonl").write_text('{"id": "a"}\n{"id": "b"}\n')     # 2 samples, then it died
    else:
        (job / "results.json").write_text(json.dumps(fake_results(scorer, keep, *numbers)))


@pytest.fixture
def sweep(tmp_path):
    sweep = tmp_path / "multirun" / "2025-06-01" / "12-00-00"
    for job in JOBS:
        write_job(sweep, *job)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")       # Hydra's file at the sweep root, not a job
    return sweep


def test_table_repeats_the_job_numbers_sorted_by_scorer_then_keep(sweep, tmp_path):
    out = tmp_path / "report"
    result = report.make_report(sweep, out)
    rows = result["rows"]
    assert [(r["scorer"], r["keep"]) for r in rows] == [("random", 0.5), ("v15", 0.25), ("v15", 0.5)]
    by_job = {r["job"]: r for r in rows}
    for num, scorer, keep, accuracy, kept, recall, prefill_ms in JOBS[:3]:
        r = by_job[num]
        assert r["scorer"] == scorer and r["keep"] == keep and r["layer"] == 2
        assert (r["policy"], r["pruner"], r["dataset"], r["model"]) == ("fixed", "drop", "shapes", "shapes_vlm")
        assert r["accuracy"] == accuracy and r["kept"] == kept and r["evidence_recall"] == recall
        assert r["prefill_ms"] == prefill_ms and r["decode_ms_per_token"] == 2.5 and r["vision_ms"] == 5.0
        assert math.isclose(r["equivalent_tokens"], 24 + kept * 5 / 8)
        assert math.isclose(r["prefill_tflops"], 0.001 * kept)
        # the configuration names only what differs between jobs; limit=20 is shared
        assert r["configuration"] == f"scorer={scorer} keep={keep}"

    with open(out / "report.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert [row["job"] for row in csv_rows] == ["2", "1", "0"]
    assert float(csv_rows[1]["accuracy"]) == 0.80 and float(csv_rows[1]["evidence_recall"]) == 0.70

    md = (out / "report.md").read_text()
    assert "| random | 0.5 |" in md and "0.8000" in md and "0.700" in md
    assert "`limit=20`" in md                                  # shared overrides said once


def test_missing_job_is_listed_with_its_progress(sweep, tmp_path):
    result = report.make_report(sweep, tmp_path / "r")
    assert [j.name for j in result["missing"]] == ["3"]
    assert result["missing"][0].samples_done == 2
    md = (tmp_path / "r" / "report.md").read_text()
    # named by what sets it apart (limit=20 is shared by all jobs and said once)
    assert "## Missing jobs" in md and "job 3: `scorer=random keep=0.25`, 2 sample(s)" in md


def test_plots_are_readable_pngs(sweep, tmp_path):
    files = report.make_report(sweep, tmp_path / "r")["files"]
    for name in ("accuracy_vs_tokens", "evidence_recall_vs_tokens", "latency_vs_tokens"):
        with Image.open(files[name]) as im:
            im.verify()
        with Image.open(files[name]) as im:
            assert im.format == "PNG" and im.width >= 500 and im.height >= 350


def test_lines_are_one_per_scorer(sweep, tmp_path):
    rows = report.make_report(sweep, tmp_path / "r")["rows"]
    groups = report.line_groups(rows)
    assert sorted(groups) == ["random", "v15"]
    assert [r["kept"] for r in groups["v15"]] == [16.0, 32.0]      # each line runs along kept tokens


def test_hydra_choice_spells_the_name_only_when_it_is_what_ran(sweep, tmp_path):
    # kv_only's class is KVOnlyPruner: Hydra's recorded choice gives the yaml's spelling back.
    # An experiment that sets `scorer: ${...}` by interpolation leaves the default choice
    # (v15) recorded while another scorer ran: the resolved _target_ wins.
    results = json.loads((sweep / "0" / "results.json").read_text())
    results["config"]["pruner"]["_target_"] = "sparsevlm_exp.pruners.KVOnlyPruner"
    results["config"]["scorer"]["_target_"] = "sparsevlm_exp.scorers.FastVScorer"
    (sweep / "0" / "results.json").write_text(json.dumps(results))
    (sweep / "0" / ".hydra" / "hydra.yaml").write_text(
        "hydra:\n  run:\n    dir: ${now:%H}\n  runtime:\n    choices:\n      pruner: kv_only\n      scorer: v15\n")
    rows = {r["job"]: r for r in report.make_report(sweep, tmp_path / "r")["rows"]}
    assert rows["0"]["pruner"] == "kv_only" and rows["1"]["pruner"] == "drop"
    assert rows["0"]["scorer"] == "fastv"


def test_each_dataset_gets_its_own_panel_with_the_same_lines(sweep, tmp_path):
    for num in ("1", "2"):                                     # move two jobs to another dataset
        results = json.loads((sweep / num / "results.json").read_text())
        results["config"]["dataset"]["_target_"] = "sparsevlm_exp.data.benchmarks.GQA"
        (sweep / num / "results.json").write_text(json.dumps(results))
    result = report.make_report(sweep, tmp_path / "r")
    assert sorted(report.line_groups(result["rows"])) == ["random", "v15"]    # dataset is not a line
    with Image.open(result["files"]["accuracy_vs_tokens"]) as one_row, \
            Image.open(result["files"]["latency_vs_tokens"]) as two_rows:
        assert one_row.width > 1.8 * one_row.height                       # two panels side by side
        assert two_rows.height > 1.5 * one_row.height                      # prefill over decode


def test_several_pruning_layers_report_the_last_and_list_each(tmp_path):
    results = fake_results("v15", 0.25, 0.7, 0.0, 0.0, 30.0)
    results["kept"] = {"2": 300.0, "6": 200.0, "15": 110.0}         # "15" > "6" as layers, not as text
    results["evidence_recall"] = {"2": 0.9, "6": 0.8, "15": 0.6}
    job = tmp_path / "sweep" / "0"
    job.mkdir(parents=True)
    (job / "results.json").write_text(json.dumps(results))
    result = report.make_report(tmp_path / "sweep", tmp_path / "r")
    row = result["rows"][0]
    assert row["kept"] == 110.0 and row["evidence_recall"] == 0.6
    assert row["kept_by_layer"] == "L2:300.0 L6:200.0 L15:110.0"
    assert "L2:0.900 L6:0.800 L15:0.600" in (tmp_path / "r" / "report.md").read_text()
    assert row["configuration"] == "(defaults)"          # no .hydra/overrides.yaml: still reported


def test_budget_column_when_the_experiment_names_one(sweep, tmp_path):
    results = json.loads((sweep / "0" / "results.json").read_text())
    results["config"]["budget"] = 192
    (sweep / "0" / "results.json").write_text(json.dumps(results))
    rows = {r["job"]: r for r in report.make_report(sweep, tmp_path / "r")["rows"]}
    assert rows["0"]["budget"] == 192 and rows["1"]["budget"] is None
    assert "| budget |" in (tmp_path / "r" / "report.md").read_text()


def test_name_from_target():
    assert report.name_from_target("sparsevlm_exp.scorers.FastVScorer") == "fastv"
    assert report.name_from_target("sparsevlm_exp.data.benchmarks.GQA") == "gqa"
    assert report.name_from_target("sparsevlm_exp.models.llava.LlavaAdapter.load") == "llava"


def test_dir_without_results_fails_in_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report.main([str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no job results" in err and str(empty) in err

    only_running = tmp_path / "running"
    write_job(only_running, *JOBS[3])
    assert report.main([str(only_running)]) == 2
    assert "1 job dir(s), none has results.json" in capsys.readouterr().err


def test_cli_writes_default_report_dir(sweep, capsys):
    assert report.main([str(sweep)]) == 0
    assert (sweep / "report" / "report.md").exists() and (sweep / "report" / "report.csv").exists()
    assert "missing: job 3" in capsys.readouterr().err


def test_wandb_offline_run_holds_the_table(sweep, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    recorded = {}
    import wandb

    real_init = wandb.init

    def spy_init(*args, **kwargs):
        run = real_init(*args, **kwargs)
        real_log = run.log

        def spy_log(data, *a, **k):
            recorded.update(data)
            return real_log(data, *a, **k)

        run.log = spy_log
        recorded["group"] = run.group
        return run

    monkeypatch.setattr(wandb, "init", spy_init)
    out = tmp_path / "r"
    report.make_report(sweep, out, wandb_mode="offline")
    assert recorded["group"] == "2025-06-01_12-00-00"      # <date>_<time>, as the runner groups jobs
    table = recorded["report/table"]
    assert table.get_column("accuracy") == [0.60, 0.80, 0.90]
    assert {"report/accuracy_vs_tokens", "report/latency_vs_tokens"} <= set(recorded)
    assert list(out.glob("wandb/offline-run-*/run-*.wandb"))


def test_report_shows_interval_headline_spread_and_types(tmp_path):
    """The numbers users misread: accuracy with its 95% interval, the metric's own
    headline (named by the metric, not by the report), latency median and p90 beside
    the mean, tokens alive including recycled ones, accuracy per question type."""
    sweep = tmp_path / "sweep"
    results = fake_results("v15", 0.25, 0.8, 16.0, 0.7, 97.0)
    results.update({"accuracy_ci95": [0.584, 0.919], "headline": {"key": "f1", "label": "POPE F1", "value": 0.75},
                    "f1": 0.75, "prefill_ms_median": 10.5, "prefill_ms_p90": 12.0,
                    "recycled": {"2": 4.0}, "alive": {"2": 20.0},
                    "accuracy_by_type": {"colour_of_shape": {"accuracy": 0.9, "n": 10, "ci95": [0.6, 0.98]},
                                         "count": {"accuracy": 0.7, "n": 10, "ci95": [0.4, 0.89]}}})
    job = sweep / "0"
    job.mkdir(parents=True)
    (job / "results.json").write_text(json.dumps(results))
    out = report.make_report(sweep, tmp_path / "r")
    row = out["rows"][0]
    assert row["accuracy_ci95"] == "0.584-0.919"
    assert (row["headline_metric"], row["headline"]) == ("POPE F1", 0.75)
    assert (row["prefill_ms"], row["prefill_ms_median"], row["prefill_ms_p90"]) == (97.0, 10.5, 12.0)
    assert (row["kept"], row["alive"]) == (16.0, 20.0)
    md = (tmp_path / "r" / "report.md").read_text()
    for text in ("| 95% CI |", "0.584-0.919", "| POPE F1 |", "prefill ms median", "10.50", "12.00",
                 "tokens alive", "## Accuracy by question type", "| colour_of_shape | count |", "0.900 (10)"):
        assert text in md, text
    assert "f1" not in report.MD_COLUMNS.__repr__()      # the report names no benchmark metric itself


def test_summary_numbers_median_p90_and_wilson():
    from sparsevlm_exp.stats import spread, wilson_interval

    # nine fast samples and one slow one: the mean says 97-ish, the median 10.5
    numbers = spread([10.0, 10.2, 10.4, 10.5, 10.5, 10.6, 10.8, 11.0, 11.2, 880.0])
    assert numbers["median"] == 10.55 and numbers["mean"] == pytest.approx(97.52)
    assert numbers["p90"] == pytest.approx(11.2 + 0.1 * (880.0 - 11.2))
    # Wilson 95% for 8 of 10, worked by hand (z^2 = 3.8416): centre (0.8 + 3.8416/20) / 1.38416
    # = 0.71674, half 1.96 * sqrt(0.016 + 3.8416/400) / 1.38416 = 0.22658 -> [0.4902, 0.9433]
    low, high = wilson_interval(0.8, 10)
    assert (low, high) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    assert wilson_interval(None, 0) is None and wilson_interval(1.0, 5)[1] == 1.0


def test_batched_jobs_say_their_latencies_are_batch_shares(tmp_path):
    """A job run with batch_size > 1 times whole batches and gives each sample its share;
    the report must not pass that off as a per-sample latency (issue 22): a batch_size
    column, a sentence naming the jobs, and the latency axis labelled as a share."""
    sweep = tmp_path / "sweep"
    for num, batch_size in (("0", 1), ("1", 8)):
        results = fake_results("v15", 0.25, 0.8, 16.0, 0.7, 10.0)
        results["config"]["batch_size"] = batch_size
        (sweep / num).mkdir(parents=True)
        (sweep / num / "results.json").write_text(json.dumps(results))
    out = report.make_report(sweep, tmp_path / "r")
    assert sorted(r["batch_size"] for r in out["rows"]) == [1, 8]
    md = (tmp_path / "r" / "report.md").read_text()
    assert "Batched jobs (1: batch_size 8): their vision / prefill / decode latencies are each sample's SHARE" in md
    with open(tmp_path / "r" / "report.csv") as f:
        assert {r["job"]: r["batch_size"] for r in csv.DictReader(f)} == {"0": "1", "1": "8"}


def test_unbatched_report_has_no_batch_sentence(sweep, tmp_path):
    report.make_report(sweep, tmp_path / "r")
    assert "SHARE" not in (tmp_path / "r" / "report.md").read_text()
