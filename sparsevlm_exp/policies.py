"""Keep policies: at which layers visual tokens are pruned, and how many survive.

`keep` convention everywhere: a float in (0, 1] is a fraction of the ORIGINAL
visual token count, an int >= 1 is a count.
"""
from __future__ import annotations

import logging
import math

import torch

from .errors import ConfigError, bad_value

log = logging.getLogger(__name__)


def check_keep(key: str, keep) -> None:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise bad_value(key, keep, "a float in (0, 1] (fraction of visual tokens) or an int >= 1 (count)")
    if isinstance(keep, float) and not 0 < keep <= 1:
        raise bad_value(key, keep, "a float fraction must be in (0, 1]; use an int for a token count")
    if isinstance(keep, int) and keep < 1:
        raise bad_value(key, keep, "an int count must be >= 1; use a float in (0, 1] for a fraction")


def keep_count(keep, n_visual: int) -> int:
    """Visual tokens to keep out of n_visual (at least 1)."""
    if isinstance(keep, float):
        return max(1, min(n_visual, round(keep * n_visual)))
    return min(n_visual, keep)


class KeepPolicy:
    def layers(self, n_layers: int) -> list[int]:
        raise NotImplementedError

    def n_keep(self, layer: int, *, n_visual: int, scores: torch.Tensor, view) -> int:
        raise NotImplementedError

    def check(self, n_layers: int) -> None:
        """Raise ConfigError if the policy cannot run on a model with n_layers layers."""


class FixedPolicy(KeepPolicy):
    """Prune once: scores from layer `layer`, layers layer+1.. keep `keep` visual tokens."""

    def __init__(self, layer: int, keep):
        check_keep("keep", keep)
        self.layer, self.keep = layer, keep
        self._warned = False

    def check(self, n_layers: int) -> None:
        if not isinstance(self.layer, int) or not 0 <= self.layer < n_layers:
            raise bad_value("layer", self.layer, f"an int in [0, {n_layers - 1}] (the model has {n_layers} layers)")

    def layers(self, n_layers: int) -> list[int]:
        return [self.layer]

    def n_keep(self, layer, *, n_visual, scores, view) -> int:
        if isinstance(self.keep, int) and self.keep > n_visual and not self._warned:
            log.warning("keep=%d exceeds the %d visual tokens of a sample: keeping all of them", self.keep, n_visual)
            self._warned = True
        return keep_count(self.keep, n_visual)
