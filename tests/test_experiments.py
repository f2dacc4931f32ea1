"""conf/experiment/ablate_*: each composes into the intended grid of jobs, and every job
builds its parts (the sweep would not die on job 17)."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

CONF = Path(__file__).resolve().parent.parent / "conf"


def sweep_jobs(experiment: str) -> list[list[str]]:
    """The override lists `-m +experiment=NAME` launches, split by Hydra's BasicSweeper."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(config_name="config", overrides=[f"+experiment={experiment}"], return_hydra_config=True)
    params = [f"{key}={value}" for key, value in cfg.hydra.sweeper.params.items()]
    batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), max_batch_size=None)
    return [list(job) for batch in batches for job in batch]


@pytest.mark.parametrize("experiment, n_jobs", [
    ("ablate_scorer", 11 * 4), ("ablate_keep", 6), ("ablate_layer", 3), ("ablate_v2", 2 * 2 * 3),
    ("ablate_positions", 2 * 2 * 2),
])
def test_ablation_grid(experiment, n_jobs):
    jobs = sweep_jobs(experiment)
    assert len(jobs) == n_jobs and len({tuple(j) for j in jobs}) == n_jobs
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        for job in jobs:
            cfg = compose(config_name="config", overrides=[f"+experiment={experiment}", *job])
            for group in ("scorer", "policy", "pruner", "decoder"):
                instantiate(cfg[group], _convert_="all")


def test_ablate_v2_varies_the_v2_scorer():
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(config_name="config", overrides=["+experiment=ablate_v2", "scorer.gravity_guard=false"])
    scorer = instantiate(cfg.scorer)
    assert type(scorer).__name__ == "V2Scorer" and scorer.gravity_guard is False


@pytest.mark.parametrize("experiment, positions", [
    ("sparsevlm_v1", "auto"), ("sparsevlm_v15", "auto"), ("sparsevlm_v2", "original")])
def test_sparsevlm_presets_position_rule(experiment, positions):
    # v1 / v1.5: the official renumbering on 1-D RoPE (auto); v2: original positions
    # (issue 15 item 5; what auto resolves to per family: tests/test_positions.py)
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(config_name="config", overrides=[f"+experiment={experiment}"])
    assert instantiate(cfg.pruner, _convert_="all").positions == positions


def test_ablate_positions_compares_the_modes_on_llava():
    jobs = sweep_jobs("ablate_positions")
    assert {o for job in jobs for o in job if o.startswith("pruner.positions=")} == {
        "pruner.positions=original", "pruner.positions=renumbered"}
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(config_name="config", overrides=["+experiment=ablate_positions", *jobs[0]])
    assert cfg.model._target_.endswith("LlavaAdapter.load") and list(cfg.policy.layers) == [2, 6, 15]
