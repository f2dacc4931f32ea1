"""Sweep results -> one table (report.md, report.csv) and plots (PNG), optionally to W&B.

    python -m sparsevlm_exp.report outputs/multirun/2025-06-01/12-00-00
    python -m sparsevlm_exp.report <sweep dir> --out my_report --wandb

A sweep dir holds one dir per job (<sweep dir>/<job num>/) with Hydra's
`.hydra/overrides.yaml` and, once the job has finished, the runner's `results.json`
(see Experiment.summarize). A job without results.json is still running or has
failed: it is listed as missing in the report, never silently dropped.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from .records import LATENCY_FIELDS

# Config groups named in every row.
GROUPS = ("scorer", "policy", "pruner", "dataset", "model")
# Rows are sorted by these (then layer, then keep): a dataset's rows stay together.
SORT_GROUPS = ("dataset", "model", "scorer", "policy", "pruner")
# Class-name suffixes dropped when a name has to be derived from `_target_`.
CLASS_SUFFIXES = ("Scorer", "Policy", "Pruner", "Dataset", "Adapter")


class ReportError(Exception):
    """A problem with the sweep dir itself, reported as one line."""


@dataclass
class Job:
    dir: Path
    overrides: list[str]            # Hydra task overrides of this job, e.g. ["scorer=v2", "keep=0.25"]
    choices: dict                   # Hydra's group choices ({"scorer": "v2", ...}); {} if unknown
    results: dict | None            # results.json, None while missing
    samples_done: int = 0           # lines in samples.jsonl (progress of a missing job)
    configuration: str = ""         # the overrides that set this job apart from the others of its sweep

    @property
    def name(self) -> str:
        return self.dir.name


# --------------------------------------------------------------------------------------
# Reading the sweep dir
# --------------------------------------------------------------------------------------
def find_jobs(sweep_dir: Path) -> list[Job]:
    """Every job dir of a sweep (or the run dir itself, for a single run), in job order."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ReportError(f"{sweep_dir} is not a directory")
    if (sweep_dir / "results.json").exists() or (sweep_dir / ".hydra").is_dir():
        job_dirs = [sweep_dir]                       # a single run dir works too
    else:
        job_dirs = [d for d in sweep_dir.iterdir()
                    if d.is_dir() and (d.name.isdigit() or (d / ".hydra").is_dir() or (d / "results.json").exists())]
    job_dirs.sort(key=lambda d: (0, int(d.name)) if d.name.isdigit() else (1, d.name))
    return [_read_job(d) for d in job_dirs]


def _read_job(job_dir: Path) -> Job:
    overrides = _read_yaml(job_dir / ".hydra" / "overrides.yaml") or []
    hydra_cfg = _read_yaml(job_dir / ".hydra" / "hydra.yaml") or {}
    choices = ((hydra_cfg.get("hydra") or {}).get("runtime") or {}).get("choices") or {}
    results = None
    results_path = job_dir / "results.json"
    if results_path.exists():
        try:
            results = json.loads(results_path.read_text())
        except json.JSONDecodeError:
            results = None                           # being written right now: treat as missing
    samples = job_dir / "samples.jsonl"
    done = sum(1 for line in samples.read_text().splitlines() if line.strip()) if samples.exists() else 0
    return Job(dir=job_dir, overrides=[str(o) for o in overrides], choices=dict(choices), results=results,
               samples_done=done)


def _read_yaml(path: Path):
    if not path.exists():
        return None
    # safe_load, not OmegaConf: hydra.yaml holds ${now:...} interpolations we never resolve
    return yaml.safe_load(path.read_text())


# --------------------------------------------------------------------------------------
# One row per finished job
# --------------------------------------------------------------------------------------
def name_from_target(target: str | None) -> str | None:
    """'sparsevlm_exp.scorers.V15Scorer' -> 'v15'; 'sparsevlm_exp.data.benchmarks.GQA' -> 'gqa'."""
    if not target:
        return None
    parts = target.split(".")
    name = parts[-1]
    if name == "load" and len(parts) >= 2:           # model adapters are built by Adapter.load
        name = parts[-2]
    for suffix in CLASS_SUFFIXES:
        if name.endswith(suffix) and name != suffix:
            name = name[: -len(suffix)]
            break
    return name.lower()


def group_name(job: Job, group: str) -> str | None:
    """The component a job really ran, named from the resolved config's `_target_`.

    Hydra's recorded choice is used only to spell that name the way its yaml does
    (kv_only for KVOnlyPruner): an experiment may set `scorer: ${...}` by
    interpolation, and then the recorded choice (the default v15) is not what ran."""
    node = (job.results or {}).get("config", {}).get(group)
    if group == "model" and isinstance(node, dict) and node.get("pretrained"):
        # the checkpoint says more than the adapter class (llava-1.5-7b-hf, not llava)
        return str(node["pretrained"]).rstrip("/").split("/")[-1].split(":")[-1]
    derived = name_from_target(node.get("_target_")) if isinstance(node, dict) else None
    choice = job.choices.get(group)
    if choice and (derived is None or str(choice).replace("_", "").lower() == derived):
        return str(choice)
    return derived


def _last_layer_value(by_layer: dict | None):
    """The value at the deepest pruning layer: what survives to the end of the prefill."""
    if not by_layer:
        return None
    return by_layer[max(by_layer, key=int)]


def _by_layer_text(by_layer: dict | None, digits: int) -> str:
    if not by_layer:
        return ""
    return " ".join(f"L{k}:{_fmt(by_layer[k], f'.{digits}f')}" for k in sorted(by_layer, key=int))


def job_row(job: Job) -> dict:
    r = job.results
    cfg = r.get("config", {})
    kept = _last_layer_value(r.get("kept"))
    if kept is None:                                 # nothing pruned (keep=1.0): every visual token stays
        kept = r.get("n_visual")
    recall = r.get("evidence_recall") or {}
    alive = _last_layer_value(r.get("alive"))          # kept + recycled after the last cut
    headline = r.get("headline") or {"key": "accuracy", "label": "accuracy"}
    ci = r.get("accuracy_ci95") or [None, None]
    row = {
        "job": job.name,
        **{g: group_name(job, g) for g in GROUPS},
        "keep": cfg.get("keep"),
        "layer": cfg.get("layer"),
        "budget": cfg.get("budget"),                 # set by experiments that name a token budget (paper_table1)
        # > 1: the job's latencies are each sample's share of its batch's time, not its own
        "batch_size": int(cfg.get("batch_size") or 1),
        "n_samples": r.get("n_samples"),
        "n_failed": r.get("n_failed"),
        "accuracy": _number(r.get("accuracy")),
        "accuracy_low": _number(ci[0]),              # 95% Wilson interval
        "accuracy_high": _number(ci[1]),
        "accuracy_ci95": _interval_text(ci),
        # the metric's own headline number (POPE: F1, MME: total score), named by the metric
        "headline_metric": headline["label"] if headline["key"] != "accuracy" else None,
        "headline": _number(r.get(headline["key"])) if headline["key"] != "accuracy" else None,
        "evidence_recall": _number(_last_layer_value(recall)),
        "evidence_recall_by_layer": _by_layer_text(recall, 3),
        "n_visual": _number(r.get("n_visual")),
        "kept": _number(kept),
        "alive": _number(alive if alive is not None else kept),
        "kept_by_layer": _by_layer_text(r.get("kept"), 1),
        "equivalent_tokens": _number(r.get("equivalent_tokens")),
        "prefill_tflops": _number(r.get("prefill_tflops")),
        **{f"{key}{stat}": _number(r.get(f"{key}{stat}")) for key in LATENCY_FIELDS
           for stat in ("", "_median", "_p90")},
        "accuracy_by_type": r.get("accuracy_by_type") or {},
        "overrides": " ".join(job.overrides),
    }
    return row


def _interval_text(ci) -> str:
    low, high = (_number(v) for v in ci)
    return "" if low is None or high is None else f"{low:.3f}-{high:.3f}"


def _number(value):
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _keep_order(keep) -> float:
    # keep is a fraction (0, 1] or a count >= 1; both sort by how much survives
    return float(keep) if keep is not None else math.inf


def build_rows(jobs: list[Job]) -> list[dict]:
    rows = [job_row(j) for j in jobs if j.results is not None]
    rows.sort(key=lambda r: (*(str(r[g] or "") for g in SORT_GROUPS), r["layer"] if r["layer"] is not None else -1,
                             _keep_order(r["keep"]), r["job"]))
    return rows


def varying_overrides(jobs: list[Job]) -> tuple[list[str], list[list[str]]]:
    """(overrides shared by every job, per job the ones that differ): the shared ones
    are said once in the report, the others name each row's configuration."""
    sets = [set(j.overrides) for j in jobs]
    common = set.intersection(*sets) if sets else set()
    shared = [o for o in (jobs[0].overrides if jobs else []) if o in common]
    return shared, [[o for o in j.overrides if o not in common] for j in jobs]


# --------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------
# (column, header, number format) of report.md; a column whose values are all empty is left out.
MD_COLUMNS = [
    ("job", "job", None), ("scorer", "scorer", None), ("keep", "keep", None), ("layer", "layer", None),
    ("budget", "budget", None), ("policy", "policy", None), ("pruner", "pruner", None), ("dataset", "dataset", None),
    ("configuration", "configuration", None),
    ("n_samples", "n", None), ("n_failed", "failed", None),
    ("accuracy", "accuracy", ".4f"), ("accuracy_ci95", "95% CI", None),
    ("headline_metric", "metric", None), ("headline", "value", ".4g"),
    ("evidence_recall", "evidence recall", ".3f"), ("evidence_recall_by_layer", "recall by layer", None),
    ("alive", "tokens alive", ".1f"), ("kept", "kept tokens", ".1f"), ("kept_by_layer", "kept by layer", None),
    ("n_visual", "visual tokens", ".1f"),
    ("equivalent_tokens", "layer-avg tokens", ".1f"), ("prefill_tflops", "prefill TFLOPs", ".4g"),
    ("vision_ms", "vision ms", ".2f"), ("prefill_ms", "prefill ms mean", ".2f"),
    ("prefill_ms_median", "prefill ms median", ".2f"), ("prefill_ms_p90", "prefill ms p90", ".2f"),
    ("decode_ms_per_token", "decode ms/tok mean", ".2f"), ("decode_ms_per_token_median", "decode ms/tok median", ".2f"),
    ("decode_ms_per_token_p90", "decode ms/tok p90", ".2f"),
]
# Columns dropped from report.md when every row has the same value there (still in the CSV).
DROP_WHEN_CONSTANT = {"policy", "pruner", "dataset", "layer", "kept_by_layer", "evidence_recall_by_layer",
                      "headline_metric"}


def _fmt(value, spec: str | None) -> str:
    if value is None or value == "":
        return ""
    if spec is not None and isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def write_csv(rows: list[dict], path: Path) -> Path:
    columns = list(rows[0].keys())
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_cell(row[k]) for k in columns})
    return path


def _csv_cell(value):
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, (dict, list)) else value


def type_table(rows: list[dict]) -> str | None:
    """Accuracy per question type (one column per type, 'acc (n)'), for datasets whose
    samples have a type; None when no row has any."""
    types = sorted({t for r in rows for t in (r.get("accuracy_by_type") or {})})
    if not types:
        return None
    body = []
    for r in rows:
        by_type = r.get("accuracy_by_type") or {}
        body.append([r["job"], r.get("configuration") or ""] + [
            f"{by_type[t]['accuracy']:.3f} ({by_type[t]['n']})" if t in by_type else "" for t in types])
    return markdown_table(["job", "configuration", *types], body)


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    """The one markdown table writer of the package (report and bench): header cells,
    then one list of cell texts per row ('|' escaped)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_cell(str(c)) for c in cells) + " |" for cells in body]
    return "\n".join(lines)


def results_table(rows: list[dict]) -> str:
    """report.md's table: the MD_COLUMNS that hold a value, constant ones dropped."""
    columns = [(key, header, digits) for key, header, digits in MD_COLUMNS
               if any(r.get(key) not in (None, "") for r in rows)]
    if not any(" " in r.get("kept_by_layer", "") for r in rows):     # one pruning layer: "L2:32.0" adds nothing
        columns = [c for c in columns if c[0] not in ("kept_by_layer", "evidence_recall_by_layer")]
    if all(r.get("alive") == r.get("kept") for r in rows):           # nothing recycled: one column says it
        columns = [c for c in columns if c[0] != "alive"]
    if len(rows) > 1:
        columns = [c for c in columns
                   if not (c[0] in DROP_WHEN_CONSTANT and len({str(r.get(c[0])) for r in rows}) == 1)]
    return markdown_table([h for _, h, _ in columns], [[_fmt(r.get(k), d) for k, _, d in columns] for r in rows])


def write_markdown(sweep_dir: Path, rows: list[dict], missing: list[Job], shared: list[str],
                   plots: dict[str, Path], path: Path) -> Path:
    parts = [f"# Sweep report: {sweep_dir}", ""]
    parts.append(f"{len(rows)} finished job(s), {len(missing)} missing.")
    if shared:
        parts.append(f"Overrides shared by every job: `{' '.join(shared)}`")
    parts += ["", results_table(rows), ""]
    parts.append("95% CI: Wilson score interval of the accuracy (exact for 0/1 scores, approximate for "
                 "fractional ones such as VQA accuracy); metric/value: the dataset metric's own headline number. "
                 "tokens alive: kept + recycled (merged) tokens after the last pruning layer; "
                 "latencies: mean, median and 90th percentile over samples (a few slow samples move the mean). "
                 "kept tokens: visual tokens left after the last pruning layer (mean over samples); "
                 "layer-avg tokens: visual tokens alive after each decoder layer, averaged over layers "
                 "(the paper's '192'); evidence recall: share of evidence tokens kept after the last pruning layer.")
    batched = [r for r in rows if r.get("batch_size", 1) > 1]      # in table order
    if batched:
        sizes = {r["batch_size"] for r in batched}
        which = (f"Every job ran in batches of {sizes.pop()}" if len(batched) == len(rows) and len(sizes) == 1
                 else "Batched jobs (" + ", ".join(f"{r['job']}: batch_size {r['batch_size']}" for r in batched) + ")")
        parts += ["", which + ": their vision / prefill / decode latencies are each sample's SHARE of its "
                  "batch's time (batch ms / batch size), not the sample's own latency at batch 1; predictions, "
                  "kept tokens, FLOPs and evidence recall are batch 1's."]
    types = type_table(rows)
    if types:
        parts += ["", "## Accuracy by question type", "", types]
    failed = [r for r in rows if r.get("n_failed")]
    if failed:
        parts += ["", "Jobs with failed samples (accuracy is over the samples that ran): "
                  + ", ".join(f"{r['job']} ({r['n_failed']})" for r in failed)]
    if missing:
        parts += ["", "## Missing jobs (no results.json: still running or failed)", ""]
        for job in missing:
            parts.append(f"- job {job.name}: `{job.configuration}`, "
                         f"{job.samples_done} sample(s) in samples.jsonl")
    if plots:
        parts += ["", "## Plots", ""]
        parts += [f"![{name}]({p.name})" for name, p in plots.items()]
    path.write_text("\n".join(parts) + "\n")
    return path


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------
X_AXES = {"kept": "kept visual tokens (after the last pruning layer)",
          "equivalent_tokens": "layer-averaged visual tokens"}


def line_groups(rows: list[dict], x: str = "kept") -> dict[str, list[dict]]:
    """Rows split into lines: one per configuration apart from keep (and dataset,
    which gets its own panel), labelled by the fields that differ between lines
    (just the scorer in a scorer x keep sweep)."""
    fields = ["scorer", "layer", "policy", "pruner", "model"]
    varying = [f for f in fields if len({str(r.get(f)) for r in rows}) > 1] or ["scorer"]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        label = " ".join(str(r.get(f)) if f == "scorer" else f"{f}={r.get(f)}" for f in varying)
        groups.setdefault(label, []).append(r)
    for members in groups.values():
        members.sort(key=lambda r: (r[x] if r[x] is not None else math.inf))
    return groups


def _plotted(row: dict, key: str) -> tuple:
    """(y, top of its bar or None): latencies plot the median with a bar up to the p90
    (the mean where a results.json predates them); other metrics their value."""
    if key in LATENCY_FIELDS and row.get(f"{key}_median") is not None:
        return row[f"{key}_median"], row.get(f"{key}_p90")
    return row[key], None


def _plot_against_tokens(rows: list[dict], metrics: list[tuple[str, str]], x: str, title: str,
                         path: Path) -> Path:
    """A grid of panels, one row per (metric key, y label) and one column per dataset:
    the metric vs visual tokens, one line per line group (same colour in every panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = line_groups(rows, x)
    datasets = sorted({str(r.get("dataset")) for r in rows})
    # distinct markers and dashes, so lines that coincide stay visible
    markers, dashes = "osD^vP*X", ["-", "--", "-.", ":"]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(len(metrics), len(datasets), figsize=(6.4 * len(datasets), 4.4 * len(metrics)),
                             squeeze=False)
    for i, (key, ylabel) in enumerate(metrics):
        for j, dataset in enumerate(datasets):
            ax = axes[i][j]
            for n, (label, members) in enumerate(groups.items()):
                points = [(r[x], *_plotted(r, key)) for r in members
                          if str(r.get("dataset")) == dataset and r[x] is not None and r.get(key) is not None]
                if points:
                    xs, ys, tops = zip(*points)
                    style = dict(marker=markers[n % len(markers)], linestyle=dashes[n % len(dashes)],
                                 color=colours[n % len(colours)], linewidth=1.8, markersize=7, alpha=0.9, label=label)
                    if all(t is not None for t in tops):
                        # latency: the median, with a bar up to the 90th percentile
                        ax.errorbar(xs, ys, yerr=[[0] * len(ys), [t - y for t, y in zip(tops, ys)]], capsize=4,
                                    **style)
                    else:
                        ax.plot(xs, ys, **style)
            ax.set_xlabel(X_AXES[x])
            ax.set_ylabel(ylabel)
            if len(datasets) > 1:
                ax.set_title(dataset)
            ax.grid(True, alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_plots(rows: list[dict], out_dir: Path, sweep_name: str, x: str = "kept") -> dict[str, Path]:
    plots = {}
    if any(r["accuracy"] is not None for r in rows):
        plots["accuracy_vs_tokens"] = _plot_against_tokens(
            rows, [("accuracy", "accuracy")], x, f"Accuracy vs visual tokens ({sweep_name})",
            out_dir / "accuracy_vs_tokens.png")
    if any(r["evidence_recall"] is not None for r in rows):
        plots["evidence_recall_vs_tokens"] = _plot_against_tokens(
            rows, [("evidence_recall", "evidence recall")], x, f"Evidence recall vs visual tokens ({sweep_name})",
            out_dir / "evidence_recall_vs_tokens.png")
    if any(r["prefill_ms"] is not None for r in rows):
        # batched jobs time a batch and give each sample its share: the axis says so
        share = " (batch share)" if any(r.get("batch_size", 1) > 1 for r in rows) else ""
        plots["latency_vs_tokens"] = _plot_against_tokens(
            rows, [("prefill_ms", f"prefill ms / sample{share} (median, bar to p90)"),
                   ("decode_ms_per_token", f"decode ms / token{share} (median, bar to p90)")], x,
            f"Latency vs visual tokens ({sweep_name})", out_dir / "latency_vs_tokens.png")
    return plots


# --------------------------------------------------------------------------------------
# W&B
# --------------------------------------------------------------------------------------
def log_to_wandb(rows: list[dict], plots: dict[str, Path], sweep_dir: Path, out_dir: Path,
                 mode: str = "offline", project: str = "sparsevlm_exp"):
    """One W&B run holding the table and the plots, in the sweep's group (the runner
    groups a sweep's jobs by the sweep dir name, so the report sits beside them)."""
    import wandb

    from .tracking import wandb_init

    # the same group as the sweep's jobs (runner._sweep_group)
    run = wandb_init(project=project, mode=mode, dir=str(out_dir), name=f"report-{sweep_dir.name}",
                     group=f"{sweep_dir.parent.name}_{sweep_dir.name}", job_type="report")
    columns = list(rows[0].keys())
    table = wandb.Table(columns=columns, data=[[_csv_cell(r[c]) for c in columns] for r in rows])
    run.log({"report/table": table, **{f"report/{name}": wandb.Image(str(p)) for name, p in plots.items()}})
    run.summary["report/n_jobs"] = len(rows)
    run.finish()
    return run


# --------------------------------------------------------------------------------------
def make_report(sweep_dir: Path, out_dir: Path | None = None, wandb_mode: str | None = None,
                wandb_project: str = "sparsevlm_exp", x: str = "kept") -> dict:
    """Read a sweep dir, write report.md, report.csv and the plots into out_dir
    (default <sweep dir>/report). Returns {"rows", "missing", "files"}."""
    sweep_dir = Path(sweep_dir)
    jobs = find_jobs(sweep_dir)
    finished = [j for j in jobs if j.results is not None]
    missing = [j for j in jobs if j.results is None]
    if not finished:
        if jobs:
            raise ReportError(f"no job results under {sweep_dir}: {len(jobs)} job dir(s), none has results.json "
                              f"yet (still running or failed)")
        raise ReportError(f"no job results under {sweep_dir}: expected <sweep dir>/<job num>/results.json")
    out_dir = Path(out_dir) if out_dir is not None else sweep_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)

    shared, per_job = varying_overrides(jobs)
    for job, own in zip(jobs, per_job):
        job.configuration = " ".join(own) or "(defaults)"
    rows = build_rows(finished)
    configuration = {j.name: j.configuration for j in jobs}
    for r in rows:
        r["configuration"] = configuration[r["job"]]
    plots = make_plots(rows, out_dir, f"{sweep_dir.parent.name}/{sweep_dir.name}", x)
    files = {"csv": write_csv(rows, out_dir / "report.csv"),
             "markdown": write_markdown(sweep_dir, rows, missing, shared, plots, out_dir / "report.md"),
             **plots}
    if wandb_mode is not None:
        log_to_wandb(rows, plots, sweep_dir, out_dir, mode=wandb_mode, project=wandb_project)
    return {"rows": rows, "missing": missing, "files": files}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsevlm_exp.report",
                                     description="Table and plots of a Hydra sweep of sparsevlm_exp runs.")
    parser.add_argument("sweep_dir", type=Path, help="e.g. outputs/multirun/2025-06-01/12-00-00")
    parser.add_argument("--out", type=Path, default=None, help="output dir (default: <sweep dir>/report)")
    parser.add_argument("--wandb", action="store_true", help="also log the table and plots to a W&B run")
    parser.add_argument("--wandb-mode", default="offline", choices=["offline", "online", "disabled"])
    parser.add_argument("--wandb-project", default="sparsevlm_exp")
    parser.add_argument("--x", default="kept", choices=sorted(X_AXES),
                        help="x axis of the plots: tokens left after the last cut, or the layer-averaged count")
    args = parser.parse_args(argv)
    try:
        report = make_report(args.sweep_dir, args.out, wandb_mode=args.wandb_mode if args.wandb else None,
                             wandb_project=args.wandb_project, x=args.x)
    except ReportError as err:
        print(f"report: {err}", file=sys.stderr)
        return 2
    print(results_table(report["rows"]))
    for job in report["missing"]:
        print(f"missing: job {job.name} ({job.configuration}), {job.samples_done} sample(s) done",
              file=sys.stderr)
    print(f"wrote {', '.join(str(p) for p in report['files'].values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
