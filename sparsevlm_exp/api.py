"""The library face: the same components as the CLI, loaded from the same yaml files.

    from sparsevlm_exp import sparse_generate
    out = sparse_generate(model, inputs, scorer="v2", keep=0.25, layer=2)
    out.sequences      # [B, new_tokens] generated tokens only
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch

from .engine import check_parts
from .errors import ConfigError, bad_value, build
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
    # A batch (B > 1): each request's own output as if it ran alone (sequences [1, n] cut
    # after its EOS, kept_indices into ITS row of the padded input, its layer_counts; its
    # timings are its share of the batch's, batch ms / B); the batch-level kept_indices /
    # layer_counts / n_visual above are then row 0's, the batch-level timings the batch's.
    rows: list["SparseGenerateOutput"] | None = None


# sparse_generate's own keywords: a misspelled one (kepp=0.25) must not be silently
# taken for an override.
OWN_KEYWORDS = ("scorer", "keep", "layer", "policy", "pruner", "max_new_tokens", "seed", "processor")


def _override_value(value) -> str:
    """A Python value written in Hydra's override grammar."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_override_value(v)}" for k, v in value.items()) + "}"
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _unknown_keyword(name: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]}?" if close else "one of " + ", ".join(known)
    return ConfigError(f"sparse_generate got an unknown keyword {name!r}: {hint} "
                       f"(config keys as group__key=value, e.g. scorer__head_fraction=0.25)")


def compose_config(overrides: list[str]):
    """conf/config.yaml composed with Hydra's Compose API and `overrides` (command-line
    syntax). Works inside a running Hydra app too (its global state is put back)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException, MissingConfigException

    outer = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            return compose(config_name="config", overrides=overrides)
    except MissingConfigException as err:
        # an unknown option of a group: name the group and its options
        group = next((o.split("=")[0] for o in overrides if o.split("=")[0] in str(err)), None)
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")) if group else []
        choice = next((o.split("=", 1)[1] for o in overrides if o.startswith(f"{group}=")), None)
        if group:
            raise bad_value(group, choice, "one of " + ", ".join(options)) from None
        raise ConfigError(str(err).splitlines()[0]) from None
    except ConfigCompositionException as err:
        raise ConfigError(str(err).splitlines()[0]) from None
    finally:
        GlobalHydra.instance().clear()
        if outer is not None:
            GlobalHydra.instance().initialize(outer)


def load_components(*, scorer: str, keep, layer: int | None, policy: str, pruner: str, max_new_tokens: int,
                    seed: int = 0, **overrides):
    """Instantiate scorer, policy, pruner and decoder from the composed conf/ tree.

    overrides: dotted keys as on the command line, e.g. {"scorer.head_fraction": 0.25}
    (use `scorer__head_fraction=0.25` as a Python keyword: `__` stands for `.`).
    Raises ConfigError (one line) for an unknown option, key or bad value.
    """
    groups = ("scorer", "policy", "pruner", "decoder")
    for name in overrides:
        if "__" not in name and "." not in name:
            raise _unknown_keyword(name, list(OWN_KEYWORDS))
    dotted = {name.replace("__", "."): value for name, value in overrides.items()}
    args = [f"scorer={scorer}", f"policy={policy}", f"pruner={pruner}", f"keep={_override_value(keep)}",
            f"seed={_override_value(seed)}", f"decoder.max_new_tokens={_override_value(max_new_tokens)}"]
    if layer is not None:     # None: the composed tree's own layer (a pre-LLM scorer's yaml sets -1)
        args.append(f"layer={_override_value(layer)}")
    probe = compose_config(args)              # the groups' keys, for naming a misspelled one
    for key in dotted:
        group, _, leaf = key.partition(".")
        node = probe.get(group) if group in groups else None
        if node is None or leaf not in node:
            known = [f"{g}__{k}" for g in groups for k in probe[g] if not str(k).startswith("_")]
            raise _unknown_keyword(key.replace(".", "__"), known + list(OWN_KEYWORDS))
    cfg = compose_config(args + [f"{k}={_override_value(v)}" for k, v in dotted.items()])
    return {group: build(cfg[group], group) for group in groups}


def sparse_generate(model, inputs, *, scorer: str = "v15", keep=1.0, layer: int | None = None, policy: str = "fixed",
                    pruner: str = "drop", max_new_tokens: int = 32, seed: int = 0, processor=None,
                    **overrides) -> SparseGenerateOutput:
    """Greedy generation with visual tokens pruned inside the prefill.

    model: a transformers Qwen2-VL / Qwen2.5-VL `...ForConditionalGeneration`;
    inputs: what its processor returned (input_ids, pixel_values, image_grid_thw, ...); an
    attention_mask with LEFT pads (0) is honoured (positions, attention, raters, scores), so a
    row of a processor-padded batch gives what HF generate gives on it. Right padding: ValueError.
    For a video clip, also pixel_values_videos / video_grid_thw (e.g. from
    `adapter_for(model, processor).video_inputs(sample)`, which needs no torchvision).
    A batch (B > 1, left padded): the requests are pruned each on its own (own kept counts) and
    run through the layers together; `out.rows[b]` is request b's output, equal to running it
    alone; `out.sequences` [B, n] fills finished rows with EOS.
    Rows may hold clips (pixel_values_videos / video_grid_thw / second_per_grid_ts batched
    end to end, as the processor gives them), images, or both: adapter.split_inputs hands
    each row its own.
    layer: the pruning layer; None = the config's own (2 from conf/config.yaml, or the stage a
    scorer's yaml sets, e.g. -1 for scorer="divprune"), exactly as the CLI without `layer=`.
    """
    parts = load_components(scorer=scorer, keep=keep, layer=layer, policy=policy, pruner=pruner,
                            max_new_tokens=max_new_tokens, seed=seed, **overrides)
    adapter = adapter_for(model, processor)
    check_parts(parts["scorer"], parts["policy"], adapter.n_layers)
    if inputs["input_ids"].shape[0] > 1:
        return _generate_batch(adapter, inputs, parts, seed)
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


def _generate_batch(adapter, inputs, parts, seed: int) -> SparseGenerateOutput:
    """A left-padded batch: split into its requests, prefilled and decoded together
    (batching.answer_batch); each row's output is what it gets alone (SparseGenerateOutput.rows,
    whose timings are the row's share of the batch's)."""
    from .batching import answer_batch
    from .models.base import request_attention_mask

    mask = request_attention_mask(dict(inputs), inputs["input_ids"])          # left padding only
    rows_in = adapter.split_inputs(dict(inputs))
    reqs = [adapter.request_from_inputs(row) for row in rows_in]
    answer = answer_batch(adapter, reqs, scorer=parts["scorer"], policy=parts["policy"], pruner=parts["pruner"],
                          decoder=parts["decoder"], generators=[torch.Generator().manual_seed(seed) for _ in reqs])
    rows = []
    for b, row in enumerate(answer.rows):
        pads = int((mask[b] == 0).sum()) if mask is not None else 0
        rows.append(SparseGenerateOutput(
            sequences=row.tokens[None].cpu(), n_visual=row.n_visual,
            kept_indices=[(e.kept_index + pads).cpu() for e in row.events], layer_counts=row.layer_counts,
            prune_layers=[e.layer for e in row.events], timings=row.timings))
    return SparseGenerateOutput(sequences=answer.sequences, n_visual=rows[0].n_visual,
                                kept_indices=rows[0].kept_indices, layer_counts=rows[0].layer_counts,
                                prune_layers=rows[0].prune_layers, timings=answer.timings, rows=rows)
