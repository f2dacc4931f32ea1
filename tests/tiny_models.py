"""Tiny random Qwen2-VL / Qwen2.5-VL models for tests, built from config, saved with
save_pretrained and loaded back with from_pretrained (the real loading path)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                          Qwen2VLForConditionalGeneration)

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
    if family == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
    vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)


def save_tiny_qwen(family: str, path, n_layers: int = 4, seed: int = 0) -> str:
    processor = build_word_processor(WORDS, family=family)
    config = tiny_qwen_config(family, processor, n_layers)
    torch.manual_seed(seed)
    cls = Qwen2_5_VLForConditionalGeneration if family == "qwen2_5_vl" else Qwen2VLForConditionalGeneration
    model = cls(config)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3)).astype("uint8"))


def sample(n_images: int = 1, w: int = 112, h: int = 84, question: str = "what colour is the circle") -> Sample:
    return Sample(id="s0", question=question, images=[noise_image(w, h, seed=i) for i in range(n_images)],
                  answers=["red"])
