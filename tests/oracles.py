"""Oracles shared by the model-family tests (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5,
LLaVA; images and videos). Each computes what the sparsified pipeline must give in a
second, independent way: HF's own `generate`, HF's eager attention maps, or HF's own
modules run over the whole sequence at every step without a cache.

- `run`: OUR side of every comparison - one fixed cut, then greedy decoding;
- `hf_generate`: keep=1.0 must equal HF `generate(do_sample=False)` token for token;
- `hf_inputs`: embeddings, M-RoPE positions and DeepStack features built from HF's
  modules, not through the adapter (so an adapter bug there cannot hide in both sides);
- `hf_reference_generate`: a pruned run on an all-attention Qwen model (DeepStack when
  the model has it) must equal this no-cache, mask-based reference;
- `check_v15_scores_equal_hf_eager_attention`: v1.5 scores must equal HF's eager map.

Oracles that differ per family on purpose stay with their tests:
test_pipeline.reference_generate (reads the adapter's embeddings and positions, so it
also drives LLaVA's 1-D RoPE, and has the kv_only mode), test_qwen3_5.reference_generate
(drops the pruned tokens physically: Gated DeltaNet states cannot be masked),
test_qwen3_vl.hf_forward_on_kept and test_engine.hf_forward_on_kept (HF's language-model
forward on the kept sequence), test_fidelity.recycled_reference (recycled clusters).
"""
from __future__ import annotations

import torch

from sparsevlm_exp.decoding import GreedyDecoder
from sparsevlm_exp.policies import FixedPolicy
from sparsevlm_exp.pruners import DropPruner
from sparsevlm_exp.scorers import V15Scorer, select_raters

MAX_NEW = 8          # greedy tokens per comparison: enough for a wrong cut to change one


def run(adapter, req, scorer=None, layer=1, keep=1.0, pruner=None, seed=0, max_new=MAX_NEW):
    """Our pipeline on an encoded request: prefill with one cut at `layer` keeping a
    `keep` fraction (DropPruner unless `pruner` is given; no scorer = the plain path,
    nothing pruned), then `max_new` greedy tokens. Returns (PrefillState, tokens [1, T])."""
    policy = FixedPolicy(layer=layer, keep=keep) if scorer is not None else None
    state = adapter.prefill(req, scorer=scorer, policy=policy, pruner=pruner or DropPruner(),
                            generator=torch.Generator().manual_seed(seed))
    return state, GreedyDecoder(max_new).generate(adapter, state)


def hf_generate(adapter, req, max_new=MAX_NEW):
    """HF `generate(do_sample=False)` on the request's processor output: the new tokens
    [1, T], the keep=1.0 oracle.

    It must get the processor's FULL output: without mm_token_type_ids, transformers
    5.24's generate silently computes other M-RoPE positions than forward (Qwen), so the
    oracle itself would be wrong - asserted whenever the request has images."""
    if "image_grid_thw" in req.model_inputs:
        assert req.model_inputs.get("mm_token_type_ids") is not None
    out = adapter.model.generate(**req.model_inputs, do_sample=False, max_new_tokens=max_new)
    return out[:, req.input_ids.shape[1]:]


def hf_inputs(adapter, req):
    """Embeddings [1, L, D], M-RoPE positions [3, 1, L] and DeepStack features (list of
    [N, D], one per injected layer; [] for models without DeepStack) computed with HF's
    modules directly (get_image_features / get_video_features, embed_tokens,
    get_rope_index), not through the adapter. The request holds images or one kind of
    media only: either pixel_values or pixel_values_videos, not both."""
    model, lm = adapter.model.model, adapter.language_model
    ids, inputs = req.input_ids, req.model_inputs
    video = "pixel_values_videos" in inputs
    assert video != ("pixel_values" in inputs), "hf_inputs: images or videos, not both"
    if video:
        out = model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        token, grids = adapter.config.video_token_id, {"video_grid_thw": inputs["video_grid_thw"]}
        if "second_per_grid_ts" in inputs:                       # Qwen2.5-VL's temporal step
            grids["second_per_grid_ts"] = inputs["second_per_grid_ts"]
    else:
        out = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        token, grids = adapter.config.image_token_id, {"image_grid_thw": inputs["image_grid_thw"]}
    mask = (ids == token).unsqueeze(-1)
    embeds = lm.embed_tokens(ids).masked_scatter(mask, torch.cat(out.pooler_output))
    feats = [torch.cat(f) if isinstance(f, (list, tuple)) else f
             for f in getattr(out, "deepstack_features", None) or []]
    # a model with DeepStack must hand its features over, or the references below would
    # silently run without them
    assert bool(feats) == hasattr(lm, "_deepstack_process")
    positions, _ = model.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"], **grids)
    return embeds, positions, feats


@torch.no_grad()
def hf_reference_generate(adapter, req, kept_index, layer_k, n_new=MAX_NEW, first_logits: list | None = None):
    """Greedy tokens [1, T] of a pruned run, recomputed from scratch at every step with
    HF's decoder layers and no cache, from `hf_inputs`: layers 0..K see every token,
    layers after K (every layer for K = -1) only the text and the kept visual tokens
    (an attention mask hides the pruned keys; kept tokens keep their original M-RoPE
    positions, new tokens continue from the original next one). With DeepStack
    (Qwen3-VL), feature j is added after layer j by HF's `_deepstack_process`: on every
    visual token while they are all visible, on the KEPT ones only after the cut.
    The first step's float32 logits [1, V] are appended to `first_logits` when given.
    For all-attention models only (a mask cannot hide tokens from Gated DeltaNet)."""
    lm = adapter.language_model
    embeds, positions, feats = hf_inputs(adapter, req)
    L = embeds.shape[1]
    visual = torch.zeros(L, dtype=torch.bool)
    visual[req.visual_index[0]] = True
    pruned = visual.clone()
    pruned[kept_index[0]] = False
    next_pos = int(positions.max()) + 1
    eos, generated = set(adapter.eos_token_ids), []
    for _ in range(n_new):
        n = L + len(generated)
        new = lm.embed_tokens(torch.tensor([generated], dtype=torch.long))
        hidden = torch.cat([embeds, new], dim=1)
        extra = torch.arange(next_pos, next_pos + len(generated)).view(1, 1, -1).expand(3, 1, -1)
        cos_sin = lm.rotary_emb(hidden, torch.cat([positions, extra], dim=2))
        pad = torch.zeros(len(generated), dtype=torch.bool)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        for i, layer in enumerate(lm.layers):
            after_cut = i > layer_k
            allowed = causal & ~(torch.cat([pruned, pad])[None, :] & after_cut)
            allowed |= torch.eye(n, dtype=torch.bool)          # pruned rows must not be all -inf
            mask = torch.zeros(n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
            hidden = layer(hidden, attention_mask=mask, position_embeddings=cos_sin, position_ids=None,
                           use_cache=False)
            if i < len(feats):
                alive = visual & ~pruned if after_cut else visual                 # [L]
                hidden = lm._deepstack_process(hidden, torch.cat([alive, pad])[None], feats[i][alive[visual]])
        logits = adapter.model.lm_head(lm.norm(hidden[:, -1:]))[:, -1].float()
        if first_logits is not None and not generated:
            first_logits.append(logits)
        token = int(logits[0].argmax())
        generated.append(token)
        if token in eos:
            break
    return torch.tensor([generated])


def check_v15_scores_equal_hf_eager_attention(adapter, req, layer: int) -> None:
    """Our v1.5 scores at `layer` == HF's eager attention map of the unpruned run: rows =
    the raters (checked to be the ones the scorer was handed), columns = the visual
    tokens, averaged over heads and raters. Needs an adapter loaded with eager attention.
    Hybrid models (Qwen3.5) return maps for their full-attention layers only, in order:
    the map of `layer` is found through adapter.attention_layers."""
    captured = {}

    class Spy(V15Scorer):
        def __call__(self, view):
            captured["scores"] = super().__call__(view)
            captured["rows"] = view.query_index
            return captured["scores"]

    adapter.prefill(req, scorer=Spy(), policy=FixedPolicy(layer=layer, keep=0.5), pruner=DropPruner())
    out = adapter.model(**req.model_inputs, output_attentions=True)
    maps = [a for a in out.attentions if a is not None]
    layers = getattr(adapter, "attention_layers", None) or list(range(adapter.n_layers))
    assert len(maps) == len(layers)
    attn = maps[layers.index(layer)][0]                                 # [H, L, L] of the unpruned run
    raters = select_raters(adapter.embed(req), req.visual_index, req.text_index)[0]
    assert torch.equal(captured["rows"][0], raters)
    expected = attn[:, raters][:, :, req.visual_index[0]].mean(dim=(0, 1))
    torch.testing.assert_close(captured["scores"][0], expected, rtol=1e-5, atol=1e-6)
