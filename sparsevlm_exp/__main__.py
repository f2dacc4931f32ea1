"""python -m sparsevlm_exp [overrides]: compose the config, run one experiment (or a sweep with -m).

Exit codes of a single run: 0 all samples scored, 1 some samples failed, 2 a bad value
(one line, nothing loaded). In a sweep (-m) every job runs whatever the others did;
sweeps.SweepSummary lists the failed jobs at the end and exits 1 if there are any.
"""
from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from .errors import ConfigError
from .paths import CONF_DIR
from .rundir import register_resolvers, restore_hydra_files
from .sweeps import write_job_status

log = logging.getLogger("sparsevlm_exp")
register_resolvers()       # ${run_suffix:} in the default run dir names (conf/config.yaml)


def _ms(summary: dict, key: str) -> str:
    """'9.7 ms (median 8.1, p90 12.0)' from the summary's mean/median/p90 of `key`."""
    mean, median, p90 = (summary.get(k) for k in (key, f"{key}_median", f"{key}_p90"))
    if mean is None:
        return "-"
    if median is None:
        return f"{mean:.1f}"
    return f"{mean:.1f} (median {median:.1f}, p90 {p90:.1f})"


def efficiency_line(summary: dict) -> str:
    """What the pruning kept and what it cost, in one line, from the run's results.json
    summary. Counts what is ALIVE after each cut (kept + recycled) and names the
    recycled (merged) tokens separately; latencies as mean (median, p90)."""
    def number(key, fmt):
        value = summary.get(key)
        return "-" if value is None else format(value, fmt)

    kept, recycled = summary.get("kept") or {}, summary.get("recycled") or {}
    cuts = ""
    for layer, count in kept.items():
        merged = recycled.get(layer) or 0
        extra = f" ({count:.0f} kept + {merged:.0f} recycled)" if merged else ""
        cuts += f" -> {count + merged:.0f}{extra} after layer {layer}"
    cuts = cuts or " (not pruned)"
    return (f"visual tokens {number('n_visual', '.0f')}{cuts}, {number('equivalent_tokens', '.0f')} per layer "
            f"on average; per sample ms, mean (median, p90): vision {_ms(summary, 'vision_ms')}, LLM prefill "
            f"{_ms(summary, 'prefill_ms')}, decode {_ms(summary, 'decode_ms_per_token')}/token")


def run_one(cfg: DictConfig, run_dir: str, choices: dict) -> tuple[int, dict | None, str | None]:
    """(exit code, summary or None, error line or None) of one run."""
    from .runner import Experiment   # heavy imports after Hydra has parsed the command line

    try:
        experiment = Experiment(cfg, run_dir, choices=choices)
        summary = experiment.run()
    except ConfigError as err:
        # One clear line, no traceback, before any model weights are loaded. Hydra has
        # already rewritten .hydra/ of the run dir: give an existing run its own back.
        restore_hydra_files(run_dir)
        return 2, None, str(err)
    acc = summary.get("accuracy")
    ci = summary.get("accuracy_ci95")
    log.info("accuracy %s%s over %d samples (%d failed); results in %s",
             "-" if acc is None else f"{acc:.4f}", f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else "",
             summary["n_samples"], summary["n_failed"], run_dir)
    log.info("%s", efficiency_line(summary))
    if summary["n_failed"]:
        return 1, summary, f"{summary['n_failed']} of {summary['n_samples']} samples failed"
    return 0, summary, None


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig):
    hc = HydraConfig.get()
    run_dir = hc.runtime.output_dir
    if hc.mode != RunMode.MULTIRUN:
        code, summary, error = run_one(cfg, run_dir, dict(hc.runtime.choices))
    else:
        try:
            code, summary, error = run_one(cfg, run_dir, dict(hc.runtime.choices))
        except Exception as err:         # noqa: BLE001 - recorded for the sweep's summary, logged in full
            log.exception("job %s failed", hc.job.num)
            code, summary, error = 1, None, f"{type(err).__name__}: {err}"
    if hc.mode == RunMode.MULTIRUN:
        # Never raise or exit inside a sweep: the next job must still run (as each SLURM
        # job does); the sweep's end lists the failures and sets the exit code.
        write_job_status(run_dir, code, error)
        if code == 2:
            print(f"error: job {hc.job.num}: {error}", file=sys.stderr)
        return None if summary is None else summary.get("accuracy")
    if code == 2:
        print(f"error: {error}", file=sys.stderr)
    if code:
        sys.exit(code)
    return summary.get("accuracy")


if __name__ == "__main__":
    main()
