"""Pruners: given the visual tokens to keep, cut the running state.

- DropPruner: inside the prefill. Layers after the pruning layer process only the
  kept tokens (less compute, a shorter KV cache there); kept tokens keep their
  ORIGINAL rotary positions (gaps preserved), so decoding continues from the
  original next position.
- KVOnlyPruner: the full prefill runs unpruned; afterwards only the decode cache of
  every layer is cut (what the `sparsevlm` PyPI package does) - for comparison.
"""
from __future__ import annotations

import torch

from .models.base import LayerView, LoopState, PruneEvent


def keep_mask(state: LoopState, keep_local: torch.LongTensor) -> torch.BoolTensor:
    """[B, L_cur] True for every non-visual token and for the kept visual tokens.
    keep_local [B, n] indexes the alive visual tokens (0..N_cur-1)."""
    visual_index = state.visual_index                                                # [B, N_cur]
    keep = ~state.is_visual.clone()
    keep.scatter_(1, visual_index.gather(1, keep_local), True)
    return keep


def _event(layer: int, state: LoopState, keep_local, scores) -> PruneEvent:
    scored_index = state.orig_index.gather(1, state.visual_index)                     # [B, N_cur]
    return PruneEvent(layer=layer, kept_index=scored_index.gather(1, keep_local),
                      scores=scores.detach().float().cpu(), scored_index=scored_index.cpu())


class Pruner:
    def cut(self, state: LoopState, keep_local: torch.LongTensor, scores: torch.Tensor,
            view: LayerView) -> PruneEvent:
        raise NotImplementedError

    def finish(self, state: LoopState) -> None:
        """Called once after the last layer of the prefill."""


class DropPruner(Pruner):
    def cut(self, state, keep_local, scores, view):
        event = _event(view.layer, state, keep_local, scores)
        keep = keep_mask(state, keep_local)
        B = keep.shape[0]
        idx = keep.nonzero()[:, 1].view(B, -1)                                        # [B, L_new]
        state.hidden = state.hidden.gather(1, idx.unsqueeze(-1).expand(-1, -1, state.hidden.shape[-1]))
        state.positions = state.positions.gather(2, idx.unsqueeze(0).expand(state.positions.shape[0], -1, -1))
        state.orig_index = state.orig_index.gather(1, idx)
        state.visual_coords = state.visual_coords.gather(1, keep_local.unsqueeze(-1).expand(-1, -1, 3))
        state.is_visual = state.is_visual.gather(1, idx)
        return event


class KVOnlyPruner(Pruner):
    def __init__(self):
        self._drop: list[torch.LongTensor] = []

    def cut(self, state, keep_local, scores, view):
        event = _event(view.layer, state, keep_local, scores)
        keep = keep_mask(state, keep_local)
        self._drop.append(state.orig_index[~keep].view(keep.shape[0], -1))
        return event

    def finish(self, state):
        # Cut every layer's cache to the kept tokens; the prefill itself saw them all.
        if not self._drop:
            return
        dropped = torch.cat(self._drop, dim=1)
        self._drop = []
        L = state.orig_index.shape[1]
        keep = torch.ones(state.orig_index.shape[0], L, dtype=torch.bool, device=dropped.device)
        keep.scatter_(1, dropped, False)
        idx = keep.nonzero()[:, 1].view(keep.shape[0], -1)                           # [B, L_new]
        for layer in state.cache.layers:
            gather = idx[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
            layer.keys = layer.keys.gather(2, gather)
            layer.values = layer.values.gather(2, gather)
        state.is_visual = state.is_visual.gather(1, idx)
