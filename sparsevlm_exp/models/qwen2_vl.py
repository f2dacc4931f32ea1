"""Qwen2-VL and Qwen2.5-VL: one adapter for both (same LLM, same M-RoPE).

The only place that knows Qwen's token layout (system prefix, <|vision_start|>,
image pads, <|vision_end|>), its M-RoPE position ids (3, B, L) and its rope_deltas.
"""
from __future__ import annotations

import torch

from ..data.base import Sample
from .base import DecoderLoopAdapter, EncodedRequest, RopeSpec
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

        grids, coords = [], []
        merge = cfg.vision_config.spatial_merge_size
        if "image_grid_thw" in inputs and inputs["image_grid_thw"] is not None:
            for image_no, (t, h, w) in enumerate(inputs["image_grid_thw"].tolist()):
                rows, cols = h // merge, w // merge
                grids.append((rows, cols))
                tt, rr, cc = torch.meshgrid(torch.arange(t), torch.arange(rows), torch.arange(cols), indexing="ij")
                coords.append(torch.stack([torch.full_like(rr, image_no), rr, cc], -1).view(-1, 3))
        visual_coords = (torch.cat(coords) if coords else torch.zeros(0, 3, dtype=torch.long)).unsqueeze(0)
        if visual_coords.shape[1] != visual_index.shape[1]:
            raise ValueError(f"{visual_index.shape[1]} image tokens in the prompt but the image grids "
                             f"describe {visual_coords.shape[1]}")

        # Instruction tokens: everything after the first image that is neither an
        # image token nor a vision start/end marker (the markers carry no question).
        text_index = torch.zeros(1, 0, dtype=torch.long)
        if visual_index.shape[1] > 0:
            after = torch.arange(input_ids.shape[1]) > visual_index[0, 0]
            markers = (input_ids[0] == cfg.vision_start_token_id) | (input_ids[0] == cfg.vision_end_token_id)
            text_index = (after & ~is_image & ~markers).nonzero().view(1, -1)

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
            feats = torch.cat(feats, dim=0).to(embeds.dtype)                          # [N, D]
            mask = (input_ids == self.config.image_token_id).unsqueeze(-1)
            embeds = embeds.masked_scatter(mask, feats)
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
