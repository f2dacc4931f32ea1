"""Qwen2-VL and Qwen2.5-VL: one adapter for both (same LLM, same M-RoPE).

The only place that knows Qwen's token layout (system prefix, <|vision_start|>,
image pads, <|vision_end|>), its M-RoPE position ids (3, B, L) and its rope_deltas.
"""
from __future__ import annotations

import torch

from ..data.base import Sample
from .base import (DecoderLoopAdapter, EncodedRequest, RopeSpec, grid_coords, instruction_index,
                   splice_image_features)
from .loading import load_pretrained
from .prompting import chat_messages


class Qwen2VLAdapter(DecoderLoopAdapter):
    position_dims = 3  # M-RoPE: temporal, height, width

    def __init__(self, model, processor=None):
        self.model = model
        self.processor = processor
        self.config = model.config

    @classmethod
    def load(cls, **model_cfg) -> "Qwen2VLAdapter":
        """Hydra's entry (conf/model/*.yaml): the yaml keys are load_pretrained's arguments."""
        return cls(*load_pretrained(**model_cfg))

    # ---- encoding -------------------------------------------------------------------
    def encode(self, sample: Sample) -> EncodedRequest:
        if self.processor is None:
            raise RuntimeError("this model was built without a processor (model.processor is unset); "
                               "it can run synthetic requests (bench) but cannot encode samples")
        inputs = self.processor.apply_chat_template(
            chat_messages(sample.images, sample.question),
            tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt",
        )
        return self.request_from_inputs(dict(inputs))

    def request_from_inputs(self, inputs: dict) -> EncodedRequest:
        """Build the request from what the processor returned (also the library path)."""
        input_ids = inputs["input_ids"]
        if input_ids.shape[0] != 1:
            raise ValueError(f"the pruned pipeline runs one request at a time; got a batch of {input_ids.shape[0]}")
        cfg = self.config
        is_image = input_ids[0] == cfg.image_token_id
        if (input_ids == cfg.video_token_id).any():
            raise ValueError("video inputs are not supported yet (image tokens only)")
        visual_index = is_image.nonzero().view(1, -1)                               # [1, N]

        grids, frames = [], []
        merge = cfg.vision_config.spatial_merge_size
        if inputs.get("image_grid_thw") is not None:
            for t, h, w in inputs["image_grid_thw"].tolist():
                grids.append((h // merge, w // merge))
                frames.append(t)
        visual_coords = grid_coords(grids, frames)                                   # [1, N, 3]
        if visual_coords.shape[1] != visual_index.shape[1]:
            raise ValueError(f"{visual_index.shape[1]} image tokens in the prompt but the image grids "
                             f"describe {visual_coords.shape[1]}")
        markers = (input_ids[0] == cfg.vision_start_token_id) | (input_ids[0] == cfg.vision_end_token_id)
        text_index = instruction_index(is_image, skip=markers)

        if "mm_token_type_ids" not in inputs or inputs["mm_token_type_ids"] is None:
            inputs["mm_token_type_ids"] = is_image.long().unsqueeze(0)
        return EncodedRequest(
            input_ids=input_ids,
            model_inputs=inputs,
            visual_index=visual_index,
            visual_coords=visual_coords,
            image_grids=grids,
            text_index=text_index,
        )

    # ---- embedding and positions ----------------------------------------------------
    def embed(self, req: EncodedRequest):
        dev = self.device
        inputs = req.model_inputs
        input_ids = req.input_ids.to(dev)
        embeds = self.language_model.embed_tokens(input_ids)                          # [B, L, D]
        grid = inputs.get("image_grid_thw")
        if inputs.get("pixel_values") is not None:
            grid = grid.to(dev)
            feats = self.model.model.get_image_features(inputs["pixel_values"].to(dev), grid).pooler_output
            embeds = splice_image_features(embeds, input_ids, self.config.image_token_id, torch.cat(feats))
        positions, _ = self.model.model.get_rope_index(
            input_ids,
            mm_token_type_ids=inputs["mm_token_type_ids"].to(dev),
            image_grid_thw=grid,
        )                                                                             # [3, B, L]
        return embeds, positions

    def rotary(self, hidden, positions):
        return self.language_model.rotary_emb(hidden, positions)

    def rope_spec(self) -> RopeSpec:
        rot = self.language_model.rotary_emb
        return RopeSpec(inv_freq=rot.inv_freq, mrope_section=list(rot.mrope_section),
                        head_dim=self.layers[0].self_attn.head_dim)
