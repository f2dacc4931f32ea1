"""Left padding (issue 15 item 1): a request whose input_ids carry LEFT pad tokens with
attention_mask = 0 (one row of a processor-padded batch) is honoured everywhere.

Oracles:
- keep=1.0 on a padded request == HF `generate(do_sample=False)` on the same padded
  inputs, token for token (Qwen2-VL, Qwen2.5-VL, LLaVA, Qwen3-VL, Qwen3.5; sdpa and eager);
- a pruned padded request == the same request unpadded: the same kept tokens (indices
  shifted by the pad count) and the same generated tokens, for several scorers and
  every pruner;
- on the embedded default model, the issue's reproduction (4 pads prepended to `test`
  samples) gives the unpadded answers through `sparse_generate`.
"""
from __future__ import annotations

import pytest
import torch

from sparsevlm_exp import sparse_generate
from sparsevlm_exp.decoding import GreedyDecoder
from sparsevlm_exp.models.llava import LlavaAdapter
from sparsevlm_exp.models.qwen2_vl import Qwen2VLAdapter
from sparsevlm_exp.models.qwen3_5 import Qwen3_5Adapter
from sparsevlm_exp.models.qwen3_vl import Qwen3VLAdapter
from sparsevlm_exp.policies import FixedPolicy
from sparsevlm_exp.pruners import DropPruner, KVOnlyPruner, RecyclePruner
from sparsevlm_exp.scorers import FastVScorer, V15Scorer, V2Scorer
from sparsevlm_exp.scorers.divprune import DivPruneScorer
from test_llava import save_tiny_llava
from tiny_models import sample, save_tiny_qwen, tiny_adapter_loader

MAX_NEW = 8
N_PADS = 4
ADAPTERS = {"qwen2_vl": Qwen2VLAdapter, "qwen2_5_vl": Qwen2VLAdapter, "qwen3_vl": Qwen3VLAdapter,
            "qwen3_5": Qwen3_5Adapter, "llava": LlavaAdapter}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pad")
    dirs = {fam: save_tiny_qwen(fam, root / fam) for fam in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5")}
    dirs["llava"] = save_tiny_llava(root / "llava")
    return dirs


@pytest.fixture(scope="module")
def load(tiny_dirs):
    return tiny_adapter_loader(tiny_dirs, ADAPTERS)


def pad_id(adapter) -> int:
    tok = adapter.processor.tokenizer
    return tok.pad_token_id if tok.pad_token_id is not None else 0


def left_pad(inputs: dict, n: int, pad: int) -> dict:
    """The processor output with n pad tokens prepended, attention_mask 0 on them (and 0
    in mm_token_type_ids), as a left-padding processor gives one row of a batch."""
    out = dict(inputs)
    ids = inputs["input_ids"]
    out["input_ids"] = torch.cat([torch.full((1, n), pad, dtype=ids.dtype), ids], dim=1)
    mask = inputs.get("attention_mask", torch.ones_like(ids))
    out["attention_mask"] = torch.cat([torch.zeros(1, n, dtype=mask.dtype), mask], dim=1)
    if inputs.get("mm_token_type_ids") is not None:
        types = inputs["mm_token_type_ids"]
        out["mm_token_type_ids"] = torch.cat([torch.zeros(1, n, dtype=types.dtype), types], dim=1)
    return out


def run(adapter, inputs: dict, scorer=None, keep=1.0, layer=1, pruner=None):
    req = adapter.request_from_inputs(dict(inputs))
    policy = FixedPolicy(layer=layer, keep=keep) if scorer is not None else None
    state = adapter.prefill(req, scorer=scorer, policy=policy, pruner=pruner,
                            generator=torch.Generator().manual_seed(0))
    return req, state, GreedyDecoder(MAX_NEW).generate(adapter, state)


def hf_generate(adapter, inputs: dict) -> torch.Tensor:
    out = adapter.model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)
    return out[:, inputs["input_ids"].shape[1]:]


# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava", "qwen3_vl", "qwen3_5"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_keep_all_on_a_padded_request_equals_hf_generate(load, family, attn):
    adapter = load(family, attn)
    inputs = left_pad(adapter.encode(sample(n_images=1)).model_inputs, N_PADS, pad_id(adapter))
    req, state, ours = run(adapter, inputs, scorer=V15Scorer(), keep=1.0, pruner=DropPruner())
    assert state.events[0].kept_index.shape[1] == req.visual_index.shape[1]
    assert int(req.visual_index[0, 0]) >= N_PADS and int(req.text_index[0, 0]) >= N_PADS
    # every layer ran the whole prompt: its real tokens, the pads not counted (FLOPs)
    assert state.seq_lens == [req.input_ids.shape[1] - N_PADS] * adapter.n_layers
    assert torch.equal(ours, hf_generate(adapter, inputs))
    # the plain path (no scorer) too
    _, _, plain = run(adapter, inputs)
    assert torch.equal(plain, ours)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_positions_of_a_padded_request_are_the_unpadded_ones(load, family):
    adapter = load(family)
    inputs = adapter.encode(sample(n_images=2)).model_inputs
    plain = adapter.positions(adapter.request_from_inputs(dict(inputs)))
    padded = adapter.positions(adapter.request_from_inputs(left_pad(inputs, N_PADS, pad_id(adapter))))
    assert torch.equal(padded[:, :, N_PADS:], plain)
    assert int(padded[:, :, :N_PADS].abs().sum()) == 0          # HF puts pads at 0


SCORERS = {"v15": (V15Scorer, 1), "v2": (V2Scorer, 1), "fastv": (FastVScorer, 1), "divprune": (DivPruneScorer, -1)}
PRUNERS = {"drop": DropPruner, "kv_only": KVOnlyPruner, "recycle": RecyclePruner}


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
@pytest.mark.parametrize("scorer_name", list(SCORERS))
@pytest.mark.parametrize("pruner_name", list(PRUNERS))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_pruned_padded_equals_pruned_unpadded(load, family, scorer_name, pruner_name, attn):
    if pruner_name != "drop" and scorer_name == "divprune":
        pytest.skip("a pre-LLM cut with another pruner adds nothing the in-LLM cuts do not test")
    adapter = load(family, attn)
    inputs = adapter.encode(sample(n_images=2)).model_inputs
    cls, layer = SCORERS[scorer_name]
    kwargs = dict(keep=0.25, layer=layer)
    _, plain_state, plain = run(adapter, inputs, scorer=cls(), pruner=PRUNERS[pruner_name](), **kwargs)
    _, state, padded = run(adapter, left_pad(inputs, N_PADS, pad_id(adapter)), scorer=cls(),
                           pruner=PRUNERS[pruner_name](), **kwargs)
    for a, b in zip(plain_state.events, state.events):
        assert torch.equal(b.kept_index, a.kept_index + N_PADS)
        assert a.n_recycled == b.n_recycled
    assert plain_state.layer_counts == state.layer_counts
    # FLOPs count real tokens only: the pads are no work the method does
    assert state.seq_lens == plain_state.seq_lens
    assert torch.equal(padded, plain)
    # every layer's decode mask covers its own cache, pads masked
    for i, mask in enumerate(state.key_masks):
        assert mask.shape[1] == state.cache.layers[i].keys.shape[2]
        assert int((~mask).sum()) == N_PADS


# The scorers the test above leaves out: every other pre-LLM and in-LLM peer (a pad must
# never be a pivot, a diversity seed, a [CLS]-less attention receiver or a uniform slot).
OTHER_SCORERS = {"visionzip": -1, "cdpruner": -1, "vispruner": -1, "vision_attn": -1, "uniform": -1, "random": -1,
                 "pdrop": 1, "dart": 1, "uniform_llm": 1}


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
@pytest.mark.parametrize("scorer_name", list(OTHER_SCORERS))
def test_every_other_scorer_pruned_padded_equals_pruned_unpadded(load, family, scorer_name):
    from sparsevlm_exp import scorers

    classes = {"visionzip": scorers.VisionZipScorer, "cdpruner": scorers.CDPrunerScorer,
               "vispruner": scorers.VisPrunerScorer, "vision_attn": scorers.VisionAttentionScorer,
               "uniform": scorers.UniformScorer, "random": scorers.RandomScorer, "pdrop": scorers.PDropScorer,
               "dart": scorers.DARTScorer, "uniform_llm": scorers.UniformScorer}
    adapter = load(family)
    inputs = adapter.encode(sample(n_images=2)).model_inputs
    layer = OTHER_SCORERS[scorer_name]
    _, a_state, a = run(adapter, inputs, scorer=classes[scorer_name](), keep=0.25, layer=layer, pruner=DropPruner())
    _, b_state, b = run(adapter, left_pad(inputs, N_PADS, pad_id(adapter)), scorer=classes[scorer_name](),
                        keep=0.25, layer=layer, pruner=DropPruner())
    assert torch.equal(b_state.events[0].kept_index, a_state.events[0].kept_index + N_PADS)
    torch.testing.assert_close(b_state.events[0].scores, a_state.events[0].scores, rtol=1e-5, atol=1e-6)
    assert b_state.seq_lens == a_state.seq_lens and b_state.layer_counts == a_state.layer_counts
    assert torch.equal(a, b)


@pytest.mark.parametrize("pruner", [DropPruner(positions="renumbered"), RecyclePruner(positions="renumbered")])
def test_renumbered_positions_count_real_tokens_only(load, pruner):
    """The official v1/v1.5 renumbering (LLaVA) over a padded row: 0.. over its real
    tokens, so each layer decodes at its unpadded position and the tokens are the same."""
    adapter = load("llava")
    inputs = adapter.encode(sample(n_images=1)).model_inputs
    _, a_state, a = run(adapter, inputs, scorer=V15Scorer(), keep=0.25, layer=1, pruner=pruner)
    _, b_state, b = run(adapter, left_pad(inputs, N_PADS, pad_id(adapter)), scorer=V15Scorer(), keep=0.25,
                        layer=1, pruner=pruner)
    assert torch.equal(b_state.next_position, a_state.next_position)
    assert torch.equal(b_state.layer_positions.next, a_state.layer_positions.next)
    assert torch.equal(b_state.events[0].kept_index, a_state.events[0].kept_index + N_PADS)
    assert torch.equal(a, b)


def test_pruned_padded_equals_unpadded_on_qwen3_5(load):
    """Gated DeltaNet layers zero the pads' inputs (HF's 2-D mask), full-attention layers
    mask them: a padded request is its unpadded self, pruned too."""
    adapter = load("qwen3_5")
    inputs = adapter.encode(sample(n_images=1)).model_inputs
    _, a_state, a = run(adapter, inputs, scorer=V15Scorer(), keep=0.25, layer=1, pruner=DropPruner())
    _, b_state, b = run(adapter, left_pad(inputs, N_PADS, pad_id(adapter)), scorer=V15Scorer(), keep=0.25,
                        layer=1, pruner=DropPruner())
    assert torch.equal(b_state.events[0].kept_index, a_state.events[0].kept_index + N_PADS)
    assert torch.equal(a, b)


def test_pads_are_never_raters_nor_query_rows(load):
    """Raters and FastV's last token come from real tokens only, whatever the pad id is
    (here the pad id is also a word of the question)."""
    adapter = load("qwen2_5_vl")
    inputs = adapter.encode(sample(n_images=1)).model_inputs
    word = int(inputs["input_ids"][0, -5])
    req = adapter.request_from_inputs(left_pad(inputs, N_PADS, word))
    assert bool((req.text_index >= N_PADS).all())
    assert int(req.visual_index.min()) >= N_PADS
    embeds = adapter.embed(req)
    assert int(V15Scorer().query_rows(embeds, req.visual_index, req.text_index).min()) >= N_PADS
    assert int(FastVScorer().query_rows(embeds, req.visual_index, req.text_index)[0, 0]) == embeds.shape[1] - 1


def test_right_padding_and_a_wrong_mask_shape_are_refused(load):
    adapter = load("qwen2_vl")
    inputs = dict(adapter.encode(sample(n_images=1)).model_inputs)
    right = dict(inputs)
    right["attention_mask"] = torch.ones_like(inputs["input_ids"])
    right["attention_mask"][0, -1] = 0
    with pytest.raises(ValueError, match="LEFT padding"):
        adapter.request_from_inputs(right)
    wrong = dict(inputs)
    wrong["attention_mask"] = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        adapter.request_from_inputs(wrong)


# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def embedded():
    from sparsevlm_exp.models.loading import load_pretrained

    model, processor = load_pretrained("asset:shapes_vlm", dtype="float32", device="cpu")
    return Qwen2VLAdapter(model, processor)


def test_embedded_model_padded_requests_give_the_unpadded_answers(embedded):
    """The issue's reproduction: the first 40 `test` samples with 4 pads prepended (mask 0,
    0 in mm_token_type_ids) give their unpadded answers at keep=1.0 (3 of them changed
    before) and pruned with v2 at keep 0.25 (the same kept tokens, shifted)."""
    from sparsevlm_exp.api import load_components
    from sparsevlm_exp.data.shapes import ShapesDataset

    adapter, pad = embedded, pad_id(embedded)
    changed = []
    for keep, scorer in ((1.0, "v15"), (0.25, "v2")):
        parts = load_components(scorer=scorer, keep=keep, layer=2, policy="fixed", pruner="drop",
                                max_new_tokens=6)
        for smp in ShapesDataset(split="test", size=40):
            inputs = adapter.encode(smp).model_inputs
            outs = []
            for request in (inputs, left_pad(inputs, N_PADS, pad)):
                req = adapter.request_from_inputs(dict(request))
                state = adapter.prefill(req, scorer=parts["scorer"], policy=parts["policy"],
                                        pruner=parts["pruner"], generator=torch.Generator().manual_seed(0))
                outs.append((state, parts["decoder"].generate(adapter, state)))
            (a_state, a), (b_state, b) = outs
            if not torch.equal(a, b):
                changed.append((smp.id, keep))
            assert torch.equal(b_state.events[0].kept_index, a_state.events[0].kept_index + N_PADS)
    assert changed == []


def test_sparse_generate_honours_the_attention_mask(embedded):
    """The library face: a processor output with left pads and its attention_mask."""
    from sparsevlm_exp.data.shapes import ShapesDataset

    smp = ShapesDataset(split="test", size=40)[0]
    inputs = embedded.encode(smp).model_inputs
    padded = left_pad(inputs, N_PADS, pad_id(embedded))
    for kwargs in (dict(keep=1.0), dict(scorer="v2", keep=0.25, layer=2)):
        plain = sparse_generate(embedded.model, inputs, max_new_tokens=6, **kwargs)
        ours = sparse_generate(embedded.model, padded, max_new_tokens=6, **kwargs)
        assert torch.equal(ours.sequences, plain.sequences)
        assert torch.equal(ours.kept_indices[0], plain.kept_indices[0] + N_PADS)
    hf = embedded.model.generate(**padded, do_sample=False, max_new_tokens=6)[:, padded["input_ids"].shape[1]:]
    assert torch.equal(sparse_generate(embedded.model, padded, keep=1.0, max_new_tokens=6).sequences, hf)


def test_scoring_attention_ignores_left_pad_keys():
    """text_visual_attention with a key_mask == the same rows without their pads (a
    correction callable is evaluated on the ORIGINAL indices), rows of a batch with
    different pad counts included; right padding is refused."""
    from sparsevlm_exp.kernels import text_visual_attention

    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, L, d = 2, 4, 2, 12, 8
    q = torch.randn(B, Hq, 3, d, generator=g)
    k = torch.randn(B, Hkv, L, d, generator=g)
    query_index = torch.tensor([[8, 10, 11], [8, 10, 11]])
    visual_index = torch.tensor([[4, 5, 6], [4, 5, 6]])
    pads = [2, 3]
    key_mask = torch.ones(B, L, dtype=torch.bool)
    for b, n in enumerate(pads):
        key_mask[b, :n] = False
    seen = []

    def correction(qi, vi):
        seen.append(vi.clone())
        return 1.0 + 0.1 * (qi[:, :, None] - vi[:, None, :]).float()

    ours = text_visual_attention(q, k, query_index, visual_index, key_mask=key_mask, correction=correction)
    assert torch.equal(seen[0], visual_index)                  # evaluated on the original indices
    for b, n in enumerate(pads):
        alone = text_visual_attention(q[b:b + 1], k[b:b + 1, :, n:], query_index[b:b + 1] - n,
                                      visual_index[b:b + 1] - n,
                                      correction=lambda qi, vi, b=b: correction(qi + pads[b], vi + pads[b])[:1])
        torch.testing.assert_close(ours[b:b + 1], alone, rtol=1e-6, atol=1e-7)
        unmasked = text_visual_attention(q[b:b + 1], k[b:b + 1], query_index[b:b + 1], visual_index[b:b + 1])
        assert not torch.allclose(unmasked, alone)             # the pads did carry mass
    right = key_mask.clone()
    right[0, -1] = False
    with pytest.raises(ValueError, match="left padding"):
        text_visual_attention(q, k, query_index, visual_index, key_mask=right)
