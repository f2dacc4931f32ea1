"""Keep policies: at which layers visual tokens are pruned, how many survive, and
which ones (contracts.KeepPolicy.select: the top-k of the scores unless a policy
overrides it).

Cut points: decoder layers 0..L-1, and PRE_LLM (-1) = before layer 0, after the
vision tower and projector (contracts.py).

`keep` convention everywhere: a float in (0, 1] is a fraction of the ORIGINAL
visual token count, an int >= 1 is a count.
"""
from __future__ import annotations

import logging
import math

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from .contracts import PRE_LLM, KeepPolicy
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


ALLOCATIONS = ("per_image", "global")


def check_allocation(allocation) -> str:
    """policy.allocation: how the kept count is shared when a request has several images
    (KeepPolicy.select). Raises ConfigError for anything but per_image | global."""
    if allocation not in ALLOCATIONS:
        raise bad_value("policy.allocation", allocation,
                        "per_image (each image keeps its share of the count, by its token count) or "
                        "global (one top-k over all images together)")
    return allocation


class FixedPolicy(KeepPolicy):
    """Prune once: scores from layer `layer`, layers layer+1.. keep `keep` visual tokens."""

    def __init__(self, layer: int, keep, allocation: str = "per_image"):
        check_keep("keep", keep)
        self.layer, self.keep = layer, keep
        self.allocation = check_allocation(allocation)
        self._warned = False

    def check(self, n_layers: int) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or not PRE_LLM <= self.layer < n_layers:
            raise bad_value("layer", self.layer, f"an int in [0, {n_layers - 1}] (the model has {n_layers} layers), "
                            f"or {PRE_LLM} to cut before the LLM")

    def layers(self, n_layers: int) -> list[int]:
        return [self.layer]

    def n_keep(self, layer, *, n_visual, scores, view) -> int:
        if isinstance(self.keep, int) and self.keep > n_visual and not self._warned:
            log.warning("keep=%d exceeds the %d visual tokens of a sample: keeping all of them", self.keep, n_visual)
            self._warned = True
        return keep_count(self.keep, n_visual)


def _plain(value):
    """Lists/dicts as Python objects: hydra's instantiate passes ListConfig/DictConfig
    unless called with _convert_="all" (the runner converts; plain instantiate does not)."""
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def _pick_by_budget(key: str, budget, table: dict):
    """table[budget], or a ConfigError naming `budget` and the budgets the table has."""
    # yaml keys may arrive as ints or strings; compare as ints so `budget=128` finds "128".
    by_int = {int(k): v for k, v in table.items()}
    if isinstance(budget, bool) or not isinstance(budget, int) or budget not in by_int:
        allowed = ", ".join(str(b) for b in sorted(by_int, reverse=True))
        raise bad_value("budget", budget, f"one of {allowed} (the budgets in {key})")
    return by_int[budget]


def map_layers(layers: list[int], reference_layers: int, n_layers: int) -> list[int]:
    """Pruning layers written for a `reference_layers`-deep model, placed on an
    n_layers-deep one at the same relative depth.

    Rule: layer i -> floor(i * n_layers / reference_layers + 1/2) (round half up), then
    each mapped layer is raised to at least one above the previous, so the list stays
    strictly increasing with distinct layers. The identity when n_layers ==
    reference_layers: SparseVLM's [2, 6, 15] stays [2, 6, 15] on 32-layer LLaVA-1.5-7B;
    it becomes [2, 5, 13] on 28-layer Qwen2.5-VL-7B and [0, 1, 3] on the 6-layer
    embedded model. Raises ConfigError if the list does not fit below n_layers.
    """
    mapped: list[int] = []
    for layer in layers:
        at = math.floor(layer * n_layers / reference_layers + 0.5)
        mapped.append(at if not mapped else max(at, mapped[-1] + 1))
    if mapped and mapped[-1] >= n_layers:
        raise bad_value("policy.layers", layers, f"{len(layers)} distinct pruning layers, mapped from a "
                        f"{reference_layers}-layer reference (policy.reference_layers) to the model's "
                        f"{n_layers} layers; they do not fit: give fewer layers or policy.reference_layers=null")
    return mapped


def _check_reference_layers(reference_layers, layers) -> None:
    if reference_layers is None:
        return
    if isinstance(reference_layers, bool) or not isinstance(reference_layers, int) or reference_layers < 1:
        raise bad_value("policy.reference_layers", reference_layers,
                        "null (policy.layers are the model's own layer indices) or an int >= 1 (the depth "
                        "of the model policy.layers were written for)")
    # the reference layers themselves must make sense on the reference model
    _check_layers(layers, reference_layers, depth=f"the {reference_layers}-layer reference, policy.reference_layers")


def _resolve_layers(layers: list[int], reference_layers: int | None, n_layers: int) -> list[int]:
    """policy.layers on this model: as given, or mapped from the reference depth."""
    if reference_layers is None:
        return list(layers)
    return map_layers(layers, reference_layers, n_layers)


def _log_layers(layers: list[int], reference_layers: int | None, n_layers: int) -> None:
    if reference_layers is not None:
        log.info("pruning layers %s of the %d-layer reference -> layers %s of this %d-layer model",
                 layers, reference_layers, _resolve_layers(layers, reference_layers, n_layers), n_layers)


def _check_layers(layers, n_layers: int, depth: str | None = None) -> None:
    depth = depth or f"the model has {n_layers} layers"
    allowed = (f"a strictly increasing list of ints in [0, {n_layers - 1}] ({depth}), "
               f"optionally starting with {PRE_LLM} (before the LLM)")
    key = "policy.layers"
    if not isinstance(layers, list) or not layers:
        raise bad_value(key, layers, allowed)
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not PRE_LLM <= layer < n_layers:
            raise bad_value(key, layers, allowed)
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise bad_value(key, layers, allowed)


class SchedulePolicy(KeepPolicy):
    """Prune at several layers; `keep[i]` visual tokens are left after `layers[i]`.

    keep entries: int = a count, float in (0, 1] = a fraction of the ORIGINAL visual
    token count. With `reference_count` set, int counts are read as "this many out of
    reference_count" and scaled to the sample's count (round(count / reference_count *
    n_visual)): SparseVLM's schedules are counts for LLaVA-1.5's 576 tokens, and this
    reproduces them exactly at 576 while scaling to any other model.

    Presets per budget: pass `keep_by_budget` {budget: [counts...]} and `budget`
    instead of `keep` (the experiment yamls do this with `budget: ${budget}`).

    reference_layers: null = `layers` are this model's layer indices; an int R = they
    were written for an R-layer model and are mapped to this one by `map_layers`
    (the SparseVLM presets: R = 32, LLaVA-1.5-7B's depth, exact there).

    A count larger than the visual tokens alive keeps all of them (alive counts
    include recycled tokens). The official v1.5 code caps at alive - 1 instead
    (topk(min(count, v_token_num - 1))); we keep all, so that a schedule whose
    count exceeds the tokens present is a no-op rather than a one-token cut.
    """

    def __init__(self, layers, keep=None, reference_count: int | None = None, budget=None,
                 keep_by_budget: dict | None = None, reference_layers: int | None = None,
                 allocation: str = "per_image"):
        self.allocation = check_allocation(allocation)
        layers, keep, keep_by_budget = _plain(layers), _plain(keep), _plain(keep_by_budget)
        if keep_by_budget is not None:
            if keep is not None:
                raise bad_value("policy.keep", keep, "null when policy.keep_by_budget picks the schedule by budget")
            keep = _pick_by_budget("policy.keep_by_budget", budget, keep_by_budget)
        if not isinstance(keep, list) or not isinstance(layers, list) or len(keep) != len(layers):
            raise bad_value("policy.keep", keep, f"a list with one entry per layer in policy.layers={layers}")
        for value in keep:
            check_keep("policy.keep", value)
        if reference_count is not None and (isinstance(reference_count, bool) or not isinstance(reference_count, int)
                                            or reference_count < 1):
            raise bad_value("policy.reference_count", reference_count, "null or an int >= 1")
        _check_reference_layers(reference_layers, layers)
        self._layers, self.keep, self.reference_count = list(layers), list(keep), reference_count
        self.reference_layers = reference_layers
        self._active = list(self._layers)      # the layers on the model in use, set by layers()

    def check(self, n_layers: int) -> None:
        _check_layers(self.layers(n_layers), n_layers)
        _log_layers(self._layers, self.reference_layers, n_layers)

    def layers(self, n_layers: int) -> list[int]:
        self._active = _resolve_layers(self._layers, self.reference_layers, n_layers)
        return list(self._active)

    def n_keep(self, layer, *, n_visual, scores, view) -> int:
        keep = self.keep[self._active.index(layer)]
        if isinstance(keep, int) and self.reference_count is not None:
            keep = min(1.0, keep / self.reference_count)      # scaled below, like any fraction
        n_alive = scores.shape[1]
        return min(n_alive, keep_count(keep, n_visual))


def rank_keep_count(P: torch.Tensor, scale: float, bias: float) -> int:
    """SparseVLM v1's adaptive count for one sample, P [T, N] (raters x alive visual).

    Official (score.py, attn_postprocess_rank): rank = torch.linalg.matrix_rank(P.float())
    with torch's default tolerance (sigma_max * max(T, N) * eps(float32)) on the
    head-averaged post-softmax attention; if rank == N nothing is pruned, else
    keep min(int(rank * scale + bias), N - 1). int() truncates = floor here.
    We also keep at least 1 (official could keep 0 for e.g. scale 0.8, rank 1).
    """
    N = P.shape[-1]
    rank = int(torch.linalg.matrix_rank(P.float()))
    if rank == N:
        return N
    return max(1, min(math.floor(rank * scale + bias), N - 1))


class AdaptivePolicy(KeepPolicy):
    """SparseVLM v1: at each of `layers`, keep min(floor(scale * rank(P) + bias), N - 1)
    visual tokens, P = the raters x alive-visual attention matrix of that layer (so the
    count adapts to how much distinct information the question reads from the image).

    Presets per budget: `scale_bias_by_budget` {budget: [scale, bias]} with `budget`,
    instead of `scale`/`bias`. P comes from the scorer (view.outputs["rater_attention"],
    which v15 and v2 provide), so the attention is not computed twice.
    reference_layers: as in SchedulePolicy (layers written for an R-layer model).
    """

    needs = ("rater_attention",)

    def __init__(self, layers, scale: float | None = None, bias: float | None = None, budget=None,
                 scale_bias_by_budget: dict | None = None, reference_layers: int | None = None,
                 allocation: str = "per_image"):
        self.allocation = check_allocation(allocation)
        layers, scale_bias_by_budget = _plain(layers), _plain(scale_bias_by_budget)
        if scale_bias_by_budget is not None:
            if scale is not None or bias is not None:
                raise bad_value("policy.scale", scale, "null (with policy.bias) when policy.scale_bias_by_budget "
                                "picks them by budget")
            scale, bias = _pick_by_budget("policy.scale_bias_by_budget", budget, scale_bias_by_budget)
        for key, value in (("policy.scale", scale), ("policy.bias", bias)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise bad_value(key, value, "a number >= 0")
        if not isinstance(layers, list):
            raise bad_value("policy.layers", layers, "a list of layer indices")
        _check_reference_layers(reference_layers, layers)
        self._layers, self.scale, self.bias = list(layers), float(scale), float(bias)
        self.reference_layers = reference_layers

    def check(self, n_layers: int) -> None:
        _check_layers(self.layers(n_layers), n_layers)
        _log_layers(self._layers, self.reference_layers, n_layers)

    def layers(self, n_layers: int) -> list[int]:
        return _resolve_layers(self._layers, self.reference_layers, n_layers)

    def n_keep(self, layer, *, n_visual, scores, view) -> int:
        P = view.outputs.get("rater_attention")                                    # [B, T, N]
        if P is None:
            raise ConfigError("policy=adaptive needs a scorer that reads rater attention (scorer=v15 or v2)")
        return rank_keep_count(P[0], self.scale, self.bias)                        # batch 1
