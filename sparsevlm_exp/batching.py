"""Batched pruned prefill (issue 22): several requests through the decoder layers at
once, each keeping its own number of visual tokens at each cut.

How a batch travels:

    per row:  embed, positions, planes, query rows, a pre-LLM cut: engine.request_front,
              the very function engine.prefill runs at batch 1, on the row's own request
    batch:    the rows' real tokens LEFT-padded to one length; every decoder layer runs
              once over [B, L_max] with a causal + padding mask (LoopState.key_mask),
              writing one batched KV cache; each layer's key mask is kept per layer
    a cut:    each row is taken out without its pads (its keys from the cache, its
              hidden states, its rows of cos/sin) and cut by engine.layer_cut, the
              batch-1 cut step (view, scores, selection, pruner), then the shortened
              rows are left-padded again to the new longest one; layers after the cut
              see the re-padded batch
    finish:   each row's Pruner.finish on that row's own slice of every layer's cache;
              kv_only (full prefill, then every layer's cache cut to the kept tokens)
              leaves each row a different number of keys, so each rewritten layer is
              left-padded again and its key mask marks each row's kept keys
    decode:   GreedyDecoder over the batched cache, each layer read with its own key
              mask (PrefillState.key_masks); positions stay each request's own. A row
              that reached EOS stops (its later tokens are fill) and the loop ends when
              every row has.

answer_batch = prefill_batch + the decoder + each row cut to its own max_new_tokens and EOS,
with its share of the batch's timings: what the runner, sparse_generate and the lmms-eval
model run for a batch.

So the per-row rules (scores, selection, recycling, kv_only's cache cut, positions:
original or renumbered) are the batch-1 code itself, run on the row; only the decoder
layers are batched, and the front and the cut are one function for both paths, so they
cannot drift. Numbers: the layers see the same real tokens, positions and masks as
batch 1, so the answers and kept tokens are batch 1's up to float summation order (see
tests/test_batching.py). A pruner a family cannot run is refused as at batch 1
(FamilyAdapter.check_pruner: kv_only on Qwen3.5).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from .contracts import EncodedRequest, KeepPolicy, LoopState, PrefillState, PruneEvent, Pruner, Scorer
from .engine import _layer_positions, _next_position, layer_cut, request_front
from .metrics.efficiency import StageTimer


@dataclass
class RowPrefill:
    """What one request of a batch got: the batch-1 PrefillState fields that differ per row."""

    n_visual: int                          # visual tokens before pruning
    layer_counts: list[int]                # visual tokens alive after each decoder layer
    seq_lens: list[int] = field(default_factory=list)   # the row's own tokens at each layer (its FLOPs)
    events: list[PruneEvent] = field(default_factory=list)   # indices into the row's OWN request


class _OneLayerCache:
    """Just enough of a DynamicCache for engine.layer_cut: layer i's keys of one row."""

    def __init__(self, i: int, keys: torch.Tensor):
        self.layers = {i: type("Layer", (), {"keys": keys})()}


class _RowLayer:
    """One row's keys and values [1, Hkv, L_i, d] at one layer, without its pads: what a
    pruner's finish (pruners.compact_cache) reads and replaces. `replaced` turns True when
    the finish assigns either, so _finish_rows knows which layers to re-pad without
    holding the original views (which would keep the whole batch cache alive)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self._keys, self._values, self.replaced = keys, values, False

    @property
    def keys(self) -> torch.Tensor:
        return self._keys

    @keys.setter
    def keys(self, value: torch.Tensor) -> None:
        self._keys, self.replaced = value, True

    @property
    def values(self) -> torch.Tensor:
        return self._values

    @values.setter
    def values(self, value: torch.Tensor) -> None:
        self._values, self.replaced = value, True


class _RowCache:
    """Just enough of a DynamicCache for Pruner.finish on one row: `.layers[i]`."""

    def __init__(self, layers: list[_RowLayer]):
        self.layers = layers


def _left_pad(tensors: list[torch.Tensor], dim: int, fill, batch_dim: int = 0) -> torch.Tensor:
    """Concatenate rows (each of size 1 along batch_dim) along batch_dim, each LEFT-padded
    with `fill` along `dim` to the longest. Hidden states and masks: dim 1, batch_dim 0;
    positions [P, 1, L]: dim 2, batch_dim 1; keys/values [1, Hkv, L, d]: dim 2, batch_dim 0."""
    length = max(t.shape[dim] for t in tensors)
    out = []
    for t in tensors:
        pad_shape = list(t.shape)
        pad_shape[dim] = length - t.shape[dim]
        out.append(torch.cat([torch.full(pad_shape, fill, dtype=t.dtype, device=t.device), t], dim=dim))
    return torch.cat(out, dim=batch_dim)


def _strip(state: LoopState) -> None:
    """Drop the row's own pads (False in key_mask) from every per-token field."""
    keep = state.key_mask[0]
    if bool(keep.all()):
        return
    idx = keep.nonzero()[:, 0]
    state.hidden = state.hidden[:, idx]
    state.positions = state.positions[:, :, idx]
    state.orig_index = state.orig_index[:, idx]
    state.is_visual = state.is_visual[:, idx]
    if state.is_recycled is not None:
        state.is_recycled = state.is_recycled[:, idx]
    state.planes = {k: v[:, idx] for k, v in state.planes.items()}
    state.key_mask = state.key_mask[:, idx]


def _assemble(rows: list[LoopState], batch: LoopState) -> None:
    """Write the rows' hidden states, positions, planes and key masks into `batch`,
    each row LEFT-padded to the longest (pads: zeros, position 0, key mask False)."""
    batch.hidden = _left_pad([r.hidden for r in rows], 1, 0.0)
    batch.positions = _left_pad([r.positions for r in rows], 2, 0, batch_dim=1)
    batch.key_mask = _left_pad([torch.ones_like(r.key_mask) for r in rows], 1, False)
    batch.planes = {name: _left_pad([r.planes[name] for r in rows], 1, 0.0) for name in rows[0].planes}


@torch.no_grad()
def prefill_batch(adapter, reqs: list[EncodedRequest], *, scorer: Scorer | None = None,
                  policy: KeepPolicy | None = None, pruner: Pruner | None = None,
                  generators: list[torch.Generator] | None = None) -> PrefillState:
    """engine.prefill over several batch-1 requests at once (module docstring).

    reqs: B requests of batch 1 each (a request may carry its own left pads). generators:
    one per request, seeded as that request would be alone (random scorers). Returns a
    PrefillState over the batch: next_logits [B, V], next_position [B], key_masks per
    layer [B, L_i], the batched cache; per-request n_visual, layer_counts and events (in
    each request's own token indices) in `.rows`; `.events` is empty and `.layer_counts`
    / `.n_visual` are row 0's. Timings are the batch's (ms). Raises ConfigError for a
    pruner the family cannot run (FamilyAdapter.check_pruner: kv_only on Qwen3.5)."""
    adapter.check_pruner(pruner)
    n_layers, B = adapter.n_layers, len(reqs)
    generators = generators or [torch.Generator().manual_seed(0) for _ in reqs]
    timer = StageTimer(adapter.device)
    fronts, pruners = [], []
    for b, req in enumerate(reqs):
        # embed .. pre-LLM cut: the batch-1 code itself (engine.request_front), on the row alone;
        # front.pruner is the row's own copy (a pruner may hold per-request state: kv_only's drops)
        front = request_front(adapter, req, scorer=scorer, policy=policy, pruner=pruner,
                              generator=generators[b], timer=timer, cache=None)
        with timer("prefill"):
            _strip(front.state)
        fronts.append(front)
        pruners.append(front.pruner)
    rows = [f.state for f in fronts]
    infos = [RowPrefill(n_visual=f.n_visual, layer_counts=[], events=list(f.events)) for f in fronts]
    with timer("prefill"):
        batch = LoopState(hidden=None, positions=None, orig_index=None, is_visual=None, visual_coords=None,
                          cache=DynamicCache(config=adapter.text_config))
        _assemble(rows, batch)
        cos_sin = adapter.rotary(batch.hidden, batch.positions)
        group_next, layer_group, seq_lens = [_next_position(batch)], [], []
        n_alive = [int(r.is_visual.sum()) for r in rows]
        for i in range(n_layers):
            layer_input = batch.hidden
            seq_lens.append(layer_input.shape[1])
            for b in range(B):
                infos[b].seq_lens.append(rows[b].hidden.shape[1])
            layer_group.append(len(group_next) - 1)
            batch.hidden = adapter.run_layer(i, layer_input, cos_sin, batch.cache, batch.key_mask)
            batch.layer_key_masks.append(batch.key_mask)
            adapter.after_layer(i, batch)
            cutting = [b for b in range(B) if i in fronts[b].cut_layers and n_alive[b] > 0]
            if cutting:
                with timer("score"):
                    _cut_rows(adapter, i, batch, rows, cutting, layer_input, cos_sin, fronts, infos, pruners,
                              scorer, policy, generators)
                _assemble(rows, batch)
                cos_sin = adapter.rotary(batch.hidden, batch.positions)
                group_next.append(_next_position(batch))
                n_alive = [int(r.is_visual.sum()) for r in rows]
            for b in range(B):
                infos[b].layer_counts.append(n_alive[b])
        # a pruner without a finish of its own (drop, recycle) has no cache to rewrite
        finishing = [b for b in range(B) if fronts[b].pruning and type(pruners[b]).finish is not Pruner.finish]
        if finishing:
            with timer("score"):
                _finish_rows(batch, rows, pruners, finishing)
        next_logits = adapter.lm_logits(batch.hidden[:, -1:])
    return PrefillState(
        cache=batch.cache, next_logits=next_logits, next_position=group_next[-1], n_visual=infos[0].n_visual,
        layer_counts=infos[0].layer_counts, seq_lens=seq_lens, events=[], timings=timer.ms,
        layer_positions=_layer_positions(group_next, layer_group), key_masks=list(batch.layer_key_masks),
        rows=infos)


def _cut_rows(adapter, i, batch, rows, cutting, layer_input, cos_sin, fronts, infos, pruners, scorer, policy,
              generators) -> None:
    """The cut after layer i of each row in `cutting`, on that row alone (its pads left out)."""
    L = batch.hidden.shape[1]
    cos, sin = cos_sin
    # [B, Hkv, L, d]; None at a linear-attention layer (Qwen3.5), which keeps no keys: only
    # a scorer that reads no attention (random, uniform) cuts there, and never asks for them
    keys = getattr(batch.cache.layers[i], "keys", None)
    for b in cutting:
        row = rows[b]
        start = L - row.hidden.shape[1]                                                 # the row's pads
        row.hidden = batch.hidden[b:b + 1, start:]
        row.planes = {k: v[b:b + 1, start:] for k, v in batch.planes.items()}
        row.cache = _OneLayerCache(i, keys[b:b + 1, :, start:]) if keys is not None else None
        row_cos_sin = (cos[b:b + 1, start:] if cos.shape[0] > 1 else cos[:, start:],
                       sin[b:b + 1, start:] if sin.shape[0] > 1 else sin[:, start:])
        # the batch-1 cut itself (engine.layer_cut), on the row alone
        infos[b].events.append(layer_cut(adapter, i, row, layer_input[b:b + 1, start:], row_cos_sin,
                                         fronts[b].query_rows, infos[b].n_visual, scorer, policy, pruners[b],
                                         generators[b]))
        row.cache = None
    # rows that did not cut keep their (unchanged) tokens, with this layer's output
    for b in range(len(rows)):
        if b not in cutting:
            start = L - rows[b].hidden.shape[1]
            rows[b].hidden = batch.hidden[b:b + 1, start:]
            rows[b].planes = {k: v[b:b + 1, start:] for k, v in batch.planes.items()}


def _finish_rows(batch: LoopState, rows: list[LoopState], pruners: list, finishing: list[int]) -> None:
    """Each pruning row's Pruner.finish (the batch-1 code) on that row alone, then every
    layer whose cache a finish rewrote is LEFT-padded again, with its key mask.

    A row sees its own keys/values of every layer without its pads ([1, Hkv, n_bi, d];
    n_bi = its True count in layer i's mask: its real keys sit at the right end, as
    _assemble laid them out) and the matching all-True masks (state.layer_key_masks).
    kv_only (pruners.KVOnlyPruner.finish) replaces them with the kept tokens only, a
    different count per row: layer i's cache becomes [B, Hkv, max_b n'_bi, d] with
    each row's kept keys at the right, zeros on the left, and layer i's decode key mask
    (PrefillState.key_masks[i]) True exactly on each row's kept keys, so no row attends
    to a pad or to another row's slot. Pruners without a finish (drop, recycle) leave
    every layer as it is (nothing is re-padded)."""
    masks = batch.layer_key_masks                                                      # per layer [B, L_i]
    counts = torch.stack([m.sum(1) for m in masks]).tolist() if masks else []         # [layers][B]; one sync
    caches = []
    for b in range(len(rows)):
        layers = []
        for i, m in enumerate(masks):
            start = m.shape[1] - counts[i][b]
            kv = batch.cache.layers[i]
            layers.append(_RowLayer(kv.keys[b:b + 1, :, start:], kv.values[b:b + 1, :, start:]))
        caches.append(_RowCache(layers))
    for b in finishing:
        row = rows[b]
        row.cache = caches[b]
        row.layer_key_masks = [m[b:b + 1, m.shape[1] - counts[i][b]:] for i, m in enumerate(masks)]
        pruners[b].finish(row)
        row.cache = None
    # Layer by layer, and every reference to layer i's old tensors (the rows' views of it)
    # dropped as soon as it is re-padded: the old layer is freed before the next one is
    # built. Peak memory: the full cache + the rows' cut copies + one layer in flight (batch
    # 1 holds the full cache + one layer). Keeping the views to the end (to compare what a
    # finish replaced) held the whole old cache alongside the whole new one: ~3x the cache
    # at keep 1.0, measured (tests/test_batching.py, the kv_only memory test).
    for i in range(len(masks)):
        layer_rows = [c.layers[i] for c in caches]
        for c in caches:
            c.layers[i] = None
        if not any(layer_rows[b].replaced for b in finishing):
            continue
        kv = batch.cache.layers[i]
        kv.keys = kv.values = None                          # free the old layer before the new one is cut
        kv.keys = _left_pad([r.keys for r in layer_rows], 2, 0.0)
        kv.values = _left_pad([r.values for r in layer_rows], 2, 0.0)
        # True on each row's real keys after its finish (a non-finishing row: all it had)
        real = [layer_rows[b].keys.new_ones(1, layer_rows[b].keys.shape[2], dtype=torch.bool)
                if b not in finishing else rows[b].layer_key_masks[i] for b in range(len(rows))]
        masks[i] = _left_pad(real, 1, False)
        del layer_rows


def trim_at_eos(tokens: torch.LongTensor, eos_ids: list[int]) -> torch.LongTensor:
    """[n'] a row of generated tokens [n] up to and including its first EOS (all if none)."""
    hits = torch.isin(tokens, torch.tensor(eos_ids, device=tokens.device)).nonzero()
    return tokens[: int(hits[0, 0]) + 1] if hits.numel() else tokens


@dataclass
class RowView:
    """What a record of one request of a batch reads (the fields of a batch-1
    PrefillState that differ per row): n_visual, events (indices into the row's OWN
    request), layer_counts, seq_lens; `timings` are the batch's ms divided by its size (a
    SHARE, not this request's own time); `tokens` [n] its generated tokens, cut at its own
    max_new_tokens and after its first EOS."""

    n_visual: int
    events: list
    layer_counts: list[int]
    seq_lens: list[int]
    timings: dict[str, float]
    tokens: torch.LongTensor | None = None


@dataclass
class BatchAnswer:
    """answer_batch's result: `sequences` [B, n] as decoded (a finished row filled with its
    EOS), `rows` each request's RowView, `timings` the whole batch's ms (vision, prefill,
    score, decode)."""

    sequences: torch.LongTensor
    rows: list[RowView]
    timings: dict[str, float]


def answer_batch(adapter, reqs: list[EncodedRequest], *, scorer, policy, pruner, decoder,
                 generators: list[torch.Generator] | None = None,
                 lengths: list[int] | None = None) -> BatchAnswer:
    """Prefill B requests together (prefill_batch) and decode them together: the one path
    the runner (batch_size > 1), sparse_generate (a padded batch) and the lmms-eval model
    (--batch_size > 1) share, so that their rows agree with batch 1 the same way.

    decoder: decodes every row up to its max_new_tokens (give the longest length asked).
    lengths: each request's own max_new_tokens (None: the decoder's for all); row b's
    tokens are cut to lengths[b] and after its first EOS, which is what it gets alone,
    since greedy decoding of a row does not depend on how long the others go on.
    generators: one per request, seeded as it would be alone. Raises what prefill_batch
    raises (ConfigError for a pruner the family cannot run)."""
    state = prefill_batch(adapter, reqs, scorer=scorer, policy=policy, pruner=pruner, generators=generators)
    sequences = decoder.generate(adapter, state)
    B = len(reqs)
    lengths = lengths or [int(decoder.max_new_tokens)] * B
    share = {key: value / B for key, value in state.timings.items()}
    rows = [RowView(n_visual=row.n_visual, events=row.events, layer_counts=row.layer_counts, seq_lens=row.seq_lens,
                    timings=share, tokens=trim_at_eos(sequences[b, :lengths[b]], adapter.eos_token_ids))
            for b, row in enumerate(state.rows)]
    return BatchAnswer(sequences=sequences, rows=rows, timings=dict(state.timings))
