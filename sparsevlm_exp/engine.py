"""The engine: the prefill loop with cut points at any stage, and the decode step.

It knows a model family only through the adapter's hooks (models/base.py,
FamilyAdapter), and the plug-in parts only through contracts.py:

    adapter.embed(req)            -> [B, L, D] input embeddings, vision features spliced in
    adapter.positions(req)        -> [P, B, L] rotary position ids
    adapter.token_planes(req)     -> {name: [B, L, ...]} extra per-token planes (default none)
    adapter.rotary(hidden, pos)   -> (cos, sin)
    adapter.layer_queries(i, rows, cos_sin_rows) -> [B, Hq, T, d] post-rotary queries
    adapter.after_layer(i, state) -> None (e.g. DeepStack injections; default no-op)
    adapter.rope_spec()           -> RopeSpec
    adapter.embed_and_vision_attention(req) -> (embeds, [B, N] vision attention | None)

One sample: embed -> [pre-LLM cut] -> for each decoder layer: run it, after_layer,
[cut if the policy names this layer] -> final norm + lm_head -> PrefillState; then
the decoder calls `decode_step` once per generated token over the ragged cache.

A cut: rows/q/k -> LayerView -> scorer(view) -> policy.select(scores, view) ->
pruner.cut(state, kept, scores, view). `layer = K` means the scores come from layer
K's attention and layers K+1.. see only the kept tokens; `layer = PRE_LLM` (-1)
cuts before layer 0 (docs/ARCHITECTURE.md, contracts.py).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .contracts import (PRE_LLM, STAGE_LLM, STAGE_PRE_LLM, EncodedRequest, KeepPolicy, LayerPositions, LayerView,
                        LoopState, PrefillState, Pruner, Scorer, image_shares, stage_of, take_tokens)
from .errors import ConfigError
from .metrics.efficiency import StageTimer
from .pruners import KVOnlyPruner


def reads_attention_rows(scorer: Scorer) -> bool:
    """True for a scorer that asks for query rows (overrides Scorer.query_rows): it needs
    the attention of the layer it scores at."""
    return type(scorer).query_rows is not Scorer.query_rows


def check_parts(scorer: Scorer, policy: KeepPolicy, n_layers: int,
                attention_layers: list[int] | None = None, pruner: Pruner | None = None) -> None:
    """Raise ConfigError (one line) if the parts cannot run together on a model with
    n_layers decoder layers: the policy's own checks, a cut point at a stage the
    scorer does not support (e.g. v15 at layer=-1), or a policy that needs what the
    scorer does not provide. Cheap: called before any weights load.

    attention_layers: the layers that have attention rows where not all do (Qwen3.5's
    full-attention layers; `models.loading.attention_layers(config)`), None = all.
    A scorer that reads attention rows is refused at any other layer, and so is a pruner
    that rewrites every layer's KV cache after the prefill (kv_only): a linear-attention
    layer keeps a recurrent state, not keys, and it cannot drop tokens from it
    (FamilyAdapter.check_pruner says the same once the adapter exists)."""
    policy.check(n_layers)
    if attention_layers is not None and isinstance(pruner, KVOnlyPruner):
        raise ConfigError("pruner=kv_only is not allowed on this model: it rewrites every layer's KV cache after "
                          "the prefill, and its linear-attention layers keep a recurrent state that cannot drop "
                          "tokens (use pruner=drop or recycle)")
    if attention_layers is not None and reads_attention_rows(scorer):
        for layer in policy.layers(n_layers):
            if layer >= 0 and layer not in attention_layers:
                below = [j for j in attention_layers if j < layer][-1:]
                above = [j for j in attention_layers if j > layer][:1]
                raise ConfigError(f"layer={layer} is not allowed with scorer {type(scorer).__name__}: it reads "
                                  f"attention rows and layer {layer} is a linear-attention layer; nearest "
                                  f"full-attention layers: {', '.join(map(str, below + above))}")
    for layer in policy.layers(n_layers):
        stage = stage_of(layer)
        if stage not in scorer.stages:
            where = (f"layer={layer} (the pre-LLM stage)" if stage == STAGE_PRE_LLM
                     else f"layer={layer} (inside the LLM)")
            can = {STAGE_PRE_LLM: f"layer={PRE_LLM} (before the LLM)",
                   STAGE_LLM: f"layers 0..{n_layers - 1} (inside the LLM)"}
            raise ConfigError(f"{where} is not allowed with scorer {type(scorer).__name__}, which scores at "
                              f"{' or '.join(can[s] for s in scorer.stages)} only")
    missing = [need for need in policy.needs if need not in scorer.provides]
    if missing:
        raise ConfigError(f"policy={type(policy).__name__} needs {', '.join(missing)} from the scorer, which "
                          f"scorer={type(scorer).__name__} does not provide (provides: "
                          f"{', '.join(scorer.provides) or 'nothing'})")


@dataclass
class RequestFront:
    """One request after the per-request front of a prefill (request_front): what the
    layer loop starts from. Shared by engine.prefill (batch 1) and
    batching.prefill_batch (one per row), so the two cannot drift apart."""

    state: LoopState                  # embeds, positions, planes, masks; after a pre-LLM cut if any
    n_visual: int                     # visual tokens before pruning
    pruning: bool                     # scorer, policy and pruner given, and the request has images
    cut_layers: set[int]              # the policy's cut points (PRE_LLM included); empty if not pruning
    query_rows: torch.LongTensor | None   # [B, T] ORIGINAL indices of the scorer's query rows; None if not pruning
    events: list                      # the pre-LLM cut's PruneEvent (None from a pruner that records none), or []
    padded: bool                      # the request carries left pads (key_mask has a False)
    n_pads: int                       # left pads per row (0 when not padded); never cut
    pruner: Pruner | None             # THIS request's copy of the pruner: run its cuts and finish with it


def request_front(adapter, req: EncodedRequest, *, scorer: Scorer | None, policy: KeepPolicy | None,
                  pruner: Pruner | None, generator: torch.Generator, timer: StageTimer, cache) -> RequestFront:
    """The per-request front of a prefill: embeddings (+ the vision tower's attention when
    a pre-LLM scorer reads it), positions [P, B, L], planes, the LoopState, the scorer's
    query rows, and a pre-LLM cut when the policy names layer PRE_LLM.

    cache: the KV cache the LoopState carries (a DynamicCache at batch 1; None for a row
    of a batch, whose layers write one batched cache). Timed into `timer` as
    engine.prefill documents: "vision" (embed, positions, planes), "prefill" and its
    part "score" (query rows and the pre-LLM cut). The same function runs for
    batch-1 prefills and for each row of a batch (batching.prefill_batch): a change
    here changes both, by construction.

    The pruner is copied for the request (RequestFront.pruner; the caller's object is never
    cut): a pruner may hold per-request state from its cuts to its finish (kv_only's dropped
    tokens), and a shared one carried a request's state into the next whenever a prefill
    stopped between the two (an error recorded for one sample, an out-of-memory): the next
    request's cache was cut at the failed one's token indices. Rows of a batch never share
    one either."""
    device = adapter.device
    pruner = copy.deepcopy(pruner) if pruner is not None else None
    n_visual = int(req.visual_index.shape[1])
    pruning = scorer is not None and policy is not None and pruner is not None and n_visual > 0
    cut_layers = set(policy.layers(adapter.n_layers)) if pruning else set()
    vision_attention = None
    with timer("vision"):
        if PRE_LLM in cut_layers and scorer.reads_vision_attention:
            embeds, vision_attention = adapter.embed_and_vision_attention(req)
        else:
            embeds = adapter.embed(req)
        positions = adapter.positions(req)
        planes = adapter.token_planes(req)
    B, L, _ = embeds.shape
    key_mask = req.key_mask(device)                                               # [B, L] False = left pad
    # One host check per request: an unpadded prompt builds no masks at all (the plain
    # causal path, bit-identical to before padding was supported).
    padded = not bool(key_mask.all())
    # Left pads are never cut (pruners drop visual tokens only), so every layer runs the
    # same number of them; seq_lens counts REAL tokens only, so FLOPs and efficiency
    # records of a padded row equal its unpadded self's (pads are no work the method does).
    n_pads = int((~key_mask[0]).sum()) if padded else 0
    is_visual = torch.zeros(B, L, dtype=torch.bool, device=device)
    is_visual.scatter_(1, req.visual_index.to(device), True)
    state = LoopState(
        hidden=embeds,
        positions=positions,
        orig_index=torch.arange(L, device=device).expand(B, L),
        is_visual=is_visual,
        visual_coords=req.visual_coords.to(device),
        cache=cache,
        planes=planes,
        key_mask=key_mask,
    )
    events, query_rows = [], None
    # timings["score"] (query rows, scores, selection, the cuts) is a part of timings["prefill"].
    with timer("prefill"):
        if pruning:
            instruction = req.instruction(scorer.instruction_tokens)              # user_turn | after_first_image
            # Rows are chosen once, from the input embeddings (SparseVLM's raters, or the
            # last token for FastV); pruning never removes text tokens, so they stay valid.
            with timer("score"):
                query_rows = scorer.query_rows(embeds, req.visual_index.to(device), instruction.to(device))
            if PRE_LLM in cut_layers:
                with timer("score"):
                    view = _pre_llm_view(adapter, state, instruction, n_visual, vision_attention, policy, generator)
                    events.append(_cut(scorer, policy, pruner, state, view))
    return RequestFront(state=state, n_visual=n_visual, pruning=pruning, cut_layers=cut_layers,
                        query_rows=query_rows, events=events, padded=padded, n_pads=n_pads, pruner=pruner)


def layer_cut(adapter, i: int, state: LoopState, layer_input: torch.Tensor, cos_sin, query_rows, n_visual: int,
              scorer: Scorer, policy: KeepPolicy, pruner: Pruner, generator: torch.Generator):
    """The cut after decoder layer i on one request's state (batch 1, or one row of a
    batch taken out without its pads): its LayerView (q of the query rows, layer i's
    keys from state.cache.layers[i]; layer i+1's for a reads_next_layer scorer; the
    final-normed output for a reads_hidden one), scores, selection, the pruner's cut.

    layer_input [B, L_cur, D]: layer i's input; state.hidden is its output. cos_sin:
    the rotary (cos, sin) of the current sequence. Returns the pruner's PruneEvent.
    Shared by engine.prefill and batching.prefill_batch (one call per cutting row)."""
    view = _layer_view(adapter, i, state, layer_input, cos_sin, query_rows, n_visual, policy, generator,
                       next_layer=scorer.reads_next_layer and i + 1 < adapter.n_layers)
    if scorer.reads_hidden:
        view.hidden = adapter.final_norm(state.hidden)
    return _cut(scorer, policy, pruner, state, view)


@torch.no_grad()
def prefill(adapter, req: EncodedRequest, *, scorer: Scorer | None = None, policy: KeepPolicy | None = None,
            pruner: Pruner | None = None, generator: torch.Generator | None = None) -> PrefillState:
    """Run the LLM over the prompt, cutting visual tokens where the policy says.

    With no scorer/policy/pruner (or a sample without images) this is a plain, full
    prefill. Timings (ms): "vision" = embeddings + vision tower + position ids,
    "prefill" = the decoder-layer loop and every cut (a pre-LLM one included),
    "score" = rows, scores, selection and cuts (a part of "prefill").
    Raises ConfigError for a pruner the family cannot run (FamilyAdapter.check_pruner).
    """
    adapter.check_pruner(pruner)
    n_layers = adapter.n_layers
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    timer = StageTimer(adapter.device)
    front = request_front(adapter, req, scorer=scorer, policy=policy, pruner=pruner, generator=generator,
                          timer=timer, cache=DynamicCache(config=adapter.text_config))
    state, n_visual, padded, n_pads = front.state, front.n_visual, front.padded, front.n_pads
    pruner = front.pruner                      # this request's own copy (request_front)
    events, layer_counts, seq_lens = list(front.events), [], []
    with timer("prefill"):
        cos_sin = adapter.rotary(state.hidden, state.positions)
        # Where each layer's first decode token goes: right after the largest position
        # that layer saw. One entry per stretch of layers between cuts (group_next),
        # layer_group[i] = the entry layer i ran with. All equal unless a pruner
        # renumbered positions (official SparseVLM v1/v1.5: each layer decodes at its
        # own cache length).
        group_next, layer_group = [_next_position(state)], []
        n_alive = int(state.is_visual[0].sum()) if events else n_visual   # recycled ones included
        for i in range(n_layers):
            layer_input = state.hidden
            seq_lens.append(layer_input.shape[1] - n_pads)
            layer_group.append(len(group_next) - 1)
            # layer i's cache is empty before the prefill writes it: its keys are this call's
            state.hidden = adapter.run_layer(i, layer_input, cos_sin, state.cache,
                                             state.key_mask if padded else None)
            state.layer_key_masks.append(state.key_mask)    # what layer i's cache holds
            adapter.after_layer(i, state)
            if i in front.cut_layers and n_alive > 0:
                with timer("score"):
                    events.append(layer_cut(adapter, i, state, layer_input, cos_sin, front.query_rows, n_visual,
                                            scorer, policy, pruner, generator))
                # after any cut: a recycling pruner may change positions without
                # changing the length (one deleted token merged into one new one)
                cos_sin = adapter.rotary(state.hidden, state.positions)
                group_next.append(_next_position(state))
                # counted on the host only after a cut: a sync per layer would stall the GPU
                n_alive = int(state.is_visual[0].sum())
            layer_counts.append(n_alive)
        if front.pruning:
            with timer("score"):
                pruner.finish(state)           # kv_only cuts every layer's cache here
        next_logits = adapter.lm_logits(state.hidden[:, -1:])
    # The last prompt token is text (never pruned) and holds the largest position:
    # decoding continues right after it - the ORIGINAL next position unless a
    # pruner renumbered positions; then each layer has its own (layer_positions).
    next_position = group_next[-1]                                                # [B], the last layer's
    return PrefillState(
        cache=state.cache,
        next_logits=next_logits,
        next_position=next_position,
        n_visual=n_visual,
        layer_counts=layer_counts,
        seq_lens=seq_lens,
        events=[e for e in events if e is not None],
        timings=timer.ms,
        layer_positions=_layer_positions(group_next, layer_group),
        key_masks=list(state.layer_key_masks) if padded else None,
    )


def _next_position(state: LoopState) -> torch.LongTensor:
    """[B] the position right after the largest one of the real tokens in the running
    sequence (left pads, at position 0, never count)."""
    positions = state.positions
    if state.key_mask is not None:
        positions = positions.masked_fill(~state.key_mask.unsqueeze(0), -1)
    return positions.amax(dim=(0, 2)) + 1


def _layer_positions(group_next: list[torch.LongTensor], layer_group: list[int]) -> LayerPositions | None:
    """The per-layer decode positions, or None when every layer agrees (no cut, or
    original positions: the usual case, which then costs nothing more). One host sync
    per pruned prefill, to find the distinct values."""
    if len(group_next) == 1:
        return None
    distinct, inverse = torch.unique(torch.stack(group_next), dim=0, return_inverse=True)   # [G, B], [groups]
    if distinct.shape[0] == 1:
        return None
    return LayerPositions(next=distinct, layer_group=tuple(inverse[layer_group].tolist()))


def _cut(scorer, policy, pruner, state: LoopState, view: LayerView):
    scores = scorer(view)                                                         # [B, N_cur]
    merged = None
    if scorer.selects:   # the method is its selection (DART, DivPrune, a DPP): the policy says how many
        n = min(policy.n_keep(view.layer, n_visual=view.n_visual, scores=scores, view=view), scores.shape[1])
        kept, merged = _scorer_select(scorer, policy.allocation, scores, view, n)
    else:
        kept = policy.select(scores, view)
    # ascending whatever the selector returned: pruners keep coords and planes in sequence order
    order = kept.argsort(dim=1)
    keep_local = kept.gather(1, order)                                            # [B, n]
    N = scores.shape[1]
    # one host sync for both checks: sorted, so the range is the first and last column
    outside = (keep_local[:, :1] < 0) | (keep_local[:, -1:] >= N)
    repeat = keep_local[:, 1:] == keep_local[:, :-1]
    if keep_local.shape[1] and bool(outside.any() | repeat.any()):
        _check_range(scorer, view.layer, keep_local, N)
        # a repeat would keep fewer tokens than every count reports (CDPruner's plain greedy
        # once did this when its kernel's rank ran out): refuse rather than publish it
        raise RuntimeError(f"scorer {type(scorer).__name__} selected a visual token twice at layer {view.layer} "
                           f"({keep_local.shape[1]} slots): a selector must return distinct indices")
    event = pruner.cut(state, keep_local, scores, view)
    if merged is not None:
        merged = take_tokens(merged, order)
        _write_kept_features(state, event, merged)
    return event


def _check_range(scorer, layer: int, kept: torch.LongTensor, N: int) -> None:
    """RuntimeError (one line, naming the scorer and layer) when a selection kept [B, n]
    holds an index outside 0..N-1: a negative one wraps silently in Python indexing (the
    per-image mapping members[kept]), and past the end the pruner's gather fails naming
    nothing (on a GPU: a device-side assert). One host sync, as the repeat check."""
    if kept.numel() and bool(((kept < 0) | (kept >= N)).any()):
        bad = kept[(kept < 0) | (kept >= N)][0]
        raise RuntimeError(f"scorer {type(scorer).__name__} selected visual token index {int(bad)} at layer {layer}, "
                           f"outside the {N} alive tokens it was given: a selector must return indices in 0..{N - 1}")


def _scorer_select(scorer: Scorer, allocation: str, scores: torch.Tensor, view: LayerView, n: int):
    """(kept [B, n] indices into the alive visual tokens, any order; new features [B, n, D]
    for them in the same order, or None) from a selecting scorer (Scorer.selects).

    allocation "per_image" (with several images alive): the n slots are split over the
    images exactly as KeepPolicy.select splits them (contracts.image_shares) and the
    scorer selects within each image on its own view.subset; "global": one selection
    over all images together."""
    N = scores.shape[1]
    if n == N:   # keeping everything needs no selection (a greedy selector would run N steps for nothing)
        return torch.arange(n, device=scores.device).expand(scores.shape[0], n), None
    images = view.visual_coords[0, :, 0] if view.visual_coords is not None else None
    if allocation != "per_image" or images is None or images.unique().numel() <= 1:
        kept = scorer.select(scores, view, n)
        return kept, view.outputs.pop("kept_features", None)
    kept, features = [], []
    for members, k in image_shares(images, n):
        if k == 0:
            continue
        sub = view.subset(members)
        local = scorer.select(scores[:, members], sub, k)                         # [B, k] into this image's tokens
        _check_range(scorer, view.layer, local, members.shape[0])                 # members[-1] would wrap silently
        kept.append(members[local])                                               # back to all-image indices
        features.append(sub.outputs.pop("kept_features", None))
    merged = None if features[0] is None else torch.cat(features, dim=1)
    return torch.cat(kept, dim=1), merged


def _write_kept_features(state: LoopState, event, features: torch.Tensor) -> None:
    """A merging selector (VisionZip's contextual tokens) hands new features for the kept
    tokens, [B, n, D] in ascending kept order: write them where those tokens now sit.
    A recycled token repeats the ORIGINAL index of the token before it, so the first
    match (searchsorted, left) is the real kept token."""
    at = torch.searchsorted(state.orig_index.contiguous(), event.kept_index.to(state.orig_index.device))
    state.hidden = state.hidden.scatter(1, at.unsqueeze(-1).expand(-1, -1, state.hidden.shape[-1]),
                                        features.to(state.hidden.dtype))


def _view(adapter, state: LoopState, layer: int, n_visual: int, policy, generator, **stage_fields) -> LayerView:
    """The LayerView of the current state; stage_fields: q/k/query_index (in the LLM)
    or visual_features/text_embeds/vision_attention (before it)."""
    return LayerView(layer=layer, n_visual=n_visual, visual_index=state.visual_index,
                     visual_coords=state.visual_coords, positions=state.positions, rope=adapter.rope_spec(),
                     generator=generator, wants=tuple(policy.needs), key_mask=state.key_mask, **stage_fields)


def _pre_llm_view(adapter, state: LoopState, text_index: torch.LongTensor, n_visual: int, vision_attention,
                  policy, generator) -> LayerView:
    """text_index [B, T_all]: the instruction tokens whose embeddings the view carries."""
    visual_index = state.visual_index                                             # [B, N]
    text_index = text_index.to(state.hidden.device)
    return _view(adapter, state, PRE_LLM, n_visual, policy, generator,
                 visual_features=take_tokens(state.hidden, visual_index),
                 text_embeds=take_tokens(state.hidden, text_index),
                 vision_attention=vision_attention)


def _layer_view(adapter, i: int, state: LoopState, layer_input, cos_sin, query_rows, n_visual: int, policy,
                generator, next_layer: bool = False) -> LayerView:
    """The view of a cut after layer i. next_layer: q/k are what layer i+1 would compute
    from layer i's output (Scorer.reads_next_layer); otherwise layer i's own."""
    if query_rows is None or query_rows.shape[1] == 0:
        return _view(adapter, state, i, n_visual, policy, generator)
    source = state.hidden if next_layer else layer_input
    at = i + 1 if next_layer else i
    B = layer_input.shape[0]
    # Query rows are kept as original indices; earlier cuts moved them.
    rows = torch.searchsorted(state.orig_index.contiguous(), query_rows)          # [B, T]
    gather = rows.unsqueeze(-1)
    hidden_rows = source.gather(1, gather.expand(-1, -1, source.shape[-1]))
    cos, sin = cos_sin
    cos_rows = cos.expand(B, -1, -1).gather(1, gather.expand(-1, -1, cos.shape[-1]))
    sin_rows = sin.expand(B, -1, -1).gather(1, gather.expand(-1, -1, sin.shape[-1]))
    return _view(adapter, state, i, n_visual, policy, generator, query_index=rows,
                 q=adapter.layer_queries(at, hidden_rows, (cos_rows, sin_rows)),
                 k=adapter.layer_keys(at, source, cos_sin) if next_layer
                 else state.cache.layers[i].keys)                                  # [B, Hkv, L_cur, d]


@torch.no_grad()
def decode_step(adapter, token: torch.LongTensor, position: torch.LongTensor | LayerPositions,
                cache, key_masks: list[torch.BoolTensor] | None = None) -> torch.Tensor:
    """One greedy step: token [B, 1] -> logits [B, V] (float32).

    position: [B], the rotary position of the new token at every layer (the ORIGINAL
    next position, whatever was pruned: PrefillState.next_position), or a
    LayerPositions giving each layer its own (renumbered positions: the official
    SparseVLM v1/v1.5 code puts the token at each layer's cache length).
    Each layer attends to its own cache, whose length differs before and after a
    cut. key_masks (PrefillState.key_masks): per layer [B, L_i] True for the real keys
    of its cache; a True column for the new token is appended to each IN PLACE (the
    list is updated for the next step), and the new token sees only real keys. None:
    no pads, a single new token needs no mask.
    """
    hidden = adapter.embed_tokens(token)
    P = adapter.position_dims
    if isinstance(position, LayerPositions):
        # One rotary call for the G distinct positions (as a G-long "sequence"), then
        # each layer takes its slice: cos/sin once per distinct position, not per layer.
        cos, sin = adapter.rotary(hidden, position.next.t().unsqueeze(0).expand(P, -1, -1))   # [..., B, G, d]
        groups = [(cos[..., g:g + 1, :], sin[..., g:g + 1, :]) for g in range(cos.shape[-2])]
        layer_cos_sin = [groups[g] for g in position.layer_group]
    else:
        cos_sin = adapter.rotary(hidden, position.view(1, -1, 1).expand(P, -1, 1))
        layer_cos_sin = [cos_sin] * adapter.n_layers
    for i in range(adapter.n_layers):
        mask = None
        if key_masks is not None:
            mask = torch.cat([key_masks[i], key_masks[i].new_ones(key_masks[i].shape[0], 1)], dim=1)
            key_masks[i] = mask
        hidden = adapter.run_layer(i, hidden, layer_cos_sin[i], cache, mask)
    return adapter.lm_logits(hidden)
