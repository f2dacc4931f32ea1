"""DART (Wen et al., EMNLP 2025, "Stop Looking for Important Tokens in Multimodal
Language Models: Duplication Matters More"; official code ZichenWen1/DART): inside the
LLM, pick a few pivot tokens and keep the visual tokens LEAST similar to them, so that
duplicates of what is already kept are dropped. Reads keys and hidden states only, no
attention map: it works with FlashAttention.

The rule (official defaults: K = 2, 4 image pivots, 4 text pivots, L1 key norm):
  pivots   = the `pivot_image` visual tokens with the largest L1 norm of their keys
             (all heads concatenated) at layer K-1, and the `pivot_text` instruction
             tokens (after the image) with the largest L1 key norm;
  per pivot, in sequence order: take the floor(n / n_pivots) not-yet-kept visual tokens
             with the lowest cosine similarity to the pivot, where tokens are compared
             by layer K-1's output after the model's final norm;
  kept     = image pivots + every pivot's picks (text pivots are never "kept": text is
             never pruned).
Layer numbering: DART's K=2 prunes BEFORE layer 2 with layer 1's keys and output; here
that is `layer=1` (scores from layer 1, layers 2.. see only the kept tokens).
Count: the official code keeps n_image_pivots + n_pivots * floor(n / n_pivots) tokens,
which is not n; we stop at n and, if the per-pivot quotas leave the count short, fill
with the remaining tokens least similar to their most similar pivot.
"""
from __future__ import annotations

import torch

from ..contracts import STAGE_LLM, LayerView, Scorer


def dart_select(keys: torch.Tensor, hidden: torch.Tensor, visual: torch.LongTensor, text: torch.LongTensor,
                n: int, pivot_image: int = 4, pivot_text: int = 4, norm: str = "l1") -> torch.LongTensor:
    """[n] indices into `visual` of the kept visual tokens, in pick order.

    keys [L, C] (heads concatenated), hidden [L, D] (final-normed layer output), visual
    [N] / text [T] sequence indices. norm: "l1" (official default) or "l2".
    """
    N = visual.shape[0]
    n = min(n, N)
    p = 1 if norm == "l1" else 2
    key_norm = keys.float().norm(p=p, dim=-1)                                         # [L]
    img_pivots = key_norm[visual].topk(min(pivot_image, n, N)).indices               # local visual numbers
    txt_pivots = text[key_norm[text].topk(min(pivot_text, text.shape[0])).indices] if text.numel() else text
    # pivots as sequence positions, iterated in sequence order
    pivots = torch.cat([visual[img_pivots], txt_pivots]).sort().values
    unit = torch.nn.functional.normalize(hidden.float(), dim=-1)
    sim = unit[pivots] @ unit[visual].T                                              # [P, N] cosine
    quota = max(1, n // max(1, pivots.shape[0]))
    kept = torch.zeros(N, dtype=torch.bool, device=visual.device)
    kept[img_pivots] = True
    order = img_pivots.tolist()
    for row in range(pivots.shape[0]):
        room = n - len(order)
        if room <= 0:
            break
        candidate = sim[row].masked_fill(kept, float("inf"))
        picks = (-candidate).topk(min(quota, room, int((~kept).sum()))).indices       # least similar first
        kept[picks] = True
        order += picks.tolist()
    if len(order) < n:   # quotas rounded down: fill by least similarity to the closest pivot
        closest = sim.amax(dim=0).masked_fill(kept, float("inf"))
        order += (-closest).topk(n - len(order)).indices.tolist()
    return torch.tensor(order, dtype=torch.long, device=visual.device)


class DARTScorer(Scorer):
    """In-LLM (default layer=1, i.e. DART's K=2): duplication-aware selection, see the
    module docstring. The recorded score of a token is minus its largest cosine
    similarity to the image pivots (the duplication it would add)."""

    stages = (STAGE_LLM,)
    reads_hidden = True
    selects = True
    NORMS = ("l1", "l2")

    def __init__(self, pivot_image: int = 4, pivot_text: int = 4, norm: str = "l1"):
        if norm not in self.NORMS:
            raise ValueError(f"scorer.norm={norm!r} is not allowed: one of {', '.join(self.NORMS)}")
        for key, value in (("pivot_image", pivot_image), ("pivot_text", pivot_text)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"scorer.{key}={value!r} is not allowed: an int >= 0")
        if pivot_image + pivot_text == 0:
            raise ValueError("scorer.pivot_image + scorer.pivot_text = 0: DART needs at least one pivot")
        self.pivot_image, self.pivot_text, self.norm = pivot_image, pivot_text, norm

    def query_rows(self, embeds, visual_index, text_index):
        return text_index            # text pivots come from the instruction tokens' keys

    @staticmethod
    def _keys(view: LayerView, b: int) -> torch.Tensor:
        k = view.k[b]                                                                 # [Hkv, L, d]
        return k.transpose(0, 1).reshape(k.shape[1], -1)                              # [L, Hkv*d]

    def __call__(self, view: LayerView) -> torch.Tensor:
        out = []
        for b in range(view.visual_index.shape[0]):
            visual = view.visual_index[b]
            norm = self._keys(view, b).float().norm(p=1 if self.norm == "l1" else 2, dim=-1)[visual]
            pivots = norm.topk(max(1, min(self.pivot_image, visual.shape[0]))).indices
            unit = torch.nn.functional.normalize(view.hidden[b].float(), dim=-1)[visual]
            out.append(-(unit[pivots] @ unit.T).amax(dim=0))
        return torch.stack(out)                                                       # [B, N]

    def select(self, scores, view: LayerView, n: int) -> torch.LongTensor:
        return torch.stack([dart_select(self._keys(view, b), view.hidden[b], view.visual_index[b],
                                        view.query_index[b], n, self.pivot_image, self.pivot_text, self.norm)
                            for b in range(view.visual_index.shape[0])])
