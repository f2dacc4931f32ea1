"""Issue 15 (silent wrong results): the official v2 head count, presets on any model
depth, and the three oracle gaps (rater softmax axis, v2 gravity guard, evidence recall
denominator). Every right value here is worked out by hand in the comments."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from sparsevlm_exp.errors import ConfigError
from sparsevlm_exp.metrics.evidence import evidence_recall
from sparsevlm_exp.contracts import RopeSpec
from sparsevlm_exp.policies import map_layers
from sparsevlm_exp.scorers import V2Scorer, select_raters
from sparsevlm_exp.scorers import sparsevlm as sparsevlm_module

CONF = Path(__file__).resolve().parent.parent / "conf"


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose(config_name="config", overrides=overrides)


# ----------------------------------------------------------------------------------------
# Item 6: v2 priority heads, 14 of 32 as the official code
# ----------------------------------------------------------------------------------------
def hand_made_head_attention() -> torch.Tensor:
    """[1, 32, 2] per-head rater->visual attention on two visual tokens.

    heads 0..13: mass 1.00, split [0.52, 0.48] (lean to token 0)
    heads 14,15: mass 0.95, split [0.00, 0.95] (all on token 1)
    heads 16..31: mass 0.10, split [0.05, 0.05]
    Top 14 heads = heads 0..13 -> mean [0.52, 0.48]: token 0 wins.
    Top 16 heads = heads 0..15 -> [14*0.52/16, (14*0.48 + 2*0.95)/16] = [0.455, 0.53875]: token 1 wins.
    """
    attn = torch.empty(1, 32, 2)
    attn[0, :14] = torch.tensor([0.52, 0.48])
    attn[0, 14:16] = torch.tensor([0.00, 0.95])
    attn[0, 16:] = torch.tensor([0.05, 0.05])
    return attn


def v2_scores(scorer: V2Scorer, attn: torch.Tensor, monkeypatch) -> torch.Tensor:
    # the kernel's output is replaced by the hand-made per-head attention
    monkeypatch.setattr(sparsevlm_module, "text_visual_attention", lambda *a, **k: attn)
    view = SimpleNamespace(q=None, k=None, query_index=None, visual_index=None, wants=(), key_mask=None)   # no pads; wants: LayerView's
    return scorer(view)


def test_v2_preset_averages_the_official_14_of_32_heads(monkeypatch):
    cfg = compose_cfg(["+experiment=sparsevlm_v2"])
    preset = instantiate(cfg.scorer, _convert_="all")
    assert preset.gravity is True           # unchanged by the preset; switched off below to isolate the heads
    preset.gravity = False
    attn = hand_made_head_attention()
    assert torch.allclose(v2_scores(preset, attn, monkeypatch), torch.tensor([[0.52, 0.48]]))
    half = V2Scorer(gravity=False, head_fraction=0.5)                   # ceil(0.5 * 32) = 16 heads
    assert torch.allclose(v2_scores(half, attn, monkeypatch), torch.tensor([[0.455, 0.53875]]))
    # the two rules pick different tokens: the count matters
    assert v2_scores(preset, attn, monkeypatch).argmax() != v2_scores(half, attn, monkeypatch).argmax()


def test_v2_head_count_scales_from_the_32_head_reference():
    preset = instantiate(compose_cfg(["+experiment=sparsevlm_v2"]).scorer, _convert_="all")
    # floor(14 * H / 32 + 1/2): 32 -> 14 exactly, 28 -> 12.25 -> 12, 40 -> 17.5 -> 18, 4 -> 1.75 -> 2, 1 -> 1
    assert [preset.n_priority_heads(h) for h in (32, 28, 40, 4, 1)] == [14, 12, 18, 2, 1]
    exact = V2Scorer(head_fraction=None, head_count=14)
    assert exact.n_priority_heads(32) == 14 and exact.n_priority_heads(28) == 14
    assert V2Scorer(head_fraction=0.5).n_priority_heads(32) == 16


@pytest.mark.parametrize("kwargs, key", [
    ({"head_fraction": 0.5, "head_count": 14}, "scorer.head_count=14"),          # both given
    ({"head_fraction": None, "head_count": None}, "scorer.head_fraction=None"),  # neither
    ({"head_fraction": None, "head_count": 0}, "scorer.head_count=0"),
    ({"head_fraction": 1.5}, "scorer.head_fraction=1.5"),
    ({"head_fraction": None, "head_count": 14, "reference_heads": 8}, "scorer.reference_heads=8"),
])
def test_v2_head_options_fail_with_one_clear_line(kwargs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        V2Scorer(**kwargs)
    assert "\n" not in str(err.value)


def test_v2_head_count_above_the_models_heads_is_an_error():
    with pytest.raises(ConfigError, match=r"scorer\.head_count=14 .*the model has 4 attention heads"):
        V2Scorer(head_fraction=None, head_count=14).n_priority_heads(4)


def test_v2_head_count_above_the_models_heads_fails_before_the_model_loads():
    from sparsevlm_exp.runner import Experiment

    # Experiment() checks the parts against the model's config; weights load only in run()
    cfg = compose_cfg(["+experiment=sparsevlm_v2", "scorer.reference_heads=null", "logger=none"])
    with pytest.raises(ConfigError, match=r"scorer\.head_count=14 .*the model has 4 attention heads"):
        Experiment(cfg, "/tmp/unused")


def test_v2_preset_with_head_fraction_override_names_both_keys():
    cfg = compose_cfg(["+experiment=sparsevlm_v2", "scorer.head_fraction=0.5"])
    from sparsevlm_exp.errors import build
    with pytest.raises(ConfigError, match=r"scorer\.head_count=14 .*head_fraction=0\.5"):
        build(cfg.scorer, "scorer")


# ----------------------------------------------------------------------------------------
# Item 8: presets on any model depth
# ----------------------------------------------------------------------------------------
PRESET_LAYERS = {"sparsevlm_v1": [2, 6, 15, 19], "sparsevlm_v15": [2, 6, 15], "sparsevlm_v2": [2, 6, 15]}


@pytest.mark.parametrize("experiment", sorted(PRESET_LAYERS))
def test_preset_layers_are_the_official_ones_on_32_layers(experiment):
    policy = instantiate(compose_cfg([f"+experiment={experiment}"]).policy, _convert_="all")
    policy.check(32)
    assert policy.layers(32) == PRESET_LAYERS[experiment]


def test_map_layers_rule_by_hand():
    # floor(i * L / 32 + 1/2), shown as i * L / 32 + 1/2 -> floor: on 28 layers 2 -> 2.25 -> 2, 6 -> 5.75 -> 5, 15 -> 13.625 -> 13,
    # 19 -> 17.125 -> 17; on 6 layers 0.875 -> 0, 1.625 -> 1, 3.3125 -> 3, 4.0625 -> 4
    assert map_layers([2, 6, 15, 19], 32, 28) == [2, 5, 13, 17]
    assert map_layers([2, 6, 15, 19], 32, 6) == [0, 1, 3, 4]
    assert map_layers([2, 6, 15, 19], 32, 32) == [2, 6, 15, 19]
    # 40 layers (LLaVA-1.5-13B): 3.0 -> 3, 8.0 -> 8, 19.25 -> 19, 24.25 -> 24
    assert map_layers([2, 6, 15], 32, 40) == [3, 8, 19]
    # collisions are pushed up to stay distinct: on 6 layers 2, 3, 4 -> 0.875, 1.0625, 1.25 -> 0, 1, 1 -> 0, 1, 2
    assert map_layers([2, 3, 4], 32, 6) == [0, 1, 2]
    with pytest.raises(ConfigError, match=r"policy\.layers=\[2, 6, 15, 19\].*3 layers"):
        map_layers([2, 6, 15, 19], 32, 3)


def test_reference_layers_must_hold_the_layers():
    cfg = compose_cfg(["+experiment=sparsevlm_v15", "policy.reference_layers=10"])
    from sparsevlm_exp.errors import build
    with pytest.raises(ConfigError, match=r"policy\.layers=\[2, 6, 15\].*10-layer reference"):
        build(cfg.policy, "policy")


@pytest.mark.parametrize("experiment, mapped", [("sparsevlm_v1", [0, 1, 3, 4]), ("sparsevlm_v15", [0, 1, 3]),
                                                ("sparsevlm_v2", [0, 1, 3])])
def test_presets_run_on_the_default_embedded_model(experiment, mapped, tmp_path, caplog):
    from sparsevlm_exp.runner import Experiment

    cfg = compose_cfg([f"+experiment={experiment}", "limit=2", "logger=none", "viz.n=0", "threads=1"])
    with caplog.at_level(logging.INFO, logger="sparsevlm_exp.policies"):
        summary = Experiment(cfg, tmp_path).run()
    assert summary["n_failed"] == 0 and summary["n_samples"] == 2
    assert summary["prune_layers"] == mapped
    assert json.loads((tmp_path / "results.json").read_text())["prune_layers"] == mapped
    assert sorted(int(k) for k in summary["kept"]) == mapped
    assert any(f"-> layers {mapped} of this 6-layer model" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------------------
# Item 9: analytic prefill FLOPs, exact for grouped-query attention
# ----------------------------------------------------------------------------------------
def layer_flops_counted(config, n: int) -> list[float]:
    """FLOPs torch's FlopCounterMode counts in each decoder layer of a Llama-style text
    model for one prefill of n tokens (2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaModel

    torch.manual_seed(0)
    model = LlamaModel(config).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=torch.randint(0, config.vocab_size, (1, n)))
    counts = counter.get_flop_counts()
    return [float(sum(counts[f"LlamaModel.layers.{i}"].values())) for i in range(config.num_hidden_layers)]


def test_prefill_flops_equal_flop_counter_on_a_tiny_gqa_model():
    from transformers import LlamaConfig

    from sparsevlm_exp.metrics.efficiency import prefill_flops, prefill_flops_of, prefill_flops_paper

    # 4 query heads, 2 KV heads, head_dim 24: q width 96 != hidden 64, k/v width 48
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=24, num_hidden_layers=2, vocab_size=100, attn_implementation="eager")
    at10, at6 = layer_flops_counted(config, 10), layer_flops_counted(config, 6)
    # one layer, n = 10, by hand: q,o 2*10*64*96 = 122880; k,v 2*10*64*48 = 61440;
    # attention 2*100*96 = 19200; MLP 3*10*64*96 = 184320 -> 387840 multiply-adds
    assert prefill_flops([10], 64, 96, n_heads=4, n_kv_heads=2, head_dim=24) == 387840
    assert at10[0] == 2 * 387840
    # a pruned run: layer 0 sees 10 tokens, layer 1 sees 6
    assert 2 * prefill_flops_of([10, 6], config) == at10[0] + at6[1]
    # with head_dim 16 (q width = hidden) the paper's full-width K/V overstate the projections:
    # 4*10*64^2 = 163840 vs 2*10*64*64 + 2*10*64*32 = 122880
    gap = prefill_flops_paper([10], 64, 96) - prefill_flops([10], 64, 96, n_heads=4, n_kv_heads=2)
    assert gap == 163840 - 122880


def test_prefill_flops_paper_formula_is_the_exact_one_for_plain_multi_head():
    from sparsevlm_exp.metrics.efficiency import prefill_flops, prefill_flops_paper

    # LLaVA-1.5-7B: d 4096, m 11008, 32 heads of 128 (no GQA): both formulas agree
    seq = [700] * 3 + [400] * 29
    assert prefill_flops(seq, 4096, 11008, n_heads=32) == prefill_flops_paper(seq, 4096, 11008)
    # Qwen2.5-VL-7B: 28 heads, 4 KV heads of 128, d 3584: the paper's 4 n d^2 vs the exact
    # n d (2*3584 + 2*512) on projections -> a difference of n d (4*3584 - 8192) per layer
    exact = prefill_flops([1000], 3584, 18944, n_heads=28, n_kv_heads=4, head_dim=128)
    assert prefill_flops_paper([1000], 3584, 18944) - exact == 1000 * 3584 * (4 * 3584 - 8192)


# ----------------------------------------------------------------------------------------
# Item 10: three oracle gaps
# ----------------------------------------------------------------------------------------
def test_raters_softmax_over_text_by_hand():
    # visual v1 (1,0), v2 (0,1), v3 (1,1); text t1 (1,0), t2 (0,1), t3 (0,0), t4 (2,0)
    # logits H_v H_t^T (no 1/sqrt(d)):  v1 [1,0,0,2]  v2 [0,1,0,0]  v3 [1,1,0,2]
    # softmax over TEXT per visual token:
    #   v1 [e,1,1,e^2]/(e+2+e^2)  = [0.2245, 0.0826, 0.0826, 0.6103]
    #   v2 [1,e,1,1]/(3+e)        = [0.1749, 0.4754, 0.1749, 0.1749]
    #   v3 [e,e,1,e^2]/(2e+1+e^2) = [0.1966, 0.1966, 0.0723, 0.5344]
    # mean over visual r = [0.1987, 0.2515, 0.1099, 0.4399]; mean(r) = 1/4 -> raters t2, t4.
    # (A softmax over the VISUAL axis averages to 1/3 for every text token: no one stands
    # out and every token would rate.)
    embeds = torch.tensor([[[9.0, 9.0],                                  # 0: a prefix token, never looked at
                            [1.0, 0.0], [0.0, 1.0], [1.0, 1.0],          # 1-3: visual
                            [1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [2.0, 0.0]]])   # 4-7: text
    raters = select_raters(embeds, torch.tensor([[1, 2, 3]]), torch.tensor([[4, 5, 6, 7]]))
    assert raters.tolist() == [[5, 7]]


def gravity_view(query_pos: int, key_pos: list[int]):
    """A LayerView stand-in for V2Scorer.correction: 1-D positions 0..query_pos, RoPE with
    head dim 128 and base 10,000 (LLaVA-1.5's)."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 128, 2).float() / 128))
    view = SimpleNamespace(positions=torch.arange(query_pos + 1).view(1, 1, -1),
                           rope=RopeSpec(inv_freq=inv_freq, mrope_section=None, head_dim=128))
    return view, torch.tensor([[query_pos]]), torch.tensor([key_pos])


def hand_gravity(distance: int) -> float:
    """R = (2 / sqrt(128)) * sum over k < 64 of cos(distance * 10000^(-2k/128)), in float64."""
    return 2 / math.sqrt(128) * sum(math.cos(distance * 10000 ** (-2 * k / 128)) for k in range(64))


def test_v2_gravity_guard_clamps_the_negative_rope_logits():
    # distances 10, 1707 and 4677 from the query at 5000: R = 7.5696, -0.0882, -1.7011
    view, query_index, visual_index = gravity_view(5000, [4990, 3293, 323])
    want = [hand_gravity(d) for d in (10, 1707, 4677)]
    assert want[0] > 7.5 and -0.1 < want[1] < -0.08 and want[2] < -1.7
    guarded = V2Scorer(gravity_guard=True, gravity_floor=1.0).correction(view)(query_index, visual_index)
    raw = V2Scorer(gravity_guard=False).correction(view)(query_index, visual_index)
    assert torch.allclose(raw[0, 0], torch.tensor(want), atol=2e-3)                   # the official formula
    assert torch.allclose(guarded[0, 0], torch.tensor([want[0], 1.0, 1.0]), atol=2e-3)  # max(R, floor)


def test_v2_guarded_scores_never_change_sign(monkeypatch):
    # Through the scorer: the kernel divides each visible probability by the correction.
    # With the guard every score is p / max(R, 1) > 0; without it the two far tokens go negative.
    view, query_index, visual_index = gravity_view(5000, [4990, 3293, 323])
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 1, 128), torch.randn(1, 2, 5001, 128)
    full = SimpleNamespace(q=q, k=k, query_index=query_index, visual_index=visual_index,
                           positions=view.positions, rope=view.rope, wants=(), key_mask=None)   # no pads
    probs = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(128), dim=-1)[0, :, 0, [4990, 3293, 323]]  # [2, 3]
    guard = torch.tensor([hand_gravity(10), 1.0, 1.0])
    guarded = V2Scorer(gravity_guard=True, head_fraction=1.0)(full)
    assert torch.allclose(guarded[0], (probs / guard).mean(0), rtol=1e-3) and bool((guarded > 0).all())
    unguarded = V2Scorer(gravity_guard=False, head_fraction=1.0)(full)
    assert bool((unguarded[0, 1:] < 0).all())


def test_evidence_recall_divides_by_the_evidence_tokens():
    # 4 evidence cells, 1 of them kept, 10 other tokens kept too: recall = 1/4, not 1/11
    evidence = torch.tensor([20, 21, 30, 31])
    kept = torch.tensor([20, *range(100, 110)])
    assert evidence_recall(evidence, kept) == 0.25
    assert evidence_recall(evidence, torch.tensor([20, 21, 30, 31, 5])) == 1.0
    assert evidence_recall(torch.tensor([], dtype=torch.long), kept) is None
