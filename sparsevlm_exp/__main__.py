"""python -m sparsevlm_exp [overrides]: compose the config, run one experiment (or a sweep with -m)."""
from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .errors import ConfigError
from .paths import CONF_DIR

log = logging.getLogger("sparsevlm_exp")


def efficiency_line(summary: dict) -> str:
    """What the pruning kept and what it cost, in one line, from the run's results.json summary."""
    def number(key, fmt):
        value = summary.get(key)
        return "-" if value is None else format(value, fmt)

    kept = summary.get("kept") or {}
    cuts = "".join(f" -> {count:.0f} after layer {layer}" for layer, count in kept.items()) or " (not pruned)"
    return (f"visual tokens {number('n_visual', '.0f')}{cuts}, {number('equivalent_tokens', '.0f')} per layer "
            f"on average; per sample: vision {number('vision_ms', '.1f')} ms, LLM prefill "
            f"{number('prefill_ms', '.1f')} ms, decode {number('decode_ms_per_token', '.1f')} ms/token")


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from .runner import Experiment   # heavy imports after Hydra has parsed the command line

    runtime = HydraConfig.get().runtime
    run_dir = runtime.output_dir
    try:
        experiment = Experiment(cfg, run_dir, choices=runtime.choices)
    except ConfigError as err:
        # One clear line, no traceback, before any model weights are loaded.
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    summary = experiment.run()
    log.info("accuracy %.4f over %d samples (%d failed); results in %s", summary["accuracy"] or 0,
             summary["n_samples"], summary["n_failed"], run_dir)
    log.info("%s", efficiency_line(summary))
    if summary["n_failed"]:
        sys.exit(1)
    return summary["accuracy"]


if __name__ == "__main__":
    main()
