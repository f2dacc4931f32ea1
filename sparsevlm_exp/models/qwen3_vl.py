"""Qwen3-VL (dense and MoE): the Qwen2-VL adapter plus the three things Qwen3-VL changes.

Read from transformers' models/qwen3_vl (5.17 and 5.24 agree on all three):

- DeepStack: the vision tower also returns features from the ViT blocks named in
  `vision_config.deepstack_visual_indexes` (one merged feature per LLM visual token
  each); `Qwen3VLTextModel.forward` adds feature j to the hidden states at the visual
  positions right AFTER decoder layer j (j = 0 .. len(indexes) - 1). Here they are
  per-token planes (`token_planes`, zeros on text tokens) that every pruner cuts with
  the same indices as the tokens, and `after_layer` adds them; so a cut before or
  between those layers (layer=-1, 0, 1) injects each feature on its own kept token.
- Interleaved M-RoPE: frequency k reads the h position if k % 3 == 1 (k < 3*sec[1]),
  w if k % 3 == 2 (k < 3*sec[2]), t otherwise (`recomposition_frequencies`); the
  rotary itself is the model's own, and `rope_spec` says "interleaved" so that v2's
  gravity correction uses the same layout.
- q_norm / k_norm (RMSNorm over the head dim, before RoPE): `layer_queries` applies
  q_norm to the recomputed scoring queries; the keys come from the cache, already
  normalised by the layer.

Everything else (token layout <|vision_start|> <|image_pad|>... <|vision_end|> after a
system prefix, `mm_token_type_ids`, get_rope_index with a (3, B, L) result, the ViT's
per-image full attention) is Qwen2-VL's. Patch 16 and merge 2 give one LLM token per
32x32 pixels; the adapter reads both from the config, nothing is hard-coded.
"""
from __future__ import annotations

import torch

from ..contracts import EncodedRequest, LoopState, RopeSpec
from .base import rotate_queries, splice_image_features
from .qwen2_vl import Qwen2VLAdapter
from .qwen_video import QWEN3_VIDEO_PIXELS, qwen3_placeholder, temporal_timestamps

PLANE = "deepstack_{}"     # state.planes key of the feature injected after decoder layer j


class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3VLForConditionalGeneration and Qwen3VLMoeForConditionalGeneration."""

    def __init__(self, model, processor=None):
        super().__init__(model, processor)
        # (request, {name: [B, L, D]}) from the last embed(), so that token_planes()
        # does not run the vision tower a second time for the same request.
        self._planes: tuple[EncodedRequest, dict] | None = None

    @property
    def n_deepstack(self) -> int:
        """How many decoder layers (0 .. n-1) get a DeepStack injection."""
        return len(self.config.vision_config.deepstack_visual_indexes)

    # ---- embedding, DeepStack planes ---------------------------------------------------
    def embed(self, req: EncodedRequest) -> torch.Tensor:
        """Text embeddings with the image and clip features spliced in; the DeepStack
        features of both become the planes (each on its own pads, zeros elsewhere), as
        HF's forward joins image and video DeepStack features on visual_pos_masks."""
        embeds = self.embed_tokens(req.input_ids)                                     # [B, L, D]
        ids = req.input_ids.to(self.device)
        planes = {}
        for token_id, out in self.visual_features(req).items():
            embeds = splice_image_features(embeds, ids, token_id, torch.cat(out.pooler_output))
            for j, feature in enumerate(getattr(out, "deepstack_features", None) or []):
                # 5.24 splits each level per image (a tuple), 5.17 returns one [N, D] tensor
                feature = torch.cat(feature) if isinstance(feature, (list, tuple)) else feature
                base = planes.get(PLANE.format(j), torch.zeros_like(embeds))
                planes[PLANE.format(j)] = splice_image_features(base, ids, token_id, feature)
        self._planes = (req, planes)
        return embeds

    # ---- video: clip-level pixel budget, timestamps between frames ---------------------
    VIDEO_PIXELS = QWEN3_VIDEO_PIXELS
    CLIP_BUDGET = True

    def video_placeholder(self, video, grid, tokens) -> str:
        """Per temporal token: "<s.s seconds>" and its own marked run of pads (Qwen3-VL's
        processor); get_rope_index gives each run t=1 positions after the timestamp text.
        The placeholder replaces the template's whole <vision_start><video_pad><vision_end>,
        as transformers 4.57's Qwen3VLProcessor and Qwen's own preprocessing do (5.24's
        replaces the pad only, leaving an extra outer marker pair around the clip)."""
        temporal = self.config.vision_config.temporal_patch_size
        return qwen3_placeholder(grid, self.config.vision_config.spatial_merge_size,
                                 temporal_timestamps(video, temporal), tokens["start"], tokens["video"],
                                 tokens["end"])

    def token_planes(self, req: EncodedRequest) -> dict[str, torch.Tensor]:
        """{"deepstack_j": [B, L, D]} the DeepStack feature added after decoder layer j,
        on the visual tokens (zeros on text tokens, so adding a plane changes only the
        visual rows, as HF's `_deepstack_process` does). Reuses the last embed()'s."""
        if self._planes is None or self._planes[0] is not req:
            self.embed(req)
        planes = self._planes[1]
        self._planes = None                  # the engine owns them now (pruners cut them)
        return planes

    def after_layer(self, i: int, state: LoopState) -> None:
        """DeepStack: after decoder layer i < n_deepstack, add plane i to the hidden
        states. The planes were cut with the tokens, so each kept visual token gets its
        own feature and a recycled (merged) token gets zeros. The last plane is dropped
        once used, so later cuts have nothing left to carry."""
        name = PLANE.format(i)
        if name in state.planes:
            state.hidden = state.hidden + state.planes.pop(name).to(state.hidden.dtype)

    # ---- attention with q_norm, interleaved M-RoPE --------------------------------------
    def layer_queries(self, i: int, hidden_rows: torch.Tensor, cos_sin_rows) -> torch.Tensor:
        """Post-rotary queries [B, Hq, T, d] of a few rows at layer i, as
        Qwen3VLTextAttention computes them: input_layernorm, q_proj, q_norm over the
        head dim, then RoPE (the interleaved cos/sin come from the model's rotary)."""
        layer = self.layers[i]
        attn = layer.self_attn
        x = layer.input_layernorm(hidden_rows)
        B, T, _ = x.shape
        q = attn.q_norm(attn.q_proj(x).view(B, T, -1, attn.head_dim)).transpose(1, 2)   # [B, Hq, T, d]
        return rotate_queries(q, cos_sin_rows)

    def rope_spec(self) -> RopeSpec:
        rot = self.language_model.rotary_emb
        return RopeSpec(inv_freq=rot.inv_freq, mrope_section=list(rot.mrope_section),
                        head_dim=self.layers[0].self_attn.head_dim, mrope_interleaved=True)
