"""Oracles for the sparsified prefill/decode pipeline on tiny random Qwen2-VL / Qwen2.5-VL.

- keep=1.0 (and no pruning) gives exactly HF `generate(do_sample=False)`;
- a pruned run gives the tokens of a slow reference that recomputes the whole
  sequence at every step without a cache, with an attention mask that says which
  tokens each layer may see (all through layer K, only the kept ones after);
- v1.5 scores equal those read from HF's eager attention map;
- kept tokens keep their original M-RoPE positions.
"""
from __future__ import annotations

import pytest
import torch

from sparsevlm_exp.decoding import GreedyDecoder
from sparsevlm_exp.policies import FixedPolicy
from sparsevlm_exp.pruners import DropPruner, KVOnlyPruner
from sparsevlm_exp.scorers import FastVScorer, RandomScorer, UniformScorer, V15Scorer, V2Scorer
from oracles import MAX_NEW, check_v15_scores_equal_hf_eager_attention, hf_generate
from tiny_models import sample

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
SCORERS = {"v15": V15Scorer, "v2": V2Scorer, "fastv": FastVScorer, "random": RandomScorer, "uniform": UniformScorer}


def run_ours(adapter, smp, scorer=None, keep=1.0, layer=1, pruner=None):
    req = adapter.encode(smp)
    policy = FixedPolicy(layer=layer, keep=keep) if scorer is not None else None
    state = adapter.prefill(req, scorer=scorer, policy=policy, pruner=pruner,
                            generator=torch.Generator().manual_seed(0))
    tokens = GreedyDecoder(MAX_NEW).generate(adapter, state)
    return req, state, tokens


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("n_images", [1, 2])
def test_keep_all_equals_hf_generate(load_tiny, family, attn, n_images):
    adapter = load_tiny(family, attn)
    smp = sample(n_images=n_images)
    req, state, ours = run_ours(adapter, smp, scorer=V15Scorer(), keep=1.0, pruner=DropPruner())
    # The layout under test: a system prefix first, the image(s), then the question.
    assert int(req.visual_index[0, 0]) > 0 and int(req.text_index.shape[1]) > 0
    assert state.events[0].kept_index.shape[1] == req.visual_index.shape[1]
    assert torch.equal(ours, hf_generate(adapter, req))
    # and the plain path (no scorer) too
    _, _, plain = run_ours(adapter, smp)
    assert torch.equal(plain, ours)


# ----------------------------------------------------------------------------------------
# Slow reference: whole sequence, no cache, masks per layer
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def reference_generate(adapter, req, kept_index, layer_k, mode, n_new=MAX_NEW):
    """Greedy tokens recomputed from scratch at every step.

    mode="drop": pruned visual tokens are visible to layers 0..K only.
    mode="kv_only": the prompt is processed fully; generated tokens see only the
    kept prompt tokens (at every layer).
    """
    lm = adapter.language_model
    embeds, positions = adapter.embed(req), adapter.positions(req)
    L = embeds.shape[1]
    pruned = torch.zeros(L, dtype=torch.bool)
    pruned[req.visual_index[0]] = True
    pruned[kept_index[0]] = False
    next_pos = int(positions.max()) + 1
    eos = set(adapter.eos_token_ids)
    generated = []
    for step in range(n_new):
        n = L + len(generated)
        if generated:
            new = lm.embed_tokens(torch.tensor([generated]))
            hidden = torch.cat([embeds, new], dim=1)
            extra = torch.arange(next_pos, next_pos + len(generated)).view(1, 1, -1).expand(3, 1, -1)
            pos = torch.cat([positions, extra], dim=2)
        else:
            hidden, pos = embeds, positions
        cos_sin = lm.rotary_emb(hidden, pos)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        is_pruned_key = torch.cat([pruned, torch.zeros(len(generated), dtype=torch.bool)])
        is_prompt_query = torch.arange(n) < L
        for i, dec_layer in enumerate(lm.layers):
            if mode == "drop":
                hide = i > layer_k
                allowed = causal & ~(is_pruned_key[None, :] & hide)
            else:  # kv_only: generated queries never see pruned prompt keys
                allowed = causal & ~(is_pruned_key[None, :] & ~is_prompt_query[:, None])
            allowed |= torch.eye(n, dtype=torch.bool)          # pruned rows must not be all -inf
            mask = torch.zeros(n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
            hidden = dec_layer(hidden, attention_mask=mask, position_embeddings=cos_sin, position_ids=None,
                               use_cache=False)
        logits = adapter.model.lm_head(lm.norm(hidden[:, -1:]))[0, -1]
        token = int(logits.argmax())
        generated.append(token)
        if token in eos:
            break
    return torch.tensor([generated])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scorer_name", list(SCORERS))
def test_pruned_run_equals_no_cache_reference(load_tiny, family, scorer_name):
    adapter = load_tiny(family, "sdpa")
    smp = sample(n_images=2)
    layer = 1
    req, state, ours = run_ours(adapter, smp, scorer=SCORERS[scorer_name](), keep=0.4, layer=layer,
                                pruner=DropPruner())
    kept = state.events[0].kept_index
    n_visual = req.visual_index.shape[1]
    assert kept.shape[1] == round(0.4 * n_visual) < n_visual
    # layers 0..K see every visual token, layers after K only the kept ones
    assert state.layer_counts[:layer] == [n_visual] * layer
    assert state.layer_counts[layer:] == [kept.shape[1]] * (adapter.n_layers - layer)
    assert state.seq_lens[layer + 1] == req.input_ids.shape[1] - (n_visual - kept.shape[1])
    ref = reference_generate(adapter, req, kept, layer, "drop")
    assert torch.equal(ours, ref)
    # the shorter KV cache after the pruning layer
    assert state.cache.layers[layer + 1].keys.shape[2] == state.cache.layers[0].keys.shape[2] - (n_visual - kept.shape[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_only_equals_reference(load_tiny, family):
    adapter = load_tiny(family, "sdpa")
    req, state, ours = run_ours(adapter, sample(), scorer=V15Scorer(), keep=0.3, layer=1, pruner=KVOnlyPruner())
    kept = state.events[0].kept_index
    assert torch.equal(ours, reference_generate(adapter, req, kept, 1, "kv_only"))
    # prefill saw every token at every layer
    assert state.seq_lens == [req.input_ids.shape[1]] * adapter.n_layers


@pytest.mark.parametrize("family", FAMILIES)
def test_v15_scores_equal_hf_eager_attention(load_tiny, family):
    adapter = load_tiny(family, "eager")
    check_v15_scores_equal_hf_eager_attention(adapter, adapter.encode(sample(n_images=2)), layer=2)


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_tokens_keep_original_mrope_positions(load_tiny, family):
    adapter = load_tiny(family, "sdpa")
    req = adapter.encode(sample(n_images=2))
    seen = {}

    class SpyDrop(DropPruner):
        def cut(self, state, keep_local, scores, view):
            event = super().cut(state, keep_local, scores, view)
            seen["positions"], seen["orig_index"] = state.positions.clone(), state.orig_index.clone()
            return event

    state = adapter.prefill(req, scorer=RandomScorer(), policy=FixedPolicy(layer=0, keep=0.25), pruner=SpyDrop(),
                            generator=torch.Generator().manual_seed(3))
    original = adapter.positions(req)                                   # [3, 1, L] from get_rope_index
    assert torch.equal(seen["positions"], original[:, :, seen["orig_index"][0]])
    # gaps preserved: kept positions are not renumbered 0..L'-1
    assert seen["positions"].shape[2] < original.shape[2]
    assert int(state.next_position[0]) == int(original.max()) + 1


def test_sample_without_image_is_answered_unpruned(load_tiny):
    adapter = load_tiny("qwen2_5_vl", "sdpa")
    smp = sample(n_images=0)
    req, state, ours = run_ours(adapter, smp, scorer=V15Scorer(), keep=0.1, pruner=DropPruner())
    assert state.n_visual == 0 and state.events == []
    assert torch.equal(ours, hf_generate(adapter, req))


def test_renumbered_positions_are_refused_on_mrope(load_tiny):
    # Renumbering (the official SparseVLM v1/v1.5 rule, 1-D RoPE) would flatten Qwen's
    # (t, h, w) image layout: refused, at the cut too (the library path); the runner
    # refuses it before weights load (tests/test_positions.py, test_experiments.py).
    adapter = load_tiny("qwen2_5_vl", "sdpa")
    req = adapter.encode(sample(n_images=2))
    from sparsevlm_exp.errors import ConfigError
    with pytest.raises(ConfigError, match="pruner.positions=renumbered is not allowed on this model"):
        adapter.prefill(req, scorer=V15Scorer(), policy=FixedPolicy(layer=1, keep=0.25),
                        pruner=DropPruner(positions="renumbered"))