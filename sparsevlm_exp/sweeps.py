"""A sweep runs every job; its end says which jobs failed and exits non-zero.

Each job writes <job dir>/job_status.json (exit code as a single run would have it:
0 ok, 1 failed samples, 2 refused value; and the error line). SweepSummary, a Hydra
callback (conf/config.yaml hydra.callbacks), reads them when the sweep ends, in the
launching process, for the local launcher and SLURM alike.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

STATUS_FILE = "job_status.json"


def write_job_status(job_dir, code: int, error: str | None) -> None:
    path = Path(job_dir) / STATUS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"exit_code": code, "error": error}))


def sweep_failures(sweep_dir) -> list[tuple[str, str]]:
    """[(job name, error line)] of the jobs under sweep_dir that did not end with 0;
    a job dir without a status file died without reaching the end of its job."""
    failures = []
    dirs = [d for d in Path(sweep_dir).iterdir() if d.is_dir() and d.name.isdigit()]
    for job in sorted(dirs, key=lambda d: int(d.name)):
        path = job / STATUS_FILE
        if not path.exists():
            failures.append((job.name, "no job_status.json: the job died before its end"))
            continue
        status = json.loads(path.read_text())
        if status.get("exit_code"):
            failures.append((job.name, status.get("error") or f"exit code {status['exit_code']}"))
    return failures


class SweepSummary(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        failures = sweep_failures(sweep_dir)
        if not failures:
            return
        print(f"sweep {sweep_dir}: {len(failures)} job(s) failed:", file=sys.stderr)
        for name, error in failures:
            print(f"  job {name}: {error}", file=sys.stderr)
        sys.exit(1)
