"""Greedy decoding over the (ragged) pruned KV cache."""
from __future__ import annotations

import torch

from .contracts import Decoder, PrefillState
from .metrics.efficiency import StageTimer


class GreedyDecoder(Decoder):
    def __init__(self, max_new_tokens: int = 16):
        if max_new_tokens < 1:
            raise ValueError(f"decoder.max_new_tokens={max_new_tokens} must be >= 1")
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def generate(self, adapter, state: PrefillState) -> torch.LongTensor:
        """Generated tokens [B, n] (the EOS token included when reached, as HF generate
        does). Positions continue from the ORIGINAL next position, whatever was
        pruned - or, after renumbered positions, from each layer's own next position
        (PrefillState.decode_position). Records decode time in state.timings['decode'].

        A batch: a row that has produced an EOS is finished; its later tokens are the
        first EOS id (fill, cut off by batching.trim_at_eos) and decoding stops when
        every row is finished or max_new_tokens is reached."""
        eos = torch.tensor(adapter.eos_token_ids, device=state.next_logits.device)
        timer = StageTimer(adapter.device)
        tokens = []
        logits, position = state.next_logits, state.decode_position()
        finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        with timer("decode"):
            for step in range(self.max_new_tokens):
                token = logits.argmax(dim=-1, keepdim=True)                           # [B, 1]
                if step > 0 and eos.numel():
                    token = torch.where(finished[:, None], eos[0], token)
                tokens.append(token)
                finished = finished | torch.isin(token[:, 0], eos)
                if bool(finished.all()) or step == self.max_new_tokens - 1:
                    break
                logits = adapter.decode_step(token, position, state.cache, state.key_masks)
                position = position + 1
        state.timings.update(timer.ms)
        return torch.cat(tokens, dim=1)
