"""Pruners: given the visual tokens to keep, cut the running state (contracts.Pruner).
Every per-token field of the LoopState is cut with the same indices, the family's
extra planes (state.planes) included.

- DropPruner: inside the prefill. Layers after the pruning layer process only the
  kept tokens (less compute, a shorter KV cache there); kept tokens keep their
  ORIGINAL rotary positions (gaps preserved), so decoding continues from the
  original next position - or, with positions="renumbered", the official
  SparseVLM v1/v1.5 scheme (see POSITIONS below).
- KVOnlyPruner: the full prefill runs unpruned; afterwards only the decode cache of
  every layer is cut (what the `sparsevlm` PyPI package does) - for comparison.
- RecyclePruner: drop, then merge the best of the deleted visual tokens into a few
  recycled tokens (SparseVLM's DPC-kNN recycling), inserted after the kept ones.
"""
from __future__ import annotations

import math
import torch

from .errors import ConfigError, bad_value
from .contracts import LayerView, LoopState, PruneEvent, Pruner, take_tokens


def keep_mask(state: LoopState, keep_local: torch.LongTensor) -> torch.BoolTensor:
    """[B, L_cur] True for every non-visual token (pads included: they stay in place,
    masked) and for the kept visual tokens. keep_local [B, n] indexes the alive visual
    tokens (0..N_cur-1)."""
    visual_index = state.visual_index                                                # [B, N_cur]
    keep = ~state.is_visual.clone()
    keep.scatter_(1, visual_index.gather(1, keep_local), True)
    return keep


def _event(layer: int, state: LoopState, keep_local, scores) -> PruneEvent:
    scored_index = state.orig_index.gather(1, state.visual_index)                     # [B, N_cur]
    return PruneEvent(layer=layer, kept_index=scored_index.gather(1, keep_local),
                      scores=scores.detach().float().cpu(), scored_index=scored_index.cpu())


def cut_key_mask(state: LoopState, idx: torch.LongTensor) -> None:
    """Cut the key mask (state.key_mask [B, L_cur], None = no pads) to the positions
    idx [B, L_new], as the hidden states are cut: a pad stays a pad where it moves."""
    if state.key_mask is not None:
        state.key_mask = state.key_mask.gather(1, idx)


def cut_planes(state: LoopState, idx: torch.LongTensor) -> None:
    """Cut every extra per-token plane (state.planes, [B, L_cur, ...] each) to the
    sequence positions idx [B, L_new], as the hidden states are cut."""
    for name, plane in state.planes.items():
        state.planes[name] = take_tokens(plane, idx)


# The rotary positions after a cut (DropPruner, RecyclePruner: `positions`).
#   original   - kept tokens keep their positions, gaps included (SparseVLM v2.0's
#                official code, and the only sound choice for M-RoPE); every layer
#                decodes at the ORIGINAL next position.
#   renumbered - the official SparseVLM v1 / v1.5 code (LLaVA): after every cut the
#                positions become 0..L'-1 over the shortened sequence (kept visual
#                tokens contiguous, recycled tokens on the next slots, the text moved
#                left), and in decoding each layer puts the new token at ITS OWN next
#                position = its cache length (L at the layers up to the first cut, L'
#                after it, ...; the engine reads that per layer, engine.prefill).
#                Official: `position_ids = position_ids[:, :L']` after each cut, and
#                in decoding `position_ids = past_key_value.get_usable_length(.., layer_idx)`
#                (Gumpest/SparseVLMs, modelling_sparse_llama.py). 1-D RoPE only:
#                refused on M-RoPE families (Qwen), where one run of consecutive
#                positions would flatten the image's (t, h, w) layout into a line the
#                model never saw, and the official code has no M-RoPE rule to follow.
#   auto       - renumbered on 1-D RoPE families (LLaVA), original on M-RoPE ones:
#                what the v1 / v1.5 presets use, so that they run on any family and
#                are exactly the official scheme where one exists.
POSITIONS = ("original", "renumbered", "auto")


def _check_positions(positions) -> str:
    if positions not in POSITIONS:
        raise bad_value("pruner.positions", positions, f"one of {', '.join(POSITIONS)}")
    return positions


def refuse_renumbered(positions: str, position_dims: int) -> None:
    """ConfigError (one line) for positions="renumbered" on a family with M-RoPE
    (position_dims > 1); see POSITIONS for why. Called before any weights load
    (Pruner.check_positions) and again at the cut (the library path)."""
    if positions == "renumbered" and position_dims > 1:
        raise ConfigError("pruner.positions=renumbered is not allowed on this model: it has M-RoPE "
                          f"({position_dims} position rows), and renumbering (the official SparseVLM v1/v1.5 "
                          "rule, written for LLaVA's 1-D RoPE) would flatten the image's (t, h, w) layout; "
                          "use original, or auto (renumbered on 1-D RoPE, original on M-RoPE)")


def renumbers(positions: str, position_dims: int) -> bool:
    """True when a cut must renumber positions 0..L'-1 (see POSITIONS)."""
    refuse_renumbered(positions, position_dims)
    return positions == "renumbered" or (positions == "auto" and position_dims == 1)


def renumbered_positions(P: int, B: int, length: int, device, key_mask=None) -> torch.LongTensor:
    """[P, B, length] positions 0..length-1 (the official v1/v1.5 rule after a cut).
    key_mask [B, length] (False = left pad): the numbering runs over each row's real
    tokens only, pads at 0, as HF numbers a padded row."""
    if key_mask is None:
        return torch.arange(length, device=device).expand(P, B, length).clone()
    real = key_mask.long()
    return ((real.cumsum(1) - 1) * real).expand(P, -1, -1).clone()


class DropPruner(Pruner):
    """Drop the pruned visual tokens inside the prefill. positions: see POSITIONS
    above ("original" by default; "renumbered" = official SparseVLM v1/v1.5 on
    LLaVA; "auto")."""

    POSITIONS = POSITIONS

    def __init__(self, *, positions: str = "original"):
        self.positions = _check_positions(positions)

    def check_positions(self, position_dims: int) -> None:
        refuse_renumbered(self.positions, position_dims)

    def cut(self, state, keep_local, scores, view):
        event = _event(view.layer, state, keep_local, scores)
        keep = keep_mask(state, keep_local)
        B = keep.shape[0]
        idx = keep.nonzero()[:, 1].view(B, -1)                                        # [B, L_new]
        state.hidden = take_tokens(state.hidden, idx)
        P = state.positions.shape[0]
        cut_key_mask(state, idx)
        if renumbers(self.positions, P):
            state.positions = renumbered_positions(P, B, idx.shape[1], idx.device, state.key_mask)
        else:
            state.positions = state.positions.gather(2, idx.unsqueeze(0).expand(P, -1, -1))
        state.orig_index = state.orig_index.gather(1, idx)
        state.visual_coords = state.visual_coords.gather(1, keep_local.unsqueeze(-1).expand(-1, -1, state.visual_coords.shape[-1]))
        state.is_visual = state.is_visual.gather(1, idx)
        cut_planes(state, idx)
        return event


class KVOnlyPruner(Pruner):
    """Run the whole prefill unpruned, then cut every layer's decode cache to the kept
    tokens (finish). positions: "original" or "auto" (see POSITIONS), both meaning the
    ORIGINAL positions here: the prefill never shortens the sequence, so there is nothing
    to renumber, and decoding continues at the original next position. Accepting "auto"
    lets the v1/v1.5 presets (which set it) run with pruner=kv_only, the issue-15 item-2
    comparison; "renumbered" is refused (one line) rather than silently ignored."""

    POSITIONS = ("original", "auto")

    def __init__(self, *, positions: str = "original"):
        _check_positions(positions)
        if positions not in self.POSITIONS:
            raise bad_value("pruner.positions", positions, "original or auto with pruner=kv_only (its prefill runs "
                            "every token, so positions are never renumbered; auto means original here)")
        self.positions = "original"        # what results.json records: the rule this pruner runs
        self._drop: list[torch.LongTensor] = []

    def cut(self, state, keep_local, scores, view):
        event = _event(view.layer, state, keep_local, scores)
        keep = keep_mask(state, keep_local)
        self._drop.append(state.orig_index[~keep].view(keep.shape[0], -1))
        # The prefill still runs every token, but a dropped one is gone for decoding: it
        # stops being an alive visual token, so a later cut ranks only the survivors and
        # layer_counts says what the decode cache will hold. (Before, every cut re-ranked
        # all visual tokens and the cache kept the intersection of the cuts: 31 of a
        # scheduled 64 - issue 15 item 2.)
        state.is_visual = state.is_visual & keep
        state.visual_coords = state.visual_coords.gather(1, keep_local.unsqueeze(-1).expand(-1, -1, state.visual_coords.shape[-1]))
        return event

    def finish(self, state):
        # Cut every layer's cache to the kept tokens; the prefill itself saw them all.
        if not self._drop:
            return
        dropped = torch.cat(self._drop, dim=1)                                         # [B, n] ORIGINAL indices
        self._drop = []
        # where they sit now: orig_index is ascending (kv_only never cuts the sequence) and
        # is 0..L-1 at batch 1, so this is the identity there; a row of a batch has its own
        # left pads stripped (batching.prefill_batch), which shifts its tokens left
        at = torch.searchsorted(state.orig_index.contiguous(), dropped.to(state.orig_index.device))
        L = state.orig_index.shape[1]
        keep = torch.ones(state.orig_index.shape[0], L, dtype=torch.bool, device=dropped.device)
        keep.scatter_(1, at, False)
        idx = keep.nonzero()[:, 1].view(keep.shape[0], -1)                           # [B, L_new]
        compact_cache(state.cache.layers, idx)
        state.is_visual = state.is_visual.gather(1, idx)
        # every layer's cache now holds the tokens idx: so must its key mask (pads stay).
        # state.key_mask stays aligned with hidden/positions, which this does not cut.
        state.layer_key_masks = [m.gather(1, idx) for m in state.layer_key_masks]


def compact_cache(layers, idx: torch.LongTensor) -> None:
    """Keep the sequence positions idx [B, L_new] (ascending) in every layer's keys and
    values [B, Hkv, L, d], in place of the full ones.

    Plain torch indexing. Batch 1 (every real use) takes index_select, which reads
    the index once per row; a gather with the index expanded to [B, Hkv, L_new, d]
    reads it once per element and was 6-8x slower on CPU (scripts/bench_kv_gather.py,
    which also bounds what a fused Triton gather could gain - issue #3)."""
    for layer in layers:
        if idx.shape[0] == 1:
            layer.keys = layer.keys.index_select(2, idx[0])
            layer.values = layer.values.index_select(2, idx[0])
        else:
            gather = idx[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
            layer.keys = layer.keys.gather(2, gather)
            layer.values = layer.values.gather(2, gather)


# --------------------------------------------------------------------------------------
# Recycling (SparseVLM): drop, then merge the best of the deleted tokens back
# --------------------------------------------------------------------------------------
def dpc_knn_clusters(x: torch.Tensor, n_clusters: int) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Density-peak clustering with a kNN density (DPC-kNN, as in TCFormer / SparseVLM).

    x [n, C] token features. Returns (assignment [n] cluster number of each token,
    centres [c] row of x that is each cluster's centre).
      d(i, j) = ||x_i - x_j|| / sqrt(C)
      rho_i   = exp(-mean of d^2 over the k = n_clusters nearest tokens, ITSELF INCLUDED)
                (official: topk(dist, k=cluster_num, largest=False) on the full matrix,
                so the zero self-distance is one of the k)
      delta_i = distance to the nearest denser token; the densest gets max d
      centres = top-c by rho * delta; every token joins its nearest centre.
    Ties in density: the official code adds 1e-6 * rand noise; we break them by
    index (a lower index counts as denser), so the result is deterministic.
    """
    n, C = x.shape
    x = x.float()
    dist = torch.cdist(x[None], x[None], compute_mode="donot_use_mm_for_euclid_dist")[0] / math.sqrt(C)  # [n, n]
    k = min(n_clusters, n)
    nearest = dist.topk(k, dim=1, largest=False).values                               # [n, k]
    density = torch.exp(-(nearest ** 2).mean(dim=1))                                  # [n]
    order = torch.arange(n, device=x.device)
    # denser[i, j]: token j is denser than token i
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (order[None, :] < order[:, None]))
    far = dist.max()
    delta = torch.where(denser, dist, far).min(dim=1).values                          # [n]
    centres = (density * delta).topk(n_clusters).indices                               # [c]
    assignment = dist[:, centres].argmin(dim=1)                                        # [n]
    assignment[centres] = torch.arange(n_clusters, device=x.device)                   # a centre joins itself
    return assignment, centres


def cluster_means(x: torch.Tensor, assignment: torch.LongTensor, n_clusters: int) -> torch.Tensor:
    """[c, C] mean of the rows of x [n, C] in each cluster, in x's dtype (computed in fp32).
    The official code divides by (count + 1e-6); we take the exact mean."""
    sums = torch.zeros(n_clusters, x.shape[1], device=x.device, dtype=torch.float32)
    sums.index_add_(0, assignment, x.float())
    counts = torch.bincount(assignment, minlength=n_clusters).clamp(min=1)
    return (sums / counts[:, None]).to(x.dtype)


def recycle_counts(n_deleted: int, select_ratio: float = 0.3, tokens_per_cluster: int = 10) -> tuple[int, int]:
    """(tokens taken from the deleted ones, clusters) = (floor(0.3 n) + 1, floor(taken / 10) + 1),
    as the official code (int(n * 0.3) + 1, int(taken / 10) + 1); (0, 0) when nothing was deleted."""
    if n_deleted == 0:
        return 0, 0
    taken = min(n_deleted, math.floor(n_deleted * select_ratio) + 1)
    return taken, taken // tokens_per_cluster + 1


RECYCLED_POSITIONS = ("last_kept", "cluster_mean")


class RecyclePruner(Pruner):
    """Drop, then recycle: the top `select_ratio` of the deleted visual tokens (by score)
    are clustered with DPC-kNN and each cluster's mean (of the pruning layer's OUTPUT
    hidden states, as the official code merges layer_outputs[0]) is inserted as one
    new token right after the last kept visual token.

    Recycled tokens ARE visual tokens from then on: later pruning layers score them
    and may keep or delete (and re-recycle) them, and `layer_counts` counts them -
    as the official code does (v_token_num = kept + cluster_num) and as the paper's
    token counts assume (309 = 300 + 9 after layer 2 of the 192 schedule).

    Sequence order: recycled tokens take the ORIGINAL index of the last kept visual
    token (a repeat), so `orig_index` stays sorted for searchsorted. PruneEvent's
    kept_index lists kept ORIGINAL tokens only; in scored_index recycled tokens are -1.

    positions: see POSITIONS above. "renumbered" (the official v1/v1.5 code, LLaVA):
    after the cut every token gets 0..L'-1, which puts the merged tokens on the
    slots right after the kept visual ones and moves the text left.

    recycled_position (positions="original" only): the rotary position a recycled
    token gets. With original positions kept there is no free slot, so:
      last_kept    - the position of the last kept visual token (default): the token
                     sits where it is placed in the sequence, every later text token
                     keeps its original position;
      cluster_mean - the rounded mean of its members' positions (per M-RoPE row): a
                     merged patch sits near where its patches were in the image.
    """

    def __init__(self, *, recycled_position: str = "last_kept", select_ratio: float = 0.3,
                 tokens_per_cluster: int = 10, positions: str = "original"):
        if recycled_position not in RECYCLED_POSITIONS:
            raise bad_value("pruner.recycled_position", recycled_position, f"one of {', '.join(RECYCLED_POSITIONS)}")
        self.positions = _check_positions(positions)
        if recycled_position != "last_kept" and positions != "original":
            # renumbering gives the merged tokens their slots; a second rule would be ignored
            raise bad_value("pruner.recycled_position", recycled_position,
                            f"last_kept with pruner.positions={positions} (recycled tokens then take the "
                            "renumbered slots after the kept ones); cluster_mean needs positions=original")
        if isinstance(select_ratio, bool) or not isinstance(select_ratio, (int, float)) or not 0 <= select_ratio <= 1:
            raise bad_value("pruner.select_ratio", select_ratio, "a float in [0, 1]")
        if isinstance(tokens_per_cluster, bool) or not isinstance(tokens_per_cluster, int) or tokens_per_cluster < 1:
            raise bad_value("pruner.tokens_per_cluster", tokens_per_cluster, "an int >= 1")
        self.recycled_position = recycled_position
        self.select_ratio, self.tokens_per_cluster = float(select_ratio), tokens_per_cluster

    def check_positions(self, position_dims: int) -> None:
        refuse_renumbered(self.positions, position_dims)

    def cut(self, state, keep_local, scores, view):
        if keep_local.shape[0] != 1:
            raise ValueError("RecyclePruner cuts one request at a time (a batch cuts each row on its own: "
                             "batching.prefill_batch)")
        if state.is_recycled is None:
            state.is_recycled = torch.zeros_like(state.is_visual)
        visual_index = state.visual_index[0]                                          # [N_cur] current positions
        n_alive = visual_index.shape[0]
        was_recycled = state.is_recycled[0, visual_index]                              # [N_cur]

        scored_index = state.orig_index[0, visual_index].masked_fill(was_recycled, -1)
        kept_local = keep_local[0]
        kept_original = kept_local[~was_recycled[kept_local]]
        event = PruneEvent(layer=view.layer, kept_index=scored_index[kept_original][None],
                           scores=scores.detach().float().cpu(), scored_index=scored_index[None].cpu())

        is_deleted = torch.ones(n_alive, dtype=torch.bool, device=visual_index.device)
        is_deleted[kept_local] = False
        deleted_local = is_deleted.nonzero()[:, 0]                                     # [n_del]
        n_taken, n_clusters = recycle_counts(deleted_local.shape[0], self.select_ratio, self.tokens_per_cluster)

        # Drop first (every field cut the same way), then insert the merged tokens.
        keep = keep_mask(state, keep_local)[0]                                         # [L_cur]
        idx = keep.nonzero()[:, 0]                                                     # [L_new]
        old_hidden, old_positions, old_coords = state.hidden, state.positions, state.visual_coords
        hidden = old_hidden[:, idx]
        positions = old_positions[:, :, idx]
        orig_index = state.orig_index[:, idx]
        is_visual = state.is_visual[:, idx]
        is_recycled = state.is_recycled[:, idx]
        coords = old_coords[:, kept_local]
        cut_planes(state, idx[None])
        cut_key_mask(state, idx[None])
        if n_clusters > 0:
            # top n_taken of the deleted by score, in score order (official topk order)
            taken = deleted_local[scores[0, deleted_local].topk(n_taken).indices]       # [n] local visual numbers
            taken_seq = visual_index[taken]                                            # [n] current positions
            members = old_hidden[0, taken_seq]                                         # [n, D]
            assignment, centres = dpc_knn_clusters(members, n_clusters)
            merged = cluster_means(members, assignment, n_clusters)                    # [c, D]
            new_positions = self._positions(old_positions[:, 0, taken_seq], assignment, n_clusters,
                                            positions[:, 0], is_visual[0])              # [P, c]
            # insert after the last kept visual token
            at = int(is_visual[0].nonzero()[-1, 0]) + 1
            c = n_clusters

            def insert(tensor, new, dim):
                before, after = tensor.narrow(dim, 0, at), tensor.narrow(dim, at, tensor.shape[dim] - at)
                return torch.cat([before, new, after], dim=dim)

            hidden = insert(hidden, merged[None].to(hidden.dtype), 1)
            positions = insert(positions, new_positions[:, None, :], 2)
            orig_index = insert(orig_index, orig_index[:, at - 1 : at].expand(1, c), 1)
            is_visual = insert(is_visual, torch.ones(1, c, dtype=torch.bool, device=is_visual.device), 1)
            is_recycled = insert(is_recycled, torch.ones(1, c, dtype=torch.bool, device=is_visual.device), 1)
            if state.key_mask is not None:          # a recycled token is real
                state.key_mask = insert(state.key_mask, torch.ones(1, c, dtype=torch.bool,
                                                                   device=is_visual.device), 1)
            # a recycled token's (image, row, col, frame) is its cluster centre's
            coords = torch.cat([coords, old_coords[:, taken[centres]]], dim=1)
            # extra per-token planes (e.g. DeepStack features) belong to real patches:
            # a merged token gets zeros (nothing is injected into it)
            for name, plane in state.planes.items():
                state.planes[name] = insert(plane, plane.new_zeros(1, c, *plane.shape[2:]), 1)
        if renumbers(self.positions, positions.shape[0]):
            # official v1/v1.5: 0..L'-1 over the new sequence, merged tokens included
            positions = renumbered_positions(positions.shape[0], 1, hidden.shape[1], positions.device,
                                             state.key_mask)
        state.hidden, state.positions, state.orig_index = hidden, positions, orig_index
        state.is_visual, state.is_recycled, state.visual_coords = is_visual, is_recycled, coords
        event.n_recycled = n_clusters
        return event

    def _positions(self, member_positions, assignment, n_clusters, kept_positions, kept_is_visual):
        """[P, c] rotary positions of the recycled tokens. member_positions [P, n]."""
        if self.recycled_position == "last_kept":
            last = kept_positions[:, kept_is_visual.nonzero()[-1, 0]]                  # [P]
            return last[:, None].expand(-1, n_clusters)
        sums = torch.zeros(member_positions.shape[0], n_clusters, dtype=torch.float64,
                           device=member_positions.device)
        sums.index_add_(1, assignment, member_positions.double())
        counts = torch.bincount(assignment, minlength=n_clusters).clamp(min=1)
        return torch.round(sums / counts).long()
