"""python -m sparsevlm_exp.bench: speed of pruned generation against the model's own `generate`.

    python -m sparsevlm_exp.bench                                   # bench_cpu, 1,024 visual tokens
    python -m sparsevlm_exp.bench model=qwen2_5_vl_7b bench.visual_tokens=[576,16320]

Requests are synthetic (conf/bench.yaml): a system prefix, <|vision_start|>, N image
pads, <|vision_end|>, a question, random pixel values of the right shape. Weights are
random by default (`model.random_init=true`): speed does not depend on them. EOS is
disabled on the loaded model so that every method generates exactly
`bench.max_new_tokens` tokens.

Methods (one row each per N, keep and layer; docs/BENCHMARKS.md "Speed" explains the timing):
- hf: the model's own `generate` (greedy, SDPA). Vision = `get_image_features` timed on
  its own; LLM prefill = time to first token (a `max_new_tokens=1` generate) minus vision;
  decode per token = (full generate - time to first token) / (max_new_tokens - 1).
- ours: our prefill with scorer + fixed policy + drop pruner, then GreedyDecoder.
- kv_only: the same scoring, but the prefill runs unpruned and only the decode cache is cut.
- sparsevlm_pkg: the PyPI `sparsevlm` package's `sparsevlm_generate` (eager attention), only
  where `import sparsevlm` works; it is never a dependency of this project.
"""
from __future__ import annotations

import functools
import gc
import json
import logging
import statistics
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError, bad_value
from .kernels import HAS_TRITON, TRITON_VERSION
from .metrics.efficiency import StageTimer, peak_memory_bytes, reset_peak_memory
from .report import markdown_table
from .rundir import register_resolvers, write_json
from .tracking import environment as tracking_environment
from .paths import CONF_DIR

log = logging.getLogger("sparsevlm_exp.bench")
register_resolvers()       # ${run_suffix:} in the default run dir names (conf/bench.yaml)

METHODS = ("hf", "ours", "kv_only", "sparsevlm_pkg")
ROW_KEYS = ("method", "keep", "layer", "visual_tokens", "frames", "vision_ms", "prefill_ms", "decode_ms_per_token",
            "total_ms", "peak_mem_bytes", "kept_tokens", "speedup", "prefill_speedup", "prefill_bound",
            "prefill_speedup_vs_keep1", "score_ms", "score_frac", "new_tokens", "spread", "flag", "error")
# Ordinary word-piece ids for the synthetic prefix and question: far below Qwen's
# special tokens (151643..), inside every model's vocabulary.
WORD_IDS = (1000, 30000)
# Families whose processor writes "<t seconds>" text before each temporal token of a clip,
# each in its own <vision_start> ... <vision_end> run (Qwen3-VL and Qwen3.5).
TIMESTAMPED_VIDEO = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
TIMESTAMP_TOKENS = 5        # "<1.5 seconds>" is about 5 BPE tokens


# --------------------------------------------------------------------------------------
# Checks (before any weights)
# --------------------------------------------------------------------------------------
def check_bench(b: DictConfig) -> None:
    methods = list(b.methods)
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise bad_value("bench.methods", methods, f"a non-empty list of {', '.join(METHODS)}")
    for n in b.visual_tokens:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise bad_value("bench.visual_tokens", list(b.visual_tokens), "a list of ints >= 1")
    for keep in b.keep:
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
            raise bad_value("bench.keep", list(b.keep), "a list of fractions in (0, 1]")
    # one row per (method, keep, layer): a repeated value would be measured once, not twice
    for key, values in (("keep", [float(k) for k in b.keep]), ("visual_tokens", list(b.visual_tokens))):
        if len(set(values)) != len(values):
            raise bad_value(f"bench.{key}", list(b[key]), "distinct values (each is one row; 1 and 1.0 are the same)")
    for key in ("noise_threshold", "control_tolerance"):
        value = b[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise bad_value(f"bench.{key}", value, "a number > 0 (a share: 0.2 = 20%)")
    for key, low in (("max_new_tokens", 2), ("repeats", 1), ("warmup", 0), ("prefix_tokens", 0),
                     ("question_tokens", 1)):
        value = b[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            why = " (decode time per token needs at least 2)" if key == "max_new_tokens" else ""
            raise bad_value(f"bench.{key}", value, f"an int >= {low}{why}")
    frames = b.get("video_frames")
    if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 2 or frames % 2):
        raise bad_value("bench.video_frames", frames, "null (an image) or an even int >= 2 (frames of one clip)")
    if frames is not None:
        for n in b.visual_tokens:
            if n % (frames // 2):
                raise bad_value("bench.visual_tokens", list(b.visual_tokens),
                                f"multiples of {frames // 2} (the temporal tokens of {frames} frames)")


def check_layers(layers, n_layers: int) -> None:
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not -1 <= layer < n_layers:
            raise bad_value("bench.layer", list(layers),
                            f"null or a list of ints in [-1, {n_layers - 1}] (-1: before the LLM; the model has "
                            f"{n_layers} layers)")
    if len(set(layers)) != len(layers):
        raise bad_value("bench.layer", list(layers), "distinct layers (each is one row)")


def runnable_methods(methods: list[str], config) -> list[str]:
    """bench.methods without kv_only on a model with linear-attention layers (Qwen3.5,
    `models.loading.attention_layers(config)` not None): kv_only rewrites every layer's
    KV cache after the prefill and a Gated DeltaNet layer's recurrent state cannot drop
    tokens. It is in the default list, so it is skipped with a warning (as sparsevlm_pkg
    is when the package is missing), before any weights load."""
    from .models.loading import attention_layers

    if "kv_only" in methods and attention_layers(config) is not None:
        log.warning("kv_only skipped: this model has linear-attention layers, whose recurrent state cannot "
                    "drop tokens after the prefill")
        return [m for m in methods if m != "kv_only"]
    return methods


def scorer_layers(name: str) -> list[int]:
    """[the stage a scorer's yaml sets] (`layer:` beside `scorer:` in a `@package _global_`
    scorer yaml, e.g. -1 for the pre-LLM methods), else config.yaml's `layer`: what
    `python -m sparsevlm_exp scorer=NAME` would use. An unknown name is left to
    load_components, which lists the options."""
    path = CONF_DIR / "scorer" / f"{name}.yaml"
    own = OmegaConf.load(path) if path.exists() else OmegaConf.create()
    if "layer" in own:
        return [int(own.layer)]
    return [int(OmegaConf.load(CONF_DIR / "config.yaml").layer)]


# --------------------------------------------------------------------------------------
# Synthetic requests
# --------------------------------------------------------------------------------------
def merged_grid(n_visual: int) -> tuple[int, int]:
    """(rows, cols) of the merged token grid with rows * cols = n_visual, as square as possible."""
    rows = max(r for r in range(1, int(n_visual ** 0.5) + 1) if n_visual % r == 0)
    return rows, n_visual // rows


def synthetic_inputs(config, n_visual: int, prefix_tokens: int, question_tokens: int, seed: int) -> dict:
    """What a Qwen2(.5)-VL processor would return for one image of n_visual tokens.

    input_ids [1, L] (CPU), pixel_values [t*h*w, C*tp*p*p], image_grid_thw [1, 3] with
    t = 1 and h, w in patches (each 2 x 2 patch group becomes one visual token, so
    t*h*w/4 = n_visual), mm_token_type_ids [1, L] (1 on image pads).
    """
    gen = torch.Generator().manual_seed(seed)
    vision = config.vision_config
    merge = vision.spatial_merge_size
    rows, cols = merged_grid(n_visual)
    grid = torch.tensor([[1, rows * merge, cols * merge]])
    words = lambda n: torch.randint(*WORD_IDS, (n,), generator=gen)            # noqa: E731
    input_ids = torch.cat([
        words(prefix_tokens),
        torch.tensor([config.vision_start_token_id]),
        torch.full((n_visual,), config.image_token_id),
        torch.tensor([config.vision_end_token_id]),
        words(question_tokens),
    ]).unsqueeze(0)
    n_patches = int(grid.prod())
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(n_patches, patch_dim, generator=gen),
        "image_grid_thw": grid,
        "mm_token_type_ids": (input_ids == config.image_token_id).long(),
    }


def synthetic_video_inputs(config, n_visual: int, frames: int, prefix_tokens: int, question_tokens: int,
                           seed: int) -> dict:
    """What the adapters' video_inputs would return for one clip of `frames` frames and
    n_visual tokens: t = frames / temporal_patch_size temporal tokens of n_visual / t
    tokens each. pixel_values_videos [t*h*w, C*tp*p*p], video_grid_thw [1, 3],
    mm_token_type_ids 2 on video pads, second_per_grid_ts [1] (2 fps) where the family
    takes one. Qwen3-VL / Qwen3.5: TIMESTAMP_TOKENS words, then a marked run, per
    temporal token; others: one marked run."""
    gen = torch.Generator().manual_seed(seed)
    vision = config.vision_config
    merge, temporal = vision.spatial_merge_size, vision.temporal_patch_size
    t = frames // temporal
    rows, cols = merged_grid(n_visual // t)
    grid = torch.tensor([[t, rows * merge, cols * merge]])
    words = lambda n: torch.randint(*WORD_IDS, (n,), generator=gen)            # noqa: E731
    start, end = torch.tensor([config.vision_start_token_id]), torch.tensor([config.vision_end_token_id])
    if config.model_type in TIMESTAMPED_VIDEO:
        runs = [torch.cat([words(TIMESTAMP_TOKENS), start, torch.full((rows * cols,), config.video_token_id), end])
                for _ in range(t)]
    else:
        runs = [start, torch.full((n_visual,), config.video_token_id), end]
    input_ids = torch.cat([words(prefix_tokens), *runs, words(question_tokens)]).unsqueeze(0)
    n_patches = int(grid.prod())
    patch_dim = vision.in_channels * temporal * vision.patch_size ** 2
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values_videos": torch.randn(n_patches, patch_dim, generator=gen),
        "video_grid_thw": grid,
        "mm_token_type_ids": 2 * (input_ids == config.video_token_id).long(),
    }
    if config.model_type in ("qwen2_5_vl",):
        inputs["second_per_grid_ts"] = torch.tensor([temporal / 2.0])
    return inputs


def on_device(inputs: dict, device, keep_ids_on_cpu: bool = False) -> dict:
    # request_from_inputs builds its indices on the CPU from input_ids; everything the
    # model reads goes to the device once, so no run pays for the transfer.
    return {k: (v if keep_ids_on_cpu and k == "input_ids" else v.to(device)) for k, v in inputs.items()}


def disable_eos(model) -> None:
    """No EOS, so every method generates exactly max_new_tokens (random weights would
    otherwise stop at a random step). Changes only the loaded model in memory."""
    model.generation_config.eos_token_id = None
    model.config.text_config.eos_token_id = None
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = 0


def prefill_bound(n_layers: int, layer: int, keep: float) -> float:
    """Best possible LLM prefill speedup of pruning after `layer`, if every token were
    visual and cost were linear in length: L / ((K+1) + (L-K-1) * keep)."""
    return n_layers / ((layer + 1) + (n_layers - layer - 1) * keep)


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------
def measure_side_by_side(runs: dict, warmup: int, repeats: int, label: str = "") -> dict:
    """{key: (numbers, None) or (None, error)} for the rows runs {key: run_once}: every
    row's `warmup` untimed runs first, then `repeats` rounds that run every row once, in
    order. Each row's numbers are medians over its repeats (`_summary`); `spread` =
    (max - min) / median of its total times (None for one repeat), the sign of a busy machine.

    Why rounds: a ratio of two rows (keep 0.25 against keep 1.0, ours against hf) is then
    measured side by side. Measured row after row, a slow spell of a shared machine (tens
    of seconds, docs/BENCHMARKS.md run 10) could fall on one row's repeats only and move
    the ratio by 20-30%; in rounds it slows one repeat of every row. A row that raises
    (an out-of-memory, a package that breaks) records the error and leaves the rounds;
    the others go on."""
    results, errors = {key: [] for key in runs}, {}

    def attempt(key) -> dict | None:
        try:
            return runs[key]()
        except Exception as err:             # noqa: BLE001 - recorded, not hidden
            log.error("%s %s failed: %s: %s", label, key, type(err).__name__, err)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            errors[key] = f"{type(err).__name__}: {err}"
            return None

    for key in runs:
        for _ in range(warmup):
            if key not in errors:
                attempt(key)
    for _ in range(repeats):
        for key in runs:
            if key not in errors:
                numbers = attempt(key)
                if numbers is not None:
                    results[key].append(numbers)
    return {key: (None, errors[key]) if key in errors else (_summary(results[key]), None) for key in runs}


def _summary(runs: list[dict]) -> dict:
    """Medians of the numbers of timed runs (maxima for memory and counts), the first
    value of anything else, and the spread of their total times."""
    out = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        if all(isinstance(v, (int, float)) for v in values):
            out[key] = statistics.median(values)
            if key in ("peak_mem_bytes", "kept_tokens", "new_tokens"):
                out[key] = int(max(values))
        else:
            out[key] = values[0]
    totals = [r["total_ms"] for r in runs]
    out["spread"] = (max(totals) - min(totals)) / statistics.median(totals) if len(totals) > 1 else None
    return out


def _checked_new_tokens(n: int, expected: int) -> int:
    if n != expected:
        raise RuntimeError(f"generated {n} tokens instead of {expected}")
    return n


# --------------------------------------------------------------------------------------
# One run of each method -> numbers
# --------------------------------------------------------------------------------------
def run_hf(model, inputs: dict, max_new_tokens: int, device) -> dict:
    timer = StageTimer(device)
    prompt_len = inputs["input_ids"].shape[1]
    with torch.no_grad():
        with timer("vision"):
            if "pixel_values_videos" in inputs:
                model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
            else:
                model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        with timer("first_token"):
            model.generate(**inputs, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        reset_peak_memory(device)
        with timer("total"):
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 do_sample=False)
    ms = timer.ms
    return {
        "vision_ms": ms["vision"],
        "prefill_ms": ms["first_token"] - ms["vision"],
        "decode_ms_per_token": (ms["total"] - ms["first_token"]) / (max_new_tokens - 1),
        "total_ms": ms["total"],
        "peak_mem_bytes": peak_memory_bytes(device),
        "kept_tokens": int(((inputs["input_ids"] == model.config.image_token_id)
                            | (inputs["input_ids"] == model.config.video_token_id)).sum()),
        "new_tokens": _checked_new_tokens(out.shape[1] - prompt_len, max_new_tokens),
    }


def run_ours(adapter, req, parts: dict, generator_seed: int) -> dict:
    device = adapter.device
    timer = StageTimer(device)
    reset_peak_memory(device)
    with timer("total"):
        state = adapter.prefill(req, scorer=parts["scorer"], policy=parts["policy"], pruner=parts["pruner"],
                                generator=torch.Generator().manual_seed(generator_seed))
        tokens = parts["decoder"].generate(adapter, state)
    n_new = tokens.shape[1]
    # engine.py's "score" stage (query rows, scores, selection, the cut, kv_only's cache cut)
    # is a part of its "prefill" stage.
    score_ms = state.timings.get("score", 0.0)
    return {
        "vision_ms": state.timings["vision"],
        "prefill_ms": state.timings["prefill"],
        "decode_ms_per_token": state.timings["decode"] / max(1, n_new - 1),
        "total_ms": timer.ms["total"],
        "peak_mem_bytes": peak_memory_bytes(device),
        "kept_tokens": int(state.events[0].kept_index.shape[1]) if state.events else state.n_visual,
        "score_ms": score_ms,
        "score_frac": score_ms / state.timings["prefill"],
        "new_tokens": _checked_new_tokens(n_new, parts["decoder"].max_new_tokens),
    }


def run_sparsevlm_pkg(sparsevlm_generate, model, inputs: dict, n_visual: int, keep_n: int, layer: int,
                      max_new_tokens: int, device) -> dict:
    """The package prefills with output_attentions=True, cuts the cache, then calls
    generate() on the prompt's last token: its first token already costs one decode
    forward, which is taken out of its prefill time."""
    timer = StageTimer(device)
    call = dict(n_vis=n_visual, keep_n_vis=keep_n, target_layer=layer, device=str(device))
    with torch.no_grad():
        with timer("vision"):
            model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        with timer("first_token"):
            sparsevlm_generate(model, None, dict(inputs), max_new_tokens=1, **call)
        reset_peak_memory(device)
        with timer("total"):
            out = sparsevlm_generate(model, None, dict(inputs), max_new_tokens=max_new_tokens, **call)
    ms = timer.ms
    decode = (ms["total"] - ms["first_token"]) / (max_new_tokens - 1)
    return {
        "vision_ms": ms["vision"],
        "prefill_ms": ms["first_token"] - ms["vision"] - decode,
        "decode_ms_per_token": decode,
        "total_ms": ms["total"],
        "peak_mem_bytes": peak_memory_bytes(device),
        "kept_tokens": keep_n,
        # it returns the re-fed last prompt token followed by the new ones
        "new_tokens": _checked_new_tokens(out.shape[1] - 1, max_new_tokens),
    }


# --------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------
def _row(method: str, keep, layer, n_visual: int, numbers: dict | None = None, error: str | None = None) -> dict:
    row = dict.fromkeys(ROW_KEYS)
    row.update(method=method, keep=keep, layer=layer, visual_tokens=n_visual, error=error)
    row.update(numbers or {})
    return row


def _import_sparsevlm():
    try:
        from sparsevlm import sparsevlm_generate
    except Exception as err:             # noqa: BLE001 - any import failure means "not available"
        log.warning("sparsevlm_pkg skipped: `from sparsevlm import sparsevlm_generate` failed (%s: %s)",
                    type(err).__name__, err)
        return None
    return sparsevlm_generate


def run_bench(cfg: DictConfig) -> list[dict]:
    from hydra.utils import instantiate

    from .api import load_components
    from .engine import check_parts
    from .models.loading import attention_layers, model_config, num_layers

    b = cfg.bench
    check_bench(b)
    m = cfg.model
    config = model_config(m.pretrained, random_init=m.random_init, architecture=m.architecture,
                          trust_remote_code=m.trust_remote_code)
    n_layers = num_layers(config)
    layers = list(b.layer) if b.layer is not None else scorer_layers(b.scorer)
    check_layers(layers, n_layers)
    methods = runnable_methods(list(b.methods), config)
    keeps = [float(k) for k in b.keep]
    M = int(b.max_new_tokens)
    # Cheap constructors validate the scorer name and keep values before any weights.
    parts = {(method, keep, layer): load_components(scorer=b.scorer, keep=keep, layer=layer, policy="fixed",
                                                    pruner="drop" if method == "ours" else "kv_only",
                                                    max_new_tokens=M, seed=int(cfg.seed))
             for method in ("ours", "kv_only") if method in methods for keep in keeps for layer in layers}
    # the runner's checks (a stage the scorer cannot score at, an attention scorer at a
    # linear-attention layer), one line before any weights rather than an error row each
    for p in parts.values():
        check_parts(p["scorer"], p["policy"], n_layers, attention_layers(config), p["pruner"])
    frames = b.get("video_frames")
    if frames is not None and "sparsevlm_pkg" in methods:
        log.warning("sparsevlm_pkg skipped: the package takes image requests only (bench.video_frames=%d)", frames)
    sparsevlm_generate = _import_sparsevlm() if "sparsevlm_pkg" in methods and frames is None else None

    adapter = instantiate(m, _convert_="all")
    disable_eos(adapter.model)
    device = adapter.device
    if frames is None:
        inputs = {n: synthetic_inputs(config, n, b.prefix_tokens, b.question_tokens, int(cfg.seed))
                  for n in b.visual_tokens}
    else:
        inputs = {n: synthetic_video_inputs(config, n, frames, b.prefix_tokens, b.question_tokens, int(cfg.seed))
                  for n in b.visual_tokens}
    rows = []
    for n in b.visual_tokens:
        model_inputs = on_device(inputs[n], device)
        req = adapter.request_from_inputs(on_device(inputs[n], device, keep_ids_on_cpu=True))
        runs = {}                                                                 # (method, keep, layer) -> run_once
        if "hf" in methods:
            runs[("hf", 1.0, None)] = functools.partial(run_hf, adapter.model, model_inputs, M, device)
        for method in ("ours", "kv_only"):
            for keep in keeps if method in methods else []:
                for layer in layers:
                    key = (method, keep, layer)
                    runs[key] = functools.partial(run_ours, adapter, req, parts[key], int(cfg.seed))
        # in rounds, so that every ratio of two rows is measured side by side
        measured = measure_side_by_side(runs, b.warmup, b.repeats, f"N={n}")
        for (method, keep, layer), (numbers, error) in measured.items():
            rows.append(_row(method, keep, layer, n, numbers, error))
        log.info("N=%d done", n)

    if sparsevlm_generate is not None:
        # The package reads attention maps, so it needs eager attention: a second model
        # with the same seed (the same random weights), loaded after the first is freed.
        runs = None                  # the last N's run_once partials hold the first model (adapter, adapter.model)
        del adapter
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        eager = instantiate(m, attn_implementation="eager", _convert_="all")
        disable_eos(eager.model)
        for n in b.visual_tokens:
            model_inputs = on_device(inputs[n], device)
            runs = {("sparsevlm_pkg", keep, layer): functools.partial(
                        run_sparsevlm_pkg, sparsevlm_generate, eager.model, model_inputs, n, max(1, round(keep * n)),
                        layer, M, device)
                    for keep in keeps for layer in layers}
            measured = measure_side_by_side(runs, b.warmup, b.repeats, f"N={n}")
            for (method, keep, layer), (numbers, error) in measured.items():
                rows.append(_row(method, keep, layer, n, numbers, error))
    for row in rows:
        row["frames"] = frames
    add_ratios(rows, n_layers, float(b.noise_threshold), float(b.control_tolerance))
    return rows


def add_ratios(rows: list[dict], n_layers: int, noise_threshold: float = 0.2,
               control_tolerance: float = 0.5) -> None:
    """speedup = hf total / total, prefill_speedup = hf prefill / prefill (same N), the
    prefill bound, and for `ours` the prefill speedup over `ours` at keep 1.0 (same N, layer).

    Flags (row["flag"]) so that a ratio is never read without its reliability:
    - "noisy": the row's repeats spread by more than noise_threshold (see measure_side_by_side);
    - "control": `ours` at keep 1.0 prunes nothing, so it does the same work as `hf`;
      their prefill ratio must be within 1 +- control_tolerance (as a factor), or every
      speedup of that N is suspect and its rows say so."""
    def find(method, n, keep=None, layer=None):
        for r in rows:
            if (r["method"] == method and r["visual_tokens"] == n and r["error"] is None
                    and (keep is None or r["keep"] == keep) and (layer is None or r["layer"] == layer)):
                return r
        return None

    for r in rows:
        if r["error"] is not None:
            continue
        hf = find("hf", r["visual_tokens"])
        if hf is not None:
            r["speedup"] = hf["total_ms"] / r["total_ms"]
            r["prefill_speedup"] = hf["prefill_ms"] / r["prefill_ms"]
        # Only `ours` shortens the prefill; the others prefill every token.
        r["prefill_bound"] = prefill_bound(n_layers, r["layer"], r["keep"]) if r["method"] == "ours" else 1.0
        if r["method"] == "ours":
            full = find("ours", r["visual_tokens"], keep=1.0, layer=r["layer"])
            if full is not None:
                r["prefill_speedup_vs_keep1"] = full["prefill_ms"] / r["prefill_ms"]
        flags = []
        if r.get("spread") is not None and r["spread"] > noise_threshold:
            flags.append(f"noisy (repeats spread {100 * r['spread']:.0f}%)")
        control = find("ours", r["visual_tokens"], keep=1.0)
        if hf is not None and control is not None:
            ratio = hf["prefill_ms"] / control["prefill_ms"]
            if not 1 / (1 + control_tolerance) <= ratio <= 1 + control_tolerance:
                flags.append(f"control off: hf / ours keep 1.0 prefill = {ratio:.2f}x for equal work")
        r["flag"] = "; ".join(flags) or None
    for r in rows:
        if r.get("flag"):
            log.warning("%s keep=%s layer=%s N=%s: %s", r["method"], r["keep"], r["layer"], r["visual_tokens"],
                        r["flag"])


def bench_table(rows: list[dict]) -> str:
    def fmt(value, digits=1):
        if value is None:
            return "-"
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    header = ["method", "N", "frames", "keep", "layer", "kept", "vision ms", "LLM prefill ms", "decode ms/token", "total ms",
              "peak MiB", "speedup vs hf", "prefill x vs hf", "prefill bound", "prefill x vs keep 1.0",
              "scoring % of prefill", "repeat spread %", "flag", "error"]
    body = []
    for r in rows:
        mib = None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2 ** 20
        body.append([
            r["method"], str(r["visual_tokens"]), fmt(r.get("frames")), fmt(r["keep"], 2), fmt(r["layer"]), fmt(r["kept_tokens"]),
            fmt(r["vision_ms"]), fmt(r["prefill_ms"]), fmt(r["decode_ms_per_token"]), fmt(r["total_ms"]),
            fmt(mib, 0), fmt(r["speedup"], 2), fmt(r["prefill_speedup"], 2), fmt(r["prefill_bound"], 2),
            fmt(r["prefill_speedup_vs_keep1"], 2),
            "-" if r["score_frac"] is None else f"{100 * r['score_frac']:.1f}",
            "-" if r.get("spread") is None else f"{100 * r['spread']:.0f}",
            r.get("flag") or "", r["error"] or "",
        ])
    return markdown_table(header, body)


def environment(cfg: DictConfig) -> dict:
    return {
        **tracking_environment(),
        "command": " ".join(["python -m sparsevlm_exp.bench", *sys.argv[1:]]),
        "triton": TRITON_VERSION,
        # what text_visual_attention dispatched to for the scorers (backend="auto")
        "scoring_backend": "triton" if (HAS_TRITON and str(cfg.device).startswith(("cuda", "auto"))
                                        and torch.cuda.is_available()) else "torch",
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


@hydra.main(config_path=str(CONF_DIR), config_name="bench", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        rows = run_bench(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    write_json(run_dir / "bench.json", rows)
    write_json(run_dir / "bench_env.json", environment(cfg))
    print(bench_table(rows))
    log.info("rows in %s", run_dir / "bench.json")


if __name__ == "__main__":
    main()
