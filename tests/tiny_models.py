"""Tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL models for tests, built from config, saved
with save_pretrained and loaded back with from_pretrained (the real loading path)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                          Qwen2VLForConditionalGeneration, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                          Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration, Qwen3_5Config,
                          Qwen3_5ForConditionalGeneration)

from sparsevlm_exp.contracts import Sample
from sparsevlm_exp.models.word_processor import build_word_processor, special_token_ids

WORDS = "what colour is the circle square red green blue yes no left right of and a".split()


def tiny_qwen_config(family: str, processor, n_layers: int = 4):
    ids = special_token_ids(processor)
    tokens = {k: v for k, v in ids.items() if k != "vocab_size"}
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=ids["vocab_size"], max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                # large init so that random models give varied, non-degenerate tokens
                initializer_range=0.3, eos_token_id=ids["eos_token_id"], bos_token_id=ids["bos_token_id"],
                pad_token_id=ids["pad_token_id"])
    if family == "qwen3_5":
        # linear (Gated DeltaNet) and full attention alternating, so that a cut at full layer 1
        # is followed by both kinds (real checkpoints: 3 linear then 1 full); head_dim 16 with
        # partial rotary 0.25 -> 4 rotary dims (2 frequencies: t, h interleaved)
        text.update(head_dim=16, layer_types=["linear_attention", "full_attention"] * 2,
                    linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                    linear_num_value_heads=4,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 0],
                                     "mrope_interleaved": True, "partial_rotary_factor": 0.25})
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                      initializer_range=0.3)
        return Qwen3_5Config(text_config=text, vision_config=vision, **tokens)
    if family in ("qwen3_vl", "qwen3_vl_moe"):
        # head_dim 16 -> 8 frequencies, interleaved t h w t h w t h (sections [2, 3, 3]);
        # DeepStack from all 3 ViT blocks -> injections after decoder layers 0, 1, 2
        text.update(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "mrope_section": [2, 3, 3], "mrope_interleaved": True})
        vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                      deepstack_visual_indexes=[0, 1, 2],
                      # as large as the text init: with the default 0.02 the DeepStack features
                      # are too small to change a greedy token, and the oracles could not see them
                      initializer_range=0.3)
        if family == "qwen3_vl_moe":
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                        mlp_only_layers=[])
            return Qwen3VLMoeConfig(text_config=text, vision_config=vision, **tokens)
        return Qwen3VLConfig(text_config=text, vision_config=vision, **tokens)
    if family == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
    vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)


def save_tiny_qwen(family: str, path, n_layers: int = 4, seed: int = 0) -> str:
    processor = build_word_processor(WORDS, family="qwen3_vl" if family.startswith("qwen3") else family)
    config = tiny_qwen_config(family, processor, n_layers)
    torch.manual_seed(seed)
    cls = {"qwen2_5_vl": Qwen2_5_VLForConditionalGeneration, "qwen2_vl": Qwen2VLForConditionalGeneration,
           "qwen3_vl": Qwen3VLForConditionalGeneration, "qwen3_vl_moe": Qwen3VLMoeForConditionalGeneration,
           "qwen3_5": Qwen3_5ForConditionalGeneration}[family]
    model = cls(config)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def tiny_adapter_loader(dirs: dict, adapters, prepare=None, **load_kwargs):
    """A cached `load(family, attn="sdpa")` for module- or session-scoped fixtures: each
    (family, attention implementation) pair is loaded once, float32 on CPU, through the
    adapter's own `load` (from_pretrained, the real path) from `dirs[family]`.

    adapters: one adapter class for every family, or {family: class}.
    prepare: optional `prepare(family, adapter)`, run once on each fresh instance (e.g. a
    smaller video pixel budget for that instance only).
    load_kwargs: passed to every `load` (e.g. LLaVA's system_prompt)."""
    cache = {}

    def load(family: str, attn: str = "sdpa"):
        if (family, attn) not in cache:
            cls = adapters[family] if isinstance(adapters, dict) else adapters
            adapter = cls.load(pretrained=dirs[family], dtype="float32", device="cpu", attn_implementation=attn,
                               **load_kwargs)
            if prepare is not None:
                prepare(family, adapter)
            cache[family, attn] = adapter
        return cache[family, attn]

    return load


def noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3)).astype("uint8"))


def sample(n_images: int = 1, w: int = 112, h: int = 84, question: str = "what colour is the circle") -> Sample:
    return Sample(id="s0", question=question, images=[noise_image(w, h, seed=i) for i in range(n_images)],
                  answers=["red"])


@torch.no_grad()
def check_qwen_vision_attention_against_eager(adapter, req, apply_rotary_pos_emb_vision, eager_attention_forward):
    """The pre-LLM vision attention (adapter.embed_and_vision_attention) equals HF's own
    eager attention weights of the named ViT block: image by image, heads and query rows
    averaged, pooled per 2x2 merge group, in the LLM's token order (matched through the
    merger's output rows). The two HF functions come from the family's modeling file."""
    visual, block = adapter.model.model.visual, adapter.vision_attention_block()
    seen = {}
    hooks = [block.register_forward_pre_hook(lambda m, a, k: seen.update(x=a[0], kw=k), with_kwargs=True),
             visual.merger.register_forward_hook(lambda m, a, out: seen.update(rows=out))]
    try:
        embeds, ours = adapter.embed_and_vision_attention(req)
    finally:
        for h in hooks:
            h.remove()
    x, kw = seen["x"], seen["kw"]
    S = x.shape[0]
    q, k, v = block.qkv(x).reshape(S, 3, block.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, *kw["position_embeddings"])
    received = []
    bounds = kw["cu_seqlens"].tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        _, weights = eager_attention_forward(block, q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None],
                                             v[a:b].transpose(0, 1)[None], None, scaling=block.scaling)
        received.append(weights[0].mean(dim=(0, 1)))                                # [b - a]
    per_group = torch.cat(received).view(-1, visual.spatial_merge_size ** 2).mean(dim=1)   # blocks' order
    # LLM token j is the merger row equal to embeds[visual j]
    match = torch.cdist(embeds[0, req.visual_index[0]], seen["rows"]).argmin(dim=1)       # [N]
    assert match.unique().numel() == match.numel()
    torch.testing.assert_close(ours[0], per_group[match], rtol=1e-5, atol=1e-6)
