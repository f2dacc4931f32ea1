"""Sweeps through our launcher configs: conf/hydra/launcher/slurm.yaml on a real
single-node SLURM cluster (scripts/slurm/start.sh), and local.yaml (submitit_local).

The sweeps run the real app (`python -m sparsevlm_exp`, the embedded default model
and dataset); each job writes `results.json` with `env.slurm_job_id` into its Hydra
output dir. USE_STANDIN_APP = True swaps in a tiny stand-in Hydra app (written into
tmp_path with copies of OUR launcher yamls) for debugging the cluster alone.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_CONF = REPO / "conf" / "hydra" / "launcher"
START = REPO / "scripts" / "slurm" / "start.sh"
STOP = REPO / "scripts" / "slurm" / "stop.sh"

USE_STANDIN_APP = False


@dataclass(frozen=True)
class App:
    command: list[str]  # argv before the overrides
    cwd: Path
    sweep_2x2: list[str]  # 4 jobs
    sweep_2: list[str]  # 2 jobs
    fixed: list[str]  # same for every job


# The real app, once sparsevlm_exp/__main__.py exists: small and CPU-only.
REAL_APP = App(
    command=[sys.executable, "-m", "sparsevlm_exp"],
    cwd=REPO,
    # the sweep, on the embedded default model and dataset
    sweep_2x2=["scorer=v15,v2", "keep=0.5,0.25"],
    sweep_2=["keep=0.25,0.5"],
    fixed=["limit=3", "device=cpu", "logger=none", "viz.n=0"],
)

STANDIN_SOURCE = '''
import json
import os

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg):
    out_dir = HydraConfig.get().runtime.output_dir
    results = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "env": {
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_array_job_id": os.environ.get("SLURM_ARRAY_JOB_ID"),
            "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
            "pid": os.getpid(),
        },
    }
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
'''


def write_standin_app(root: Path) -> App:
    conf = root / "conf"
    (conf / "hydra" / "launcher").mkdir(parents=True)
    (conf / "config.yaml").write_text("a: 1\nb: x\n")
    for yaml in ("slurm.yaml", "local.yaml"):
        shutil.copy(LAUNCHER_CONF / yaml, conf / "hydra" / "launcher" / yaml)
    script = root / "standin_app.py"
    script.write_text(textwrap.dedent(STANDIN_SOURCE))
    return App(
        command=[sys.executable, str(script)],
        cwd=root,
        sweep_2x2=["a=1,2", "b=x,y"],
        sweep_2=["a=1,2"],
        fixed=[],
    )


@pytest.fixture
def app(tmp_path: Path) -> App:
    return write_standin_app(tmp_path / "app") if USE_STANDIN_APP else REAL_APP


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment minus any SLURM/submitit job variables (pytest may itself run
    inside a job on a real cluster), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    env.update(extra or {})
    return env


def run_sweep(app: App, overrides: list[str], env: dict[str, str], timeout_s: float, on_fail=None):
    cmd = [*app.command, "-m", *overrides]
    try:
        proc = subprocess.run(cmd, cwd=app.cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        extra = on_fail() if on_fail else ""
        pytest.fail(f"sweep timed out after {timeout_s}s: {shlex.join(cmd)}\n{out}\n{err}\n{extra}")
    if proc.returncode != 0:
        extra = on_fail() if on_fail else ""
        pytest.fail(f"sweep failed (rc {proc.returncode}): {shlex.join(cmd)}\n{proc.stdout}\n{proc.stderr}\n{extra}")
    return proc


def job_results(sweep_dir: Path) -> dict[Path, dict]:
    """results.json of every job of the sweep, keyed by the job's output dir."""
    return {p.parent: json.loads(p.read_text()) for p in sorted(sweep_dir.rglob("results.json"))}


def job_overrides(job_dir: Path) -> tuple[str, ...]:
    # Hydra writes each job's overrides next to its outputs (hydra.output_subdir=.hydra).
    lines = (job_dir / ".hydra" / "overrides.yaml").read_text().splitlines()
    return tuple(sorted(line.removeprefix("- ").strip() for line in lines if line.startswith("- ")))


def submitit_logs(sweep_dir: Path, limit: int = 4000) -> str:
    parts = []
    for p in sorted((sweep_dir / ".submitit").rglob("*")):
        if p.is_file() and p.suffix in (".out", ".err", ".sh"):
            parts.append(f"----- {p}\n{p.read_text(errors='replace')[-limit:]}")
    return "\n".join(parts)


# ---------------------------------------------------------------------------
# SLURM


@dataclass(frozen=True)
class Cluster:
    dir: Path
    env: dict[str, str]  # exports from <dir>/env.sh (SLURM_CONF, SLURM_TMP)

    def logs(self) -> str:
        parts = []
        for name in ("log/slurmctld.log", "log/slurmd.log", "munge/munged.log"):
            p = self.dir / name
            if p.exists():
                parts.append(f"----- {p}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-40:]))
        return "\n".join(parts)

    def scontrol_job(self, job_id: str) -> str:
        proc = subprocess.run(
            ["scontrol", "show", "job", job_id], env=clean_env(self.env), capture_output=True, text=True, timeout=30
        )
        return proc.stdout + proc.stderr


def read_env_sh(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            key, value = words[1].split("=", 1)
            env[key] = value
    return env


@pytest.fixture(scope="module")
def slurm_cluster():
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    missing = [c for c in ("slurmctld", "slurmd", "munged", "sbatch") if shutil.which(c, path=path) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        pytest.skip("starting slurmd and munged needs root")
    # Not pytest's tmp_path: munged runs as user munge and must reach the dir
    # (pytest's base temp is 0700), and the munge socket path must stay short.
    cluster_dir = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
    try:
        proc = subprocess.run(
            [str(START), str(cluster_dir)], env=clean_env(), capture_output=True, text=True, timeout=120
        )
        if proc.returncode != 0:
            pytest.fail(f"scripts/slurm/start.sh failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        yield Cluster(dir=cluster_dir, env=read_env_sh(cluster_dir / "env.sh"))
    finally:
        subprocess.run([str(STOP), str(cluster_dir)], env=clean_env(), timeout=120)
        shutil.rmtree(cluster_dir, ignore_errors=True)


@pytest.mark.slurm
def test_slurm_sweep_runs_each_job_as_a_slurm_job(slurm_cluster: Cluster, app: App, tmp_path: Path):
    sweep_dir = tmp_path / "multirun"
    overrides = [
        *app.sweep_2x2,
        *app.fixed,
        "hydra/launcher=slurm",
        f"hydra.sweep.dir={sweep_dir}",
        # The test cluster: no GPUs, 2 CPUs, partition `debug` (also the default).
        "hydra.launcher.partition=debug",
        "hydra.launcher.gpus_per_node=null",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=1",
        "hydra.launcher.timeout_min=5",
    ]
    t0 = time.monotonic()
    run_sweep(
        app,
        overrides,
        clean_env(slurm_cluster.env),
        timeout_s=300,
        on_fail=lambda: submitit_logs(sweep_dir) + "\n" + slurm_cluster.logs(),
    )
    elapsed = time.monotonic() - t0

    results = job_results(sweep_dir)
    assert len(results) == 4, f"expected 4 results.json, got {list(results)}\n{submitit_logs(sweep_dir)}"
    assert len({job_overrides(d) for d in results}) == 4, "each job must run its own override combination"

    job_ids = [r["env"]["slurm_job_id"] for r in results.values()]
    assert all(j is not None and j.isdigit() for j in job_ids), f"not run under SLURM: {job_ids}"
    assert len(set(job_ids)) == 4, f"expected 4 distinct SLURM job ids, got {job_ids}"
    for job_id in job_ids:
        info = slurm_cluster.scontrol_job(job_id)
        assert f"JobId={job_id}" in info and "Partition=debug" in info, f"job {job_id} unknown to our cluster:\n{info}"

    # Our yaml's `setup` reached the sbatch script, with the shell variable not eaten by OmegaConf.
    scripts = list((sweep_dir / ".submitit").rglob("*_submission.sh"))
    assert scripts, f"no sbatch script under {sweep_dir / '.submitit'}"
    script = scripts[0].read_text()
    assert "export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK;" in script, script
    assert "#SBATCH --partition=debug" in script and "--gpus-per-node" not in script, script
    print(f"4-job SLURM sweep took {elapsed:.1f}s")


# ---------------------------------------------------------------------------
# submitit_local


def test_local_sweep_runs_each_job_in_a_submitit_process(app: App, tmp_path: Path):
    sweep_dir = tmp_path / "multirun"
    overrides = [
        *app.sweep_2,
        *app.fixed,
        "hydra/launcher=local",
        f"hydra.sweep.dir={sweep_dir}",
        "hydra.launcher.timeout_min=5",
    ]
    run_sweep(app, overrides, clean_env(), timeout_s=300, on_fail=lambda: submitit_logs(sweep_dir))

    results = job_results(sweep_dir)
    assert len(results) == 2, f"expected 2 results.json, got {list(results)}\n{submitit_logs(sweep_dir)}"
    assert len({job_overrides(d) for d in results}) == 2
    assert all(r["env"]["slurm_job_id"] is None for r in results.values())
    # Ran through submitit (its pickled results), not Hydra's in-process basic launcher.
    assert len(list((sweep_dir / ".submitit").rglob("*_result.pkl"))) == 2
