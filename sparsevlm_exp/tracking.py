"""Where results go: local files (always) and Weights & Biases (logger=wandb).

Local files in the Hydra run dir:
- samples.jsonl: one record per finished sample, appended and flushed at once, so
  an interrupted run loses no finished sample (and `resume=true` skips them);
- results.json: the summary and the resolved config, written at the end.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import ConfigError, bad_value
from .records import LATENCY_FIELDS, TABLE_COLUMNS, SampleRecord
from .rundir import json_safe


class SampleLog:
    """samples.jsonl: one line per sample, appended and fsynced at once, read back on resume.

    Each dataset index has exactly ONE record in the file once the log is closed: a
    failed sample retried on resume replaces its old record (the file is rewritten,
    atomically, at close). A line cut by a kill mid-write is dropped on reopening and
    that sample is run again. Refusing to start into a dir that already holds records
    (without resume=true) is rundir.open_run_dir's job; this class never truncates.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "samples.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._by_index: dict[int, SampleRecord] = {}
        self._stale = False          # the file holds lines that a later record replaced
        if self.path.exists():
            lines = [(n, line) for n, line in enumerate(self.path.read_text().splitlines(), start=1) if line.strip()]
            for position, (number, line) in enumerate(lines):
                try:
                    record = SampleRecord.from_dict(json.loads(line))
                except json.JSONDecodeError:
                    if position == len(lines) - 1:
                        self._stale = True   # the last line, cut by a kill mid-write: redo that sample
                        break
                    raise ConfigError(f"{self.path}:{number} is not valid JSON and is not the last line: the file "
                                      f"was edited or is not ours; nothing was changed") from None
                except TypeError as err:     # valid JSON, but not a record (no index/id)
                    raise ConfigError(f"{self.path}:{number} is not a sample record ({err}); nothing was "
                                      f"changed") from None
                self._by_index[record.index] = record      # the last record of an index wins
            if self._stale or len(lines) != len(self._by_index):
                self._rewrite()
        self._file = open(self.path, "a")

    @property
    def records(self) -> list[SampleRecord]:
        """The current record of every index, in index order."""
        return [self._by_index[i] for i in sorted(self._by_index)]

    @property
    def done(self) -> set[int]:
        """Indices that finished without error (a failed one is retried on resume)."""
        return {i for i, r in self._by_index.items() if r.ok}

    def append(self, record: SampleRecord) -> None:
        if record.index in self._by_index:
            self._stale = True
        self._file.write(json.dumps(json_safe(record.to_dict()), allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._by_index[record.index] = record

    def close(self) -> None:
        self._file.close()
        if self._stale:
            self._rewrite()

    def _rewrite(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(json_safe(r.to_dict()), allow_nan=False) + "\n" for r in self.records))
        tmp.replace(self.path)
        self._stale = False


class NullLogger:
    """logger=none: local files only."""

    def start(self, *, config: dict, run_dir: Path, name: str, group: str | None, tags: list[str] = ()) -> None:
        pass

    def log_sample(self, record: SampleRecord, step: int) -> None:
        pass

    def log_images(self, images: dict[str, Any]) -> None:
        pass

    def finish(self, summary: dict, records: list[SampleRecord], exit_code: int = 0) -> None:
        pass


def wandb_init(*, mode: str, project: str, dir: str, name: str, group: str | None, **kwargs):
    """The one wandb.init of the package (runs and sweep reports alike)."""
    import wandb

    return wandb.init(
        project=project, mode=mode, dir=dir, name=name, group=group, reinit="finish_previous",
        # Console capture off: under launchers (submitit) it fights over the job's
        # stdout. (wandb >= 0.2x runs a separate service; the old start_method is gone.)
        settings=wandb.Settings(console="off", silent=True, x_disable_stats=True), **kwargs)


def wandb_credentials_found() -> bool:
    """An API key in the environment or in ~/.netrc for the W&B host: what wandb.init
    needs for mode=online without prompting (checked before the model loads)."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbLogger(NullLogger):
    def __init__(self, mode: str = "offline", project: str = "sparsevlm_exp", entity: str | None = None,
                 group: str | None = None, tags: list[str] | None = None):
        if mode not in ("offline", "online", "disabled"):
            raise bad_value("logger.mode", mode, "offline, online or disabled")
        if mode == "online" and not wandb_credentials_found():
            raise bad_value("logger.mode", mode, "offline or disabled: no W&B API key found (set WANDB_API_KEY "
                            "or run `wandb login`); offline runs can be uploaded later with `wandb sync`")
        self.mode, self.project, self.entity = mode, project, entity
        self.group, self.tags = group, list(tags or [])
        self.run = None

    def start(self, *, config, run_dir, name, group, tags=()):
        self.run = wandb_init(mode=self.mode, project=self.project, dir=str(run_dir), name=name,
                              group=self.group or group, entity=self.entity, tags=[*self.tags, *tags], config=config)

    def log_sample(self, record: SampleRecord, step):
        if self.run is None:
            return
        metrics = {"sample/score": record.score, "sample/failed": not record.ok}
        for key in LATENCY_FIELDS:
            if getattr(record, key) is not None:
                metrics[f"sample/{key}"] = getattr(record, key)
        self.run.log(metrics, step=step)

    def log_images(self, images):
        if self.run is None or not images:
            return
        import wandb

        self.run.log({key: wandb.Image(str(path)) for key, path in images.items()})

    def finish(self, summary, records: list[SampleRecord], exit_code=0):
        if self.run is None:
            return
        import wandb

        for key, value in _flatten(json_safe(summary)).items():
            self.run.summary[key] = value
        table = wandb.Table(columns=list(TABLE_COLUMNS))
        for r in records:
            cells = [getattr(r, c) for c in TABLE_COLUMNS]
            table.add_data(*[json.dumps(v) if isinstance(v, (list, dict)) else v for v in cells])
        self.run.log({"samples": table})
        self.run.finish(exit_code=exit_code)
        self.run = None


def environment() -> dict:
    """Where a result was produced: host, versions, device, SLURM job (results.json and
    the bench's bench_env.json)."""
    import platform

    import torch
    import transformers

    from .metrics.efficiency import cpu_model_name

    return {
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
        "host": platform.node(),
        "cpu": cpu_model_name(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        # the CPU selection loops of CDPruner and VisPruner are numba-compiled; numpy runs the rest
        "numpy": _installed_version("numpy"),
        "numba": _installed_version("numba"),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def _installed_version(package: str) -> str | None:
    """The installed distribution's version (not imported: numba loads LLVM), None if absent."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
    return out
