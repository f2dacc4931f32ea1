"""Rotary positions after a cut: the official SparseVLM v1 / v1.5 rule (issue 15 item 5).

The official code (Gumpest/SparseVLMs, LLaVA) RENUMBERS positions after every cut:
they become 0..L'-1 over the shortened sequence (kept visual tokens contiguous,
recycled tokens on the next slots, the text moved left). In decoding each layer puts
the new token at ITS OWN cache length: L at the layers up to the first cut, L' after
it, L'' after the second, ... `pruner.positions=renumbered` must run exactly that.

On a tiny LLaVA (4 layers, 16 visual tokens), cuts after layers 0 and 2:
- the positions each layer sees in prefill and in every decode step, read from the
  cos/sin the engine hands each layer, equal the hand-built rule, recycling on and off;
- the generated tokens (and logits) equal a no-cache reference that recomputes the
  whole sequence at every step, every layer at positions 0..n-1 of its own sequence;
- `renumbered` is refused on M-RoPE families before weights load; `auto` resolves to
  renumbered on LLaVA and original on Qwen.
"""
from __future__ import annotations

import pytest
import torch

from sparsevlm_exp.decoding import GreedyDecoder
from sparsevlm_exp.errors import ConfigError
from sparsevlm_exp.policies import SchedulePolicy
from sparsevlm_exp.pruners import DropPruner, RecyclePruner, cluster_means, dpc_knn_clusters, recycle_counts
from sparsevlm_exp.scorers import V15Scorer
from test_llava import N_VISUAL, llava_dir, load_llava  # noqa: F401 (fixtures)
from tiny_models import sample

MAX_NEW = 6
CUT_LAYERS, KEEP = [0, 2], [8, 4]        # 16 visual tokens -> 8 after layer 0 -> 4 after layer 2


def pruner_for(recycle: bool, positions: str = "renumbered"):
    return RecyclePruner(positions=positions) if recycle else DropPruner(positions=positions)


def expected_lengths(L: int, recycle: bool) -> list[int]:
    """Sequence length each of the 4 layers sees in prefill, worked out by hand.

    Drop: L, then 8 of 16 visual tokens deleted -> L - 8 (layers 1, 2), then 4 of the 8
    alive deleted -> L - 12 (layer 3).
    Recycle (floor(0.3 n) + 1 deleted tokens taken, floor(taken / 10) + 1 clusters):
    cut 1 deletes 8 -> takes 3 -> 1 recycled token: L - 8 + 1 = L - 7, alive 8 + 1 = 9;
    cut 2 keeps 4 of 9, deletes 5 -> takes 2 -> 1 recycled: L - 7 - 5 + 1 = L - 11.
    """
    return [L, L - 7, L - 7, L - 11] if recycle else [L, L - 8, L - 8, L - 12]


def spy_layers(adapter, monkeypatch):
    """Record the (cos, sin) the engine hands each decoder layer, in call order."""
    seen = []
    run_layer = adapter.run_layer

    def spy(i, hidden, cos_sin, cache, key_mask=None):
        seen.append((i, hidden.shape[1], cos_sin[0].detach().clone()))
        return run_layer(i, hidden, cos_sin, cache, key_mask)

    monkeypatch.setattr(adapter, "run_layer", spy)
    return seen


def rotary_cos(adapter, positions: torch.Tensor) -> torch.Tensor:
    """cos of 1-D RoPE at the given positions [n] -> [1, n, d]."""
    lm = adapter.language_model
    return lm.rotary_emb(torch.zeros(1, positions.numel(), 1), positions.view(1, -1))[0]


@pytest.mark.parametrize("recycle", [False, True])
def test_each_layer_sees_the_official_renumbered_positions(load_llava, monkeypatch, recycle):
    adapter = load_llava("sdpa")
    req = adapter.encode(sample(n_images=1))
    L = req.input_ids.shape[1]
    seen = spy_layers(adapter, monkeypatch)
    state = adapter.prefill(req, scorer=V15Scorer(), policy=SchedulePolicy(layers=CUT_LAYERS, keep=KEEP),
                            pruner=pruner_for(recycle))
    tokens = GreedyDecoder(MAX_NEW).generate(adapter, state)
    assert tokens.shape[1] == MAX_NEW            # no EOS: every decode step below is checked
    lengths = expected_lengths(L, recycle)
    assert state.seq_lens == lengths
    assert [e.n_recycled for e in state.events] == ([1, 1] if recycle else [0, 0])
    n_layers = adapter.n_layers
    prefill, decode = seen[:n_layers], seen[n_layers:]
    # prefill: layer i sees 0..L_i-1 over its own, shortened, sequence
    for (i, n, cos), length in zip(prefill, lengths):
        assert n == length
        torch.testing.assert_close(cos, rotary_cos(adapter, torch.arange(length)), rtol=0, atol=1e-6)
    # decode step t (t = 0 .. MAX_NEW - 2): layer i puts the new token at its cache length L_i + t
    assert len(decode) == (MAX_NEW - 1) * n_layers
    for k, (i, n, cos) in enumerate(decode):
        t = k // n_layers
        assert (i, n) == (k % n_layers, 1)
        assert int(state.cache.layers[i].keys.shape[2]) == lengths[i] + MAX_NEW - 1   # the cache lengths agree
        torch.testing.assert_close(cos, rotary_cos(adapter, torch.tensor([lengths[i] + t])), rtol=0, atol=1e-6)


@pytest.mark.parametrize("recycle", [False, True])
def test_original_positions_decode_at_the_original_next_position(load_llava, monkeypatch, recycle):
    # the default (and SparseVLM v2.0): gaps kept, every layer decodes at L + t
    adapter = load_llava("sdpa")
    req = adapter.encode(sample(n_images=1))
    L = req.input_ids.shape[1]
    seen = spy_layers(adapter, monkeypatch)
    state = adapter.prefill(req, scorer=V15Scorer(), policy=SchedulePolicy(layers=CUT_LAYERS, keep=KEEP),
                            pruner=pruner_for(recycle, "original"))
    assert state.layer_positions is None and int(state.next_position[0]) == L
    GreedyDecoder(3).generate(adapter, state)
    for k, (i, n, cos) in enumerate(seen[adapter.n_layers:]):
        torch.testing.assert_close(cos, rotary_cos(adapter, torch.tensor([L + k // adapter.n_layers])),
                                   rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------
# No-cache reference
# ----------------------------------------------------------------------------------------
class RecordingPruner:
    """Wraps a pruner and records, per cut, the kept local indices and the scores."""

    def __init__(self, inner):
        self.inner, self.cuts = inner, []

    def cut(self, state, keep_local, scores, view):
        self.cuts.append((view.layer, keep_local[0].clone(), scores[0].clone()))
        return self.inner.cut(state, keep_local, scores, view)

    def finish(self, state):
        self.inner.finish(state)

    def __deepcopy__(self, memo):
        # engine.request_front runs a per-request copy of the pruner; this recorder is read
        # after the prefill, so the copy is itself (one request per recorder in this file)
        return self


@torch.no_grad()
def renumbered_reference(adapter, req, cuts, recycle: bool, n_new: int = MAX_NEW):
    """Greedy tokens and per-step logits, recomputed from scratch at every step.

    Every layer runs over its own sequence (prompt then the generated tokens) at
    positions 0..n-1 - the official rule, generated tokens included: in the official
    code a layer's decode token sits at its cache length, i.e. right after its own
    sequence. After a cut layer the sequence is shortened as the recorded selection
    says (kept visual tokens, then - recycling - the cluster means of the top deleted
    tokens by score right after the last kept visual token)."""
    lm = adapter.language_model
    embeds = adapter.embed(req)
    L = embeds.shape[1]
    by_layer = {layer: (keep, scores) for layer, keep, scores in cuts}
    generated, step_logits, eos = [], [], set(adapter.eos_token_ids)
    for _ in range(n_new):
        hidden = torch.cat([embeds, lm.embed_tokens(torch.tensor([generated], dtype=torch.long))], dim=1)
        is_visual = torch.zeros(hidden.shape[1], dtype=torch.bool)
        is_visual[req.visual_index[0]] = True
        for i, layer in enumerate(lm.layers):
            n = hidden.shape[1]
            cos_sin = lm.rotary_emb(hidden, torch.arange(n).view(1, -1))
            mask = torch.zeros(n, n).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(),
                                                 torch.finfo(torch.float32).min)[None, None]
            hidden = layer(hidden, attention_mask=mask, position_embeddings=cos_sin, position_ids=None,
                           use_cache=False)
            if i not in by_layer:
                continue
            keep_local, scores = by_layer[i]
            visual = is_visual.nonzero()[:, 0]                                   # [N_alive] sequence indices
            deleted = torch.ones(visual.numel(), dtype=torch.bool)
            deleted[keep_local] = False
            keep_seq = ~is_visual
            keep_seq[visual[keep_local]] = True
            pieces = [hidden[:, keep_seq]]
            flags = [is_visual[keep_seq]]
            if recycle:
                deleted_local = deleted.nonzero()[:, 0]
                n_taken, n_clusters = recycle_counts(deleted_local.numel())
                taken = visual[deleted_local[scores[deleted_local].topk(n_taken).indices]]
                assignment, _ = dpc_knn_clusters(hidden[0, taken], n_clusters)
                merged = cluster_means(hidden[0, taken], assignment, n_clusters)[None]
                at = int(keep_seq[: int(visual[keep_local][-1]) + 1].sum())     # after the last kept visual
                kept_hidden, kept_flags = pieces[0], flags[0]
                pieces = [kept_hidden[:, :at], merged, kept_hidden[:, at:]]
                flags = [kept_flags[:at], torch.ones(n_clusters, dtype=torch.bool), kept_flags[at:]]
            hidden, is_visual = torch.cat(pieces, dim=1), torch.cat(flags)
        logits = adapter.model.lm_head(lm.norm(hidden[:, -1:]))[0, -1].float()
        step_logits.append(logits)
        token = int(logits.argmax())
        generated.append(token)
        if token in eos:
            break
    return torch.tensor([generated]), step_logits


@pytest.mark.parametrize("recycle", [False, True])
def test_renumbered_run_equals_no_cache_reference(load_llava, recycle):
    adapter = load_llava("sdpa")
    req = adapter.encode(sample(n_images=1))
    recorder = RecordingPruner(pruner_for(recycle))
    policy = SchedulePolicy(layers=CUT_LAYERS, keep=KEEP)
    state = adapter.prefill(req, scorer=V15Scorer(), policy=policy, pruner=recorder)
    ours = GreedyDecoder(MAX_NEW).generate(adapter, state)
    ref_tokens, ref_logits = renumbered_reference(adapter, req, recorder.cuts, recycle)
    assert torch.equal(ours, ref_tokens)
    # tokens of a random tiny model are robust to small changes: compare the logits of
    # the prefill and of two decode steps (through the ragged cache) as well
    state = adapter.prefill(req, scorer=V15Scorer(), policy=policy, pruner=pruner_for(recycle))
    torch.testing.assert_close(state.next_logits[0], ref_logits[0], rtol=1e-4, atol=1e-4)
    position, token = state.decode_position(), ours[:, :1]
    for step in (1, 2):
        logits = adapter.decode_step(token, position, state.cache)
        torch.testing.assert_close(logits[0], ref_logits[step], rtol=1e-4, atol=1e-4)
        position, token = position + 1, ours[:, step:step + 1]
    # ... and the check can fail: decoding every layer at the last layer's next position
    # (renumbered prefill, one decode position) gives other logits at the first step
    state = adapter.prefill(req, scorer=V15Scorer(), policy=policy, pruner=pruner_for(recycle))
    logits = adapter.decode_step(ours[:, :1], state.next_position, state.cache)
    assert (logits[0] - ref_logits[1]).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------
# Which families: renumbered is 1-D RoPE only; auto picks per family
# ----------------------------------------------------------------------------------------
def test_renumbered_is_refused_on_mrope_and_auto_keeps_original(load_tiny):
    adapter = load_tiny("qwen2_5_vl", "sdpa")
    for pruner in (DropPruner(positions="renumbered"), RecyclePruner(positions="renumbered")):
        with pytest.raises(ConfigError, match="pruner.positions=renumbered is not allowed on this model: it has M-RoPE"):
            pruner.check_positions(adapter.position_dims)
    req = adapter.encode(sample(n_images=2))
    policy = SchedulePolicy(layers=[0, 2], keep=[0.5, 0.25])
    auto = adapter.prefill(req, scorer=V15Scorer(), policy=policy, pruner=DropPruner(positions="auto"))
    original = adapter.prefill(req, scorer=V15Scorer(), policy=policy, pruner=DropPruner())
    assert auto.layer_positions is None and torch.equal(auto.next_position, original.next_position)
    assert torch.equal(auto.next_logits, original.next_logits)


@pytest.mark.parametrize("recycle", [False, True])
def test_auto_is_renumbered_on_llava(load_llava, recycle):
    adapter = load_llava("sdpa")
    req = adapter.encode(sample(n_images=1))
    policy = SchedulePolicy(layers=CUT_LAYERS, keep=KEEP)
    auto = adapter.prefill(req, scorer=V15Scorer(), policy=policy, pruner=pruner_for(recycle, "auto"))
    renumbered = adapter.prefill(req, scorer=V15Scorer(), policy=policy, pruner=pruner_for(recycle))
    assert torch.equal(auto.next_logits, renumbered.next_logits)
    assert torch.equal(auto.layer_positions.next, renumbered.layer_positions.next)
    assert auto.layer_positions.layer_group == renumbered.layer_positions.layer_group
    L = req.input_ids.shape[1]
    lengths = expected_lengths(L, recycle)
    assert [int(auto.layer_positions.at_layer(i)[0]) for i in range(4)] == lengths
    assert int(auto.next_position[0]) == lengths[-1]          # next_position: the last layer's


def test_bad_positions_values_are_one_line():
    with pytest.raises(ConfigError, match=r"pruner.positions='gaps' is not allowed: one of original, renumbered, auto"):
        DropPruner(positions="gaps")
    with pytest.raises(ConfigError, match="pruner.recycled_position='cluster_mean' is not allowed"):
        RecyclePruner(positions="renumbered", recycled_position="cluster_mean")


def test_v15_preset_runs_renumbered_on_llava(llava_dir, tmp_path):
    """+experiment=sparsevlm_v15 through the runner on the tiny LLaVA: auto resolves to
    the official renumbering, and results.json says so."""
    import json
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from sparsevlm_exp.runner import Experiment

    data = tmp_path / "data"
    data.mkdir()
    sample(n_images=1).images[0].save(data / "a.png")
    (data / "questions.jsonl").write_text(
        json.dumps({"id": "q1", "image": "a.png", "question": "what colour is the circle", "answers": ["red"]}) + "\n")
    conf = Path(__file__).resolve().parent.parent / "conf"
    with initialize_config_dir(version_base="1.3", config_dir=str(conf)):
        cfg = compose(config_name="config", overrides=[
            "+experiment=sparsevlm_v15", "model=llava15_7b", f"model.pretrained={llava_dir}", "dataset=folder",
            f"dataset.path={data}", "dataset.prompt=", "logger=none", "device=cpu", "dtype=float32",
            "decoder.max_new_tokens=3", "viz.n=0"])
    summary = Experiment(cfg, tmp_path / "run").run()
    assert summary["n_failed"] == 0 and summary["positions"] == "renumbered"


@pytest.mark.parametrize("preset", ["sparsevlm_v1", "sparsevlm_v15"])
def test_v1_presets_run_with_the_kv_only_pruner(preset):
    """The issue-15 item-2 comparison (+experiment=sparsevlm_v15 pruner=kv_only): the
    presets set pruner.positions=auto, which kv_only takes as original (its prefill never
    shortens the sequence); before, KVOnlyPruner refused the key ("unexpected keyword
    argument 'positions'"). renumbered is refused in one line naming the key."""
    from sparsevlm_exp.api import compose_config
    from sparsevlm_exp.errors import build
    from sparsevlm_exp.pruners import KVOnlyPruner

    pruner = build(compose_config([f"+experiment={preset}", "pruner=kv_only"]).pruner, "pruner")
    assert isinstance(pruner, KVOnlyPruner) and pruner.positions == "original"
    with pytest.raises(ConfigError, match=r"pruner.positions='renumbered' is not allowed: original or auto with "
                                          r"pruner=kv_only"):
        build(compose_config(["pruner=kv_only", "pruner.positions=renumbered"]).pruner, "pruner")
