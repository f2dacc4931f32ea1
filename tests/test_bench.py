"""The speed benchmark (sparsevlm_exp/bench.py) and the model yamls it runs on.

No timing assertions: CI machines are shared. The tests check that the yamls describe
the checkpoints they name, and that bench.json's rows are complete and consistent.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForImageTextToText

from sparsevlm_exp.bench import ROW_KEYS, merged_grid, prefill_bound, synthetic_inputs

ROOT = Path(__file__).resolve().parent.parent
MODEL_CONF = ROOT / "conf" / "model"

# Published parameter counts of the checkpoints (their hub pages). The names round
# differently: "7B" is the LLM alone (7.07e9) while the checkpoint holds 8.29e9, and
# Qwen2-VL's README calls its sizes "2, 8 and 72 billion"; so the check is against the
# published totals, within 10%.
PUBLISHED_PARAMS = {
    "qwen2_vl_2b": ("Qwen/Qwen2-VL-2B-Instruct", 2.21e9),
    "qwen2_vl_7b": ("Qwen/Qwen2-VL-7B-Instruct", 8.29e9),
    "qwen2_5_vl_3b": ("Qwen/Qwen2.5-VL-3B-Instruct", 3.75e9),
    "qwen2_5_vl_7b": ("Qwen/Qwen2.5-VL-7B-Instruct", 8.29e9),
    "qwen2_5_vl_32b": ("Qwen/Qwen2.5-VL-32B-Instruct", 33.5e9),
    "qwen2_5_vl_72b": ("Qwen/Qwen2.5-VL-72B-Instruct", 73.4e9),
}


def architecture(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(MODEL_CONF / f"{name}.yaml").architecture, resolve=True)


def parameter_count(arch: dict) -> int:
    """Parameters of the model built from `arch` on the meta device (no memory), tied
    weights counted once."""
    config = AutoConfig.for_model(**arch)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    unique = {id(p): p.numel() for p in model.parameters()}
    return sum(unique.values())


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_model_yaml_builds_the_named_checkpoint(name):
    hub_id, published = PUBLISHED_PARAMS[name]
    yaml = OmegaConf.load(MODEL_CONF / f"{name}.yaml")
    assert yaml.pretrained == hub_id
    assert yaml._target_ == "sparsevlm_exp.models.qwen2_vl.Qwen2VLAdapter.load"
    arch = architecture(name)
    config = AutoConfig.for_model(**arch)
    text = config.text_config
    # M-RoPE sections cover every rotary frequency of a head
    assert sum(text.rope_parameters["mrope_section"]) == text.hidden_size // text.num_attention_heads // 2
    assert config.image_token_id == 151655 and config.vision_start_token_id == 151652
    count = parameter_count(arch)
    assert abs(count - published) / published < 0.10, f"{name}: {count / 1e9:.2f}e9 vs {published / 1e9:.2f}e9"


def test_bench_cpu_is_mid_size():
    count = parameter_count(architecture("bench_cpu"))
    assert 0.05e9 < count < 0.3e9
    assert OmegaConf.load(MODEL_CONF / "bench_cpu.yaml").random_init is True


@pytest.mark.parametrize("n_visual", [1, 64, 576, 1000, 16320])
def test_synthetic_request_has_n_visual_tokens(n_visual):
    config = AutoConfig.for_model(**architecture("qwen2_5_vl_7b"))
    inputs = synthetic_inputs(config, n_visual, prefix_tokens=5, question_tokens=7, seed=0)
    t, h, w = inputs["image_grid_thw"][0].tolist()
    assert h % 2 == 0 and w % 2 == 0 and t * h * w // 4 == n_visual
    assert merged_grid(n_visual)[0] * merged_grid(n_visual)[1] == n_visual
    ids = inputs["input_ids"][0]
    assert int((ids == config.image_token_id).sum()) == n_visual
    assert ids.shape[0] == 5 + 1 + n_visual + 1 + 7
    # the system prefix comes first, then <|vision_start|> right before the pads
    assert int(ids[5]) == config.vision_start_token_id and int(ids[6 + n_visual]) == config.vision_end_token_id
    assert inputs["pixel_values"].shape == (t * h * w, 3 * 2 * 14 * 14)
    assert torch.equal(inputs["mm_token_type_ids"][0], (ids == config.image_token_id).long())


def test_prefill_bound():
    assert prefill_bound(28, 2, 1.0) == 1.0
    assert prefill_bound(28, 2, 0.25) == pytest.approx(28 / (3 + 25 * 0.25))


# A tiny Qwen2.5-VL, so the app runs in seconds: the bench_cpu yaml with its sizes overridden.
TINY = [
    "model=bench_cpu",
    "model.architecture.text_config.hidden_size=64",
    "model.architecture.text_config.intermediate_size=128",
    "model.architecture.text_config.num_hidden_layers=4",
    "model.architecture.text_config.num_attention_heads=4",
    "model.architecture.text_config.num_key_value_heads=2",
    "model.architecture.text_config.rope_parameters.mrope_section=[2,3,3]",
    "model.architecture.vision_config.depth=2",
    "model.architecture.vision_config.hidden_size=32",
    "model.architecture.vision_config.intermediate_size=64",
    "model.architecture.vision_config.num_heads=2",
    "model.architecture.vision_config.out_hidden_size=64",
    "device=cpu",
]


def run_bench(tmp_path, *overrides):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "sparsevlm_exp.bench", *TINY, *overrides,
                           f"hydra.run.dir={tmp_path}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_bench_app_writes_consistent_rows(tmp_path):
    n, new_tokens, n_layers = 64, 3, 4
    proc = run_bench(tmp_path, "bench.visual_tokens=[64]", "bench.keep=[0.25,1.0]", "bench.layer=[1]",
                     # one warm-up: a cold first call can make the vision-alone timing exceed
                     # hf's whole time to first token, i.e. a negative prefill (seen once)
                     "bench.repeats=1", "bench.warmup=1", f"bench.max_new_tokens={new_tokens}",
                     "bench.methods=[hf,ours,kv_only]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert [(r["method"], r["keep"]) for r in rows] == [("hf", 1.0), ("ours", 0.25), ("ours", 1.0),
                                                        ("kv_only", 0.25), ("kv_only", 1.0)]
    hf = rows[0]
    for r in rows:
        assert set(r) == set(ROW_KEYS)
        assert r["error"] is None
        assert r["visual_tokens"] == n
        assert r["new_tokens"] == new_tokens
        for key in ("vision_ms", "prefill_ms", "total_ms"):
            assert r[key] > 0
        assert r["speedup"] == pytest.approx(hf["total_ms"] / r["total_ms"])
        assert r["prefill_speedup"] == pytest.approx(hf["prefill_ms"] / r["prefill_ms"])
        if r["method"] == "hf":
            assert r["kept_tokens"] == n and r["layer"] is None and r["prefill_bound"] == 1.0
        else:
            assert r["layer"] == 1
            assert r["kept_tokens"] == round(r["keep"] * n)
            assert r["score_ms"] > 0 and r["score_frac"] > 0
    ours = {r["keep"]: r for r in rows if r["method"] == "ours"}
    assert ours[0.25]["prefill_bound"] == pytest.approx(prefill_bound(n_layers, 1, 0.25))
    assert ours[0.25]["prefill_speedup_vs_keep1"] == pytest.approx(ours[1.0]["prefill_ms"] / ours[0.25]["prefill_ms"])
    # kv_only prefills every token: no prefill saving is claimed for it
    assert all(r["prefill_bound"] == 1.0 for r in rows if r["method"] == "kv_only")
    env = json.loads((tmp_path / "bench_env.json").read_text())
    assert env["torch"] == torch.__version__ and "bench.visual_tokens=[64]" in env["command"]
    assert env["scoring_backend"] == "torch"   # the scorers' text_visual_attention ran the reference on CPU
    assert "| method |" in proc.stdout


@pytest.mark.parametrize("override, key", [("bench.keep=[1.5]", "bench.keep"),
                                           ("bench.layer=[4]", "bench.layer"),
                                           ("bench.methods=[hf,fastest]", "bench.methods"),
                                           ("bench.keep=[0.5,0.5]", "bench.keep"),       # one row each
                                           ("bench.keep=[1,1.0]", "bench.keep"),
                                           ("bench.visual_tokens=[64,64]", "bench.visual_tokens"),
                                           ("bench.layer=[2,2]", "bench.layer"),
                                           ("bench.max_new_tokens=1", "bench.max_new_tokens")])
def test_bad_bench_values_fail_in_one_line(tmp_path, override, key):
    proc = run_bench(tmp_path, override)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {key}=")
    assert not (tmp_path / "bench.json").exists()


def _timed_row(method, keep, prefill, spread=0.05, layer=2):
    from sparsevlm_exp.bench import _row

    return _row(method, keep, None if method == "hf" else layer, 64,
                {"vision_ms": 1.0, "prefill_ms": prefill, "total_ms": prefill + 10, "spread": spread})


def test_noisy_rows_and_a_failed_equal_work_control_are_flagged():
    from sparsevlm_exp.bench import add_ratios, bench_table

    # quiet machine: hf and ours at keep 1.0 (equal work) agree, repeats agree
    rows = [_timed_row("hf", 1.0, 100.0), _timed_row("ours", 1.0, 104.0), _timed_row("ours", 0.25, 50.0)]
    add_ratios(rows, n_layers=12, noise_threshold=0.2, control_tolerance=0.5)
    assert [r["flag"] for r in rows] == [None, None, None]
    # busy machine: one row's repeats spread 60%, and equal work differs 18.55x
    rows = [_timed_row("hf", 1.0, 1855.0), _timed_row("ours", 1.0, 100.0), _timed_row("ours", 0.25, 50.0, spread=0.6)]
    add_ratios(rows, n_layers=12, noise_threshold=0.2, control_tolerance=0.5)
    assert all("control off: hf / ours keep 1.0 prefill = 18.55x for equal work" in r["flag"] for r in rows)
    assert "noisy (repeats spread 60%)" in rows[2]["flag"] and "noisy" not in rows[1]["flag"]
    assert "noisy (repeats spread 60%)" in bench_table(rows)


def test_rows_are_measured_in_rounds_so_a_slow_spell_leaves_their_ratio_alone():
    # A fake machine: row "pruned" costs 1 ms, row "full" 3 ms, and the machine runs 2x slower
    # from the 9th call on (a slow spell). Rows in rounds (warm-ups first, then one repeat of
    # each row per round): the spell slows the last 2 repeats of BOTH rows, so the medians keep
    # the true ratio 3. Measured row after row, "full" would get every slow repeat and the
    # ratio would read 6.
    from sparsevlm_exp.bench import measure_side_by_side

    calls = []

    def row(cost):
        def run_once():
            calls.append(cost)
            ms = cost * (2 if len(calls) > 8 else 1)
            return {"prefill_ms": ms, "total_ms": ms, "note": "kept"}
        return run_once

    out = measure_side_by_side({"pruned": row(1.0), "full": row(3.0)}, warmup=1, repeats=5)
    assert calls == [1.0, 3.0] + [1.0, 3.0] * 5                                     # warm-ups, then rounds
    (pruned, error_p), (full, error_f) = out["pruned"], out["full"]
    assert error_p is None and error_f is None
    assert full["prefill_ms"] / pruned["prefill_ms"] == 3.0                         # medians 6 / 2
    assert pruned["note"] == "kept" and pruned["spread"] == (2 - 1) / 1             # repeats [1, 1, 1, 2, 2]
    # the row-after-row order this replaced, on the same machine: the ratio doubles
    calls.clear()
    blocks = [[row(c)() for _ in range(6)][1:] for c in (1.0, 3.0)]
    assert statistics.median(r["prefill_ms"] for r in blocks[1]) / statistics.median(
        r["prefill_ms"] for r in blocks[0]) == 6.0


def test_a_row_that_fails_records_its_error_and_the_other_rows_go_on():
    from sparsevlm_exp.bench import measure_side_by_side

    count = {"n": 0}

    def breaks():
        count["n"] += 1
        if count["n"] == 2:                                                          # the first timed run
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"prefill_ms": 1.0, "total_ms": 1.0}

    out = measure_side_by_side({"oom": breaks, "fine": lambda: {"prefill_ms": 2.0, "total_ms": 2.0}},
                               warmup=1, repeats=3)
    assert out["oom"] == (None, "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert count["n"] == 2                                                           # not run again
    assert out["fine"][0]["prefill_ms"] == 2.0 and out["fine"][1] is None


def test_qwen3_5_bench_skips_kv_only_and_refuses_a_linear_layer_before_weights(tmp_path):
    """On a hybrid model (Qwen3.5) kv_only cannot run, so the default methods drop it
    with a warning before loading; an attention scorer at a linear-attention layer is
    one line before any weights (the 9B architecture is only read, never built)."""
    from omegaconf import OmegaConf

    from sparsevlm_exp.bench import runnable_methods
    from sparsevlm_exp.models.loading import model_config

    arch = OmegaConf.load(ROOT / "conf" / "model" / "qwen3_5_9b.yaml").architecture
    config = model_config("unused", random_init=True, architecture=arch)
    assert runnable_methods(["hf", "ours", "kv_only"], config) == ["hf", "ours"]
    qwen25 = OmegaConf.load(ROOT / "conf" / "model" / "bench_cpu.yaml").architecture
    assert runnable_methods(["hf", "kv_only"], model_config("unused", random_init=True, architecture=qwen25)) \
        == ["hf", "kv_only"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "sparsevlm_exp.bench", "model=qwen3_5_9b", "model.random_init=true",
                           "device=cpu", "bench.scorer=v15", "bench.layer=[2]", f"hydra.run.dir={tmp_path}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "layer=2 is not allowed with scorer V15Scorer" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "bench.json").exists()


def test_sparsevlm_pkg_rows_load_their_eager_model_after_the_first_is_freed(monkeypatch):
    # The package's rows need a second (eager) model; run_bench frees the first before it
    # loads it, or both sit in memory at once (a 7B model twice on one GPU). Nothing of the
    # first model's rows may keep it alive: a fake `sparsevlm_generate`, the real tiny model.
    import gc
    import weakref

    import hydra.utils
    from hydra import compose, initialize_config_dir

    from sparsevlm_exp import bench
    from sparsevlm_exp.paths import CONF_DIR

    def fake_generate(model, processor, inputs, max_new_tokens, **call):
        return torch.zeros(1, max_new_tokens + 1, dtype=torch.long)

    monkeypatch.setattr(bench, "_import_sparsevlm", lambda: fake_generate)
    real_instantiate = hydra.utils.instantiate
    first, alive_at_eager = [], []

    def instantiate(config, *args, **kwargs):
        if kwargs.get("attn_implementation") == "eager":
            gc.collect()
            alive_at_eager.append(first[0]() is not None)
        adapter = real_instantiate(config, *args, **kwargs)
        if not first:
            first.append(weakref.ref(adapter.model))
        return adapter

    monkeypatch.setattr(hydra.utils, "instantiate", instantiate)
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("bench", overrides=[*TINY, "bench.visual_tokens=[16]", "bench.keep=[1.0]", "bench.layer=[1]",
                                          "bench.repeats=1", "bench.warmup=0", "bench.max_new_tokens=2",
                                          "bench.methods=[hf,ours,sparsevlm_pkg]"])
    rows = bench.run_bench(cfg)
    assert [r["method"] for r in rows] == ["hf", "ours", "sparsevlm_pkg"]
    assert [r["error"] for r in rows] == [None, None, None]
    assert alive_at_eager == [False]                          # the first model was freed before the eager one
