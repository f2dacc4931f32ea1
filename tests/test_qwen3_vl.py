"""Oracles for Qwen3-VL (dense and MoE) on tiny random models built from config.

- keep=1.0 == HF `generate` token for token (sdpa and eager; one and two images; text
  before, between and after the images);
- a pruned run == a no-cache reference that recomputes the whole sequence at every step
  with HF's decoder layers and HF's own DeepStack injection (`_deepstack_process`), the
  pruned tokens hidden from the layers after the cut (cuts at layer -1, 0, 1 - before
  DeepStack is done - and 3);
- at layer=-1 also == HF's language-model forward on the kept sequence, with HF's
  DeepStack arguments restricted to the kept tokens;
- v1.5 scores (queries recomputed WITH q_norm) == HF eager attention maps;
- v2's RoPE-only logits use the interleaved M-RoPE layout == dot products of
  HF-rotated all-ones vectors;
- sparse_generate and the CLI run the family.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsevlm_exp import sparse_generate
from sparsevlm_exp.contracts import PRE_LLM
from sparsevlm_exp.models import adapter_for
from sparsevlm_exp.models.qwen3_vl import Qwen3VLAdapter
from sparsevlm_exp.scorers import (FastVScorer, RandomScorer, V15Scorer, V2Scorer, VisionAttentionScorer,
                                   rope_gravity)
from oracles import (MAX_NEW, check_v15_scores_equal_hf_eager_attention, hf_generate, hf_inputs,
                     hf_reference_generate, run)
from tiny_models import (check_qwen_vision_attention_against_eager, noise_image, sample, save_tiny_qwen,
                         tiny_adapter_loader)

ROOT = Path(__file__).resolve().parent.parent
W, H = 160, 128          # patch 16, merge 2: a 4 x 5 token grid (20 visual tokens) per image


@pytest.fixture(scope="module")
def qwen3_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_qwen3")
    return {fam: save_tiny_qwen(fam, root / fam) for fam in ("qwen3_vl", "qwen3_vl_moe")}


@pytest.fixture(scope="module")
def load3(qwen3_dirs):
    get = tiny_adapter_loader(qwen3_dirs, Qwen3VLAdapter)

    def load(family: str = "qwen3_vl", attn: str = "sdpa") -> Qwen3VLAdapter:
        return get(family, attn)

    return load


def encode(adapter, layout: str):
    """"one": system, image, question; "two": two images then the question;
    "around": text, image, text, image, text (text before, between and after)."""
    if layout in ("one", "two"):
        return adapter.encode(sample(n_images=1 if layout == "one" else 2, w=W, h=H))
    content = [{"type": "text", "text": "left of"}, {"type": "image", "image": noise_image(W, H, 0)},
               {"type": "text", "text": "and right of"}, {"type": "image", "image": noise_image(H, W, 1)},
               {"type": "text", "text": "what colour is the circle"}]
    inputs = adapter.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=True,
                                                   add_generation_prompt=True, return_dict=True, return_tensors="pt")
    return adapter.request_from_inputs(dict(inputs))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", ["one", "two", "around"])
def test_keep_all_equals_hf_generate(load3, attn, layout):
    adapter = load3("qwen3_vl", attn)
    req = encode(adapter, layout)
    n_visual = req.visual_index.shape[1]
    assert n_visual == (20 if layout == "one" else 40)
    assert int(req.visual_index[0, 0]) > 0 and req.text_index.shape[1] > 0
    state, ours = run(adapter, req, V15Scorer(), layer=1, keep=1.0)
    assert state.events[0].kept_index.shape[1] == n_visual
    assert torch.equal(ours, hf_generate(adapter, req))
    _, plain = run(adapter, req)                       # no scorer: the plain path
    assert torch.equal(plain, ours)


def test_deepstack_changes_the_answer(load3):
    """Guards the oracles: on the tiny model the greedy tokens change without the
    DeepStack injections, so a lost or misplaced injection cannot pass them."""
    adapter = load3()
    req = encode(adapter, "two")
    _, with_ds = run(adapter, req)
    planes = adapter.token_planes
    adapter.token_planes = lambda r: (planes(r), {})[1]
    try:
        _, without = run(adapter, req)
    finally:
        del adapter.token_planes
    assert not torch.equal(with_ds, without)


# ----------------------------------------------------------------------------------------
# Pruned runs against references built from HF's own pieces (oracles.hf_inputs)
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def hf_forward_on_kept(adapter, req, kept_index, n_new=MAX_NEW):
    """Greedy tokens from HF's Qwen3VLTextModel forward on the kept sequence only
    (text + kept visual tokens at their original positions), with HF's DeepStack
    arguments (visual_pos_masks, deepstack_visual_embeds) restricted to the kept tokens."""
    lm = adapter.language_model
    embeds, positions, feats = hf_inputs(adapter, req)
    L = embeds.shape[1]
    visual = torch.zeros(L, dtype=torch.bool)
    visual[req.visual_index[0]] = True
    keep = ~visual
    keep[kept_index[0]] = True
    kept_visual = keep[visual]                                                    # [N] which visual tokens stay
    hidden, pos, vmask = embeds[:, keep], positions[:, :, keep], visual[keep]
    ds = [f[kept_visual] for f in feats]
    next_pos = int(positions.max()) + 1
    eos, tokens = set(adapter.eos_token_ids), []
    for step in range(n_new):
        out = lm(inputs_embeds=hidden, position_ids=pos, use_cache=False, visual_pos_masks=vmask[None],
                 deepstack_visual_embeds=ds)
        token = int(adapter.model.lm_head(out.last_hidden_state[:, -1]).argmax())
        tokens.append(token)
        if token in eos:
            break
        hidden = torch.cat([hidden, lm.embed_tokens(torch.tensor([[token]]))], dim=1)
        pos = torch.cat([pos, torch.full((3, 1, 1), next_pos + step, dtype=pos.dtype)], dim=2)
        vmask = torch.cat([vmask, torch.zeros(1, dtype=torch.bool)])
    return torch.tensor([tokens])


CUTS = [(PRE_LLM, "random"), (PRE_LLM, "vision_attn"), (0, "v15"), (1, "v2"), (1, "fastv"), (3, "v15")]
SCORERS = {"v15": V15Scorer, "v2": V2Scorer, "fastv": FastVScorer, "random": RandomScorer,
           "vision_attn": VisionAttentionScorer}


@pytest.mark.parametrize("layer, scorer", CUTS)
def test_pruned_run_equals_no_cache_reference(load3, layer, scorer):
    adapter = load3()
    req = encode(adapter, "two")
    n_visual = req.visual_index.shape[1]
    state, ours = run(adapter, req, SCORERS[scorer](), layer=layer, keep=0.3)
    kept = state.events[0].kept_index
    assert kept.shape[1] == 12 < n_visual
    n_full = max(layer, 0)               # layers whose OUTPUT still holds every visual token
    assert state.layer_counts == [n_visual] * n_full + [12] * (adapter.n_layers - n_full)
    first = []
    assert torch.equal(ours, hf_reference_generate(adapter, req, kept, layer, first_logits=first))
    # logits too, not only the argmax: an injection lost on a few kept tokens moves them
    torch.testing.assert_close(state.next_logits, first[0], rtol=1e-4, atol=1e-4)
    if layer == PRE_LLM:
        assert torch.equal(ours, hf_forward_on_kept(adapter, req, kept))


def test_pruned_run_with_another_kept_set_differs(load3):
    """The reference is sensitive to which tokens are kept (it would catch planes cut
    with the wrong indices): the same run scored by another seed keeps other tokens
    and the reference follows it."""
    adapter = load3()
    req = encode(adapter, "two")
    runs = [run(adapter, req, RandomScorer(), layer=0, keep=0.3, seed=s) for s in (0, 1)]
    (s0, t0), (s1, t1) = runs
    assert not torch.equal(s0.events[0].kept_index, s1.events[0].kept_index)
    assert torch.equal(t0, hf_reference_generate(adapter, req, s0.events[0].kept_index, 0))
    assert torch.equal(t1, hf_reference_generate(adapter, req, s1.events[0].kept_index, 0))


@pytest.mark.parametrize("layer", [0, 2])
def test_v15_scores_equal_hf_eager_attention(load3, layer):
    """Scores from queries recomputed WITH q_norm (and interleaved M-RoPE) == HF's
    eager attention map of the unpruned run (layer 0: before any DeepStack injection
    reached a layer's input; layer 2: after two)."""
    adapter = load3("qwen3_vl", "eager")
    check_v15_scores_equal_hf_eager_attention(adapter, encode(adapter, "around"), layer=layer)


def test_v2_gravity_uses_the_interleaved_layout(load3):
    """rope_gravity(adapter.rope_spec()) == q.k / sqrt(d) for q = k = all-ones vectors
    rotated by HF's own Qwen3-VL rotary at the real M-RoPE positions of a 2-image prompt
    (2-D positions differ in h and w, so a blocked layout would give other numbers)."""
    adapter = load3()
    req = encode(adapter, "two")
    positions = adapter.positions(req)                                            # [3, 1, L]
    spec = adapter.rope_spec()
    d = spec.head_dim
    cos, sin = adapter.language_model.rotary_emb(torch.zeros(1, 1, d), positions)  # [1, L, d]
    ones = torch.ones(d)
    rotated = ones * cos[0] + torch.cat([-ones[d // 2:], ones[: d // 2]]) * sin[0]  # [L, d]
    expected = rotated @ rotated.T / d ** 0.5                                     # [L, L]
    rows, cols = req.text_index, req.visual_index
    ours = rope_gravity(spec, positions[:, :, rows[0]], positions[:, :, cols[0]])[0]
    torch.testing.assert_close(ours, expected[rows[0]][:, cols[0]], rtol=1e-4, atol=1e-4)
    blocked = rope_gravity(type(spec)(spec.inv_freq, spec.mrope_section, d), positions[:, :, rows[0]],
                           positions[:, :, cols[0]])[0]
    assert (blocked - ours).abs().max() > 1e-2


def test_recomputed_queries_apply_q_norm(load3):
    """layer_queries == the queries Qwen3VLTextAttention builds (q_proj, q_norm, RoPE),
    captured from the layer itself."""
    adapter = load3()
    req = encode(adapter, "one")
    embeds, positions = adapter.embed(req), adapter.positions(req)
    cos_sin = adapter.rotary(embeds, positions)
    attn = adapter.layers[0].self_attn
    captured = {}
    hook = attn.q_norm.register_forward_hook(lambda m, a, out: captured.setdefault("q", out))
    try:
        adapter.layers[0](embeds, attention_mask=None, position_embeddings=cos_sin, position_ids=None)
    finally:
        hook.remove()
    cos, sin = cos_sin
    q = captured["q"].transpose(1, 2)                                              # [1, H, L, d] pre-RoPE
    q1, q2 = q[..., : q.shape[-1] // 2], q[..., q.shape[-1] // 2:]
    expected = q * cos.unsqueeze(1) + torch.cat([-q2, q1], dim=-1) * sin.unsqueeze(1)
    torch.testing.assert_close(adapter.layer_queries(0, embeds, cos_sin), expected)


# ----------------------------------------------------------------------------------------
# MoE: the same adapter (attention and DeepStack are the dense model's)
# ----------------------------------------------------------------------------------------
def test_moe_keep_all_and_pruned_equal_their_oracles(load3):
    adapter = load3("qwen3_vl_moe")
    req = encode(adapter, "two")
    _, full = run(adapter, req, V15Scorer(), layer=1, keep=1.0)
    assert torch.equal(full, hf_generate(adapter, req))
    state, ours = run(adapter, req, V2Scorer(), layer=1, keep=0.3)
    assert torch.equal(ours, hf_reference_generate(adapter, req, state.events[0].kept_index, 1))


# ----------------------------------------------------------------------------------------
# The library call and the CLI
# ----------------------------------------------------------------------------------------
def test_sparse_generate_runs_qwen3_vl(load3):
    adapter = load3()
    req = encode(adapter, "two")
    assert isinstance(adapter_for(adapter.model, adapter.processor), Qwen3VLAdapter)
    full = sparse_generate(adapter.model, req.model_inputs, keep=1.0, max_new_tokens=MAX_NEW)
    assert torch.equal(full.sequences, hf_generate(adapter, req))
    out = sparse_generate(adapter.model, req.model_inputs, scorer="v2", keep=0.25, layer=1,
                          max_new_tokens=MAX_NEW)
    assert out.n_visual == 40 and out.prune_layers == [1] and out.layer_counts == [40, 10, 10, 10]
    assert torch.equal(out.sequences, hf_reference_generate(adapter, req, out.kept_indices[0], 1))


def test_cli_runs_qwen3_vl(qwen3_dirs, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "questions.jsonl", "w") as f:
        for i in range(2):
            noise_image(W, H, seed=i).save(data / f"img{i}.png")
            f.write(json.dumps({"id": f"q{i}", "image": f"img{i}.png", "question": "what colour is the circle",
                                "answers": ["red"]}) + "\n")
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "sparsevlm_exp", "model=qwen3_vl_2b", f"model.pretrained={qwen3_dirs['qwen3_vl']}",
         "dataset=folder", f"dataset.path={data}", "scorer=v2", "layer=1", "keep=0.25", "logger=none",
         "device=cpu", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["q0", "q1"]
    assert all(r["n_visual"] == 20 and r["kept"] == [5] for r in records)


def test_a_qwen2_yaml_refuses_a_qwen3_checkpoint(qwen3_dirs):
    """The default (Qwen2.5-VL) adapter would run a Qwen3-VL model without DeepStack and
    q_norm: it refuses in one line that names the family's yamls."""
    from sparsevlm_exp.errors import ConfigError
    from sparsevlm_exp.models.qwen2_vl import Qwen2VLAdapter

    with pytest.raises(ConfigError, match="'qwen3_vl' checkpoint.*model=qwen3_vl_8b"):
        Qwen2VLAdapter.load(pretrained=qwen3_dirs["qwen3_vl"], dtype="float32", device="cpu")


@torch.no_grad()
def test_vision_attention_equals_eager_attention_in_llm_token_order(load3):
    """The pre-LLM scores (scorer=vision_attn) read the last ViT block: equal to HF's own
    eager attention weights of that block, image by image, heads and query rows averaged,
    2x2-pooled, in the LLM's token order (matched through the merger's output rows)."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision, eager_attention_forward

    adapter = load3("qwen3_vl", "eager")
    req = encode(adapter, "two")
    assert adapter.vision_attention_block() is adapter.model.model.visual.blocks[-1].attn
    check_qwen_vision_attention_against_eager(adapter, req, apply_rotary_pos_emb_vision, eager_attention_forward)
