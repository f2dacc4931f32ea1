"""The library face: the same components as the CLI, loaded from the same yaml files.

    from sparsevlm_exp import sparse_generate
    out = sparse_generate(model, inputs, scorer="v2", keep=0.25, layer=2)
    out.sequences      # [B, new_tokens] generated tokens only
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import OmegaConf

from .errors import ConfigError, build
from .models import adapter_for
from .paths import CONF_DIR



@dataclass
class SparseGenerateOutput:
    sequences: torch.LongTensor              # [B, new_tokens] generated tokens only
    n_visual: int                            # visual tokens before pruning
    kept_indices: list[torch.LongTensor]     # per pruning layer: [B, n_kept] indices into the original sequence, sorted
    layer_counts: list[int]                  # visual tokens alive after each decoder layer
    prune_layers: list[int]
    timings: dict[str, float]


def load_components(*, scorer: str, keep, layer: int, policy: str, pruner: str, max_new_tokens: int,
                    seed: int = 0, **overrides):
    """Instantiate scorer, policy, pruner and decoder from conf/<group>/<name>.yaml.

    overrides: dotted keys as on the command line, e.g. {"scorer.head_fraction": 0.25}
    (use `scorer__head_fraction=0.25` as a Python keyword: `__` stands for `.`).
    """
    root = OmegaConf.create({"keep": keep, "layer": layer, "seed": seed})
    for group, name in (("scorer", scorer), ("policy", policy), ("pruner", pruner), ("decoder", "greedy")):
        path = CONF_DIR / group / f"{name}.yaml"
        if not path.exists():
            options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
            raise ConfigError(f"{group}={name!r} is not allowed: one of {', '.join(options)}")
        root[group] = OmegaConf.load(path)
    root.decoder.max_new_tokens = max_new_tokens
    for key, value in overrides.items():
        OmegaConf.update(root, key.replace("__", "."), value, force_add=True)
    return {group: build(root[group], group) for group in ("scorer", "policy", "pruner", "decoder")}


def sparse_generate(model, inputs, *, scorer: str = "v15", keep=1.0, layer: int = 2, policy: str = "fixed",
                    pruner: str = "drop", max_new_tokens: int = 32, seed: int = 0, processor=None,
                    **overrides) -> SparseGenerateOutput:
    """Greedy generation with visual tokens pruned inside the prefill.

    model: a transformers Qwen2-VL / Qwen2.5-VL `...ForConditionalGeneration`;
    inputs: what its processor returned (input_ids, pixel_values, image_grid_thw, ...), batch 1.
    """
    parts = load_components(scorer=scorer, keep=keep, layer=layer, policy=policy, pruner=pruner,
                            max_new_tokens=max_new_tokens, seed=seed, **overrides)
    adapter = adapter_for(model, processor)
    parts["policy"].check(adapter.n_layers)
    req = adapter.request_from_inputs(dict(inputs))
    state = adapter.prefill(req, scorer=parts["scorer"], policy=parts["policy"], pruner=parts["pruner"],
                            generator=torch.Generator().manual_seed(seed))
    sequences = parts["decoder"].generate(adapter, state)
    return SparseGenerateOutput(
        sequences=sequences,
        n_visual=state.n_visual,
        kept_indices=[e.kept_index.cpu() for e in state.events],
        layer_counts=state.layer_counts,
        prune_layers=[e.layer for e in state.events],
        timings=state.timings,
    )
