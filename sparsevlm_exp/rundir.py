"""One run directory = one configuration: refuse to mix, lose or duplicate results.

A run dir holds the records of exactly one resolved configuration. Starting a run:
  1. take an exclusive lock on <run dir>/.lock (a second process refuses at once);
  2. if the dir already holds results (results.json, or records in samples.jsonl),
     refuse unless `resume=true`;
  3. with `resume=true`, compare the stored resolved config with the new one, ignoring
     keys that do not change results (RESULT_NEUTRAL_KEYS), and refuse naming the keys
     that differ;
  4. store the resolved config (run_config.json) before the first record is written.

Every refusal is a ConfigError (one line, exit 2) raised before the model loads, and
deletes nothing. Hydra rewrites `.hydra/*.yaml` of a run dir before our code runs; on
a refusal those files are put back from run_config.json, so the dir still describes
the run that produced its records.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from omegaconf import OmegaConf

from .errors import ConfigError

# Top-level keys whose value does not change any record: how many samples to run,
# where results are logged, the pictures, CPU threads, and resume itself.
RESULT_NEUTRAL_KEYS = ("limit", "logger", "viz", "threads", "resume")
CONFIG_FILE = "run_config.json"
LOCK_FILE = ".lock"


def register_resolvers() -> None:
    """`${run_suffix:}`: a short random suffix for default run/sweep dir names, so two
    launches in the same second never share a dir. Cached like Hydra's `now`, so every
    use within one run (and in the jobs of a sweep, which copy the cache) agrees."""
    if not OmegaConf.has_resolver("run_suffix"):
        OmegaConf.register_new_resolver("run_suffix", lambda: os.urandom(3).hex(), use_cache=True)


# --------------------------------------------------------------------------------------
# JSON that strict parsers accept
# --------------------------------------------------------------------------------------
def json_safe(value):
    """value with every NaN/inf float replaced by None (JSON has no NaN; Python's json
    writes a bare `NaN` that strict parsers reject) and non-JSON leaves as strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def write_json(path: Path, data) -> None:
    """Atomic (tmp file + rename), strict JSON (allow_nan=False after json_safe)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(json_safe(data), indent=2, allow_nan=False))
    tmp.replace(path)


# --------------------------------------------------------------------------------------
# Comparing configurations
# --------------------------------------------------------------------------------------
def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def result_config(config: dict) -> dict:
    """The flattened config ({"scorer.head_fraction": 0.5, ...}) minus the keys that do not
    change results."""
    return {k: v for k, v in _flatten(config).items() if k.split(".")[0] not in RESULT_NEUTRAL_KEYS}


def config_differences(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for each result-changing key that differs (sorted)."""
    a, b = result_config(old), result_config(new)
    missing = object()
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, missing), b.get(key, missing)
        if va != vb:
            show = lambda v: "(absent)" if v is missing else repr(v)   # noqa: E731
            diffs.append(f"{key}: {show(va)} -> {show(vb)}")
    return diffs


# --------------------------------------------------------------------------------------
# Opening a run dir
# --------------------------------------------------------------------------------------
class RunDir:
    """An opened, locked run dir. Use as a context manager or call close()."""

    def __init__(self, path: Path, lock):
        self.path, self._lock = Path(path), lock

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def holds_results(run_dir: Path) -> bool:
    """Whether the dir holds records of a run: results.json, or a non-empty samples.jsonl.
    (A run that stopped before its first record, e.g. a model that did not load, left
    nothing to lose; its run_config.json is simply rewritten.)"""
    samples = Path(run_dir) / "samples.jsonl"
    return (Path(run_dir) / "results.json").exists() or (samples.exists() and samples.stat().st_size > 0)


def open_run_dir(run_dir: Path, config: dict, resume: bool, hydra_files: dict[str, str] | None = None) -> RunDir:
    """Lock run_dir and check that `config` (resolved, plain dict) may write into it.

    hydra_files: {"overrides.yaml": text, ...} of <run dir>/.hydra as Hydra wrote them
    for THIS launch (None outside the CLI); stored with the config on a fresh start.
    Raises ConfigError (nothing deleted) when another process holds the dir, when it
    holds results and resume is false, or when resume=true but the stored config
    differs in keys that change results."""
    from filelock import FileLock, Timeout

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        restore_hydra_files(run_dir)
        raise ConfigError(f"run dir {run_dir} is in use by another process (lock {run_dir / LOCK_FILE}): "
                          f"wait for it to finish or choose another hydra.run.dir") from None
    try:
        stored_path = run_dir / CONFIG_FILE
        if holds_results(run_dir):
            if not resume:
                raise ConfigError(f"run dir {run_dir} already holds results: add resume=true to continue that run "
                                  f"with the same config, or choose another hydra.run.dir (nothing was deleted)")
            stored = json.loads(stored_path.read_text()) if stored_path.exists() else None
            if stored is not None:
                diffs = config_differences(stored["config"], config)
                if diffs:
                    raise ConfigError(f"resume=true into {run_dir}, which holds another configuration: "
                                      + "; ".join(diffs) + " (use another hydra.run.dir for a new configuration)")
                return RunDir(run_dir, lock)
        write_json(stored_path, {"config": config, "hydra_files": hydra_files or {}})
        return RunDir(run_dir, lock)
    except ConfigError:
        restore_hydra_files(run_dir)
        lock.release()
        raise


def read_hydra_files(run_dir: Path) -> dict[str, str]:
    hydra_dir = Path(run_dir) / ".hydra"
    return {p.name: p.read_text() for p in sorted(hydra_dir.glob("*.yaml"))} if hydra_dir.is_dir() else {}


def restore_hydra_files(run_dir: Path) -> None:
    """Put back the .hydra/*.yaml of the launch that created the dir (Hydra has just
    overwritten them with a launch that we refuse or that only resumes)."""
    stored_path = Path(run_dir) / CONFIG_FILE
    try:
        files = json.loads(stored_path.read_text()).get("hydra_files") or {}
    except (OSError, ValueError):
        return
    for name, text in files.items():
        path = Path(run_dir) / ".hydra" / name
        if path.parent.is_dir():
            path.write_text(text)
