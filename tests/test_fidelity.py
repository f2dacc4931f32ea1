"""SparseVLM fidelity: schedules, the rank-adaptive v1 count, DPC-kNN recycling, the
v1 / v1.5 / v2 presets, and the paper's token accounting.

Oracles: hand-made point clouds whose clusters are obvious, matrices of known rank,
the paper's own numbers (192.03 for the 192 schedule), HF generate (nothing pruned),
and a no-cache reference that builds the recycled sequence by hand.
"""
from __future__ import annotations

import math
from pathlib import Path
from statistics import mean
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from sparsevlm_exp.decoding import GreedyDecoder
from sparsevlm_exp.errors import ConfigError
from sparsevlm_exp.kernels import text_visual_attention_ref
from sparsevlm_exp.contracts import LoopState
from sparsevlm_exp.models.qwen2_vl import Qwen2VLAdapter
from sparsevlm_exp.policies import AdaptivePolicy, FixedPolicy, SchedulePolicy, rank_keep_count
from sparsevlm_exp.scorers import rater_visual_attention
from sparsevlm_exp.pruners import (DropPruner, RecyclePruner, cluster_means, dpc_knn_clusters,
                                   recycle_counts)
from sparsevlm_exp.scorers import RandomScorer, V15Scorer
from oracles import hf_generate
from tiny_models import sample, save_tiny_qwen

CONF = Path(__file__).resolve().parent.parent / "conf"
MAX_NEW = 6


def run(adapter, smp, scorer, policy, pruner, max_new=MAX_NEW):
    req = adapter.encode(smp)
    state = adapter.prefill(req, scorer=scorer, policy=policy, pruner=pruner,
                            generator=torch.Generator().manual_seed(0))
    return req, state, GreedyDecoder(max_new).generate(adapter, state)


# ----------------------------------------------------------------------------------------
# Token accounting: the paper's "192"
# ----------------------------------------------------------------------------------------
def test_recycled_counts_match_the_papers_token_counts():
    # 576 -> keep 300: 276 deleted, floor(0.3*276)+1 = 83 taken, floor(83/10)+1 = 9 clusters
    assert recycle_counts(276) == (83, 9)
    # 309 alive (recycled included) -> keep 200: 109 deleted -> 33 taken -> 4 clusters
    assert recycle_counts(109) == (33, 4)
    # 204 -> keep 110: 94 deleted -> 29 taken -> 3 clusters
    assert recycle_counts(94) == (29, 3)
    assert recycle_counts(0) == (0, 0) and recycle_counts(1) == (1, 1)


def simulated_layer_counts(policy: SchedulePolicy, n_visual: int, n_layers: int) -> list[int]:
    """Visual tokens alive after each layer, walking the schedule with recycling's counts."""
    alive, counts = n_visual, []
    for layer in range(n_layers):
        if layer in policy.layers(n_layers):
            kept = policy.n_keep(layer, n_visual=n_visual, scores=torch.zeros(1, alive), view=None)
            alive = kept + recycle_counts(alive - kept)[1]
        counts.append(alive)
    return counts


def test_equivalent_tokens_of_the_official_192_schedule_is_192_03():
    policy = SchedulePolicy([2, 6, 15], [300, 200, 110], reference_count=576)
    counts = simulated_layer_counts(policy, n_visual=576, n_layers=32)
    assert counts == [576] * 2 + [309] * 4 + [204] * 9 + [113] * 17
    # the runner's equivalent_tokens is mean(layer_counts)
    assert mean(counts) == (2 * 576 + 4 * 309 + 9 * 204 + 17 * 113) / 32 == 192.03125


def test_32_layer_tiny_model_runs_the_192_schedule_with_recycling(tmp_path):
    """The real loop on a 32-layer (hidden 64) model and a 672x672 image = 576 visual
    tokens: exactly the paper's alive counts, 192.03 equivalent tokens."""
    adapter = Qwen2VLAdapter.load(pretrained=save_tiny_qwen("qwen2_vl", tmp_path, n_layers=32), dtype="float32",
                                  device="cpu", attn_implementation="sdpa")
    policy = SchedulePolicy([2, 6, 15], [300, 200, 110], reference_count=576)
    req, state, _ = run(adapter, sample(w=672, h=672), V15Scorer(), policy, RecyclePruner(), max_new=2)
    assert state.n_visual == 576
    assert state.layer_counts == [576] * 2 + [309] * 4 + [204] * 9 + [113] * 17
    assert round(mean(state.layer_counts), 2) == 192.03
    assert [e.n_recycled for e in state.events] == [9, 4, 3]
    # kept_index lists original tokens only (recycled ones that survive are not in it)
    assert state.events[0].kept_index.shape[1] == 300
    assert all(e.kept_index.shape[1] <= k for e, k in zip(state.events, [300, 200, 110]))


# ----------------------------------------------------------------------------------------
# DPC-kNN clustering and the recycle pruner on hand-made states
# ----------------------------------------------------------------------------------------
def blobs(sizes, centres, noise=0.01, seed=0):
    g = torch.Generator().manual_seed(seed)
    points = [torch.tensor(c, dtype=torch.float32) + noise * torch.randn(n, len(c), generator=g)
              for n, c in zip(sizes, centres)]
    return points


def assert_same_rows(actual: torch.Tensor, expected: torch.Tensor):
    """Rows equal up to order (each actual row matched to its nearest expected row, one to one)."""
    match = torch.cdist(actual, expected).argmin(dim=1)
    assert sorted(match.tolist()) == list(range(expected.shape[0]))
    torch.testing.assert_close(actual, expected[match], rtol=0, atol=1e-5)


def test_dpc_knn_merges_each_obvious_cluster_to_its_mean():
    points = blobs([5, 4, 6], [(10, 0, 0, 0), (0, 10, 0, 0), (0, 0, -10, 3)])
    x = torch.cat(points)[torch.randperm(15, generator=torch.Generator().manual_seed(1))]
    assignment, centres = dpc_knn_clusters(x, 3)
    assert len(set(assignment.tolist())) == 3
    assert torch.equal(assignment[centres], torch.arange(3))          # each centre is in its own cluster
    merged = cluster_means(x, assignment, 3)
    assert_same_rows(merged, torch.stack([p.mean(dim=0) for p in points]))


def test_dpc_knn_density_and_centres_by_hand():
    # 1-D points (C=1, so d = |x_i - x_j|): {0, 1, 2} and {10, 11}; k = 2 nearest (self included).
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0]])
    # density: exp(-mean(0^2, 1^2)) = e^-0.5 for every token -> ties broken by index, so
    # token 0 is the densest (delta = max d = 11); delta(1) = 1, delta(2) = 1 (to 1),
    # delta(10) = 8 (to 2), delta(11) = 1 (to 10) -> centres: token 0, then token 3 (x=10).
    assignment, centres = dpc_knn_clusters(x, 2)
    assert centres.tolist() == [0, 3] and assignment.tolist() == [0, 0, 0, 1, 1]
    # with clear densities: {0, 0.1, 0.2} is denser than {10, 13}
    x = torch.tensor([[0.0], [0.1], [0.2], [10.0], [13.0]])
    assignment, centres = dpc_knn_clusters(x, 2)
    assert assignment.tolist() in ([0, 0, 0, 1, 1], [1, 1, 1, 0, 0])
    assert_same_rows(cluster_means(x, assignment, 2), torch.tensor([[0.1], [11.5]]))


def synthetic_state(n_text_before=3, n_visual=70, n_text_after=2, dim=4):
    L = n_text_before + n_visual + n_text_after
    is_visual = torch.zeros(1, L, dtype=torch.bool)
    is_visual[0, n_text_before:n_text_before + n_visual] = True
    coords = torch.stack([torch.zeros(n_visual, dtype=torch.long), torch.arange(n_visual) // 10,
                          torch.arange(n_visual) % 10], dim=-1)[None]
    return LoopState(hidden=torch.zeros(1, L, dim), positions=torch.arange(L).view(1, 1, L) * 1,
                     orig_index=torch.arange(L)[None], is_visual=is_visual, visual_coords=coords, cache=None)


@pytest.mark.parametrize("recycled_position", ["last_kept", "cluster_mean"])
def test_recycle_pruner_inserts_cluster_means_after_the_kept_tokens(recycled_position):
    state = synthetic_state()
    kept = [0, 10, 20, 30, 40, 50]                                    # visual numbers (visual token v is at 3 + v)
    clusters = [[1, 2, 3, 4, 5, 6, 7], [11, 12, 13, 14, 15, 16, 17], [21, 22, 23, 24, 25, 27]]
    points = blobs([7, 7, 6], [(10, 0, 0, 0), (0, 10, 0, 0), (0, 0, 10, 0)])
    scores = torch.rand(1, 70, generator=torch.Generator().manual_seed(2))  # the other deleted: < 1
    scores[0, kept] = 10.0
    for members, feats in zip(clusters, points):
        state.hidden[0, [3 + v for v in members]] = feats
        scores[0, members] = 5.0                                      # the top 20 of the 64 deleted
    # 64 deleted -> floor(0.3*64)+1 = 20 taken -> floor(20/10)+1 = 3 clusters
    assert recycle_counts(64) == (20, 3)

    event = RecyclePruner(recycled_position=recycled_position).cut(
        state, torch.tensor([kept]), scores, SimpleNamespace(layer=2))

    assert event.n_recycled == 3
    assert event.kept_index.tolist() == [[3 + v for v in kept]]
    # text, the 6 kept visual tokens, the 3 recycled ones right after them, text
    assert state.hidden.shape[1] == 3 + 6 + 3 + 2
    assert state.is_visual[0].tolist() == [False] * 3 + [True] * 9 + [False] * 2
    assert state.is_recycled[0].tolist() == [False] * 9 + [True] * 3 + [False] * 2
    assert state.orig_index[0].tolist() == [0, 1, 2, 3, 13, 23, 33, 43, 53, 53, 53, 53, 73, 74]
    assert_same_rows(state.hidden[0, 9:12], torch.stack([p.mean(dim=0) for p in points]))
    new_positions = sorted(state.positions[0, 0, 9:12].tolist())
    if recycled_position == "last_kept":
        assert new_positions == [53, 53, 53]
    else:   # rounded mean of the members' positions 3 + v
        assert new_positions == [7, 17, 27]                           # 3+4, 3+14, round(3 + 142/6)
    # a recycled token's coords are its centre's: one from each cluster's rows (row = v // 10)
    assert sorted(state.visual_coords[0, 6:, 1].tolist()) == [0, 1, 2]
    assert state.visual_coords.shape[1] == 9

    # A second cut: recycled tokens are visual tokens - scored, kept or deleted, never in kept_index.
    scores2 = torch.tensor([[9.0, 0, 0, 0, 0, 0, 8.0, 7.0, 0]])       # keep kept-0, one recycled, ...
    event2 = RecyclePruner().cut(state, torch.tensor([[0, 6, 7]]), scores2, SimpleNamespace(layer=5))
    assert event2.kept_index.tolist() == [[3]]
    assert event2.scored_index[0].tolist() == [3, 13, 23, 33, 43, 53, -1, -1, -1]
    # 6 deleted -> 2 taken -> 1 cluster
    assert event2.n_recycled == 1 and int(state.is_visual.sum()) == 4
    assert torch.equal(state.orig_index[0].sort().values, state.orig_index[0])


def test_recycle_pruner_rejects_bad_values():
    with pytest.raises(ConfigError, match="recycled_position"):
        RecyclePruner(recycled_position="middle")
    with pytest.raises(ConfigError, match="select_ratio"):
        RecyclePruner(select_ratio=1.5)


# ----------------------------------------------------------------------------------------
# Schedule policy on a tiny model
# ----------------------------------------------------------------------------------------
def test_schedule_counts_are_exact_per_layer(load_tiny):
    adapter = load_tiny("qwen2_5_vl")
    smp = sample(n_images=2)
    n_visual = adapter.encode(smp).visual_index.shape[1]
    policy = SchedulePolicy([0, 2], [9, 0.25])
    _, state, _ = run(adapter, smp, RandomScorer(), policy, DropPruner())
    quarter = round(0.25 * n_visual)
    assert state.layer_counts == [9, 9, quarter, quarter]
    assert [e.layer for e in state.events] == [0, 2]
    # with recycling: alive = kept + clusters, and the second cut counts the recycled tokens as alive
    _, state, _ = run(adapter, smp, RandomScorer(), policy, RecyclePruner())
    after_0 = 9 + recycle_counts(n_visual - 9)[1]
    after_2 = quarter + recycle_counts(after_0 - quarter)[1]
    assert state.layer_counts == [after_0, after_0, after_2, after_2]
    # a count above the tokens alive keeps all of them
    _, state, _ = run(adapter, smp, RandomScorer(), SchedulePolicy([1], [10_000]), DropPruner())
    assert state.layer_counts == [n_visual] * 4


def test_schedule_reference_count_scales_the_official_counts():
    policy = SchedulePolicy([2, 6, 15], [300, 200, 110], reference_count=576)
    at = lambda layer, n: policy.n_keep(layer, n_visual=n, scores=torch.zeros(1, n), view=None)
    assert [at(2, 576), at(6, 576), at(15, 576)] == [300, 200, 110]             # exact on LLaVA
    assert [at(2, 1152), at(6, 1152), at(15, 1152)] == [600, 400, 220]          # same share elsewhere
    assert at(2, 64) == round(300 / 576 * 64) == 33


def test_schedule_policy_rejects_bad_values():
    with pytest.raises(ConfigError, match="policy.layers"):
        SchedulePolicy([0, 4], [0.5, 0.2]).check(4)
    with pytest.raises(ConfigError, match="policy.layers"):
        SchedulePolicy([2, 1], [0.5, 0.2]).check(4)
    with pytest.raises(ConfigError, match="policy.keep"):
        SchedulePolicy([0, 1], [0.5])
    with pytest.raises(ConfigError, match="policy.keep"):
        SchedulePolicy([0, 1], [0.5, 0])
    with pytest.raises(ConfigError, match="budget=100"):
        SchedulePolicy([0], budget=100, keep_by_budget={192: [3]})


# ----------------------------------------------------------------------------------------
# v1's rank-adaptive count
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [1, 3, 5])
def test_rank_keep_count_on_matrices_of_known_rank(rank):
    g = torch.Generator().manual_seed(rank)
    T, N = 8, 40
    P = torch.rand(T, rank, generator=g) @ torch.rand(rank, N, generator=g)     # rank `rank`, non-negative
    P = P / P.sum(dim=1, keepdim=True)                                          # rows like probabilities
    assert rank_keep_count(P, scale=13.5, bias=0.0) == min(math.floor(13.5 * rank), N - 1)
    assert rank_keep_count(P, scale=9.0, bias=6.0) == min(math.floor(9 * rank + 6), N - 1)
    assert rank_keep_count(P, scale=0.8, bias=0.0) == max(1, math.floor(0.8 * rank))


def test_rank_keep_count_keeps_all_when_full_rank():
    P = torch.rand(10, 6, generator=torch.Generator().manual_seed(0))            # rank 6 = N
    assert rank_keep_count(P, scale=0.8, bias=0.0) == 6


def test_rater_visual_attention_rows_average_to_the_kernel_reference():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 3, 8, generator=g), torch.randn(1, 2, 12, 8, generator=g)
    view = SimpleNamespace(q=q, k=k, query_index=torch.tensor([[9, 10, 11]]),
                           visual_index=torch.tensor([[2, 3, 4, 5, 6]]), key_mask=None)   # no pads
    P = rater_visual_attention(view)                                            # [1, 3, 5]
    expected = text_visual_attention_ref(q, k, view.query_index, view.visual_index).mean(dim=1)
    torch.testing.assert_close(P.mean(dim=1), expected)


def test_adaptive_policy_on_a_tiny_model(load_tiny):
    adapter = load_tiny("qwen2_vl")
    smp = sample(n_images=2)
    seen = []

    class Spy(AdaptivePolicy):
        def n_keep(self, layer, *, n_visual, scores, view):
            n = super().n_keep(layer, n_visual=n_visual, scores=scores, view=view)
            seen.append((rank_keep_count(rater_visual_attention(view)[0], self.scale, self.bias), n))
            return n

    _, state, _ = run(adapter, smp, V15Scorer(), Spy([0, 2], scale=2.0, bias=1.0), DropPruner())
    assert [e.layer for e in state.events] == [0, 2]
    assert [n for _, n in seen] == [state.layer_counts[0], state.layer_counts[2]]
    assert all(a == b for a, b in seen)
    with pytest.raises(ConfigError, match="scorer=v15"):
        run(adapter, smp, RandomScorer(), AdaptivePolicy([0], 2.0, 1.0), DropPruner())


# ----------------------------------------------------------------------------------------
# Presets: compose and run
# ----------------------------------------------------------------------------------------
def compose_cfg(overrides):
    # dataset=folder: these tests never build a dataset; it keeps them independent of the default one
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose(config_name="config", overrides=["dataset=folder"] + overrides)


@pytest.mark.parametrize("experiment, scorer, policy, pruner", [
    ("sparsevlm_v1", "V15Scorer", "AdaptivePolicy", "RecyclePruner"),
    ("sparsevlm_v15", "V15Scorer", "SchedulePolicy", "RecyclePruner"),
    ("sparsevlm_v2", "V2Scorer", "SchedulePolicy", "DropPruner"),
])
def test_presets_compose_and_run_on_a_tiny_model(load_tiny, experiment, scorer, policy, pruner):
    # tiny models have 4 layers: give the preset this model's own layer indices
    cfg = compose_cfg([f"+experiment={experiment}", "budget=128", "policy.layers=[0,1,2]",
                       "policy.reference_layers=null"])
    parts = {g: instantiate(cfg[g], _convert_="all") for g in ("scorer", "policy", "pruner")}
    assert [type(parts[g]).__name__ for g in ("scorer", "policy", "pruner")] == [scorer, policy, pruner]
    parts["policy"].check(4)
    adapter = load_tiny("qwen2_5_vl")
    smp = sample(n_images=1, w=224, h=224)                           # 8 x 8 = 64 visual tokens
    _, state, tokens = run(adapter, smp, parts["scorer"], parts["policy"], parts["pruner"])
    assert [e.layer for e in state.events] == [0, 1, 2] and tokens.shape[1] >= 1
    if experiment == "sparsevlm_v15":
        # 128 -> [303, 110, 36] of 576, scaled to 64: 34, 12, 4; plus recycled
        assert [round(303 / 576 * 64), round(110 / 576 * 64), round(36 / 576 * 64)] == [34, 12, 4]
        a0 = 34 + recycle_counts(64 - 34)[1]                          # 30 deleted -> 10 taken -> 2 clusters
        a1 = 12 + recycle_counts(a0 - 12)[1]                          # 24 deleted -> 8 taken -> 1 cluster
        a2 = 4 + recycle_counts(a1 - 4)[1]                            # 9 deleted -> 3 taken -> 1 cluster
        assert (a0, a1, a2) == (36, 13, 5)
        assert state.layer_counts == [a0, a1, a2, a2]
    if experiment == "sparsevlm_v2":
        # 128 -> [238, 108, 60] of 576, scaled to 64: no recycling
        assert state.layer_counts == [26, 12, 7, 7]
        assert all(e.n_recycled == 0 for e in state.events)


@pytest.mark.parametrize("experiment, budget", [("sparsevlm_v15", 100), ("sparsevlm_v2", 32), ("sparsevlm_v1", 96)])
def test_preset_with_a_bad_budget_raises_config_error(experiment, budget):
    cfg = compose_cfg([f"+experiment={experiment}", f"budget={budget}"])
    from sparsevlm_exp.runner import build
    with pytest.raises(ConfigError, match=f"budget={budget}"):
        build(cfg.policy, "policy")


# ----------------------------------------------------------------------------------------
# Recycling against oracles on a real (tiny) model
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_keep_all_with_recycle_equals_hf_generate(load_tiny, family):
    adapter = load_tiny(family)
    smp = sample(n_images=2)
    req, state, ours = run(adapter, smp, V15Scorer(), FixedPolicy(layer=1, keep=1.0), RecyclePruner())
    assert state.events[0].n_recycled == 0
    assert torch.equal(ours, hf_generate(adapter, req, max_new=MAX_NEW))


@torch.no_grad()
def recycled_reference(adapter, req, event, layer_k, n_new=MAX_NEW):
    """Greedy tokens recomputed without cache: layers 0..K see the whole sequence; the
    recycled sequence is built BY HAND from layer K's output (kept tokens, then the
    cluster means of the top deleted tokens right after the last kept visual token, at
    its position), and layers K+1.. run on it."""
    lm = adapter.language_model
    embeds, positions = adapter.embed(req), adapter.positions(req)  # [1, L, D], [3, 1, L]
    L = embeds.shape[1]
    visual = req.visual_index[0]
    scores = event.scores[0]
    kept_mask = torch.isin(visual, event.kept_index[0])
    deleted = (~kept_mask).nonzero()[:, 0]
    n_taken, n_clusters = recycle_counts(deleted.numel())
    taken = visual[deleted[scores[deleted].topk(n_taken).indices]]   # sequence indices
    keep_seq = torch.ones(L, dtype=torch.bool)
    keep_seq[visual[~kept_mask]] = False
    last_kept = int(visual[kept_mask][-1])
    at = int(keep_seq[: last_kept + 1].sum())                        # insertion point in the kept sequence

    def run_layers(hidden, pos, layers):
        n = hidden.shape[1]
        mask = torch.zeros(n, n).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(),
                                             torch.finfo(torch.float32).min)[None, None]
        cos_sin = lm.rotary_emb(hidden, pos)
        for i in layers:
            hidden = lm.layers[i](hidden, attention_mask=mask, position_embeddings=cos_sin, position_ids=None,
                                  use_cache=False)
        return hidden

    next_pos = int(positions.max()) + 1
    generated, step_logits, eos = [], [], set(adapter.eos_token_ids)
    for _ in range(n_new):
        extra = torch.arange(next_pos, next_pos + len(generated)).view(1, 1, -1).expand(3, 1, -1)
        hidden = torch.cat([embeds, lm.embed_tokens(torch.tensor([generated], dtype=torch.long))], dim=1)
        pos = torch.cat([positions, extra], dim=2)
        hidden = run_layers(hidden, pos, range(layer_k + 1))
        assignment, _ = dpc_knn_clusters(hidden[0, taken], n_clusters)
        merged = cluster_means(hidden[0, taken], assignment, n_clusters)[None]        # [1, c, D]
        prompt, prompt_pos = hidden[:, :L][:, keep_seq], positions[:, :, keep_seq]
        new_pos = positions[:, :, last_kept:last_kept + 1].expand(-1, -1, n_clusters)
        hidden = torch.cat([prompt[:, :at], merged, prompt[:, at:], hidden[:, L:]], dim=1)
        pos = torch.cat([prompt_pos[:, :, :at], new_pos, prompt_pos[:, :, at:], extra], dim=2)
        hidden = run_layers(hidden, pos, range(layer_k + 1, len(lm.layers)))
        logits = adapter.model.lm_head(lm.norm(hidden[:, -1:]))[0, -1].float()
        step_logits.append(logits)
        token = int(logits.argmax())
        generated.append(token)
        if token in eos:
            break
    return torch.tensor([generated]), step_logits


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_recycle_run_equals_no_cache_reference(load_tiny, family):
    adapter = load_tiny(family)
    smp = sample(n_images=2, w=168, h=112)                           # 2 x 24 visual tokens, text between
    layer = 1
    req, state, ours = run(adapter, smp, V15Scorer(), FixedPolicy(layer=layer, keep=0.3), RecyclePruner())
    event = state.events[0]
    n_visual = req.visual_index.shape[1]
    assert event.n_recycled == recycle_counts(n_visual - event.kept_index.shape[1])[1] >= 2
    ref_tokens, ref_logits = recycled_reference(adapter, req, event, layer)
    assert torch.equal(ours, ref_tokens)
    # Tokens of a random tiny model are robust to small changes, so compare logits too:
    # the prefill's and one decode step's (through the ragged cache with recycled tokens).
    state = adapter.prefill(req, scorer=V15Scorer(), policy=FixedPolicy(layer=layer, keep=0.3), pruner=RecyclePruner())
    torch.testing.assert_close(state.next_logits[0], ref_logits[0], rtol=1e-4, atol=1e-4)
    first = state.next_logits.argmax(dim=-1, keepdim=True)
    second_logits = adapter.decode_step(first, state.next_position, state.cache)
    torch.testing.assert_close(second_logits[0], ref_logits[1], rtol=1e-4, atol=1e-4)
    # ... and the check can fail: plain drop, or other positions, give other logits
    for other in (DropPruner(), RecyclePruner(recycled_position="cluster_mean")):
        logits = adapter.prefill(req, scorer=V15Scorer(), policy=FixedPolicy(layer=layer, keep=0.3),
                                 pruner=other).next_logits[0]
        assert (logits - ref_logits[0]).abs().max() > 1e-3
