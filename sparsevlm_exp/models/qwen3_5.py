"""Qwen3.5 (`Qwen3_5ForConditionalGeneration`): hybrid linear-attention + full-attention LLM.

Read from transformers' models/qwen3_5 (5.17 and 5.24):

- `text_config.layer_types`: "linear_attention" (Gated DeltaNet: a causal conv + a
  recurrent state, no attention rows) and "full_attention" layers, 3:1. Only a
  full-attention layer has attention rows, so a scorer that asks for query rows can
  score only there (`layer_queries` refuses any other layer in one line naming the
  nearest allowed ones). A cut before a linear-attention layer needs nothing special:
  the engine hands the next layers the shortened sequence, so their conv and recurrent
  states only ever see the kept tokens.
- The cache is hybrid (`DynamicCache(config=...)` holds a LinearAttentionLayer with
  conv/recurrent states for linear layers and keys/values for full ones); decoding
  updates both. A pruner that rewrites every layer's KV after the prefill (kv_only)
  cannot rewrite a recurrent state, so it is refused here.
- Full attention: q_proj gives the query AND an output gate (chunked per head), q_norm
  / k_norm over the head dim, and partial rotary (`partial_rotary_factor`, e.g. 0.25:
  only the first head_dim/4 dims rotate) with interleaved M-RoPE.
- No DeepStack (`deepstack_visual_indexes` is empty); image layout, mm_token_type_ids,
  get_rope_index and the ViT are Qwen3-VL's.
"""
from __future__ import annotations

import torch

from ..contracts import RopeSpec
from ..errors import ConfigError
from ..pruners import KVOnlyPruner
from .base import cache_keyword
from .qwen3_vl import Qwen3VLAdapter

FULL = "full_attention"


class Qwen3_5Adapter(Qwen3VLAdapter):
    """Qwen3_5ForConditionalGeneration (dense text model)."""

    @property
    def attention_layers(self) -> list[int]:
        """The decoder layers with attention rows (full attention)."""
        return [i for i, t in enumerate(self.text_config.layer_types) if t == FULL]

    def layer_queries(self, i: int, hidden_rows: torch.Tensor, cos_sin_rows) -> torch.Tensor:
        """Post-rotary queries [B, Hq, T, d] at full-attention layer i, as Qwen3_5Attention
        builds them: input_layernorm, q_proj (the query half; the gate half only scales the
        output), q_norm, rotary on the first rotary_dim dims. A linear-attention layer has
        no attention rows: ConfigError naming the nearest layers that do."""
        if self.text_config.layer_types[i] != FULL:
            allowed = self.attention_layers
            below = [j for j in allowed if j < i]
            above = [j for j in allowed if j > i]
            near = ", ".join(str(j) for j in ([below[-1]] if below else []) + ([above[0]] if above else []))
            raise ConfigError(f"layer={i} is a linear-attention layer of {type(self.model).__name__}: it has no "
                              f"attention rows to score from; nearest full-attention layers: {near} "
                              f"(all: {allowed})")
        layer = self.layers[i]
        attn = layer.self_attn
        x = layer.input_layernorm(hidden_rows)
        B, T, _ = x.shape
        q, _gate = torch.chunk(attn.q_proj(x).view(B, T, -1, attn.head_dim * 2), 2, dim=-1)
        q = attn.q_norm(q).transpose(1, 2)                                                # [B, Hq, T, d]
        cos, sin = cos_sin_rows
        rot = cos.shape[-1]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q_rot, q_pass = q[..., :rot], q[..., rot:]
        half = rot // 2
        rotated = q_rot * cos + torch.cat((-q_rot[..., half:], q_rot[..., :half]), dim=-1) * sin
        return torch.cat((rotated, q_pass), dim=-1)

    def rope_spec(self) -> RopeSpec:
        """inv_freq covers only the rotary dims (partial rotary); the pass-through dims add
        a position-independent constant to RoPE-only logits, which rope_gravity leaves out."""
        rot = self.language_model.rotary_emb
        return RopeSpec(inv_freq=rot.inv_freq, mrope_section=list(rot.mrope_section),
                        head_dim=self.layers[self.attention_layers[0]].self_attn.head_dim, mrope_interleaved=True)

    def run_layer(self, i: int, hidden, cos_sin, cache, key_mask=None) -> torch.Tensor:
        """A full-attention layer takes the engine's causal (+ padding) mask. A linear-
        attention layer takes HF's 2-D padding mask instead, as `create_recurrent_attention_mask`
        builds it: the new tokens' part of key_mask, only for a multi-token call with a pad
        in it (Gated DeltaNet zeroes the pads' inputs, so a left pad leaves the conv and
        recurrent states as if it were absent); a one-token decode step gets None."""
        if self.text_config.layer_types[i] == FULL:
            return super().run_layer(i, hidden, cos_sin, cache, key_mask)
        q_len = hidden.shape[1]
        pads = None
        if key_mask is not None and q_len > 1:
            new = key_mask[:, -q_len:].to(hidden.device)
            pads = None if bool(new.all()) else new.to(hidden.dtype)
        return self.layers[i](hidden, attention_mask=pads, position_embeddings=cos_sin, position_ids=None,
                              use_cache=True, **{cache_keyword(self.layers[i]): cache})

    def check_pruner(self, pruner) -> None:
        # engine.prefill and batching.prefill_batch both ask, so a batch refuses it too
        if isinstance(pruner, KVOnlyPruner):
            raise ConfigError("pruner=kv_only is not allowed with Qwen3.5: it rewrites every layer's KV cache after "
                              "the prefill, and a linear-attention layer's recurrent state cannot drop tokens "
                              "(use pruner=drop or recycle)")
