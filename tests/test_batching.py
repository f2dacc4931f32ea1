"""Batched pruned inference (issue 22): each request of a batch gets what it gets alone.

Oracles:
- per request, the answer, the kept tokens of every cut and the per-layer counts of a
  batched run == a batch-1 run of that request, for requests with different image
  sizes, image counts and question lengths (so different kept counts per cut), for
  several scorers (in-LLM, pre-LLM, attention-free) and pruners (drop, recycle, kv_only:
  each row's decode cache, key mask and first decode logits == its batch-1 cache's);
- keep=1.0 in a batch == HF `generate` on the same left-padded batch (rows cut at EOS);
- the same two for video batches (clips of different lengths, sizes and rates, a clip +
  an image, an image; Qwen2.5-VL, Qwen3-VL, Qwen3.5), and the runner's video datasets at
  batch 2 == batch 1.
"""
from __future__ import annotations

import copy

import pytest
import torch

from sparsevlm_exp.batching import prefill_batch, trim_at_eos
from sparsevlm_exp.decoding import GreedyDecoder
from sparsevlm_exp.errors import ConfigError
from sparsevlm_exp.policies import FixedPolicy, SchedulePolicy
from sparsevlm_exp.pruners import DropPruner, KVOnlyPruner, RecyclePruner
from sparsevlm_exp.scorers import FastVScorer, RandomScorer, UniformScorer, V15Scorer, V2Scorer
from sparsevlm_exp.scorers.divprune import DivPruneScorer
from tiny_models import Sample, noise_image

MAX_NEW = 8


def samples() -> list[Sample]:
    return [
        Sample(id="a", question="what colour is the circle", images=[noise_image(112, 84, seed=1)], answers=["x"]),
        Sample(id="b", question="red or blue", images=[noise_image(56, 56, seed=2), noise_image(84, 56, seed=3)],
               answers=["x"]),
        Sample(id="c", question="is the square left of the circle and is it green or red or blue",
               images=[noise_image(84, 140, seed=4)], answers=["x"]),
    ]


def alone(adapter, req, scorer, policy, pruner):
    state = adapter.prefill(req, scorer=scorer, policy=policy, pruner=pruner,
                            generator=torch.Generator().manual_seed(0))
    return state, GreedyDecoder(MAX_NEW).generate(adapter, state)[0]


SCORERS = {"v15": (V15Scorer, 1), "v2": (V2Scorer, 1), "fastv": (FastVScorer, 1), "random": (RandomScorer, 1),
           "divprune": (DivPruneScorer, -1)}


@pytest.mark.parametrize("family", ["qwen2_5_vl"])
@pytest.mark.parametrize("scorer_name", list(SCORERS))
@pytest.mark.parametrize("pruner_cls", [DropPruner, RecyclePruner])
def test_each_request_in_a_batch_gets_what_it_gets_alone(load_tiny, family, scorer_name, pruner_cls):
    adapter = load_tiny(family)
    reqs = [adapter.encode(s) for s in samples()]
    cls, layer = SCORERS[scorer_name]
    policy = FixedPolicy(layer=layer, keep=0.3)
    state = prefill_batch(adapter, reqs, scorer=cls(), policy=policy, pruner=pruner_cls(),
                          generators=[torch.Generator().manual_seed(0) for _ in reqs])
    tokens = GreedyDecoder(MAX_NEW).generate(adapter, state)
    kept_counts = set()
    for b, req in enumerate(reqs):
        single, ours = alone(adapter, req, cls(), policy, pruner_cls())
        row = state.rows[b]
        assert row.layer_counts == single.layer_counts
        assert len(row.events) == len(single.events)
        for a, e in zip(row.events, single.events):
            assert torch.equal(a.kept_index, e.kept_index)
            kept_counts.add(int(a.kept_index.shape[1]))
        assert torch.equal(trim_at_eos(tokens[b], adapter.eos_token_ids), trim_at_eos(ours, adapter.eos_token_ids))
    assert len(kept_counts) > 1                      # the rows really kept different counts


def left_padded_batch(adapter, reqs) -> dict:
    """The rows' processor outputs as one left-padded batch (what a processor gives with
    padding_side='left'): pads with attention_mask 0 and mm_token_type_ids 0."""
    pad = adapter.processor.tokenizer.pad_token_id or 0
    L = max(r.input_ids.shape[1] for r in reqs)
    ids, mask, types = [], [], []
    for r in reqs:
        n = L - r.input_ids.shape[1]
        ids.append(torch.cat([torch.full((1, n), pad), r.input_ids], dim=1))
        mask.append(torch.cat([torch.zeros(1, n, dtype=torch.long), torch.ones_like(r.input_ids)], dim=1))
        types.append(torch.cat([torch.zeros(1, n, dtype=torch.long), r.model_inputs["mm_token_type_ids"]], dim=1))
    batch = {"input_ids": torch.cat(ids), "attention_mask": torch.cat(mask), "mm_token_type_ids": torch.cat(types)}
    # the media of all rows end to end, in row order, as a processor batches them
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        parts = [r.model_inputs[key] for r in reqs if r.model_inputs.get(key) is not None]
        if parts:
            batch[key] = torch.cat(parts)
    return batch


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_keep_all_batch_equals_hf_generate_on_the_padded_batch(load_tiny, attn):
    adapter = load_tiny("qwen2_5_vl", attn)
    reqs = [adapter.encode(s) for s in samples()]
    state = prefill_batch(adapter, reqs, scorer=V15Scorer(), policy=FixedPolicy(layer=1, keep=1.0),
                          pruner=DropPruner())
    ours = GreedyDecoder(MAX_NEW).generate(adapter, state)
    batch = left_padded_batch(adapter, reqs)
    hf = adapter.model.generate(**batch, do_sample=False, max_new_tokens=MAX_NEW)[:, batch["input_ids"].shape[1]:]
    for b in range(len(reqs)):
        assert torch.equal(trim_at_eos(ours[b], adapter.eos_token_ids), trim_at_eos(hf[b], adapter.eos_token_ids))


KV_ONLY = {   # scorer, policy: an in-LLM cut, a two-cut schedule, a pre-LLM cut (kv_only takes every stage)
    "v2": ("v2", 1, "fixed", {}),
    "fastv_schedule": ("fastv", 1, "schedule", {"policy__layers": [1, 2], "policy__keep": [0.5, 0.25],
                                                "policy__reference_count": None}),
    "divprune": ("divprune", -1, "fixed", {}),
}


def kv_only_parts(name: str):
    from sparsevlm_exp.api import load_components

    scorer, layer, policy, extra = KV_ONLY[name]
    return load_components(scorer=scorer, keep=0.3, layer=layer, policy=policy, pruner="kv_only",
                           max_new_tokens=MAX_NEW, **extra)


def check_kv_only_batch(adapter, reqs, name):
    """Each row of a kv_only batch == that request alone: kept tokens, counts, tokens, and
    its decode cache: layer i's key mask marks exactly as many keys as its batch-1 cache
    holds, those keys are batch 1's (right-aligned after the row's pads), and the first
    decode step gives batch 1's logits (a pad or a neighbour's slot seen as a real key
    would change them)."""
    parts = kv_only_parts(name)
    state = prefill_batch(adapter, reqs, scorer=parts["scorer"], policy=parts["policy"], pruner=parts["pruner"])
    singles = [adapter.prefill(req, scorer=parts["scorer"], policy=parts["policy"], pruner=parts["pruner"],
                               generator=torch.Generator().manual_seed(0)) for req in reqs]
    token = torch.stack([s.next_logits[0, -1].argmax() for s in singles])[:, None]               # [B, 1]
    masks = [m.clone() for m in state.key_masks]
    for b, single in enumerate(singles):
        assert state.rows[b].layer_counts == single.layer_counts
        assert [e.kept_index.tolist() for e in state.rows[b].events] == [e.kept_index.tolist() for e in single.events]
        for i, layer in enumerate(state.cache.layers):
            keys, values = single.cache.layers[i].keys[0], single.cache.layers[i].values[0]     # [Hkv, L_i, d]
            if single.key_masks is not None:          # a padded request alone keeps its pads (masked)
                real = single.key_masks[i][0]
                keys, values = keys[:, real], values[:, real]
            n = keys.shape[1]
            assert int(masks[i][b].sum()) == n and bool(masks[i][b, -n:].all())    # real keys right-aligned
            torch.testing.assert_close(layer.keys[b, :, -n:], keys, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(layer.values[b, :, -n:], values, rtol=1e-4, atol=1e-5)
    # the first decode step on copies (decode_step appends to the caches and masks)
    batch_cache, single_caches = copy.deepcopy(state.cache), [copy.deepcopy(s.cache) for s in singles]
    logits = adapter.decode_step(token, state.decode_position(), batch_cache, list(masks))
    for b, single in enumerate(singles):
        mine = adapter.decode_step(token[b:b + 1], single.decode_position(), single_caches[b],
                                   None if single.key_masks is None else list(single.key_masks))
        torch.testing.assert_close(logits[b], mine[0], rtol=1e-4, atol=1e-4)
    tokens = GreedyDecoder(MAX_NEW).generate(adapter, state)
    for b, single in enumerate(singles):
        ours = GreedyDecoder(MAX_NEW).generate(adapter, single)[0]
        assert torch.equal(trim_at_eos(tokens[b], adapter.eos_token_ids), trim_at_eos(ours, adapter.eos_token_ids))
    kept = {b: state.rows[b].layer_counts[-1] for b in range(len(reqs))}
    assert len(set(kept.values())) > 1                      # the rows' caches really differ in length
    return state


@pytest.mark.parametrize("name", list(KV_ONLY))
def test_kv_only_rows_in_a_batch_get_what_they_get_alone(load_tiny, name):
    """pruner=kv_only in a batch (Qwen2-VL): every row keeps all its tokens in the prefill,
    then every layer's cache is cut to that row's kept tokens and left-padded again.
    The rows differ in image sizes, image counts, question lengths and kept counts, and
    one carries its own left pads (kv_only maps its dropped tokens past them)."""
    from test_padding import left_pad

    adapter = load_tiny("qwen2_vl")
    reqs = [adapter.encode(s) for s in samples()]
    reqs.append(adapter.request_from_inputs(left_pad(reqs[0].model_inputs, 3,
                                                     adapter.processor.tokenizer.pad_token_id or 0)))
    check_kv_only_batch(adapter, reqs, name)


@pytest.mark.parametrize("name", ["v2", "divprune"])
def test_llava_kv_only_rows_in_a_batch_get_what_they_get_alone(tmp_path, name):
    from sparsevlm_exp.models.llava import LlavaAdapter
    from test_llava import save_tiny_llava

    adapter = LlavaAdapter.load(pretrained=save_tiny_llava(tmp_path / "llava"), dtype="float32", device="cpu")
    check_kv_only_batch(adapter, [adapter.encode(s) for s in samples()], name)


def test_a_kv_only_prefill_that_stops_half_way_leaves_nothing_to_the_next_request(load_tiny, monkeypatch):
    """The runner hands every sample the same pruner object. kv_only holds the tokens its
    cuts dropped until its finish cuts the cache; a prefill that stops in between (an
    out-of-memory at a later layer, recorded as that sample's error and the run goes on)
    left them behind, and the next request's cache, at batch 1 and in a batch, was cut at
    the failed request's token indices too. Each prefill now runs its own copy
    (engine.request_front): the next request's cache and tokens are a fresh pruner's."""
    adapter = load_tiny("qwen2_vl")
    reqs = [adapter.encode(s) for s in samples()]
    parts = kv_only_parts("v2")                                          # one cut, after layer 1 of 4
    scorer, policy, shared = parts["scorer"], parts["policy"], parts["pruner"]

    def run(req, pruner):
        return adapter.prefill(req, scorer=scorer, policy=policy, pruner=pruner,
                               generator=torch.Generator().manual_seed(0))

    fresh = [run(req, KVOnlyPruner()) for req in reqs[1:]]
    run_layer = adapter.run_layer

    def out_of_memory_at_layer_2(i, *args, **kwargs):
        if i == 2:
            raise RuntimeError("out of memory")
        return run_layer(i, *args, **kwargs)

    monkeypatch.setattr(adapter, "run_layer", out_of_memory_at_layer_2)
    with pytest.raises(RuntimeError, match="out of memory"):
        run(reqs[0], shared)                                             # stops after its cut, before finish
    monkeypatch.undo()
    again = run(reqs[1], shared)
    batch = prefill_batch(adapter, reqs[1:], scorer=scorer, policy=policy, pruner=shared)
    for i, layer in enumerate(fresh[0].cache.layers):
        assert again.cache.layers[i].keys.shape == layer.keys.shape
        torch.testing.assert_close(again.cache.layers[i].keys, layer.keys)
        for b, single in enumerate(fresh):
            assert int(batch.key_masks[i][b].sum()) == single.cache.layers[i].keys.shape[2]
    decode = GreedyDecoder(MAX_NEW).generate
    assert torch.equal(decode(adapter, again), decode(adapter, fresh[0]))


def test_kv_only_batch_frees_each_old_cache_layer_before_cutting_the_next(monkeypatch):
    """kv_only's finish in a batch (batching._finish_rows) re-pads the rows' cut caches
    layer by layer; each old layer must be freed before the next is built, so that the
    peak is the full cache + the cut copies (batch 1: the full cache + one layer), not the
    old cache and the new one side by side (the views kept to compare what a finish
    replaced held all of the old cache: ~3x the cache at keep 1.0 in
    /proc/self/status VmHWM, 1.9x added; 2x after). Checked with weak references to
    each old layer's keys at every re-pad; the result is each row's own kept keys."""
    import weakref
    from types import SimpleNamespace

    import sparsevlm_exp.batching as batching
    from sparsevlm_exp.contracts import LoopState

    B, n_layers, H, d, lens = 3, 4, 2, 4, [9, 7, 5]
    L = max(lens)
    torch.manual_seed(0)
    layers = [SimpleNamespace(keys=torch.randn(B, H, L, d), values=torch.randn(B, H, L, d)) for _ in range(n_layers)]
    expected = [[layers[i].keys[b:b + 1, :, L - lens[b]:].clone() for i in range(n_layers)] for b in range(B)]
    mask = torch.arange(L)[None] >= torch.tensor([L - n for n in lens])[:, None]          # [B, L] left pads
    batch = LoopState(hidden=None, positions=None, orig_index=None, is_visual=None, visual_coords=None,
                      cache=SimpleNamespace(layers=layers))
    batch.layer_key_masks = [mask.clone() for _ in range(n_layers)]
    rows, pruners, dropped = [], [], [[1, 2], [1], [2, 3]]              # each row's dropped tokens
    for b, n in enumerate(lens):
        rows.append(LoopState(hidden=None, positions=None, orig_index=torch.arange(n)[None],
                              is_visual=torch.zeros(1, n, dtype=torch.bool), visual_coords=None, cache=None))
        pruner = KVOnlyPruner()
        pruner._drop = [torch.tensor([dropped[b]])]
        pruners.append(pruner)
    old = [weakref.ref(layer.keys) for layer in layers]
    seen, pad = [], batching._left_pad

    def spy(tensors, dim, fill, batch_dim=0):
        if dim == 2 and len(seen) % 2 == 0:              # the keys of the next layer (then its values)
            i = len(seen) // 2
            assert all(ref() is None for ref in old[:i]), f"layer {i} re-padded while an older layer is alive"
        if dim == 2:
            seen.append(dim)
        return pad(tensors, dim, fill, batch_dim)

    monkeypatch.setattr(batching, "_left_pad", spy)
    batching._finish_rows(batch, rows, pruners, list(range(B)))
    assert len(seen) == 2 * n_layers
    for b in range(B):
        keep = [t for t in range(lens[b]) if t not in dropped[b]]
        for i in range(n_layers):
            n = len(keep)
            torch.testing.assert_close(layers[i].keys[b:b + 1, :, -n:], expected[b][i][:, :, keep])
            assert batch.layer_key_masks[i][b].tolist() == [False] * (layers[i].keys.shape[2] - n) + [True] * n


# ---- the runner: batch_size=B ------------------------------------------------------------
def run_experiment(overrides: list[str], run_dir):
    import json

    from hydra import compose, initialize_config_dir

    from sparsevlm_exp.paths import CONF_DIR
    from sparsevlm_exp.runner import Experiment

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name="config", overrides=overrides)
    summary = Experiment(cfg, run_dir).run()
    records = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    return summary, sorted(records, key=lambda r: r["index"])


@pytest.mark.parametrize("method", [["scorer=v2", "keep=0.25", "layer=2"],
                                    ["scorer=v15", "keep=0.3", "layer=1", "pruner=recycle"],
                                    ["scorer=v2", "keep=0.25", "layer=2", "pruner=kv_only"]])
def test_runner_batch_records_equal_batch_1(tmp_path, method):
    """The embedded model on 12 `test` questions: batch_size=4 gives every sample the
    prediction, score, kept tokens and per-layer counts of batch_size=1; its timings are
    labelled as batch shares (batch_size in the record)."""
    common = ["dataset.size=12", "logger=none", "viz.n=0", "device=cpu"] + method
    _, one = run_experiment(common + ["batch_size=1"], tmp_path / "b1")
    summary, four = run_experiment(common + ["batch_size=4"], tmp_path / "b4")
    assert [r["index"] for r in four] == list(range(12))
    for a, b in zip(one, four):
        assert b["error"] is None
        for key in ("id", "prediction", "score", "kept", "recycled", "layer_counts", "n_visual",
                    "prefill_flops", "evidence_recall"):
            assert a[key] == b[key], (key, a["id"])
        assert a["batch_size"] == 1 and b["batch_size"] == 4
    assert summary["n_failed"] == 0


def test_sparse_generate_with_a_padded_batch_gives_each_row_its_batch_1_output(load_tiny):
    adapter = load_tiny("qwen2_5_vl")
    reqs = [adapter.encode(s) for s in samples()]
    batch = left_padded_batch(adapter, reqs)
    pads = (batch["attention_mask"] == 0).sum(dim=1).tolist()
    from sparsevlm_exp import sparse_generate

    out = sparse_generate(adapter.model, batch, scorer="v2", keep=0.3, layer=1, max_new_tokens=MAX_NEW)
    assert len(out.rows) == len(reqs)
    for b, req in enumerate(reqs):
        alone = sparse_generate(adapter.model, req.model_inputs, scorer="v2", keep=0.3, layer=1,
                                max_new_tokens=MAX_NEW)
        assert torch.equal(out.rows[b].sequences[0], trim_at_eos(alone.sequences[0], adapter.eos_token_ids))
        assert out.rows[b].layer_counts == alone.layer_counts
        for mine, single in zip(out.rows[b].kept_indices, alone.kept_indices):
            assert torch.equal(mine, single + pads[b])     # indices into the row of the padded input


def test_llava_batch_rows_equal_batch_1(tmp_path):
    """LLaVA (1-D RoPE): rows with 1 and 2 images and different questions, v15 + recycle
    with the official renumbered positions (per-row decode positions)."""
    from sparsevlm_exp.models.llava import LlavaAdapter
    from test_llava import save_tiny_llava

    adapter = LlavaAdapter.load(pretrained=save_tiny_llava(tmp_path / "llava"), dtype="float32", device="cpu")
    reqs = [adapter.encode(s) for s in samples()]
    policy = FixedPolicy(layer=1, keep=0.3)
    state = prefill_batch(adapter, reqs, scorer=V15Scorer(), policy=policy,
                          pruner=RecyclePruner(positions="renumbered"))
    tokens = GreedyDecoder(MAX_NEW).generate(adapter, state)
    for b, req in enumerate(reqs):
        single, ours = alone(adapter, req, V15Scorer(), policy, RecyclePruner(positions="renumbered"))
        assert [e.kept_index.tolist() for e in state.rows[b].events] == [e.kept_index.tolist() for e in single.events]
        assert torch.equal(trim_at_eos(tokens[b], adapter.eos_token_ids), trim_at_eos(ours, adapter.eos_token_ids))


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_5"])
def test_qwen3_families_batch_rows_equal_batch_1(tmp_path, family):
    """DeepStack planes (Qwen3-VL) are cut and re-padded with their rows; Gated DeltaNet
    layers (Qwen3.5) zero the re-padded pads, so each row is its batch-1 self."""
    from sparsevlm_exp.models import Qwen3_5Adapter, Qwen3VLAdapter
    from tiny_models import save_tiny_qwen

    cls = Qwen3_5Adapter if family == "qwen3_5" else Qwen3VLAdapter
    adapter = cls.load(pretrained=save_tiny_qwen(family, tmp_path / family), dtype="float32", device="cpu")
    smp = samples()
    smp[2].images = [noise_image(96, 160, seed=4)]          # patch 16: sizes that divide into 32 px tokens
    smp[0].images = [noise_image(128, 96, seed=1)]
    smp[1].images = [noise_image(64, 64, seed=2), noise_image(96, 64, seed=3)]
    reqs = [adapter.encode(s) for s in smp]
    policy = FixedPolicy(layer=1, keep=0.3)
    state = prefill_batch(adapter, reqs, scorer=V15Scorer(), policy=policy, pruner=DropPruner())
    tokens = GreedyDecoder(MAX_NEW).generate(adapter, state)
    for b, req in enumerate(reqs):
        single, ours = alone(adapter, req, V15Scorer(), policy, DropPruner())
        assert [e.kept_index.tolist() for e in state.rows[b].events] == [e.kept_index.tolist() for e in single.events]
        assert torch.equal(trim_at_eos(tokens[b], adapter.eos_token_ids), trim_at_eos(ours, adapter.eos_token_ids))
    if family == "qwen3_5":     # a recurrent state cannot drop tokens: refused in a batch as alone
        with pytest.raises(ConfigError, match="pruner=kv_only is not allowed with Qwen3.5"):
            prefill_batch(adapter, reqs, scorer=V15Scorer(), policy=policy, pruner=KVOnlyPruner())


@pytest.mark.parametrize("scorer_cls", [RandomScorer, UniformScorer])
def test_attention_free_cut_at_a_linear_attention_layer_runs_batched(tmp_path, scorer_cls):
    """Qwen3.5's layers 0 and 2 are Gated DeltaNet (linear attention, no keys in the
    cache). A scorer that reads no attention may cut there (check_parts allows it); the
    batch read that layer's keys anyway and raised AttributeError, so sparse_generate
    failed and the runner silently fell back to one request at a time. Each row now
    gets its batch-1 kept tokens and answer at both linear layers."""
    from sparsevlm_exp.models import Qwen3_5Adapter
    from tiny_models import save_tiny_qwen

    adapter = Qwen3_5Adapter.load(pretrained=save_tiny_qwen("qwen3_5", tmp_path / "q35"), dtype="float32",
                                  device="cpu")
    assert adapter.model.config.get_text_config().layer_types[0] == "linear_attention"
    smp = samples()
    smp[2].images = [noise_image(96, 160, seed=4)]          # patch 16: sizes that divide into 32 px tokens
    smp[0].images = [noise_image(128, 96, seed=1)]
    smp[1].images = [noise_image(64, 64, seed=2), noise_image(96, 64, seed=3)]
    reqs = [adapter.encode(s) for s in smp]
    policy = SchedulePolicy(layers=[0, 2], keep=[0.5, 0.25])
    state = prefill_batch(adapter, reqs, scorer=scorer_cls(), policy=policy, pruner=DropPruner(),
                          generators=[torch.Generator().manual_seed(0) for _ in reqs])
    tokens = GreedyDecoder(MAX_NEW).generate(adapter, state)
    for b, req in enumerate(reqs):
        single, ours = alone(adapter, req, scorer_cls(), policy, DropPruner())
        assert [e.layer for e in state.rows[b].events] == [0, 2]
        assert [e.kept_index.tolist() for e in state.rows[b].events] == [e.kept_index.tolist() for e in single.events]
        assert torch.equal(trim_at_eos(tokens[b], adapter.eos_token_ids), trim_at_eos(ours, adapter.eos_token_ids))


def test_throughput_mode_compares_batch_1_and_batch_b(tmp_path):
    from sparsevlm_exp.throughput import main

    out = tmp_path / "t.json"
    assert main(["--out", str(out), "dataset.size=8", "batch_size=4", "device=cpu"]) == 0
    import json

    result = json.loads(out.read_text())
    assert result["identical"] and result["n_identical"] == 8
    assert result["batch_1"]["samples"] == result["batch_4"]["samples"] == 8
    assert result["speedup"] > 0 and result["batch_4"]["tokens_per_s"] > 0


def test_throughput_measures_batch_1_and_batch_b_side_by_side(tmp_path, monkeypatch):
    # 40 samples at B = 2: chunks of one grouping window (8 batches = 16 samples), each
    # answered by both modes back to back, which goes first alternating; every sample is
    # answered once per mode and each mode's time is the sum over its chunks.
    from sparsevlm_exp import runner, throughput

    calls = []
    real = runner.Experiment._records

    def spy(self, adapter, todo, text_cfg):
        calls.append((int(self.cfg.batch_size), list(todo)))
        yield from real(self, adapter, todo, text_cfg)

    monkeypatch.setattr(runner.Experiment, "_records", spy)
    result = throughput.measure(["dataset.size=40", "batch_size=2", "device=cpu", "decoder.max_new_tokens=2"])
    chunks = [list(range(0, 16)), list(range(16, 32)), list(range(32, 40))]
    assert calls == [(1, chunks[0]), (2, chunks[0]), (2, chunks[1]), (1, chunks[1]), (1, chunks[2]), (2, chunks[2])]
    assert result["batch_1"]["samples"] == result["batch_2"]["samples"] == 40
    assert result["identical"] and result["n_identical"] == 40


ALL_SCORERS = ["v15", "v2", "fastv", "pdrop", "dart", "random", "uniform", "divprune", "visionzip", "cdpruner",
               "vispruner", "vision_attn"]


@pytest.mark.parametrize("scorer", ALL_SCORERS)
def test_every_scorer_batched_equals_batch_1(load_tiny, scorer):
    """Every scorer of conf/scorer at its own stage (pre-LLM ones at -1), from its yaml."""
    from sparsevlm_exp.api import load_components

    adapter = load_tiny("qwen2_5_vl")
    layer = -1 if scorer in ("divprune", "visionzip", "cdpruner", "vispruner", "vision_attn") else 1
    parts = load_components(scorer=scorer, keep=0.3, layer=layer, policy="fixed", pruner="drop", max_new_tokens=4)
    reqs = [adapter.encode(s) for s in samples()]
    state = prefill_batch(adapter, reqs, scorer=parts["scorer"], policy=parts["policy"], pruner=parts["pruner"])
    tokens = GreedyDecoder(MAX_NEW).generate(adapter, state)
    for b, req in enumerate(reqs):
        single, ours = alone(adapter, req, parts["scorer"], parts["policy"], parts["pruner"])
        assert [e.kept_index.tolist() for e in state.rows[b].events] == [e.kept_index.tolist() for e in single.events]
        assert torch.equal(trim_at_eos(tokens[b], adapter.eos_token_ids), trim_at_eos(ours, adapter.eos_token_ids))


@pytest.mark.parametrize("policy", [("schedule", ["policy.layers=[1,2]", "policy.keep=[0.5,0.25]",
                                                  "policy.reference_count=null"]),
                                    ("adaptive", ["policy.layers=[1,2]"])])
def test_multi_cut_policies_batched_equal_batch_1(load_tiny, policy):
    from sparsevlm_exp.api import load_components

    adapter = load_tiny("qwen2_5_vl")
    name, extra = policy
    overrides = {o.split("=")[0].replace(".", "__"): eval(o.split("=")[1].replace("null", "None")) for o in extra}
    parts = load_components(scorer="v15", keep=0.3, layer=1, policy=name, pruner="recycle", max_new_tokens=4,
                            **overrides)
    reqs = [adapter.encode(s) for s in samples()]
    state = prefill_batch(adapter, reqs, scorer=parts["scorer"], policy=parts["policy"], pruner=parts["pruner"])
    tokens = GreedyDecoder(MAX_NEW).generate(adapter, state)
    for b, req in enumerate(reqs):
        single, ours = alone(adapter, req, parts["scorer"], parts["policy"], parts["pruner"])
        assert len(single.events) == 2
        assert state.rows[b].layer_counts == single.layer_counts
        assert [e.kept_index.tolist() for e in state.rows[b].events] == [e.kept_index.tolist() for e in single.events]
        assert torch.equal(trim_at_eos(tokens[b], adapter.eos_token_ids), trim_at_eos(ours, adapter.eos_token_ids))


def test_a_request_with_its_own_left_pads_is_charged_for_its_real_tokens_only(load_tiny):
    """A row that arrives left-padded (one row of a processor-padded batch) in a batch:
    its seq_lens (its FLOPs) are those of the same request unpadded, alone (the batch
    strips a row's own pads before assembling; engine.prefill's batch-1 path now agrees)."""
    from test_padding import left_pad

    adapter = load_tiny("qwen2_5_vl")
    plain = [adapter.encode(s) for s in samples()[:2]]
    padded = adapter.request_from_inputs(left_pad(plain[0].model_inputs, 3, adapter.processor.tokenizer.pad_token_id))
    policy = FixedPolicy(layer=1, keep=0.3)
    state = prefill_batch(adapter, [padded, plain[1]], scorer=V15Scorer(), policy=policy, pruner=DropPruner())
    single, _ = alone(adapter, plain[0], V15Scorer(), policy, DropPruner())
    assert state.rows[0].seq_lens == single.seq_lens
    assert state.rows[0].layer_counts == single.layer_counts


# ---- videos in batches -------------------------------------------------------------------
def video_samples() -> list[Sample]:
    """Clips of different lengths, sizes and rates (so different token counts, temporal
    steps and, on Qwen2.5-VL, second_per_grid_ts), a clip + an image, an image alone."""
    from test_video import clip as _clip

    def clip(seed, frames, h, w, fps):
        video = _clip(seed, fps)
        video.frames, video.timestamps = video.frames[:frames, :h, :w], video.timestamps[:frames]
        return video

    return [
        Sample(id="v8", question="what colour is the circle", images=[], answers=["x"],
               videos=[clip(1, 8, 112, 168, 2.0)]),
        Sample(id="v4", question="red or blue", images=[], answers=["x"], videos=[clip(2, 4, 84, 112, 1.0)]),
        Sample(id="vi", question="is the square left of the circle", images=[noise_image(128, 96, seed=5)],
               answers=["x"], videos=[clip(3, 6, 112, 112, 2.0)]),
        Sample(id="i", question="what", images=[noise_image(96, 64, seed=6)], answers=["x"]),
    ]


@pytest.fixture(scope="module")
def video_adapters(tmp_path_factory):
    from test_video import ADAPTERS, PIXELS
    from tiny_models import save_tiny_qwen

    root, cache = tmp_path_factory.mktemp("tiny_batch_video"), {}

    def get(family):
        if family not in cache:
            adapter = ADAPTERS[family].load(pretrained=save_tiny_qwen(family, root / family), dtype="float32",
                                            device="cpu", attn_implementation="sdpa")
            adapter.VIDEO_PIXELS = PIXELS[family]          # small clips (this instance only)
            cache[family] = adapter
        return cache[family]

    return get


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_a_padded_batch_with_videos_gives_each_row_its_batch_1_output(video_adapters, family):
    """sparse_generate on a left-padded processor batch of clips (and a clip + an image,
    and an image): each row gets the sequence, kept tokens and per-layer counts that the
    same row's processor output gets alone (split_inputs hands each row its own clips,
    pixel rows and second_per_grid_ts)."""
    from sparsevlm_exp import sparse_generate

    adapter = video_adapters(family)
    reqs = [adapter.encode(s) for s in video_samples()]
    batch = left_padded_batch(adapter, reqs)
    if family == "qwen2_5_vl":       # two rates: a row given another row's step would move its positions
        assert batch["second_per_grid_ts"].tolist() == [1.0, 2.0, 1.0]
    pads = (batch["attention_mask"] == 0).sum(dim=1).tolist()
    # the processor locates the user's instruction (the raters) in the chat template
    out = sparse_generate(adapter.model, batch, scorer="v2", keep=0.3, layer=1, max_new_tokens=MAX_NEW,
                          processor=adapter.processor)
    kept_counts = set()
    for b, req in enumerate(reqs):
        alone = sparse_generate(adapter.model, req.model_inputs, scorer="v2", keep=0.3, layer=1,
                                max_new_tokens=MAX_NEW, processor=adapter.processor)
        assert torch.equal(out.rows[b].sequences[0], trim_at_eos(alone.sequences[0], adapter.eos_token_ids))
        assert out.rows[b].n_visual == alone.n_visual == req.visual_index.shape[1]
        assert out.rows[b].layer_counts == alone.layer_counts
        for mine, single in zip(out.rows[b].kept_indices, alone.kept_indices, strict=True):
            assert torch.equal(mine, single + pads[b])
            kept_counts.add(mine.shape[1])
    assert len(kept_counts) == len(reqs)                 # every row kept its own count


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_keep_all_video_batch_equals_hf_generate_on_the_padded_batch(video_adapters, family):
    from sparsevlm_exp import sparse_generate

    adapter = video_adapters(family)
    reqs = [adapter.encode(s) for s in video_samples()]
    batch = left_padded_batch(adapter, reqs)
    out = sparse_generate(adapter.model, batch, scorer="fastv", keep=1.0, layer=1, max_new_tokens=MAX_NEW)
    hf = adapter.model.generate(**batch, do_sample=False, max_new_tokens=MAX_NEW)[:, batch["input_ids"].shape[1]:]
    for b in range(len(reqs)):
        assert torch.equal(out.rows[b].sequences[0], trim_at_eos(hf[b], adapter.eos_token_ids)), b


def test_split_inputs_refuses_pads_that_do_not_match_the_grids(video_adapters):
    adapter = video_adapters("qwen2_5_vl")
    batch = left_padded_batch(adapter, [adapter.encode(s) for s in video_samples()[:2]])
    batch["video_grid_thw"] = batch["video_grid_thw"][:1]          # the second clip's grid lost
    with pytest.raises(ValueError, match="row 1: its video pads do not match video_grid_thw"):
        adapter.split_inputs(batch)
    batch = left_padded_batch(adapter, [adapter.encode(s) for s in video_samples()[:2]])
    batch["video_grid_thw"] = torch.cat([batch["video_grid_thw"], batch["video_grid_thw"][:1]])
    with pytest.raises(ValueError, match="video_grid_thw has 3 grids but the rows' pads use 2"):
        adapter.split_inputs(batch)


@pytest.mark.parametrize("dataset", ["folder", "msvd_qa"])
def test_runner_batches_video_samples_with_batch_1_records(tmp_path, dataset):
    """dataset=folder (a clip; frames + an image) and dataset=msvd_qa (clips of different
    lengths) with batch_size=2: every record equals batch_size=1's, and was answered in a
    batch (batch_size 2 in the record: a failed batch would fall back to 1 at a time)."""
    import json
    import os

    from test_video import _write_clip
    from tiny_models import save_tiny_qwen

    root = tmp_path / "data"
    if dataset == "folder":
        os.makedirs(root / "frames1")
        _write_clip(root / "clip0.mp4")
        for i in range(4):
            noise_image(96, 64, seed=i).save(root / "frames1" / f"{i}.png")
        noise_image(112, 84).save(root / "img.png")
        rows = [{"id": "v0", "video": "clip0.mp4", "question": "what colour", "answers": ["red"]},
                {"id": "v1", "video": "frames1", "image": "img.png", "question": "what colour is it",
                 "answers": ["blue"]},
                {"id": "i2", "image": "img.png", "question": "red or blue", "answers": ["red"]}]
        (root / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        os.makedirs(root / "videos")
        for name, n in (("vidA", 8), ("vidB", 16), ("vidC", 12)):
            _write_clip(root / "videos" / f"{name}.mp4", seed=n, n=n)
        names = ["vidA", "vidB", "vidC"]
        (root / "test_q.json").write_text(json.dumps([{"video_name": v, "question": f"what is in {v}",
                                                       "question_id": f"q{i}"} for i, v in enumerate(names)]))
        (root / "test_a.json").write_text(json.dumps([{"answer": "cooking", "question_id": f"q{i}", "answer_type": 3}
                                                      for i in range(3)]))
    model = save_tiny_qwen("qwen3_vl", tmp_path / "qwen3_vl")
    common = ["model=qwen3_vl_2b", f"model.pretrained={model}", f"dataset={dataset}", f"dataset.path={root}",
              "scorer=v2", "keep=0.3", "layer=1", "logger=none", "viz.n=0", "device=cpu",
              "decoder.max_new_tokens=6"]
    _, one = run_experiment(common + ["batch_size=1"], tmp_path / "b1")
    summary, two = run_experiment(common + ["batch_size=2"], tmp_path / "b2")
    assert len(two) == 3 and summary["n_failed"] == 0
    for a, b in zip(one, two):
        assert b["error"] is None and b["n_visual"] > 0
        for key in ("id", "prediction", "kept", "layer_counts", "n_visual", "prefill_flops"):
            assert a[key] == b[key], (key, a["id"])
    assert sorted(r["batch_size"] for r in two) == [1, 2, 2]    # 3 samples: a batch of 2 and one of 1


def test_split_inputs_refuses_pixels_that_do_not_match_the_grids(load_tiny):
    """A processor batch whose pixel rows, grids or per-token tensors do not add up is
    refused by split_inputs with one ValueError line naming the key: never an IndexError
    from deep inside, nor rows silently handed too few (or their neighbour's) pixels.
    A text-only row inside the batch is fine (it takes no media)."""
    adapter = load_tiny("qwen2_5_vl")
    smp = [Sample(id="t", question="just text", images=[], answers=["x"])] + samples()[:2]
    batch = left_padded_batch(adapter, [adapter.encode(s) for s in smp])
    rows = adapter.split_inputs(batch)
    assert "pixel_values" not in rows[0] and rows[2]["image_grid_thw"].shape[0] == 2
    n = batch["pixel_values"].shape[0]
    cases = [
        ({"pixel_values": batch["pixel_values"][:-4]}, f"pixel_values has {n - 4} rows but image_grid_thw describes {n}"),
        ({"pixel_values": torch.cat([batch["pixel_values"], batch["pixel_values"][:4]])},
         f"pixel_values has {n + 4} rows but image_grid_thw describes {n}"),
        ({"pixel_values": None}, "image_grid_thw is given but pixel_values is not"),
        ({"pixel_values": None, "image_grid_thw": None}, "row 1 has 12 image pads but no image_grid_thw was given"),
        ({"mm_token_type_ids": batch["mm_token_type_ids"][:, 1:]}, "mm_token_type_ids has shape"),
    ]
    for change, message in cases:
        broken = {**batch, **change}
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            adapter.split_inputs(broken)


def test_llava_split_inputs_refuses_images_that_do_not_match_the_rows(tmp_path):
    """LLaVA rows take whole images in order: an image too many, too few, or no
    pixel_values at all is one ValueError line, not a row silently given the wrong images."""
    from sparsevlm_exp.models.llava import LlavaAdapter
    from test_llava import save_tiny_llava

    adapter = LlavaAdapter.load(pretrained=save_tiny_llava(tmp_path / "llava"), dtype="float32", device="cpu")
    reqs = [adapter.encode(s) for s in samples()]
    pad = adapter.processor.tokenizer.pad_token_id or 0
    L = max(r.input_ids.shape[1] for r in reqs)
    batch = {"input_ids": torch.cat([torch.cat([torch.full((1, L - r.input_ids.shape[1]), pad), r.input_ids], 1)
                                     for r in reqs]),
             "attention_mask": torch.cat([torch.cat([torch.zeros(1, L - r.input_ids.shape[1], dtype=torch.long),
                                                     torch.ones_like(r.input_ids)], 1) for r in reqs]),
             "pixel_values": torch.cat([r.model_inputs["pixel_values"] for r in reqs])}
    rows = adapter.split_inputs(batch)
    assert [r["pixel_values"].shape[0] for r in rows] == [1, 2, 1]
    pixels = batch["pixel_values"]
    for broken, message in [(torch.cat([pixels, pixels[:1]]), "pixel_values has 5 images but the rows' image tokens use 4"),
                            (pixels[:3], "row 2: its"), (None, "row 0 has")]:
        with pytest.raises(ValueError, match=message):
            adapter.split_inputs({**batch, "pixel_values": broken})


def test_runner_batches_keep_batch_1_pictures_and_failures(tmp_path, monkeypatch):
    """batch_size=2 with viz.n=4, one sample whose encoding raises and one whose prefill
    raises (its whole batch fails and is answered one at a time): every index is recorded
    exactly once; the failures are batch 1's records (error, question and answers); the
    batch mate of the failing sample gets its batch-1 record; and kept-token pictures go
    to the same samples as at batch 1 (the first viz.n to run), not only to the first row
    of the first batch."""
    import json

    from sparsevlm_exp.models.qwen2_vl import Qwen2VLAdapter

    encode, embed = Qwen2VLAdapter.encode, Qwen2VLAdapter.embed

    def bad_encode(self, sample):
        if sample.id.endswith("/1"):
            raise RuntimeError("encode refused")
        req = encode(self, sample)
        req.poisoned = sample.id.endswith("/5")        # marked on the request (an id() could be reused)
        return req

    def bad_embed(self, req):
        if getattr(req, "poisoned", False):
            raise RuntimeError("prefill refused")
        return embed(self, req)

    monkeypatch.setattr(Qwen2VLAdapter, "encode", bad_encode)
    monkeypatch.setattr(Qwen2VLAdapter, "embed", bad_embed)
    common = ["dataset.size=8", "logger=none", "viz.n=4", "device=cpu", "decoder.max_new_tokens=4"]
    _, one = run_experiment(common + ["batch_size=1"], tmp_path / "b1")
    summary, two = run_experiment(common + ["batch_size=2"], tmp_path / "b2")
    lines = (tmp_path / "b2" / "samples.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["index"] for line in lines) == list(range(8))
    assert summary["n_failed"] == 2
    for a, b in zip(one, two):
        for key in ("index", "id", "question", "answers", "error", "prediction", "kept", "layer_counts"):
            assert a[key] == b[key], (key, a["index"])
    assert [r["index"] for r in two if r["error"]] == [1, 5]
    # answered in batches of 2, except the failed batch's rows (alone) and the odd one out
    assert sorted(r["batch_size"] for r in two if not r["error"]).count(2) >= 2
    pictured = [r["index"] for r in two if r["pictures"]]
    assert pictured == [r["index"] for r in one if r["pictures"]] == [0, 2, 3]
