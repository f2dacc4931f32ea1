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


class SampleLog:
    """Append-only samples.jsonl with resume support."""

    def __init__(self, run_dir: Path, resume: bool):
        self.path = Path(run_dir) / "samples.jsonl"
        self.records: list[dict] = []
        if resume and self.path.exists():
            good = []
            for line in self.path.read_text().splitlines():
                try:
                    good.append(json.loads(line))
                except json.JSONDecodeError:
                    break           # a line cut by a kill mid-write: drop it and redo that sample
            # keep the last record per sample index (a failed sample is retried)
            by_index = {r["index"]: r for r in good}
            self.records = sorted(by_index.values(), key=lambda r: r["index"])
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")
        self.done = {r["index"] for r in self.records if r.get("error") is None}  # dataset indices
        self.records = [r for r in self.records if r.get("error") is None]
        self._file = open(self.path, "a")

    def append(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.records.append(record)

    def close(self) -> None:
        self._file.close()


class NullLogger:
    """logger=none: local files only."""

    def start(self, *, config: dict, run_dir: Path, name: str, group: str | None, tags: list[str] = ()) -> None:
        pass

    def log_sample(self, record: dict, step: int) -> None:
        pass

    def log_images(self, images: dict[str, Any]) -> None:
        pass

    def finish(self, summary: dict, records: list[dict], exit_code: int = 0) -> None:
        pass


class WandbLogger(NullLogger):
    TABLE_COLUMNS = ["id", "question", "prediction", "answers", "score", "n_visual", "kept", "evidence_recall"]

    def __init__(self, mode: str = "offline", project: str = "sparsevlm_exp", entity: str | None = None,
                 group: str | None = None, tags: list[str] | None = None):
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.mode={mode!r} is not allowed: offline, online or disabled")
        self.mode, self.project, self.entity = mode, project, entity
        self.group, self.tags = group, list(tags or [])
        self.run = None

    def start(self, *, config, run_dir, name, group, tags=()):
        import wandb

        self.run = wandb.init(
            project=self.project, entity=self.entity, mode=self.mode, dir=str(run_dir), name=name,
            group=self.group or group, tags=[*self.tags, *tags], config=config, reinit="finish_previous",
            # Console capture off: under launchers (submitit) it fights over the job's
            # stdout. (wandb >= 0.2x runs a separate service; the old start_method is gone.)
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        )

    def log_sample(self, record, step):
        if self.run is None:
            return
        metrics = {"sample/score": record.get("score"), "sample/failed": record.get("error") is not None}
        for key in ("prefill_ms", "decode_ms_per_token", "vision_ms"):
            if record.get(key) is not None:
                metrics[f"sample/{key}"] = record[key]
        self.run.log(metrics, step=step)

    def log_images(self, images):
        if self.run is None or not images:
            return
        import wandb

        self.run.log({key: wandb.Image(str(path)) for key, path in images.items()})

    def finish(self, summary, records, exit_code=0):
        if self.run is None:
            return
        import wandb

        for key, value in _flatten(summary).items():
            self.run.summary[key] = value
        table = wandb.Table(columns=self.TABLE_COLUMNS)
        for r in records:
            table.add_data(*[json.dumps(r.get(c)) if isinstance(r.get(c), (list, dict)) else r.get(c)
                             for c in self.TABLE_COLUMNS])
        self.run.log({"samples": table})
        self.run.finish(exit_code=exit_code)
        self.run = None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
    return out
