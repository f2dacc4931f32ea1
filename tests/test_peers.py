"""The peer methods (issue 18): each checked against its definition on small hand-made
tensors whose answer is worked out by hand in the comments, and through the pipeline
oracle (a pruned run equals a no-cache reference on the kept sequence).

Pre-LLM methods (layer=-1): the oracle is test_engine.hf_forward_on_kept (HF's language
model recomputed from scratch on text + kept visual tokens at their original positions).
In-LLM methods (layer=K): test_pipeline.reference_generate (whole sequence, no cache,
pruned keys hidden from layers > K).
"""
from __future__ import annotations

import math

import pytest
import numpy as np
import torch
from hydra import compose, initialize_config_dir

from sparsevlm_exp.contracts import PRE_LLM, LayerView, RopeSpec, Sample, per_image_top_k
from sparsevlm_exp.policies import FixedPolicy
from sparsevlm_exp.pruners import DropPruner
from sparsevlm_exp import scorers as S
from test_engine import CONF, hf_forward_on_kept, load_any, run  # noqa: F401  (load_any is a fixture)
from test_pipeline import reference_generate
from tiny_models import noise_image, sample

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "llava"]


def view_of(features=None, text=None, layer=PRE_LLM, **fields) -> LayerView:
    """A LayerView over hand-made tensors (batch 1)."""
    n = features.shape[1] if features is not None else fields["visual_index"].shape[1]
    base = dict(layer=layer, n_visual=n, visual_index=torch.arange(n)[None],
                visual_coords=torch.zeros(1, n, 3, dtype=torch.long), positions=torch.zeros(1, 1, n, dtype=torch.long),
                rope=RopeSpec(inv_freq=torch.ones(1), mrope_section=None, head_dim=2),
                generator=torch.Generator().manual_seed(0), visual_features=features, text_embeds=text)
    base.update(fields)
    return LayerView(**base)


def unit(deg: float, r: float = 1.0) -> list[float]:
    return [r * math.cos(math.radians(deg)), r * math.sin(math.radians(deg))]


# ----------------------------------------------------------------------------------------
# Hydra: each scorer's yaml sets its own stage
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, layer", [("divprune", -1), ("visionzip", -1), ("cdpruner", -1), ("vispruner", -1),
                                         ("dart", 1)])
def test_scorer_yaml_sets_its_stage(name, layer):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        assert compose("config", overrides=[f"scorer={name}"]).layer == layer
        assert compose("config", overrides=[f"scorer={name}"]).policy.layer == layer   # ${layer}
        # the command line still wins, and other scorers keep the default
        assert compose("config", overrides=[f"scorer={name}", "layer=3"]).layer == 3
        assert compose("config", overrides=["scorer=v15"]).layer == 2


def pre_llm_oracle(load_any, family, scorer, keep=0.4):   # noqa: F811
    """Pruned pre-LLM run == HF forward on the kept sequence; every LLM layer sees only the
    kept tokens. Returns (req, kept ORIGINAL indices [1, n], adapter). Global allocation:
    one selection over both images together (per-image runs: test_selecting_scorers_*)."""
    adapter = load_any(family)
    req = adapter.encode(sample(n_images=1 if family == "llava" else 2))
    n_visual, L = req.visual_index.shape[1], req.input_ids.shape[1]
    state, ours = run(adapter, req, scorer, FixedPolicy(layer=PRE_LLM, keep=keep, allocation="global"),
                      DropPruner())
    kept = state.events[0].kept_index
    n_kept = round(keep * n_visual)
    assert kept.shape[1] == n_kept < n_visual
    assert state.layer_counts == [n_kept] * adapter.n_layers
    assert state.seq_lens == [L - (n_visual - n_kept)] * adapter.n_layers
    assert torch.equal(ours, hf_forward_on_kept(adapter, req, kept))
    return req, kept, adapter


# ----------------------------------------------------------------------------------------
# DivPrune
# ----------------------------------------------------------------------------------------
def test_divprune_definition_six_points_in_the_plane():
    # Six 2-D points at angles 0, 5, 60, 125, 180, 270 degrees, with different lengths
    # (cosine distance ignores length): d = 1 - cos(angle between).
    #  first pick: nearest-other distance per point: 0->5: 1-cos5, 5->0: 1-cos5, 60->5: 1-cos55,
    #    125->60 or 180: 1-cos55, 180->125: 1-cos55, 270->180 or 0: 1-cos90 = 1  => 270 (#5)
    #  to {270}: 0: 1, 5: 1-cos95 = 1.087, 60: 1-cos150 = 1.866, 125: 1-cos145 = 1.819, 180: 1  => 60 (#2)
    #  to {270, 60}: 0: min(1, 1-cos60 = .5) = .5, 5: min(1.087, 1-cos55 = .426) = .426,
    #    125: min(1.819, 1-cos65 = .577) = .577, 180: min(1, 1-cos120 = 1.5) = 1  => 180 (#4)
    #  to {270, 60, 180}: 0: .5, 5: .426, 125: min(.577, 1-cos55 = .426) = .426  => 0 (#0)
    #  to {.., 0}: 5: 1-cos5 = .004, 125: .426  => 125 (#3); then 5 (#1)
    x = torch.tensor([unit(0, 2.0), unit(5, 0.5), unit(60), unit(125, 3.0), unit(180), unit(270, 0.2)])
    assert S.max_min_diverse(x, 6).tolist() == [5, 2, 4, 0, 3, 1]
    scorer = S.DivPruneScorer()
    view = view_of(x[None], text=torch.zeros(1, 1, 2))
    scores = scorer(view)
    assert scores[0, 5] == pytest.approx(1.0, abs=1e-6) and scores[0, 0] == pytest.approx(1 - math.cos(math.radians(5)), abs=1e-6)
    assert sorted(scorer.select(scores, view, 3)[0].tolist()) == [2, 4, 5]


@pytest.mark.parametrize("family", FAMILIES)
def test_divprune_pruned_run_equals_reference(load_any, family):   # noqa: F811
    req, kept, adapter = pre_llm_oracle(load_any, family, S.DivPruneScorer())
    # and the kept tokens are the greedy max-min set of the projected features
    features = adapter.embed(req)[0, req.visual_index[0]]
    expected = req.visual_index[0][S.max_min_diverse(features, kept.shape[1])].sort().values
    assert torch.equal(kept[0], expected)


def reference_max_min(dist: torch.Tensor, n: int) -> list[int]:
    """DivPrune's greedy written out plainly: at every step recompute each unpicked row's
    distance to the picked set from scratch; ties to the lower index."""
    N = dist.shape[0]
    others = [[float(dist[i, j]) for j in range(N) if j != i] for i in range(N)]
    nearest = [min(row) for row in others]
    picked = [max(range(N), key=lambda i: (nearest[i], -i))]
    while len(picked) < n:
        rest = [i for i in range(N) if i not in picked]
        picked.append(max(rest, key=lambda i: (min(float(dist[i, s]) for s in picked), -i)))
    return picked


@pytest.mark.parametrize("loop", ["host", "device"])
def test_max_min_diverse_fast_loops_equal_the_plain_greedy(loop):
    # Random features with planted exact duplicates (ties in distance, resolved to the
    # lower index); both loops (numpy on CPU tensors, device ops elsewhere - run here on
    # CPU) must pick exactly the plain greedy's sequence.
    from sparsevlm_exp.scorers.divprune import _farthest_first_device, cosine_distance
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        N, D = 12 + 5 * seed, 3 + seed
        x = torch.randn(N, D, generator=g)
        x[N - 1], x[N - 2] = x[0], 2 * x[1]                                           # duplicates (cos 1)
        dist = cosine_distance(x)
        for n in (1, 3, N // 2, N):
            expected = reference_max_min(dist, n)
            if loop == "host":
                got = S.max_min_diverse(x, n)
            else:
                first = torch.tensor([expected[0]])
                got = _farthest_first_device(dist, first, n)
            assert got.tolist() == expected, (seed, n)


# ----------------------------------------------------------------------------------------
# DART
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("loop", ["host", "device"])
def test_max_min_diverse_never_repeats_on_nan_features(loop):
    # A NaN feature row (a model whose projector overflowed) gives NaN distances; with
    # minimum, min(-inf, NaN) = NaN made a picked row pickable again: picks 0, 1, 0, 1, ...
    # and the engine stopped the run ("selected a visual token twice"). n distinct rows.
    from sparsevlm_exp.scorers.divprune import (_farthest_first_device, _farthest_first_host, cosine_distance,
                                                nearest_other_distance)
    x = torch.randn(9, 4, generator=torch.Generator().manual_seed(0))
    x[::2] = float("nan")
    dist = cosine_distance(x)
    greedy = _farthest_first_host if loop == "host" else _farthest_first_device
    for n in range(1, 10):
        picks = greedy(dist, torch.tensor([0]), n).tolist()
        assert len(set(picks)) == n, (n, picks)
    # finite distances: fmin is minimum, the picks are the plain greedy's (reference_max_min)
    y = torch.randn(12, 4, generator=torch.Generator().manual_seed(1))
    d = cosine_distance(y)
    first = nearest_other_distance(d).argmax(dim=0, keepdim=True)
    assert greedy(d, first, 8).tolist() == reference_max_min(d, 8)


def dart_view():
    """8 tokens: visual 0..5, text 6..7. Keys [1, 1, 8, 2] = (L1 norm, 0); normed hidden
    states = unit vectors at the given angles. Token 1 DUPLICATES token 0 (same direction)
    and has the second-largest key norm."""
    norms = [10, 9, 1, 2, 3, 1, 5, 1]
    angles = [0, 0, 30, 100, 170, 60, 270, 45]
    k = torch.tensor([[v, 0.0] for v in norms])[None, None]                           # [1, 1, 8, 2]
    hidden = torch.tensor([unit(a) for a in angles])[None]                            # [1, 8, 2]
    return view_of(layer=1, visual_index=torch.arange(6)[None], k=k, hidden=hidden,
                   query_index=torch.tensor([[6, 7]]), q=torch.zeros(1, 1, 2, 2),
                   positions=torch.zeros(1, 1, 8, dtype=torch.long))


def test_dart_definition_drops_the_planted_duplicate():
    # 1 image + 1 text pivot, keep 3: quota = 3 // 2 = 1 per pivot.
    #  image pivot: largest key L1 norm among 0..5 = token 0 (10); text pivot: 6 (5 > 1).
    #  pivot 0 (0 deg): least similar of {1..5} = token 4 (170 deg, cos -0.98).
    #  pivot 6 (270 deg): angles to {1, 2, 3, 5} = 90, 120, 170, 150 -> token 3.
    #  kept {0, 3, 4}: the duplicate 1 (cos 1 to pivot 0) is dropped although its key norm
    #  is the second largest (a norm top-3 would keep {0, 1, 4}).
    view = dart_view()
    scorer = S.DARTScorer(pivot_image=1, pivot_text=1)
    scores = scorer(view)
    assert sorted(scorer.select(scores, view, 3)[0].tolist()) == [0, 3, 4]
    assert scores[0, 1] == pytest.approx(-1.0) and scores[0, 4] == pytest.approx(-math.cos(math.radians(170)))
    # L2 pivots pick the same here; more pivots than room: the image pivots alone fill n=1
    assert S.DARTScorer(1, 1, norm="l2").select(scores, view, 3)[0].sort().values.tolist() == [0, 3, 4]
    assert S.DARTScorer(4, 4).select(scores, view, 1)[0].tolist() == [0]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_dart_pruned_run_equals_no_cache_reference(load_any, family):   # noqa: F811
    adapter = load_any(family)
    req = adapter.encode(sample(n_images=2))
    n_visual, layer = req.visual_index.shape[1], 1
    state, ours = run(adapter, req, S.DARTScorer(), FixedPolicy(layer=layer, keep=0.4, allocation="global"),
                      DropPruner())
    kept = state.events[0].kept_index
    assert kept.shape[1] == round(0.4 * n_visual)
    assert state.layer_counts == [n_visual] * layer + [kept.shape[1]] * (adapter.n_layers - layer)
    assert torch.equal(ours, reference_generate(adapter, req, kept, layer, "drop"))
    # the selection is DART's rule on layer 1's keys and final-normed output
    lm = adapter.language_model
    out = lm(inputs_embeds=adapter.embed(req), position_ids=adapter.positions(req), output_hidden_states=True)
    hidden = lm.norm(out.hidden_states[layer + 1])[0]
    keys = state.cache.layers[layer].keys[0]                                          # layer 1 kept the full cache
    keys = keys.transpose(0, 1).reshape(keys.shape[1], -1)
    local = S.dart_select(keys, hidden, req.visual_index[0], req.text_index[0], kept.shape[1])
    assert torch.equal(kept[0], req.visual_index[0][local].sort().values)


def test_dart_yaml_runs_inside_the_llm():
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("config", overrides=["scorer=dart"])
    assert cfg.layer == 1 and cfg.scorer.pivot_image == 4 and cfg.scorer.pivot_text == 4


# ----------------------------------------------------------------------------------------
# VisionZip
# ----------------------------------------------------------------------------------------
def test_visionzip_definition_dominant_plus_contextual():
    attention = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.3, 0.05])
    f = torch.tensor([unit(0), unit(90), unit(180), unit(250, 2.0), unit(260), unit(100, 3.0)])
    # keep 4 with half contextual: c = 2, dominant = top-2 attention = {0, 2};
    # remaining {1, 3, 4, 5}: step = 4 // 2 = 2 -> targets {1, 4}; 3 (250 deg) is closest
    # to 4 (260 deg), 5 (100 deg) to 1 (90 deg): contextual 1 = (f1 + f5) / 2, 4 = (f4 + f3) / 2
    kept, out = S.visionzip_select(attention, f, 4, contextual_fraction=0.5)
    assert kept.tolist() == [0, 1, 2, 4]
    expected = torch.stack([f[0], (f[1] + f[5]) / 2, f[2], (f[4] + f[3]) / 2])
    assert torch.allclose(out, expected)
    # the official 64 split: 54 dominant + 10 contextual
    assert round(64 * 0.15625) == 10
    # no contextual share: plain top-k by attention, features untouched
    kept, out = S.visionzip_select(attention, f, 3, contextual_fraction=0.0)
    assert kept.tolist() == [0, 2, 4] and torch.equal(out, f[[0, 2, 4]])


@torch.no_grad()
def hf_forward_on_merged(adapter, req, kept_index, kept_features, n_new=8):
    """Like test_engine.hf_forward_on_kept, with the kept visual tokens' embeddings
    replaced by `kept_features` [1, n, D] (VisionZip's contextual tokens)."""
    embeds, positions = adapter.embed(req), adapter.positions(req)
    embeds[0, kept_index[0]] = kept_features[0].to(embeds.dtype)
    keep = torch.ones(embeds.shape[1], dtype=torch.bool)
    keep[req.visual_index[0]] = False
    keep[kept_index[0]] = True
    hidden, pos = embeds[:, keep], positions[:, :, keep]
    next_pos, tokens = int(positions.max()) + 1, []
    for step in range(n_new):
        kwargs = ({"position_ids": pos} if adapter.position_dims == 3 else
                  {"position_ids": pos[0], "attention_mask": torch.ones(1, hidden.shape[1], dtype=torch.long)})
        out = adapter.language_model(inputs_embeds=hidden, use_cache=False, **kwargs)
        token = int(adapter.model.lm_head(out.last_hidden_state[:, -1]).argmax())
        tokens.append(token)
        if token in set(adapter.eos_token_ids):
            break
        hidden = torch.cat([hidden, adapter.embed_tokens(torch.tensor([[token]]))], dim=1)
        pos = torch.cat([pos, torch.full((pos.shape[0], 1, 1), next_pos + step, dtype=pos.dtype)], dim=2)
    return torch.tensor([tokens])


@pytest.mark.parametrize("family", FAMILIES)
def test_visionzip_pruned_run_equals_reference(load_any, family):   # noqa: F811
    adapter = load_any(family)
    req = adapter.encode(sample(n_images=1 if family == "llava" else 2))
    n_visual = req.visual_index.shape[1]
    state, ours = run(adapter, req, S.VisionZipScorer(contextual_fraction=0.25),
                      FixedPolicy(layer=PRE_LLM, keep=0.4, allocation="global"), DropPruner())
    kept = state.events[0].kept_index
    n = round(0.4 * n_visual)
    assert kept.shape[1] == n and state.layer_counts == [n] * adapter.n_layers
    embeds, attention = adapter.embed_and_vision_attention(req)
    local, features = S.visionzip_select(attention[0], embeds[0, req.visual_index[0]], n, 0.25)
    assert torch.equal(kept[0], req.visual_index[0][local])
    assert not torch.allclose(features, embeds[0, kept[0]])          # some tokens really are merged
    assert torch.equal(ours, hf_forward_on_merged(adapter, req, kept, features[None]))


# ----------------------------------------------------------------------------------------
# PyramidDrop
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_pdrop_scores_are_the_next_layers_last_token_attention(load_any, family):   # noqa: F811
    # Definition: a cut after layer K ranks by layer K+1's attention from the last prompt
    # token (averaged over heads) - in an unpruned eager forward that is exactly
    # output_attentions[K+1][:, :, -1, visual].
    adapter = load_any(family, "eager")
    req = adapter.encode(sample(n_images=2))
    layer = 0
    state, ours = run(adapter, req, S.PDropScorer(), FixedPolicy(layer=layer, keep=0.4), DropPruner())
    out = adapter.language_model(inputs_embeds=adapter.embed(req), position_ids=adapter.positions(req),
                                 output_attentions=True)
    expected = out.attentions[layer + 1][0, :, -1, req.visual_index[0]].mean(dim=0)
    assert torch.allclose(state.events[0].scores[0], expected, atol=1e-5)
    # and not layer K's own attention (what FastV reads)
    assert not torch.allclose(state.events[0].scores[0], out.attentions[layer][0, :, -1, req.visual_index[0]].mean(0),
                              atol=1e-5)
    kept = state.events[0].kept_index
    # each image's top-k (the policy's default per-image allocation)
    top = per_image_top_k(expected.view(1, -1), req.visual_coords[0, :, 0], kept.shape[1])[0]
    assert torch.equal(kept[0], req.visual_index[0][top])
    # pipeline oracle: layers > K see only the kept tokens
    assert torch.equal(ours, reference_generate(adapter, req, kept, layer, "drop"))


def test_pdrop_preset_composes():
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("config", overrides=["+experiment=pdrop"])
    assert cfg.scorer._target_.endswith("PDropScorer")
    assert list(cfg.policy.layers) == [7, 15, 23] and list(cfg.policy.keep) == [0.5, 0.25, 0.125]
    assert cfg.policy.reference_layers == 32 and cfg.pruner.positions == "original"
    # the 32-layer reference mapped to the embedded model's depth; the preset builds
    from hydra.utils import instantiate
    policy = instantiate(cfg.policy, _convert_="all")
    assert policy.layers(6) == [1, 3, 4] and policy.layers(32) == [7, 15, 23]


# ----------------------------------------------------------------------------------------
# CDPruner
# ----------------------------------------------------------------------------------------
def test_cdpruner_definition_3x3_dpp_map():
    # L = [[1, .9, .2], [.9, .95, .1], [.2, .1, .7]]. Pairs: det{0,1} = .95 - .81 = .14,
    # det{0,2} = .7 - .04 = .66, det{1,2} = .665 - .01 = .655: the MAP pair is {0, 2}.
    # Greedy: first the largest diagonal (0), then the largest gain L_ii - L_0i^2 / L_00:
    # 1: .95 - .81 = .14, 2: .7 - .04 = .66 -> 2; then 1. Singletons: MAP {0}.
    L = torch.tensor([[1.0, 0.9, 0.2], [0.9, 0.95, 0.1], [0.2, 0.1, 0.7]])
    assert S.dpp_greedy_map(L, 1).tolist() == [0]
    assert S.dpp_greedy_map(L, 2).tolist() == [0, 2]
    assert S.dpp_greedy_map(L, 3).tolist() == [0, 2, 1]
    best = max([(0, 1), (0, 2), (1, 2)], key=lambda p: float(torch.det(L[list(p)][:, list(p)])))
    assert best == (0, 2)


def test_cdpruner_conditional_kernel_drops_a_relevant_duplicate():
    # features f0 = (1, 0), f1 = (1, .1) (a near duplicate of f0), f2 = (0, 1); instruction
    # t = (-1, 0). Negated cosine to t: 1, .995, 0 -> normalised r = (1, .995, 0);
    # weights exp(.5 r) = (1.649, 1.645, 1). L00 = 2.718, L01 = 2.698, L11 = 2.705, L02 = 0,
    # L22 = 1. Greedy: 0 first; gains 1: 2.705 - 2.698^2 / 2.718 = .027, 2: 1 -> keeps {0, 2}:
    # the duplicate goes although it is the second most relevant token.
    f = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
    kernel, r = S.conditional_kernel(f, torch.tensor([[-1.0, 0.0]]))
    assert torch.allclose(r, torch.tensor([1.0, 0.99504, 0.0]), atol=1e-4)
    assert kernel[0, 0] == pytest.approx(math.e, rel=1e-5)
    scorer = S.CDPrunerScorer()
    view = view_of(f[None], text=torch.tensor([[[-1.0, 0.0]]]))
    assert sorted(scorer.select(scorer(view), view, 2)[0].tolist()) == [0, 2]


@pytest.mark.parametrize("family", FAMILIES)
def test_cdpruner_pruned_run_equals_reference(load_any, family):   # noqa: F811
    req, kept, adapter = pre_llm_oracle(load_any, family, S.CDPrunerScorer())
    embeds = adapter.embed(req)[0]
    kernel, _ = S.conditional_kernel(embeds[req.visual_index[0]], embeds[req.text_index[0]])
    expected = req.visual_index[0][S.dpp_greedy_map(kernel, kept.shape[1])].sort().values
    assert torch.equal(kept[0], expected)


def determinant_greedy(L: torch.Tensor, n: int) -> list[int]:
    """Greedy DPP MAP written out plainly: add the item that maximises det L_S (float64,
    from scratch at every step)."""
    L = L.double()
    picked = []
    for _ in range(n):
        rest = [i for i in range(L.shape[0]) if i not in picked]
        picked.append(max(rest, key=lambda i: float(torch.det(L[picked + [i]][:, picked + [i]]))))
    return picked


@pytest.mark.parametrize("loop", ["host", "device"])
def test_dpp_fast_loops_equal_the_determinant_greedy(loop):
    # Random conditional kernels (CDPruner's construction) of full rank: both loops (numpy
    # on CPU tensors, device ops elsewhere - run here on CPU) pick the determinant greedy's
    # sequence, i.e. the incremental Cholesky gains are the determinant ratios.
    from sparsevlm_exp.scorers.cdpruner import _dpp_greedy_device, _dpp_greedy_host
    greedy = _dpp_greedy_host if loop == "host" else _dpp_greedy_device
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        N, D = 10 + 2 * seed, 16
        kernel, _ = S.conditional_kernel(torch.randn(N, D, generator=g), torch.randn(3, D, generator=g))
        for n in (1, 4, N // 2):
            assert greedy(kernel, n).tolist() == determinant_greedy(kernel, n), (seed, n)
    assert S.dpp_greedy_map(kernel, 0).tolist() == []


def test_dpp_greedy_incremental_cholesky_equals_determinant_greedy():
    # The fast algorithm's gains must be the determinant ratios: compare with a greedy
    # that recomputes det(L_S+i) from scratch at every step (random 7 x 7 PSD kernel).
    x = torch.randn(7, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    L = x @ x.T + 0.1 * torch.eye(7, dtype=torch.float64)
    picked = []
    for _ in range(5):
        rest = [i for i in range(7) if i not in picked]
        picked.append(max(rest, key=lambda i: float(torch.det(L[picked + [i]][:, picked + [i]]))))
    assert S.dpp_greedy_map(L, 5).tolist() == picked


# ----------------------------------------------------------------------------------------
# VisPruner
# ----------------------------------------------------------------------------------------
def test_vispruner_definition_important_plus_deduplicated():
    # keep 4, important int(4 * .5) = 2: tokens 0, 1 by attention. The rest ranked by
    # attention: [4, 3, 2, 5], at 90, 5, 0, 100 degrees. One token dropped per round (step 1):
    #  round 1: A = [4, 2], B = [3, 5]; max cos to B: 4 -> cos10 = .985, 2 -> cos5 = .996
    #    -> drop 2; rest = [4] + [3, 5]
    #  round 2: A = [4, 5], B = [3]: 4 -> cos85 = .087, 5 -> cos95 = -.087 -> drop 4; rest [5, 3]
    # kept {0, 1, 3, 5}: one token of each near-duplicate pair (0/5 deg, 90/100 deg).
    attention = torch.tensor([0.9, 0.8, 0.1, 0.2, 0.3, 0.05])
    f = torch.tensor([unit(45), unit(135), unit(0), unit(5), unit(90), unit(100, 2.0)])
    assert S.vispruner_select(attention, f, 4, 0.5, step=1).tolist() == [0, 1, 3, 5]
    assert S.deduplicate(f, torch.tensor([4, 3, 2, 5]), 2, step=1).tolist() == [5, 3]
    # the official step 8 drops both members of A at once: A = [4, 2] -> rest [3, 5]
    assert S.deduplicate(f, torch.tensor([4, 3, 2, 5]), 2, step=8).tolist() == [3, 5]
    # all important: plain top-k of the attention; the important count truncates: int(3 * .5) = 1
    assert S.vispruner_select(attention, f, 3, 1.0).tolist() == [0, 1, 4]
    assert S.vispruner_select(attention, f, 3, 0.5, step=1)[:1].tolist() == [0]


@pytest.mark.parametrize("family", FAMILIES)
def test_vispruner_pruned_run_equals_reference(load_any, family):   # noqa: F811
    req, kept, adapter = pre_llm_oracle(load_any, family, S.VisPrunerScorer())
    embeds, attention = adapter.embed_and_vision_attention(req)
    local = S.vispruner_select(attention[0], embeds[0, req.visual_index[0]], kept.shape[1])
    assert torch.equal(kept[0], req.visual_index[0][local])


# ----------------------------------------------------------------------------------------
# CDPruner and VisPruner: the faster selections pick exactly what the plain ones picked
# ----------------------------------------------------------------------------------------
def plain_cdpruner(features: torch.Tensor, text: torch.Tensor, n: int, theta: float = 0.5,
                   negate: bool = True) -> list[int]:
    """CDPruner's selection written plainly (the reference): the full kernel (S w_i) w_j,
    then the incremental-Cholesky greedy, fp32, over the items whose gain is above 1e-4 of
    their own L_ii (below: rounding noise); once no item is (rank used up) the rest by L_ii,
    largest first (the module's stated rule; without it the picks repeated items).
    The same fp32 operations as the compiled loop, so that picks compare exactly, ties and
    rank exhaustion included: S from similarity.cosine_matrix (itself checked against
    x @ x.T), and c_j^T C summed term by term, t = 0, 1, ... (one rounding per product and
    per subtraction; a BLAS product rounds its sums in another order)."""
    import numpy as np

    from sparsevlm_exp.scorers.similarity import cosine_matrix
    x = torch.nn.functional.normalize(features.float(), dim=-1)
    t = torch.nn.functional.normalize(text.float(), dim=-1)
    r = (x @ t.T).mean(dim=-1)
    r = -r if negate else r
    r = (r - r.min()) / (r.max() - r.min() + 1e-6)
    weight = torch.exp(theta / (2 * (1 - theta)) * r) if theta != 1 else r
    K = cosine_matrix(x).mul_(weight[:, None]).mul_(weight[None, :]).numpy()
    n = min(n, K.shape[0])
    gain = np.diagonal(K).copy()
    floor = np.maximum(np.diagonal(K), 0) * 1e-4          # fp32, per item
    factors = np.zeros((n, K.shape[0]), dtype=K.dtype)
    picks = []
    for k in range(n):
        real = [i for i in range(K.shape[0]) if gain[i] > floor[i]]
        if not real:
            rest = [i for i in sorted(range(K.shape[0]), key=lambda i: -float(K[i, i])) if i not in picks]
            return picks + rest[:n - k]
        j = max(real, key=lambda i: (float(gain[i]), -i))
        picks.append(j)
        e = K[j].copy()
        for step in range(k):
            e -= factors[step, j] * factors[step]
        e /= np.sqrt(gain[j])
        factors[k] = e
        gain -= e * e
        gain[j] = -np.inf
    return picks


def random_features(seed: int, N: int, D: int, ties: bool) -> torch.Tensor:
    """[N, D] random features; with ties: every third row repeats an earlier one exactly and
    the rest sit on a coarse grid, so equal cosines (and equal gains) are common."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    if ties:
        x = torch.round(x * 2) / 2
        x[2::3] = x[: len(range(2, N, 3))].clone()
    return x


def greedy_path_slack(L: torch.Tensor, picks: list[int], floor: float) -> float:
    """Replay `picks` on the kernel L [N, N] in float64 (the incremental Cholesky written
    plainly) and return the largest amount by which a pick's gain fell short of the best
    gain available at its step: 0 for an exact greedy path. Steps whose best gain is at
    most `floor` are not counted: once the kernel's rank is used up every gain is rounding
    noise (the fp32 kernel's tiny eigenvalues), and so is the order of the later picks,
    in any implementation."""
    L = L.double()
    gain = torch.diagonal(L).clone()
    factors = []
    open_ = torch.ones(L.shape[0], dtype=torch.bool)
    slack = 0.0
    for j in picks:
        if float(gain[open_].max()) > floor:
            slack = max(slack, float(gain[open_].max() - gain[j]))
        e = L[j] - sum((c[j] * c for c in factors), torch.zeros_like(gain))
        e = e / gain[j].clamp(min=1e-12).sqrt()
        factors.append(e)
        gain = gain - e * e
        open_[j] = False
    return slack


def test_cdpruner_selection_is_the_greedy_map():
    # Random features with and without exact ties, N below and above D (rank-exhausted
    #    kernels), n up to N, three (theta, negate) settings. The CPU selection must
    #  - return n distinct items;
    #  - be a greedy path: every pick's float64 gain is the best available at its step, up
    #    to fp32 rounding (slack <= 1e-4 of the largest diagonal entry), until the kernel's
    #    rank is used up (best gain <= 1e-3 of it: noise from there on);
    #  - pick exactly the plain implementation's sequence, number for number (the same
    #    fp32 operations; ties and rank exhaustion included, where any changed rounding
    #    would show);
    #  - be what the scorer's select returns (the normalised features and relevance handed
    #    over by its __call__).
    cases = 0
    for seed, (N, D) in enumerate([(5, 4), (17, 16), (40, 8), (64, 64), (130, 16), (96, 48), (150, 200)]):
        for ties in (False, True):
            x = random_features(seed, N, D, ties)
            text = torch.randn(3, D, generator=torch.Generator().manual_seed(100 + seed))
            for theta, negate in ((0.5, True), (0.8, False), (1.0, True)):
                scorer = S.CDPrunerScorer(theta=theta, negate=negate)
                kernel, _ = S.conditional_kernel(x, text, theta, negate)
                scale = float(torch.diagonal(kernel).max())
                for n in sorted({1, 2, N // 4, N // 2, N - 1, N}):
                    got = S.conditional_dpp_map(x, text, n, theta, negate).tolist()
                    assert sorted(set(got)) == sorted(got) and len(got) == min(n, N)
                    assert greedy_path_slack(kernel, got, 1e-3 * scale) <= 1e-4 * scale, (seed, N, D, ties, theta, n)
                    assert got == plain_cdpruner(x, text, n, theta, negate), (seed, N, D, ties, theta, n)
                    view = view_of(x[None], text=text[None])
                    assert scorer.select(scorer(view), view, n)[0].tolist() == got
                    cases += 1
    assert cases > 100


@pytest.mark.parametrize("loop", ["host", "weighted", "device"])
def test_dpp_rank_used_up_fills_by_relevance_without_repeats(loop):
    # Rows b0 = (2, 0), b1 = (0, 1.5), b2 = (1.2, 0), b3 = (1, 1): L = B B^T has rank 2,
    # L_ii = 4, 2.25, 1.44, 2. Greedy: 0 (4); gains then 1: 2.25, 2: 1.44 - 2.4^2 / 4 = 0,
    # 3: 2 - 1 = 1 -> 1; then 2: 0, 3: 1 - 1 = 0: rank used up, the rest by L_ii: 3 (2.0),
    # then 2 (1.44). The plain algorithm divided by sqrt(0) here and returned repeats.
    from sparsevlm_exp.scorers.cdpruner import _dpp_greedy_device, _dpp_greedy_host

    def greedy(S, w, n):    # "weighted": the CPU path of conditional_dpp_map (kernel = w_i S_ij w_j)
        if loop == "weighted":
            return _dpp_greedy_host(S.clone(), n, w)
        return (_dpp_greedy_host if loop == "host" else _dpp_greedy_device)(S * w[:, None] * w[None, :], n)

    B = torch.tensor([[2.0, 0.0], [0.0, 1.5], [1.2, 0.0], [1.0, 1.0]])
    assert greedy(B @ B.T, torch.ones(4), 4).tolist() == [0, 1, 3, 2]
    # and many more picks than the rank: n distinct items, every loop
    x = torch.randn(60, 5, generator=torch.Generator().manual_seed(0))
    w = torch.rand(60, generator=torch.Generator().manual_seed(1)) + 0.5
    kernel = (x @ x.T) * w[:, None] * w[None, :]
    for n in (5, 6, 30, 60):
        picks = greedy(x @ x.T, w, n).tolist()
        assert len(set(picks)) == n, (loop, n)
        tail = picks[6:]       # rank 5 (+1 for rounding noise at most): the rest by L_ii
        assert [float(kernel[i, i]) for i in tail] == sorted((float(kernel[i, i]) for i in tail), reverse=True)


@pytest.mark.parametrize("loop", ["host", "weighted", "device"])
def test_dpp_small_items_still_add_volume_after_a_large_one(loop):
    # "Rank used up" is judged per item: a gain is rounding noise when it is at most 1e-4 of
    # the item's OWN L_ii, not of the largest one (a stop at 1e-5 max L_ii ended the greedy
    # on full-rank kernels whose diagonal spans more than 1e5: CDPruner at theta >= ~0.93).
    # Rows b0 = (1, 0, 0), b1 = 2e-3 (0.995, 0.0998, 0) (|b1| = 2e-3, sin^2 = 0.00996),
    # b2 = (0, 0, 1e-3): L is diagonal-dominant with L_ii = 1, 4e-6, 1e-6, full rank 3.
    # Greedy: 0 (gain 1); then 1: 4e-6 * 0.00996 = 3.98e-8, 2: 1e-6 -> 2; then 1.
    # The max-L_ii stop saw 1e-6 <= 1e-5 after the first pick and filled by L_ii: 0, 1, 2.
    # Per item, 1e-4: item 1's 3.98e-8 is 0.00996 of its own 4e-6, item 2's all of its own.
    from sparsevlm_exp.scorers.cdpruner import _dpp_greedy_device, _dpp_greedy_host
    B = torch.tensor([[1.0, 0.0, 0.0], [2e-3 * 0.995, 2e-3 * 0.0998, 0.0], [0.0, 0.0, 1e-3]])
    if loop == "weighted":   # the same kernel as w_i S_ij w_j: S the cosines, w the norms
        w = B.norm(dim=1)
        u = B / w[:, None]
        got = _dpp_greedy_host(u @ u.T, 3, w)
    else:
        got = (_dpp_greedy_host if loop == "host" else _dpp_greedy_device)(B @ B.T, 3)
    assert got.tolist() == [0, 2, 1]


def test_cdpruner_high_theta_is_still_the_greedy_map():
    # theta 0.95: w = exp(9.5 r), so L_ii spans e^19 ~ 1.8e8. With 48 tokens of width 128
    # the kernel has full rank, so every pick must be the float64 greedy's (no noise to
    # fill by relevance); the max-L_ii stop left it after ~35 picks.
    def greedy64(L, n):
        L = L.double()
        gain, factors, picks = torch.diagonal(L).clone(), [], []
        for _ in range(n):
            j = int(gain.argmax())
            e = L[j] - sum((c[j] * c for c in factors), torch.zeros_like(gain))
            e = e / gain[j].sqrt()
            factors.append(e)
            gain = gain - e * e
            gain[j] = -float("inf")
            picks.append(j)
        return picks
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        x, text = torch.randn(48, 128, generator=g), torch.randn(3, 128, generator=g)
        kernel, _ = S.conditional_kernel(x, text, 0.95)
        got = S.conditional_dpp_map(x, text, 47, 0.95).tolist()
        assert got == greedy64(kernel, 47), seed
        assert got == plain_cdpruner(x, text, 47, 0.95)
        assert S.dpp_greedy_map(kernel, 47).tolist() == got


def test_cdpruner_refuses_a_theta_whose_kernel_overflows():
    # theta 0.995: L_ii = exp(199 r_i) is inf in fp32 for the most relevant tokens, and the
    # selection came back as tokens 0..n-1 (every quality inf, ties to the lower index).
    x = torch.randn(48, 128, generator=torch.Generator().manual_seed(0))
    text = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    kernel, _ = S.conditional_kernel(x, text, 0.98)
    assert bool(torch.isfinite(kernel).all())                     # the largest allowed region fits
    for theta in (0.99, 0.995, 0.9999):
        with pytest.raises(ValueError, match=r"scorer.theta=.* is not allowed"):
            S.CDPrunerScorer(theta=theta)
    for theta in (0.0, 0.5, 0.98, 1.0, 1):
        S.CDPrunerScorer(theta=theta)


def plain_deduplicate(features: torch.Tensor, ranked: torch.LongTensor, n: int, step: int = 8) -> torch.LongTensor:
    """VisPruner's de-duplication as it was written before the speed work (the reference):
    every round gathers the |A| x |B| block of the cosine matrix and takes its row maxima.
    S from similarity.cosine_matrix (itself checked against x @ x.T), as in plain_cdpruner:
    unit @ unit.T may differ in the last bit of some entries, which reorders near ties
    (duplicated rows of a wide feature) whatever the rounds do."""
    from sparsevlm_exp.scorers.similarity import cosine_matrix
    unit = torch.nn.functional.normalize(features[ranked].float(), dim=-1)
    cosine = cosine_matrix(unit)
    rest = torch.arange(ranked.shape[0])
    while rest.shape[0] > n:
        a, b = rest[0::2], rest[1::2]
        r = min(step, rest.shape[0] - n, a.shape[0])
        similarity = cosine.index_select(0, a).index_select(1, b).amax(dim=1)
        rest = torch.cat([a[similarity.argsort(descending=True, stable=True)[r:]], b])
    return ranked[rest]


def test_cosine_matrix_is_the_product_of_unit_rows():
    # The shared cosine matrix computes S[h:, :h] as the transpose of S[:h, h:]: every
    # entry is the dot product of its two rows (float64 reference, fp32 rounding), that
    # block is exactly the mirror of S[:h, h:]; batches, odd N, N = 1.
    from sparsevlm_exp.scorers.similarity import cosine_matrix
    for seed, shape in enumerate([(1, 4), (2, 3), (7, 5), (130, 16), (257, 64), (3, 33, 8)]):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
        unit = torch.nn.functional.normalize(x, dim=-1)
        got = cosine_matrix(unit)
        exact = unit.double() @ unit.double().mT
        assert got.shape == exact.shape and got.dtype == torch.float32
        assert float((got.double() - exact).abs().max()) < 1e-6, shape
        h = shape[-2] // 2
        assert torch.equal(got[..., h:, :h], got[..., :h, h:].mT), shape
    # the 2 x 2 hand-worked case: rows (1, 0) and (0.6, 0.8) -> cos 0.6
    got = cosine_matrix(torch.tensor([[1.0, 0.0], [0.6, 0.8]]))
    assert torch.allclose(got, torch.tensor([[1.0, 0.6], [0.6, 1.0]]))


def test_cosine_matrix_is_differentiable_like_the_plain_product():
    # A public function standing for unit @ unit.mT: with autograd on it must give that
    # product's gradient (torch.mm(out=) refuses an input that requires grad), float64
    # gradcheck; 2-D odd and even N, batched.
    from sparsevlm_exp.scorers.similarity import cosine_matrix
    for seed, shape in enumerate([(5, 3), (4, 3), (2, 3, 4)]):
        u = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        u.requires_grad_()
        assert torch.autograd.gradcheck(cosine_matrix, (u,)), shape
        upstream = torch.randn(*shape[:-2], shape[-2], shape[-2], dtype=torch.float64)
        got, = torch.autograd.grad(cosine_matrix(u), u, upstream)
        expected, = torch.autograd.grad(u @ u.mT, u, upstream)
        assert torch.allclose(got, expected), shape


def test_compiled_loops_run_their_own_python_code():
    # The numba-compiled loops must compute exactly what their Python source says (checked
    # by running that source, `.py_func`, in Python on the same inputs): the greedy's fp32
    # arithmetic bit for bit (no fused multiply-add, no reordered sums), the rounds' order.
    from sparsevlm_exp.scorers import cdpruner as C, vispruner as V
    from sparsevlm_exp.scorers.similarity import cosine_matrix
    for seed, (N, D, n) in enumerate([(12, 3, 12), (40, 8, 20), (64, 64, 30)]):
        for ties in (False, True):
            x = random_features(seed, N, D, ties)
            unit = torch.nn.functional.normalize(x, dim=-1)
            K = cosine_matrix(unit).numpy()
            w = (torch.rand(N, generator=torch.Generator().manual_seed(seed)) + 0.5).numpy()
            quality = (np.diagonal(K) * w) * w
            floor = np.maximum(quality, 0) * C.EXHAUSTED
            compiled, compiled_factors = C._greedy_steps(K, w, quality, floor, n)
            assert type(C._greedy_steps.dispatcher).__module__.startswith("numba")   # really compiled
            python, python_factors = C._greedy_steps.py_func(K, w, quality, floor, n)
            assert compiled.tolist() == python.tolist(), (seed, ties)
            assert np.array_equal(compiled_factors, python_factors), (seed, ties)   # every bit of every e
            assert len(compiled) >= min(n, D), (seed, ties)          # the rank rule stops only past the rank
            lists = torch.topk(cosine_matrix(unit).fill_diagonal_(-float("inf")), 3, dim=1)    # as _rounds_host
            values, columns = lists.values.numpy(), lists.indices.numpy()
            for keep in (1, N // 4, N // 2):
                got = V._rounds_steps(K, values, columns, keep, 3)
                assert type(V._rounds_steps.dispatcher).__module__.startswith("numba")
                assert got.tolist() == V._rounds_steps.py_func(K, values, columns, keep, 3).tolist(), (seed, keep)


def test_compiled_without_numba_or_without_a_cache_directory(monkeypatch):
    # numba missing: one ImportError line naming the function and the pip command (at the
    # first call, not at import). No writable cache directory (numba raises RuntimeError when
    # caching is asked for): compiled per process instead of failing.
    import sys

    import numba

    from sparsevlm_exp.scorers.similarity import compiled

    def twice(x):
        return 2 * x

    monkeypatch.setitem(sys.modules, "numba", None)
    with pytest.raises(ImportError, match=r"twice runs compiled with numba.*pip install 'numba>=0.60'"):
        compiled(twice)(3)
    monkeypatch.setitem(sys.modules, "numba", numba)
    real = numba.njit

    def no_cache(*args, **kwargs):
        if kwargs.get("cache"):
            raise RuntimeError("cannot cache function 'twice': no locator available")
        return real(*args, **kwargs)

    monkeypatch.setattr(numba, "njit", no_cache)
    with pytest.warns(UserWarning, match=r"twice: numba cannot cache .* NUMBA_CACHE_DIR"):
        assert compiled(twice)(3) == 6


@pytest.mark.parametrize("step", [0, -1, 2.0, True])
def test_vispruner_deduplication_refuses_a_step_below_one(step):
    # step 0 never shrinks `rest` (r = 0) and a negative step grows it: the compiled rounds
    # would spin forever without returning to Python (Ctrl-C unheard). One clear error.
    from sparsevlm_exp.scorers import vispruner as V
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"step=.* is not allowed: an int >= 1"):
        V.deduplicate(x, torch.arange(10), 3, step)
    with pytest.raises(ValueError, match=r"step=.* is not allowed: an int >= 1"):
        V.vispruner_select(torch.rand(10), x, 6, 0.5, step)


def test_vispruner_deduplication_of_few_rows_keeps_them_all():
    # R <= n: no round runs and every ranked row comes back in ranked order, R = 0 included
    # (the neighbour lists are then empty, not of width R - 1 = -1).
    from sparsevlm_exp.scorers import vispruner as V
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    for ranked in (torch.arange(0), torch.tensor([3]), torch.tensor([4, 0, 2])):
        for n in (1, 3, 7):
            expected = plain_deduplicate(x, ranked, n)
            assert torch.equal(V.deduplicate(x, ranked, n), expected), (ranked, n)
            if ranked.shape[0] <= n:
                assert torch.equal(expected, ranked)


@pytest.mark.parametrize("width", [1, 3, 10, 12])
def test_vispruner_deduplication_equals_the_plain_rounds(width, monkeypatch):
    # Random features with and without exact ties (repeated rows, grid values: equal
    # cosines, so equal s_a whose order the stable sort decides), several R, n and steps:
    # the neighbour-list rounds keep exactly the plain rounds' tokens in the same order.
    # Short lists (width 1, 3) send most rows through the fallback that reads B's entries.
    from sparsevlm_exp.scorers import vispruner as V
    monkeypatch.setattr(V._rounds_host, "__defaults__", (width,))
    for seed, (N, D) in enumerate([(6, 2), (33, 4), (100, 8), (257, 32), (600, 64)]):
        for ties in (False, True):
            x = random_features(seed, N, D, ties)
            attention = torch.rand(N, generator=torch.Generator().manual_seed(seed))
            ranked = attention.argsort(descending=True, stable=True)
            for n in sorted({1, 2, N // 8, N // 4, N // 2, N - 1} - {0}):
                for step in (1, 8):
                    expected = plain_deduplicate(x, ranked, n, step)
                    assert torch.equal(S.deduplicate(x, ranked, n, step), expected), (seed, N, ties, n, step)
            n = N // 4
            important = int(n * 0.5)
            expected = torch.cat([ranked[:important], plain_deduplicate(x, ranked[important:], n - important)])
            assert torch.equal(S.vispruner_select(attention, x, n), expected.sort().values)
    # Near ties from arithmetic: rows repeated at other scales, 358 wide (after normalising,
    # cosines that are equal but for their last bits; ~1 case in 3 reorders if the reference
    # computes S another way).
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        base = torch.randn(6, 358, generator=g)
        x = base[torch.randint(0, 6, (19,), generator=g)] * (torch.rand(19, 1, generator=g) + 0.5)
        ranked = torch.randperm(19, generator=g)
        for n in (4, 9):
            assert torch.equal(S.deduplicate(x, ranked, n), plain_deduplicate(x, ranked, n)), (seed, n)


def test_vispruner_rounds_order_signed_zeros_and_ties_as_the_plain_rounds():
    # The compiled rounds order s_a by integer keys made from its float bits; -0.0 and +0.0
    # compare equal as floats (their tie goes to A's order), so the keys must not split them.
    # Hand-made symmetric matrices of a few values, signed zeros among them: many exact ties.
    from sparsevlm_exp.scorers import vispruner as V
    g = torch.Generator().manual_seed(0)
    palette = torch.tensor([0.0, -0.0, 0.5, -0.5, 0.25, -0.0, 0.0])
    for R in (5, 16, 41):
        for trial in range(6):
            values = palette[torch.randint(0, len(palette), (R, R), generator=g)]
            above = torch.ones(R, R, dtype=torch.bool).triu(1)
            matrix = torch.where(above, values, values.T).fill_diagonal_(1.0)   # symmetric, signs kept
            assert (torch.signbit(matrix) & (matrix == 0)).any()
            for n in (1, R // 3, R - 1):
                for width in (1, 3, 10):
                    got = V._rounds_host(matrix, n, 2, width)
                    assert torch.equal(got, V._rounds_device(matrix, n, 2)), (R, trial, n, width)
    assert (torch.tensor([-0.0]).view(torch.int32) != torch.tensor([0.0]).view(torch.int32)).all()


@pytest.mark.parametrize("step", [2 ** 63, 10 ** 30, np.uint64(3)])
def test_vispruner_host_rounds_take_any_step_the_device_rounds_take(step):
    # deduplicate accepts any integral step >= 1 (numbers.Integral), and so does the plain
    # reference; the compiled rounds must not fail where the device rounds run: a Python int
    # past int64 (numba: OverflowError) or a numpy uint64 (numba: float r, TypingError).
    from sparsevlm_exp.scorers import vispruner as V
    x = random_features(3, 40, 8, ties=True)
    ranked = torch.randperm(40, generator=torch.Generator().manual_seed(3))
    for n in (1, 7, 39):
        assert torch.equal(V.deduplicate(x, ranked, n, step), plain_deduplicate(x, ranked, n, int(step))), n
    assert torch.equal(V.deduplicate(x, ranked, 2 ** 64, step), ranked)              # n past int64: all kept


# ----------------------------------------------------------------------------------------
# Per-image allocation for the selecting scorers (policy.allocation, the default per_image)
# ----------------------------------------------------------------------------------------
# Three images of different sizes: token grids 3x4, 2x2 and 4x6 on the tiny Qwen models
# (14 px patches, 2x2 merge) -> 12, 4 and 24 visual tokens, 40 in all.
SIZES = [(112, 84), (56, 56), (168, 112)]
# Hand-worked shares: keep 0.5 -> 20 slots = 6 + 2 + 12 (half of each image);
# keep 7 -> quotas 7 * (12, 4, 24) / 40 = 2.1, 0.7, 4.2 -> floors 2, 0, 4 (6), the one
# slot left goes to the largest remainder (0.7, image 1) -> 2, 1, 4.
SHARES = {0.5: [6, 2, 12], 7: [2, 1, 4]}


def three_images() -> Sample:
    return Sample(id="s3", question="what colour is the circle", answers=["red"],
                  images=[noise_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES)])


def reference_pre_llm(name, features, attention, text, k):
    """Local indices of the k tokens the method keeps out of ONE image's tokens
    (features [N_j, D], attention [N_j]), by its module-level definition."""
    if name == "divprune":
        return S.max_min_diverse(features, k)
    if name == "cdpruner":
        return S.dpp_greedy_map(S.conditional_kernel(features, text)[0], k)
    if name == "vispruner":
        return S.vispruner_select(attention, features, k)
    return S.visionzip_select(attention, features, k)[0]


SELECTING = {"divprune": S.DivPruneScorer, "cdpruner": S.CDPrunerScorer, "vispruner": S.VisPrunerScorer,
             "visionzip": S.VisionZipScorer}


@pytest.mark.parametrize("keep", [0.5, 7])
@pytest.mark.parametrize("name", list(SELECTING))
def test_selecting_scorers_select_per_image(load_any, name, keep):   # noqa: F811
    adapter = load_any("qwen2_5_vl")
    req = adapter.encode(three_images())
    image = req.visual_coords[0, :, 0]
    assert torch.bincount(image).tolist() == [12, 4, 24]
    state, ours = run(adapter, req, SELECTING[name](), FixedPolicy(layer=PRE_LLM, keep=keep), DropPruner())
    kept = state.events[0].kept_index[0]
    # each image keeps exactly its share ...
    kept_image = image[torch.searchsorted(req.visual_index[0], kept)]
    assert torch.bincount(kept_image, minlength=3).tolist() == SHARES[keep]
    # ... chosen by the method run on that image's tokens alone
    embeds, attention = adapter.embed_and_vision_attention(req)
    features, text = embeds[0, req.visual_index[0]], embeds[0, req.text_index[0]]
    expected, merged = [], []
    for j, k in enumerate(SHARES[keep]):
        members = (image == j).nonzero().view(-1)
        local = reference_pre_llm(name, features[members], attention[0, members], text, k)
        expected.append(req.visual_index[0][members[local]].sort().values)
        if name == "visionzip":
            merged.append(S.visionzip_select(attention[0, members], features[members], k)[1])
    assert torch.equal(kept, torch.cat(expected))
    assert state.layer_counts == [sum(SHARES[keep])] * adapter.n_layers
    # and the pruned run is the model on that kept (VisionZip: merged) sequence
    if name == "visionzip":
        assert torch.equal(ours, hf_forward_on_merged(adapter, req, kept[None], torch.cat(merged)[None]))
    else:
        assert torch.equal(ours, hf_forward_on_kept(adapter, req, kept[None]))
    # global allocation: one selection over all 40 tokens, as before per-image selection existed
    state, _ = run(adapter, req, SELECTING[name](), FixedPolicy(layer=PRE_LLM, keep=keep, allocation="global"),
                   DropPruner())
    n = sum(SHARES[keep])
    local = reference_pre_llm(name, features, attention[0], text, n)
    assert torch.equal(state.events[0].kept_index[0], req.visual_index[0][local].sort().values)


def test_dart_selects_per_image(load_any):   # noqa: F811
    adapter = load_any("qwen2_vl")
    req = adapter.encode(three_images())
    image, layer = req.visual_coords[0, :, 0], 1
    state, ours = run(adapter, req, S.DARTScorer(pivot_image=2, pivot_text=2), FixedPolicy(layer=layer, keep=0.5),
                      DropPruner())
    kept = state.events[0].kept_index[0]
    assert torch.bincount(image[torch.searchsorted(req.visual_index[0], kept)], minlength=3).tolist() == [6, 2, 12]
    # each image: DART's rule over its own tokens (its own image pivots; the text pivots shared)
    lm = adapter.language_model
    out = lm(inputs_embeds=adapter.embed(req), position_ids=adapter.positions(req), output_hidden_states=True)
    hidden = lm.norm(out.hidden_states[layer + 1])[0]
    keys = state.cache.layers[layer].keys[0]
    keys = keys.transpose(0, 1).reshape(keys.shape[1], -1)
    expected = []
    for j, k in enumerate([6, 2, 12]):
        visual = req.visual_index[0][image == j]
        expected.append(visual[S.dart_select(keys, hidden, visual, req.text_index[0], k, 2, 2)].sort().values)
    assert torch.equal(kept, torch.cat(expected))
    assert torch.equal(ours, reference_generate(adapter, req, kept[None], layer, "drop"))


def test_ablate_scorer_runs_each_method_at_its_own_stage():
    stages = {"divprune": -1, "visionzip": -1, "cdpruner": -1, "vispruner": -1, "dart": 1, "pdrop": 2, "v15": 2}
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        for name, layer in stages.items():
            cfg = compose("config", overrides=["+experiment=ablate_scorer", f"scorer={name}", "keep=0.25"])
            assert cfg.layer == layer and cfg.policy.layer == layer, name


def test_bench_uses_the_scorers_own_stage():
    from sparsevlm_exp.bench import check_layers, prefill_bound, scorer_layers
    assert scorer_layers("divprune") == [-1] and scorer_layers("dart") == [1] and scorer_layers("v15") == [2]
    check_layers([-1, 0], 4)                                 # -1 (before the LLM) is a valid bench layer
    assert prefill_bound(12, -1, 0.25) == pytest.approx(4.0)  # every layer sees a quarter of the tokens
