"""The Hydra app: config composition, the CLI end to end, bad input, W&B, the library API."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from sparsevlm_exp import sparse_generate
from sparsevlm_exp.errors import ConfigError
from sparsevlm_exp.runner import Experiment
from tiny_models import noise_image, sample

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
CHEAP_GROUPS = ["scorer", "policy", "pruner", "decoder", "logger"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture(scope="module")
def folder_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    with open(root / "questions.jsonl", "w") as f:
        for i in range(3):
            noise_image(112, 84, seed=i).save(root / f"img{i}.png")
            f.write(json.dumps({"id": f"q{i}", "image": f"img{i}.png", "question": "what colour is the circle",
                                "answers": ["red"], "question_type": "colour" if i < 2 else "shape"}) + "\n")
    return str(root)


def base_overrides(tiny_dir, folder):
    return [f"model.pretrained={tiny_dir}", "dataset=folder", f"dataset.path={folder}", "layer=1"]


# ---- composition ------------------------------------------------------------------
@pytest.mark.parametrize("group", CHEAP_GROUPS + ["model", "dataset"])
def test_every_group_option_composes(group):
    for option in options(group):
        cfg = compose_cfg([f"{group}={option}"])
        assert cfg[group]["_target_"], (group, option)
        if group in CHEAP_GROUPS:
            instantiate(cfg[group])


def test_job_name_is_not_main():
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(config_name="config", return_hydra_config=True)
    assert cfg.hydra.job.name == "sparsevlm_exp"


# ---- bad input: one clear error before any weights --------------------------------
@pytest.mark.parametrize("override, key", [
    ("keep=0", "keep"), ("keep=-3", "keep"), ("keep=1.5", "keep"), ("keep=0.0", "keep"),
    ("layer=-1", "layer"), ("layer=4", "layer"), ("layer=99", "layer"), ("batch_size=0", "batch_size"),
    ("scorer.head_fraction=0", "head_fraction"), ("decoder.max_new_tokens=0", "max_new_tokens"),
    ("logger.mode=sometimes", "logger.mode"), ("dataset.path=/nonexistent/dir", "dataset.path"),
])
def test_bad_input_raises_config_error(tiny_qwen_dirs, folder_dataset, override, key):
    overrides = base_overrides(tiny_qwen_dirs["qwen2_5_vl"], folder_dataset) + ["scorer=v2", override]
    cfg = compose_cfg(overrides)
    with pytest.raises(ConfigError) as err:
        Experiment(cfg, "/tmp/unused")
    message = str(err.value)
    assert key in message and "\n" not in message


def test_unknown_checkpoint_names_it_and_the_fix():
    cfg = compose_cfg(["model.pretrained=/no/such/checkpoint", "logger=none"])
    with pytest.raises(ConfigError, match="model.pretrained=.*/no/such/checkpoint.*local copy"):
        Experiment(cfg, "/tmp/unused")


# Every bad value a reliability pass found getting past the up-front checks (issue 16,
# item 5): (overrides, the start of the one-line error). The key, the value and what is
# allowed must all be named; nothing may load.
BAD_VALUES = [
    (["dtype=float8"], "dtype='float8' is not allowed: one of auto, float32"),
    (["device=tpu"], "device='tpu' is not allowed: auto, cpu, cuda, cuda:N or mps"),
    (["model.attn_implementation=bogus"], "model.attn_implementation='bogus' is not allowed: sdpa, eager"),
    (["model.attn_implementation=flash_attention_2"],
     "model.attn_implementation='flash_attention_2' is not allowed: sdpa or eager: the flash-attn package"),
    (["logger=wandb", "logger.mode=online"], "logger.mode='online' is not allowed: offline or disabled: no W&B"),
    (["seed=abc"], "seed='abc' is not allowed: an int"),
    (["decoder.max_new_tokens=abc"], "decoder.max_new_tokens='abc' is not allowed: an int"),
    (["scorer=v2", "scorer.head_fraction=abc"], "scorer.head_fraction='abc' is not allowed: a number"),
    (["policy.allocation=per_sample"], "policy.allocation='per_sample' is not allowed: per_image"),
    (["policy=adaptive", "scorer=random"], "scorer='RandomScorer' is not allowed: a scorer that reads"),
    (["policy=adaptive", "scorer=fastv"], "scorer='FastVScorer' is not allowed: a scorer that reads"),
    (["model=bench_cpu"], "model.random_init=True is not allowed: false in the main app"),
    (["model.random_init=true"], "model.random_init=True is not allowed: false in the main app"),
    (["+experiment=paper_table1", "row=nope"], "row='nope' is not allowed: one of vanilla, sparsevlm_192"),
    (["limit=true"], "limit=True is not allowed: null or an int >= 1"),
    # the official SparseVLM v1/v1.5 renumbering is a 1-D RoPE rule (issue 15 item 5)
    (["pruner.positions=renumbered"], "pruner.positions=renumbered is not allowed on this model: it has M-RoPE"),
    (["pruner=recycle", "pruner.positions=renumbered"],
     "pruner.positions=renumbered is not allowed on this model: it has M-RoPE"),
    (["pruner.positions=gaps"], "pruner.positions='gaps' is not allowed: one of original, renumbered, auto"),
    (["resume=no"], "resume='no' is not allowed: true or false"),
    (["resume=maybe"], "resume='maybe' is not allowed: true or false"),
    (["model.pretrained=NOCONFIG"], "model.pretrained='NOCONFIG' is not allowed: a checkpoint directory holding "
                                    "config.json"),
    (["model.pretrained=nobody-xyz/not-cached-model"], "model.pretrained='nobody-xyz/not-cached-model' is not "
                                                       "allowed: a local checkpoint dir: the hub is not reachable"),
]


@pytest.mark.parametrize("extra, expected", BAD_VALUES, ids=[" ".join(e) for e, _ in BAD_VALUES])
def test_every_bad_value_is_one_line_before_loading(tiny_qwen_dirs, folder_dataset, tmp_path, monkeypatch,
                                                     extra, expected):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "empty_netrc"))      # no W&B credentials anywhere
    (tmp_path / "empty_netrc").write_text("")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")                       # the hub id is refused at once
    (tmp_path / "NOCONFIG").mkdir()
    extra = [e.replace("NOCONFIG", str(tmp_path / "NOCONFIG")) for e in extra]
    expected = expected.replace("NOCONFIG", str(tmp_path / "NOCONFIG"))
    cfg = compose_cfg(base_overrides(tiny_qwen_dirs["qwen2_5_vl"], folder_dataset) + ["logger=none"] + extra)
    with pytest.raises(ConfigError) as err:
        Experiment(cfg, tmp_path / "run")
    assert str(err.value).startswith(expected), str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()                         # nothing written either


def run_cli(args, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", "sparsevlm_exp", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "WANDB_SILENT": "true"})


@pytest.mark.parametrize("override, expected", [("keep=0", "keep=0"), ("layer=99", "layer=99"),
                                                ("scorer=nope", "scorer"), ("dtype=float8", "dtype='float8'"),
                                                ("seed=abc", "seed='abc'"), ("resume=maybe", "resume='maybe'")])
def test_cli_bad_input_is_one_line_without_traceback(tiny_qwen_dirs, folder_dataset, tmp_path, override, expected):
    proc = run_cli(base_overrides(tiny_qwen_dirs["qwen2_5_vl"], folder_dataset) + [override], cwd=tmp_path)
    # an unknown group option is refused by Hydra's own composition (its exit code 1,
    # the options listed); every value we check exits 2
    assert proc.returncode == (1 if override == "scorer=nope" else 2)
    assert "Traceback" not in proc.stderr and expected in proc.stderr
    assert "Loading weights" not in proc.stderr + proc.stdout


# ---- the CLI end to end ------------------------------------------------------------
def test_cli_runs_end_to_end(tiny_qwen_dirs, folder_dataset, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(base_overrides(tiny_qwen_dirs["qwen2_5_vl"], folder_dataset)
                   + ["scorer=v2", "keep=0.25", "logger=none", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["q0", "q1", "q2"]
    assert all(r["kept"] == [3] and r["n_visual"] == 12 for r in records)     # 12 visual tokens, keep 0.25
    results = json.loads((run_dir / "results.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert results["n_samples"] == 3 and results["kept"] == {"1": 3}
    scores = [r["score"] for r in records]
    assert results["accuracy_by_type"]["colour"]["n"] == 2 and results["accuracy_by_type"]["shape"]["n"] == 1
    assert results["accuracy_by_type"]["shape"]["accuracy"] == scores[2]
    low, high = results["accuracy_ci95"]
    assert 0 <= low <= results["accuracy"] <= high <= 1
    prefill = sorted(r["prefill_ms"] for r in records)
    assert results["prefill_ms_median"] == pytest.approx(prefill[1])
    assert prefill[1] <= results["prefill_ms_p90"] <= prefill[2]
    assert results["config"]["scorer"]["_target_"].endswith("V2Scorer")
    assert results["prefill_ms"] > 0 and results["decode_ms_per_token"] > 0
    # the closing log line says what was kept, from the same summary
    assert "visual tokens 12 -> 3 after layer 1" in proc.stdout + proc.stderr


def test_efficiency_line_reads_the_summary():
    from sparsevlm_exp.__main__ import efficiency_line

    summary = {"n_visual": 256, "kept": {"2": 64.0, "10": 16.0}, "recycled": {"2": 9.0, "10": 0.0},
               "equivalent_tokens": 100.4, "vision_ms": 16.52, "vision_ms_median": 15.0, "vision_ms_p90": 20.04,
               "prefill_ms": 97.0, "prefill_ms_median": 10.5, "prefill_ms_p90": 12.0,
               "decode_ms_per_token": 2.68}
    # alive after layer 2 = 64 kept + 9 recycled; the recycled ones are named separately
    assert efficiency_line(summary) == (
        "visual tokens 256 -> 73 (64 kept + 9 recycled) after layer 2 -> 16 after layer 10, 100 per layer "
        "on average; per sample ms, mean (median, p90): vision 16.5 (median 15.0, p90 20.0), LLM prefill "
        "97.0 (median 10.5, p90 12.0), decode 2.7/token")
    assert efficiency_line({"n_visual": 0, "kept": {}}).startswith("visual tokens 0 (not pruned), - per layer")


def test_keep_above_visual_count_keeps_all_and_says_so(tiny_qwen_dirs, folder_dataset, tmp_path, caplog):
    cfg = compose_cfg(base_overrides(tiny_qwen_dirs["qwen2_5_vl"], folder_dataset) + ["keep=500", "logger=none"])
    with caplog.at_level("WARNING"):
        summary = Experiment(cfg, tmp_path).run()
    assert summary["kept"] == {"1": 12}
    assert sum("exceeds" in r.message for r in caplog.records) == 1


def test_wandb_offline_records_the_run(tiny_qwen_dirs, folder_dataset, tmp_path, monkeypatch):
    from sparsevlm_exp import tracking

    recorded = {}
    real_finish = tracking.WandbLogger.finish

    def spy_finish(self, summary, records, exit_code=0):
        recorded["config"] = dict(self.run.config)
        recorded["mode"] = self.run.settings.mode
        recorded["tags"] = list(self.run.tags)
        real_finish(self, summary, records, exit_code)
        recorded["summary"] = summary

    monkeypatch.setattr(tracking.WandbLogger, "finish", spy_finish)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_cfg(base_overrides(tiny_qwen_dirs["qwen2_5_vl"], folder_dataset)
                      + ["logger=wandb", "logger.tags=[mine]"])
    Experiment(cfg, tmp_path, choices={"scorer": "v15", "pruner": "drop"}).run()
    assert recorded["mode"] == "offline"
    assert set(recorded["tags"]) == {"mine", "scorer=v15", "pruner=drop", "keep=0.25", "layer=1"}
    assert recorded["config"]["keep"] == 0.25 and recorded["config"]["layer"] == 1
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))


# ---- the library API ----------------------------------------------------------------
def test_sparse_generate_matches_the_pipeline(load_tiny):
    adapter = load_tiny("qwen2_5_vl")
    req = adapter.encode(sample(n_images=2))
    full = sparse_generate(adapter.model, req.model_inputs, keep=1.0, max_new_tokens=8)
    hf = adapter.model.generate(**req.model_inputs, do_sample=False, max_new_tokens=8)
    assert torch.equal(full.sequences, hf[:, req.input_ids.shape[1]:])

    out = sparse_generate(adapter.model, req.model_inputs, scorer="v2", keep=0.25, layer=1, max_new_tokens=8,
                          scorer__head_fraction=0.25)
    assert out.n_visual == 24 and out.prune_layers == [1]
    kept = out.kept_indices[0]
    assert kept.shape == (1, 6) and torch.equal(kept, kept.sort(dim=1).values)
    assert bool(torch.isin(kept, req.visual_index).all())
    assert out.layer_counts == [24, 6, 6, 6]
    with pytest.raises(ConfigError, match="scorer='nope'"):
        sparse_generate(adapter.model, req.model_inputs, scorer="nope")


def test_sparse_generate_takes_a_pre_llm_scorers_own_stage(load_tiny):
    # layer=None (the default) is the config's own layer: divprune's yaml sets -1, so
    # every LLM layer sees only the kept tokens, as `python -m sparsevlm_exp scorer=divprune`.
    adapter = load_tiny("qwen2_5_vl")
    req = adapter.encode(sample(n_images=1))
    out = sparse_generate(adapter.model, req.model_inputs, scorer="divprune", keep=0.25, max_new_tokens=4)
    n_kept = out.kept_indices[0].shape[1]
    assert out.prune_layers == [-1] and n_kept == round(0.25 * out.n_visual)
    assert set(out.layer_counts) == {n_kept}
    # a misspelled keyword is refused with its close match, never silently ignored
    with pytest.raises(ConfigError, match="unknown keyword 'kepp': did you mean keep"):
        sparse_generate(adapter.model, req.model_inputs, kepp=0.25)
    with pytest.raises(ConfigError, match="'scorer__head_fractoin': did you mean scorer__head_fraction"):
        sparse_generate(adapter.model, req.model_inputs, scorer="v2", scorer__head_fractoin=0.25)
    with pytest.raises(ConfigError, match="scorer.head_fraction='abc' is not allowed"):
        sparse_generate(adapter.model, req.model_inputs, scorer="v2", scorer__head_fraction="abc")


# ---- numbers users misread ------------------------------------------------------------
def test_int_keep_below_two_percent_warns_and_the_kept_count_is_said(caplog):
    from types import SimpleNamespace

    from sparsevlm_exp.records import SampleRecord

    record = SampleRecord(index=0, id="s", n_visual=256, prune_layers=[2], kept=[1], recycled=[0])
    with caplog.at_level("INFO"):
        Experiment.say_kept(SimpleNamespace(cfg=SimpleNamespace(keep=1)), record)
    messages = [r.getMessage() for r in caplog.records]
    assert "keep=1 resolves to 1 after layer 2 of 256 visual tokens (first sample)" in messages
    assert any(r.levelname == "WARNING" and "keep=1 is a token COUNT: 1 of 256" in r.getMessage()
               for r in caplog.records)
    caplog.clear()
    record.kept = [64]
    with caplog.at_level("INFO"):
        Experiment.say_kept(SimpleNamespace(cfg=SimpleNamespace(keep=1.0 / 4)), record)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_prompt_longer_than_the_context_warns(caplog):
    from types import SimpleNamespace

    decoder = SimpleNamespace(max_new_tokens=16)
    fake = SimpleNamespace(decoder=decoder, decoder_for=lambda sample: decoder)
    req = SimpleNamespace(input_ids=torch.zeros(1, 4090, dtype=torch.long))
    with caplog.at_level("WARNING"):
        Experiment._warn_if_too_long(fake, SimpleNamespace(id="q7", meta={}), req,
                                     SimpleNamespace(max_position_embeddings=4096))
    assert any("sample q7: prompt of 4090 tokens + 16 new tokens exceeds the model's context of 4096"
               in r.getMessage() for r in caplog.records)


def test_recycled_tokens_count_as_alive_and_are_named(tiny_qwen_dirs, folder_dataset, tmp_path):
    from sparsevlm_exp.__main__ import efficiency_line

    cfg = compose_cfg(base_overrides(tiny_qwen_dirs["qwen2_5_vl"], folder_dataset)
                      + ["pruner=recycle", "keep=0.25", "logger=none", "viz.n=0"])
    summary = Experiment(cfg, tmp_path).run()
    kept, recycled = summary["kept"]["1"], summary["recycled"]["1"]
    # 12 visual tokens, 3 kept, 9 deleted: floor(0.3 * 9) + 1 = 3 candidates -> floor(3/10) + 1 = 1 cluster
    assert (kept, recycled) == (3, 1) and summary["alive"]["1"] == 4
    assert "visual tokens 12 -> 4 (3 kept + 1 recycled) after layer 1" in efficiency_line(summary)


def test_library_composes_the_same_config_tree_as_the_cli():
    from sparsevlm_exp.api import load_components

    parts = load_components(scorer="v2", keep=0.25, layer=1, policy="fixed", pruner="drop", max_new_tokens=5,
                            scorer__gravity_floor=2.0)
    cfg = compose_cfg(["scorer=v2", "keep=0.25", "layer=1", "decoder.max_new_tokens=5", "scorer.gravity_floor=2.0"])
    cli_parts = {g: instantiate(cfg[g], _convert_="all") for g in ("scorer", "policy", "pruner", "decoder")}
    for group, part in parts.items():
        assert type(part) is type(cli_parts[group]) and vars(part) == vars(cli_parts[group]), group
    # also from inside a composed Hydra context (a notebook, a Hydra app), which it leaves as it was
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        inner = load_components(scorer="v15", keep=0.5, layer=1, policy="fixed", pruner="drop", max_new_tokens=3)
        assert inner["policy"].keep == 0.5
        assert compose(config_name="config").keep == 0.25
