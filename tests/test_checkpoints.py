"""The real-checkpoint yamls (conf/model/llava15_*.yaml, qwen3_vl_*.yaml) without downloading anything.

- every `architecture` builds (AutoConfig.for_model), on the meta device, into a
  model whose parameter count is the checkpoint's (7B / 13B, within 10%);
- the yamls have the keys every model yaml has, so the runner treats them alike;
- loading a hub id offline fails with one line that names the checkpoint and the
  way out (model.pretrained=/path/to/dir), no traceback.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import AutoModelForImageTextToText

from sparsevlm_exp.models.loading import model_config, num_layers

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
LLAVA_YAMLS = sorted(p.stem for p in (CONF / "model").glob("llava15_*.yaml"))
# name -> (parameters, decoder layers) of the published checkpoint
EXPECTED = {"llava15_7b": (7.06e9, 32), "llava15_13b": (13.35e9, 40)}


def compose_model(name: str):
    # dataset=folder: any dataset composes; this test is about the model group
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose(config_name="config", overrides=[f"model={name}", "dataset=folder", "logger=none"])


def test_every_llava_yaml_is_checked():
    assert set(LLAVA_YAMLS) == set(EXPECTED)


@pytest.mark.parametrize("name", LLAVA_YAMLS)
def test_architecture_builds_at_checkpoint_size(name):
    cfg = compose_model(name)
    m = cfg.model
    assert m._target_ == "sparsevlm_exp.models.llava.LlavaAdapter.load"
    # the same keys as the embedded default's yaml, so runner and loader treat them alike
    default_keys = set(OmegaConf.load(CONF / "model" / "shapes_vlm.yaml").keys())
    assert default_keys <= set(m.keys())

    config = model_config(m.pretrained, random_init=True, architecture=m.architecture)
    assert config.model_type == "llava"
    params, layers = EXPECTED[name]
    assert num_layers(config) == layers
    # 336 px / patch 14 = a 24x24 grid: 576 visual tokens after dropping CLS
    vision = config.vision_config
    assert (vision.image_size // vision.patch_size) ** 2 == config.image_seq_length == 576
    assert config.vision_feature_select_strategy == "default" and config.vision_feature_layer == -2
    assert config.image_token_id < config.text_config.vocab_size

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - params) / params < 0.10, f"{name}: {n / 1e9:.2f}B parameters, expected about {params / 1e9:.2f}B"


def test_offline_hub_id_fails_in_one_clear_line(tmp_path):
    # a dataset the runner accepts without looking at images (checks run before weights)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "questions.jsonl").write_text(
        json.dumps({"id": "q1", "image": "a.png", "question": "what?", "answers": ["x"]}) + "\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), WANDB_MODE="disabled")
    proc = subprocess.run(
        [sys.executable, "-m", "sparsevlm_exp", "model=llava15_7b", "dataset=folder",
         f"dataset.path={tmp_path / 'data'}", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "llava-hf/llava-1.5-7b-hf" in errors[0]
    assert "model.pretrained=/path/to/dir" in errors[0]


# ----------------------------------------------------------------------------------------
# conf/experiment/paper_table1.yaml: the paper's table as one multirun
# ----------------------------------------------------------------------------------------
def paper_table1_jobs() -> list[list[str]]:
    """The override lists of the jobs `-m +experiment=paper_table1` launches, split by
    Hydra's own BasicSweeper from the experiment's hydra.sweeper.params."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(config_name="config", overrides=["+experiment=paper_table1"], return_hydra_config=True)
    params = [f"{key}={value}" for key, value in cfg.hydra.sweeper.params.items()]
    batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), max_batch_size=None)
    return [list(job) for batch in batches for job in batch]


def test_paper_table1_is_10_rows_by_4_benchmarks():
    from hydra.utils import instantiate

    from sparsevlm_exp.policies import FixedPolicy, SchedulePolicy
    from sparsevlm_exp.pruners import DropPruner, RecyclePruner
    from sparsevlm_exp.scorers import FastVScorer, RandomScorer, V15Scorer

    jobs = paper_table1_jobs()
    assert len(jobs) == 40
    seen = set()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        for job in jobs:
            cfg = compose(config_name="config", overrides=["+experiment=paper_table1", *job])
            assert cfg.model.pretrained == "llava-hf/llava-1.5-7b-hf"
            # the paper's setting: LLaVA in fp16, TextVQA with the reference OCR tokens
            assert cfg.model.dtype == "float16"
            if cfg.dataset._target_.endswith("TextVQA"):
                assert cfg.dataset.ocr_tokens is True
            seen.add((cfg.row, cfg.dataset._target_.rsplit(".", 1)[-1]))
            scorer = instantiate(cfg.scorer, _convert_="all")
            policy = instantiate(cfg.policy, _convert_="all")
            pruner = instantiate(cfg.pruner, _convert_="all")
            policy.check(32)
            method = cfg.row.split("_")[0]
            if method == "vanilla":
                assert isinstance(policy, FixedPolicy) and policy.keep == 1.0
            elif method == "sparsevlm":
                assert isinstance(scorer, V15Scorer) and isinstance(policy, SchedulePolicy)
                assert isinstance(pruner, RecyclePruner) and policy.layers(32) == [2, 6, 15]
            else:
                assert isinstance(scorer, FastVScorer if method == "fastv" else RandomScorer)
                assert isinstance(policy, FixedPolicy) and isinstance(pruner, DropPruner)
                assert policy.keep == cfg.budget == int(cfg.row.split("_")[1]) and policy.layer == 1
    assert len(seen) == 40
    assert {d for _, d in seen} == {"TextVQA", "GQA", "POPE", "MME"}


def test_paper_table1_schedules_match_sparsevlm_v15():
    table = OmegaConf.load(CONF / "experiment" / "paper_table1.yaml").table1.parts.policy.schedule
    v15 = OmegaConf.load(CONF / "experiment" / "sparsevlm_v15.yaml").policy
    assert table.layers == v15.layers and table.reference_count == v15.reference_count
    assert table.reference_layers == v15.reference_layers
    for budget in (192, 128, 64):
        assert table.keep_by_budget[budget] == v15.keep_by_budget[budget]


# ----------------------------------------------------------------------------------------
# Qwen3-VL (dense sizes and the 30B-A3B MoE): conf/model/qwen3_vl_*.yaml
# ----------------------------------------------------------------------------------------
QWEN3_VL_YAMLS = sorted(p.stem for p in (CONF / "model").glob("qwen3_vl_*.yaml"))
# name -> (hub id, parameters, decoder layers, model_type). The 8B's count is its
# safetensors total in a public weight listing; the others are the hub pages' totals
# as the yaml comments report them (2.13B, 4.44B, 33.4B, 31.1B).
QWEN3_VL_EXPECTED = {
    "qwen3_vl_2b": ("Qwen/Qwen3-VL-2B-Instruct", 2.13e9, 28, "qwen3_vl"),
    "qwen3_vl_4b": ("Qwen/Qwen3-VL-4B-Instruct", 4.44e9, 36, "qwen3_vl"),
    "qwen3_vl_8b": ("Qwen/Qwen3-VL-8B-Instruct", 8.767e9, 36, "qwen3_vl"),
    "qwen3_vl_32b": ("Qwen/Qwen3-VL-32B-Instruct", 33.4e9, 64, "qwen3_vl"),
    "qwen3_vl_30b_a3b": ("Qwen/Qwen3-VL-30B-A3B-Instruct", 31.1e9, 48, "qwen3_vl_moe"),
}


def test_every_qwen3_vl_yaml_is_checked():
    assert set(QWEN3_VL_YAMLS) == set(QWEN3_VL_EXPECTED)


@pytest.mark.parametrize("name", QWEN3_VL_YAMLS)
def test_qwen3_vl_architecture_builds_at_checkpoint_size(name):
    cfg = compose_model(name)
    m = cfg.model
    hub, params, layers, model_type = QWEN3_VL_EXPECTED[name]
    assert m._target_ == "sparsevlm_exp.models.qwen3_vl.Qwen3VLAdapter.load" and m.pretrained == hub
    assert set(OmegaConf.load(CONF / "model" / "shapes_vlm.yaml").keys()) <= set(m.keys())

    config = model_config(m.pretrained, random_init=True, architecture=m.architecture)
    assert config.model_type == model_type and num_layers(config) == layers
    text, vision = config.text_config, config.vision_config
    # interleaved M-RoPE sections cover the head's d/2 frequencies; one LLM token per 32x32 px
    rope = text.rope_parameters
    assert rope["mrope_interleaved"] and sum(rope["mrope_section"]) == text.head_dim // 2
    assert vision.patch_size * vision.spatial_merge_size == 32 and vision.out_hidden_size == text.hidden_size
    # DeepStack features come from ViT blocks that exist and land on the first LLM layers
    assert len(vision.deepstack_visual_indexes) == 3 and max(vision.deepstack_visual_indexes) < vision.depth

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    n = sum({id(p): p.numel() for p in model.parameters()}.values())
    assert abs(n - params) / params < 0.10, f"{name}: {n / 1e9:.2f}B parameters, expected about {params / 1e9:.2f}B"


def test_qwen3_5_9b_yaml_builds_a_hybrid_model_of_its_size():
    cfg = compose_model("qwen3_5_9b")
    m = cfg.model
    assert m._target_ == "sparsevlm_exp.models.qwen3_5.Qwen3_5Adapter.load" and m.pretrained == "Qwen/Qwen3.5-9B"
    config = model_config(m.pretrained, random_init=True, architecture=m.architecture)
    text = config.text_config
    assert config.model_type == "qwen3_5" and num_layers(config) == 32
    # 3 linear-attention layers, then a full-attention one, 8 times
    assert text.layer_types == (["linear_attention"] * 3 + ["full_attention"]) * 8
    rope = text.rope_parameters
    assert sum(rope["mrope_section"]) == int(text.head_dim * rope["partial_rotary_factor"]) // 2
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    n = sum({id(p): p.numel() for p in model.parameters()}.values())
    assert abs(n - 9e9) / 9e9 < 0.10, f"{n / 1e9:.2f}B parameters for a 9B checkpoint"
