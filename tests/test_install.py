"""A non-editable install works: the wheel carries the config tree and the embedded model,
and an installed copy runs from a directory outside the checkout without importing it.

Users install wheels on clusters; before this test, `pip wheel .` shipped no conf/ at all
and the CLI of a wheel install could not find its configs.
"""
from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "sparsevlm_exp"
pytestmark = pytest.mark.slow


def _run(cmd, cwd, timeout=300, env=None):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # No build isolation: the build backend (setuptools) is already here, and CI must not
    # depend on fetching it again.
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
          str(REPO)], cwd=out)
    (found,) = out.glob("sparsevlm_exp-*.whl")
    return found


def test_wheel_carries_every_config_module_and_asset(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    yamls = sorted(p.relative_to(REPO / "conf").as_posix() for p in (REPO / "conf").rglob("*.yaml"))
    assert yamls, "no yaml found under conf/"
    missing = [y for y in yamls if f"sparsevlm_exp/conf/{y}" not in names]
    assert not missing, f"conf files not in the wheel: {missing}"
    # every module of the package (a new subpackage must be listed in pyproject's packages)
    modules = sorted(p.relative_to(REPO).as_posix() for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)
    missing = [m for m in modules if m not in names]
    assert not missing, f"modules not in the wheel (add the package to pyproject [tool.setuptools] packages): {missing}"
    for asset in ("model.safetensors", "config.json", "tokenizer.json", "processor_config.json"):
        assert f"sparsevlm_exp/assets/shapes_vlm/{asset}" in names
    # the config tree is mapped into the package, never duplicated at the top of site-packages
    assert not any(n.startswith("conf/") for n in names)


LIBRARY_CHECK = """
import sys
from pathlib import Path
import sparsevlm_exp
from sparsevlm_exp.paths import CONF_DIR
assert Path(sparsevlm_exp.__file__).resolve().is_relative_to(Path(sys.prefix).resolve()), sparsevlm_exp.__file__
assert CONF_DIR == Path(sparsevlm_exp.__file__).resolve().parent / "conf", CONF_DIR
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from sparsevlm_exp import sparse_generate
with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
    cfg = compose(config_name="config", overrides=["device=cpu", "dtype=float32"])
adapter = instantiate(cfg.model)
sample = instantiate(cfg.dataset)[0]
req = adapter.encode(sample)
out = sparse_generate(adapter.model, req.model_inputs, scorer="v2", keep=0.25, max_new_tokens=4)
assert out.n_visual == 256 and out.kept_indices[0].shape[1] == 64, (out.n_visual, out.kept_indices)
print("library ok", sparsevlm_exp.__file__)
"""


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["WANDB_MODE"] = "disabled"
    return env


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv holding the wheel; the dependencies come from this interpreter's
    site-packages (no network), the package itself only from the wheel."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    python = env_dir / "bin" / "python"
    # --force-reinstall and a clean environment: a PYTHONPATH that reaches a checkout with
    # a build's egg-info would make pip think the package is already installed.
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)], cwd=env_dir,
         env=_clean_env())
    return env_dir


def test_installed_wheel_runs_outside_the_checkout(installed, tmp_path):
    python, cli = installed / "bin" / "python", installed / "bin" / "sparsevlm-exp"
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = _clean_env()

    lib = _run([str(python), "-c", LIBRARY_CHECK], cwd=work, env=env)
    assert "library ok" in lib.stdout and str(REPO) not in lib.stdout

    run_dir = work / "run"
    _run([str(cli), "limit=2", "logger=none", "viz.n=0", f"hydra.run.dir={run_dir}"], cwd=work, env=env)
    assert (run_dir / "results.json").is_file()
    assert len((run_dir / "samples.jsonl").read_text().splitlines()) == 2

    # an experiment file and a sweep find their configs too
    cfg = _run([str(cli), "+experiment=ablate_scorer", "--cfg", "job"], cwd=work, env=env)
    assert "scorer" in cfg.stdout
    sweep = work / "sweep"
    _run([str(cli), "-m", "keep=0.5,0.25", "limit=1", "logger=none", "viz.n=0", f"hydra.sweep.dir={sweep}"],
         cwd=work, env=env)
    assert sorted(p.parent.name for p in sweep.glob("*/results.json")) == ["0", "1"]

    for script in ("sparsevlm-exp-report", "sparsevlm-exp-bench"):
        assert (installed / "bin" / script).is_file(), script
    _run([str(installed / "bin" / "sparsevlm-exp-report"), str(sweep), "--out", str(work / "report")],
         cwd=work, env=env)
    assert (work / "report" / "report.md").is_file()
