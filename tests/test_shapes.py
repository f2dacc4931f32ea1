"""The embedded benchmark: word-level processor, shapes generator, shipped model."""
from __future__ import annotations

import torch
from PIL import Image

from sparsevlm_exp.models.prompting import chat_messages
from sparsevlm_exp.models.word_processor import build_word_processor, special_token_ids


def _encode(processor, image, question):
    return processor.apply_chat_template(chat_messages([image], question), tokenize=True,
                                         add_generation_prompt=True, return_dict=True, return_tensors="pt")


def test_word_processor_has_qwen_layout_and_round_trips(tmp_path):
    from transformers import AutoProcessor

    for family in ("qwen2_5_vl", "qwen2_vl"):
        processor = build_word_processor(["what colour is the circle ?", "red"], family=family)
        ids = special_token_ids(processor)
        out = _encode(processor, Image.new("RGB", (448, 448), "red"), "What colour is the circle?")
        tokens = processor.tokenizer.convert_ids_to_tokens(out["input_ids"][0].tolist())
        # system prefix first, then vision_start, 32*32/4 pads, vision_end, question, assistant turn
        assert tokens[:3] == ["<|im_start|>", "system", "you"]
        start = tokens.index("<|vision_start|>")
        assert tokens[start + 1:start + 257] == ["<|image_pad|>"] * 256
        assert tokens[start + 257:] == ["<|vision_end|>", "what", "colour", "is", "the", "circle", "?",
                                        "<|im_end|>", "<|im_start|>", "assistant"]
        assert out["image_grid_thw"].tolist() == [[1, 32, 32]]
        assert out["mm_token_type_ids"][0].sum() == 256
        assert (out["input_ids"][0] == ids["image_token_id"]).sum() == 256
        assert processor.tokenizer.eos_token_id == ids["eos_token_id"]

        processor.save_pretrained(tmp_path / family)
        loaded = AutoProcessor.from_pretrained(tmp_path / family)
        assert type(loaded) is type(processor)
        again = _encode(loaded, Image.new("RGB", (448, 448), "red"), "What colour is the circle?")
        assert torch.equal(again["input_ids"], out["input_ids"])
        assert torch.equal(again["pixel_values"], out["pixel_values"])
