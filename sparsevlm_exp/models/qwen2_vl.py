"""Qwen2-VL and Qwen2.5-VL: one adapter for both (same LLM, same M-RoPE).

The only place that knows Qwen's token layout (system prefix, <|vision_start|>,
image pads, <|vision_end|>), its M-RoPE position ids (3, B, L) and its rope_deltas,
and its vision tower's internals for the pre-LLM stage (`vision_attention`).
"""
from __future__ import annotations

import torch
from transformers.vision_utils import get_vision_window_index

from ..contracts import EncodedRequest, RopeSpec, Sample
from ..errors import ConfigError
from .base import (FamilyAdapter, attention_received, grid_coords, request_attention_mask,
                   splice_image_features)
from .loading import load_pretrained
from .prompting import chat_messages


class Qwen2VLAdapter(FamilyAdapter):
    position_dims = 3  # M-RoPE: temporal, height, width

    FAMILIES = ("qwen2_vl", "qwen2_5_vl")

    def __init__(self, model, processor=None):
        model_type = model.config.model_type
        if type(self) is Qwen2VLAdapter and model_type not in self.FAMILIES:
            # e.g. a Qwen3-VL dir given to a Qwen2.5-VL yaml: it would run without its
            # DeepStack injections and q_norm, i.e. silently wrong
            raise ConfigError(f"model.pretrained holds a {model_type!r} checkpoint, which the Qwen2-VL adapter "
                              f"does not run (it runs {', '.join(self.FAMILIES)}): pick that family's model yaml, "
                              f"e.g. model=qwen3_vl_8b model.pretrained=/path/to/dir")
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
        attention_mask = request_attention_mask(inputs, input_ids)
        markers = (input_ids[0] == cfg.vision_start_token_id) | (input_ids[0] == cfg.vision_end_token_id)
        text_index, after_image_index = self.instruction_indices(inputs, is_image, markers)

        if "mm_token_type_ids" not in inputs or inputs["mm_token_type_ids"] is None:
            inputs["mm_token_type_ids"] = is_image.long().unsqueeze(0)
        return EncodedRequest(
            input_ids=input_ids,
            model_inputs=inputs,
            visual_index=visual_index,
            visual_coords=visual_coords,
            image_grids=grids,
            text_index=text_index,
            attention_mask=attention_mask,
            after_image_index=after_image_index,
        )

    # ---- embedding and positions ----------------------------------------------------
    def embed(self, req: EncodedRequest) -> torch.Tensor:
        embeds = self.embed_tokens(req.input_ids)                                     # [B, L, D]
        inputs = req.model_inputs
        if inputs.get("pixel_values") is not None:
            grid = inputs["image_grid_thw"].to(self.device)
            feats = self.model.model.get_image_features(inputs["pixel_values"].to(self.device), grid).pooler_output
            embeds = splice_image_features(embeds, req.input_ids.to(self.device), self.config.image_token_id,
                                           torch.cat(feats))
        return embeds

    def positions(self, req: EncodedRequest) -> torch.LongTensor:
        """[3, B, L] HF's own get_rope_index, given the attention_mask as HF generate
        gives it: positions count only the real tokens (a left-padded row gets the
        positions of its unpadded self), pads get 0."""
        dev = self.device
        inputs = req.model_inputs
        grid = inputs.get("image_grid_thw")
        mask = req.attention_mask
        positions, _ = self.model.model.get_rope_index(
            req.input_ids.to(dev),
            mm_token_type_ids=inputs["mm_token_type_ids"].to(dev),
            image_grid_thw=grid.to(dev) if grid is not None else None,
            attention_mask=mask.to(dev) if mask is not None else None,
        )                                                                             # [3, B, L]
        return positions

    # ---- the pre-LLM stage: vision-tower attention ------------------------------------
    def vision_attention_block(self):
        """The last full-attention block of the ViT: Qwen2.5-VL's blocks attend inside
        windows except those in `fullatt_block_indexes`; Qwen2-VL's all attend fully."""
        visual = self.model.model.visual
        full = getattr(visual, "fullatt_block_indexes", None)
        index = max(full) if full else len(visual.blocks) - 1
        return visual.blocks[index].attn

    def vision_attention(self, req: EncodedRequest, args: tuple, kwargs: dict) -> torch.Tensor:
        """[1, N] mean attention each merged visual token receives in the last
        full-attention ViT block: per image, softmax(q k^T / sqrt(d)) averaged over heads
        and over all of that image's patches as queries (Qwen's ViT has no [CLS]; this is
        the "attention received" that VisionZip ports to Qwen use), then averaged over
        the 2x2 patches merged into one LLM token. Rows are processed in chunks, never
        as a full attention map over every block."""
        attn = self.vision_attention_block()
        x = args[0] if args else kwargs["hidden_states"]                             # [S, C] after norm1
        cu_seqlens = kwargs["cu_seqlens"]
        cos, sin = kwargs["position_embeddings"]
        S = x.shape[0]
        q, k, _ = attn.qkv(x).reshape(S, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)   # [S, H, d]
        q, k = rotate_vision(q, cos, sin), rotate_vision(k, cos, sin)
        received = torch.cat([
            attention_received(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1))
            for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())
        ])                                                                            # [S] in the blocks' order
        visual = self.model.model.visual
        unit = visual.spatial_merge_size ** 2
        merged = received.view(-1, unit).mean(dim=1)                                  # [N] in the blocks' order
        if hasattr(visual, "window_size"):
            # Qwen2.5-VL runs its blocks in window order; undo it as its forward does
            grid = req.model_inputs["image_grid_thw"]
            window_index, _ = get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size,
                                                      visual.patch_size)
            merged = merged[torch.argsort(window_index.to(merged.device))]
        return merged.unsqueeze(0)

    def rotary(self, hidden, positions):
        return self.language_model.rotary_emb(hidden, positions)

    def rope_spec(self) -> RopeSpec:
        rot = self.language_model.rotary_emb
        return RopeSpec(inv_freq=rot.inv_freq, mrope_section=list(rot.mrope_section),
                        head_dim=self.layers[0].self_attn.head_dim)


def rotate_vision(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Qwen's ViT rotary embedding on x [S, H, d] with cos/sin [S, d], in float32."""
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    x = x.float()
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
