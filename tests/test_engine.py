"""The engine and its contracts: the pre-LLM stage (layer=-1), the adapter hooks, the
import layering, and extra per-token planes cut alongside the hidden states.

Oracles:
- keep=1.0 at the pre-LLM stage == HF generate(do_sample=False);
- a pruned pre-LLM run == a no-cache reference that runs HF's own language-model
  forward on the kept sequence (kept embeddings at their original positions) at every step;
- the recomputed vision attention == HF's eager attention weights (LLaVA's CLIP) or
  == eager attention recomputed with HF's own attention function, mapped to the LLM
  token order by matching the merger's rows (Qwen);
- a stage mismatch (v15 at layer=-1) is refused in one line before any weights load.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from sparsevlm_exp import engine
from sparsevlm_exp.contracts import PRE_LLM, per_image_top_k
from sparsevlm_exp.decoding import GreedyDecoder
from sparsevlm_exp.errors import ConfigError
from sparsevlm_exp.models.llava import LlavaAdapter
from sparsevlm_exp.models.qwen2_vl import Qwen2VLAdapter
from sparsevlm_exp.policies import FixedPolicy, SchedulePolicy
from sparsevlm_exp.pruners import DropPruner, KVOnlyPruner, RecyclePruner
from sparsevlm_exp.scorers import RandomScorer, V15Scorer, VisionAttentionScorer
from test_llava import save_tiny_llava
from tiny_models import check_qwen_vision_attention_against_eager, sample

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sparsevlm_exp"
CONF = ROOT / "conf"
MAX_NEW = 8
FAMILIES = ["qwen2_vl", "qwen2_5_vl", "llava"]


@pytest.fixture(scope="module")
def load_any(load_tiny, tmp_path_factory):
    llava = {}

    def load(family: str, attn: str = "sdpa"):
        if family != "llava":
            return load_tiny(family, attn)
        if attn not in llava:
            path = save_tiny_llava(tmp_path_factory.mktemp("llava_engine") / "llava")
            llava[attn] = LlavaAdapter.load(pretrained=path, dtype="float32", device="cpu", attn_implementation=attn)
        return llava[attn]

    return load


def run(adapter, req, scorer, policy, pruner, seed=0):
    """(state, tokens); state.cache_lens: each layer's KV length right after the prefill."""
    state = engine.prefill(adapter, req, scorer=scorer, policy=policy, pruner=pruner,
                           generator=torch.Generator().manual_seed(seed))
    state.cache_lens = [layer.keys.shape[2] for layer in state.cache.layers]
    return state, GreedyDecoder(MAX_NEW).generate(adapter, state)


# ----------------------------------------------------------------------------------------
# Layering: who may import whom
# ----------------------------------------------------------------------------------------
def imported_modules(path: Path) -> set[str]:
    """Absolute names of the sparsevlm_exp modules a file imports (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names |= {f"{module}.{a.name}" for a in node.names}
    return {n for n in names if n.startswith("sparsevlm_exp")}


def files(*parts: str) -> list[Path]:
    out = []
    for part in parts:
        p = PACKAGE / part
        out += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    return out


def test_import_layers():
    # contracts is the bottom layer
    assert imported_modules(PACKAGE / "contracts.py") == set()
    # the method side never reaches into model families, the engine or the runner
    for path in files("scorers", "policies.py", "pruners.py", "decoding.py", "kernels"):
        bad = {m for m in imported_modules(path)
               if m.startswith(("sparsevlm_exp.models", "sparsevlm_exp.engine", "sparsevlm_exp.runner"))}
        assert not bad, f"{path.name} imports {bad}"
    # metrics never import data (data/benchmarks may name metric classes, not the reverse)
    for path in files("metrics"):
        assert not {m for m in imported_modules(path) if m.startswith("sparsevlm_exp.data")}, path.name
    # no lower layer imports the runner or the CLI
    for path in files("contracts.py", "engine.py", "models", "scorers", "policies.py", "pruners.py", "decoding.py",
                      "kernels", "metrics", "data"):
        assert not {m for m in imported_modules(path)
                    if m.startswith(("sparsevlm_exp.runner", "sparsevlm_exp.__main__", "sparsevlm_exp.api"))}


# ----------------------------------------------------------------------------------------
# The pre-LLM stage
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def hf_forward_on_kept(adapter, req, kept_index, n_new=MAX_NEW):
    """Greedy tokens from HF's language-model forward, recomputed from scratch at every
    step on the kept sequence only: text + kept visual embeddings at their ORIGINAL
    rotary positions, each new token at the original next position + step."""
    embeds, positions = adapter.embed(req), adapter.positions(req)
    L = embeds.shape[1]
    keep = torch.ones(L, dtype=torch.bool)
    keep[req.visual_index[0]] = False
    keep[kept_index[0]] = True
    hidden, pos = embeds[:, keep], positions[:, :, keep]
    next_pos = int(positions.max()) + 1
    eos, tokens = set(adapter.eos_token_ids), []
    for step in range(n_new):
        if adapter.position_dims == 3:
            out = adapter.language_model(inputs_embeds=hidden, position_ids=pos, use_cache=False)
        else:
            # a 2-D mask keeps HF from reading the position gaps as packed sequences
            out = adapter.language_model(inputs_embeds=hidden, position_ids=pos[0], use_cache=False,
                                         attention_mask=torch.ones(1, hidden.shape[1], dtype=torch.long))
        token = int(adapter.model.lm_head(out.last_hidden_state[:, -1]).argmax())
        tokens.append(token)
        if token in eos:
            break
        hidden = torch.cat([hidden, adapter.embed_tokens(torch.tensor([[token]]))], dim=1)
        new_pos = torch.full((pos.shape[0], 1, 1), next_pos + step, dtype=pos.dtype)
        pos = torch.cat([pos, new_pos], dim=2)
    return torch.tensor([tokens])


@pytest.mark.parametrize("family", FAMILIES)
def test_pre_llm_keep_all_equals_hf_generate(load_any, family):
    adapter = load_any(family)
    req = adapter.encode(sample(n_images=1 if family == "llava" else 2))
    state, ours = run(adapter, req, VisionAttentionScorer(), FixedPolicy(layer=PRE_LLM, keep=1.0), DropPruner())
    assert [e.layer for e in state.events] == [PRE_LLM]
    assert state.events[0].kept_index.shape[1] == req.visual_index.shape[1]
    hf = adapter.model.generate(**req.model_inputs, do_sample=False, max_new_tokens=MAX_NEW)
    assert torch.equal(ours, hf[:, req.input_ids.shape[1]:])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scorer", ["vision_attn", "random"])
def test_pre_llm_pruned_run_equals_hf_forward_on_the_kept_sequence(load_any, family, scorer):
    adapter = load_any(family)
    req = adapter.encode(sample(n_images=1 if family == "llava" else 2))
    n_visual, L = req.visual_index.shape[1], req.input_ids.shape[1]
    score = VisionAttentionScorer() if scorer == "vision_attn" else RandomScorer()
    state, ours = run(adapter, req, score, FixedPolicy(layer=PRE_LLM, keep=0.4), DropPruner(), seed=3)
    kept = state.events[0].kept_index
    n_kept = round(0.4 * n_visual)
    assert kept.shape[1] == n_kept < n_visual
    # every LLM layer saw only the kept tokens: counts from layer 0, shorter sequences, less FLOPs
    assert state.layer_counts == [n_kept] * adapter.n_layers
    assert state.seq_lens == [L - (n_visual - n_kept)] * adapter.n_layers
    assert state.cache_lens == [L - (n_visual - n_kept)] * adapter.n_layers
    assert torch.equal(ours, hf_forward_on_kept(adapter, req, kept))
    if scorer == "vision_attn":
        # the kept tokens are each image's top-k of the vision attention (per-image allocation)
        _, attention = adapter.embed_and_vision_attention(req)
        top = per_image_top_k(attention[:1], req.visual_coords[0, :, 0], n_kept)[0]
        assert torch.equal(kept[0], req.visual_index[0][top])


@pytest.mark.parametrize("pruner", ["kv_only", "recycle"])
def test_pre_llm_stage_with_the_other_pruners(load_any, pruner):
    adapter = load_any("qwen2_5_vl")
    req = adapter.encode(sample(n_images=2))
    n_visual = req.visual_index.shape[1]
    cut = KVOnlyPruner() if pruner == "kv_only" else RecyclePruner()
    state, _ = run(adapter, req, VisionAttentionScorer(), FixedPolicy(layer=PRE_LLM, keep=0.25), cut)
    n_kept = round(0.25 * n_visual)
    if pruner == "kv_only":   # the prefill sees every token, only the decode cache is cut
        assert state.seq_lens == [req.input_ids.shape[1]] * adapter.n_layers
        assert state.cache_lens == [req.input_ids.shape[1] - (n_visual - n_kept)] * adapter.n_layers
    else:                     # kept + recycled tokens from layer 0 on
        assert state.layer_counts == [n_kept + state.events[0].n_recycled] * adapter.n_layers


def test_pre_llm_then_in_llm_cuts(load_any):
    adapter = load_any("qwen2_vl")
    req = adapter.encode(sample(n_images=2))
    n_visual = req.visual_index.shape[1]
    policy = SchedulePolicy(layers=[PRE_LLM, 1], keep=[0.5, 0.25])
    state, _ = run(adapter, req, RandomScorer(), policy, DropPruner())
    assert [e.layer for e in state.events] == [PRE_LLM, 1]
    half, quarter = round(0.5 * n_visual), round(0.25 * n_visual)
    assert state.layer_counts == [half, quarter] + [quarter] * (adapter.n_layers - 2)
    assert set(state.events[1].kept_index[0].tolist()) <= set(state.events[0].kept_index[0].tolist())


@torch.no_grad()
def test_llava_vision_attention_equals_clip_eager_cls_attention(load_any):
    adapter = load_any("llava", "eager")
    req = adapter.encode(sample(n_images=1))
    _, ours = adapter.embed_and_vision_attention(req)
    tower = adapter.model.model.vision_tower
    out = tower(req.model_inputs["pixel_values"], output_attentions=True)
    # LLaVA-1.5 reads features from hidden_states[-2] = the output of layers[-2]
    cls_row = out.attentions[-2][0, :, 0, 1:].mean(dim=0)                           # [P]
    torch.testing.assert_close(ours[0], cls_row, rtol=1e-5, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_vision_attention_equals_eager_attention_in_llm_token_order(load_any, family):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
    from transformers.models.qwen2_vl.modeling_qwen2_vl import eager_attention_forward

    adapter = load_any(family, "eager")
    req = adapter.encode(sample(n_images=2))
    check_qwen_vision_attention_against_eager(adapter, req, apply_rotary_pos_emb_vision, eager_attention_forward)


# ----------------------------------------------------------------------------------------
# Refused before weights load
# ----------------------------------------------------------------------------------------
def compose_cfg(overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose(config_name="config", overrides=["logger=none", *overrides])


@pytest.mark.parametrize("overrides, message", [
    (["scorer=v15", "layer=-1"], r"layer=-1 \(the pre-LLM stage\) is not allowed with scorer V15Scorer, which "
                                 r"scores at layers 0\.\.5 \(inside the LLM\) only"),
    (["scorer=fastv", "layer=-1"], r"layer=-1 \(the pre-LLM stage\) is not allowed with scorer FastVScorer"),
    (["scorer=vision_attn", "layer=2"], r"layer=2 \(inside the LLM\) is not allowed with scorer "
                                        r"VisionAttentionScorer, which scores at layer=-1 \(before the LLM\) only"),
    (["scorer=random", "policy=adaptive", "policy.layers=[1]"], r"scorer='RandomScorer' is not allowed"),
    (["layer=-2"], r"layer=-2"),
])
def test_mismatched_parts_are_refused_before_weights_load(tmp_path, monkeypatch, overrides, message):
    from sparsevlm_exp import runner

    monkeypatch.setattr(runner, "build", _build_without_model(runner.build))
    cfg = compose_cfg(overrides)
    with pytest.raises(ConfigError, match=message) as err:
        runner.Experiment(cfg, tmp_path)
    assert "\n" not in str(err.value)


def _build_without_model(build):
    def guarded(node, group):
        if group == "model":
            raise AssertionError("weights were loaded")
        return build(node, group)
    return guarded


def test_a_policy_need_the_scorer_does_not_provide_is_refused():
    class NeedsRows(FixedPolicy):
        needs = ("rater_attention",)

    engine.check_parts(V15Scorer(), NeedsRows(layer=1, keep=0.5), 4)
    with pytest.raises(ConfigError, match=r"policy=NeedsRows needs rater_attention from the scorer, which "
                                          r"scorer=RandomScorer does not provide \(provides: nothing\)"):
        engine.check_parts(RandomScorer(), NeedsRows(layer=1, keep=0.5), 4)


def test_pre_llm_scorers_are_accepted_at_layer_minus_one(tmp_path):
    from sparsevlm_exp import runner

    for scorer in ("vision_attn", "random", "uniform"):
        runner.Experiment(compose_cfg([f"scorer={scorer}", "layer=-1"]), tmp_path)


# ----------------------------------------------------------------------------------------
# Extra per-token planes (DeepStack-style): cut with the same indices as the tokens
# ----------------------------------------------------------------------------------------
class PlaneAdapter(Qwen2VLAdapter):
    """A toy DeepStack: a plane [B, L, 1] holding each token's ORIGINAL index + 1 is
    "injected" after layers 0 and 1 (here: checked and recorded, not added, so the
    answer is unchanged); pruners must cut it alongside the hidden states."""

    def __init__(self, inner):
        super().__init__(inner.model, inner.processor)
        self.seen = []

    def token_planes(self, req):
        L = req.input_ids.shape[1]
        return {"toy": (torch.arange(L, dtype=torch.float32) + 1).view(1, L, 1)}

    def after_layer(self, i, state):
        plane = state.planes["toy"]
        assert plane.shape[:2] == state.hidden.shape[:2]
        self.seen.append((i, plane[0, :, 0].clone(), state.orig_index[0].clone(),
                          None if state.is_recycled is None else state.is_recycled[0].clone()))


@pytest.mark.parametrize("layer", [PRE_LLM, 0])
@pytest.mark.parametrize("pruner", ["drop", "recycle"])
def test_extra_planes_are_cut_alongside_the_tokens(load_any, layer, pruner):
    adapter = PlaneAdapter(load_any("qwen2_5_vl"))
    req = adapter.encode(sample(n_images=2))
    cut = DropPruner() if pruner == "drop" else RecyclePruner()
    state = engine.prefill(adapter, req, scorer=RandomScorer(), policy=FixedPolicy(layer=layer, keep=0.25),
                           pruner=cut, generator=torch.Generator().manual_seed(1))
    assert [i for i, *_ in adapter.seen] == list(range(adapter.n_layers))
    shortened = False
    for i, plane, orig_index, recycled in adapter.seen:
        real = torch.ones_like(orig_index, dtype=torch.bool) if recycled is None else ~recycled
        assert torch.equal(plane[real], orig_index[real].float() + 1)
        if recycled is not None:      # merged tokens carry no injected feature
            assert torch.equal(plane[~real], torch.zeros(int((~real).sum())))
        shortened |= plane.shape[0] < req.input_ids.shape[1]
    assert shortened and state.events[0].layer == layer


def test_a_selector_may_return_indices_in_any_order(load_any):
    class Reversed(FixedPolicy):
        def select(self, scores, view):
            return super().select(scores, view).flip(dims=[1])

    adapter = load_any("qwen2_vl")
    req = adapter.encode(sample(n_images=2))
    seen = []

    class SpyDrop(DropPruner):
        def cut(self, state, keep_local, scores, view):
            event = super().cut(state, keep_local, scores, view)
            seen.append(state.visual_coords.clone())
            return event

    states = [run(adapter, req, V15Scorer(), policy, SpyDrop())
              for policy in (FixedPolicy(layer=1, keep=0.3), Reversed(layer=1, keep=0.3))]
    (plain, plain_tokens), (flipped, flipped_tokens) = states
    assert torch.equal(plain.events[0].kept_index, flipped.events[0].kept_index)
    assert torch.equal(seen[0], seen[1]) and torch.equal(plain_tokens, flipped_tokens)


def test_a_selector_that_repeats_a_token_is_refused(load_any):
    # A repeated index would keep fewer tokens than every count says (CDPruner's plain
    # greedy once repeated items when its kernel's rank ran out, and the embedded table
    # published 93 tokens as 128): the engine refuses it, naming the scorer and layer.
    class Repeats(FixedPolicy):
        def select(self, scores, view):
            kept = super().select(scores, view)
            kept[:, -1] = kept[:, 0]
            return kept

    adapter = load_any("qwen2_vl")
    req = adapter.encode(sample(n_images=2))
    with pytest.raises(RuntimeError, match="selected a visual token twice at layer 1"):
        run(adapter, req, V15Scorer(), Repeats(layer=1, keep=0.3), DropPruner())


def test_a_selector_index_outside_the_alive_tokens_is_refused(load_any):
    # Under per-image allocation the engine maps a scorer's local picks to all-image ones
    # with members[picks]: a -1 wrapped silently to the image's LAST token (another token
    # kept than the selector meant, and a repeat only by chance), and an index past the end
    # was an IndexError naming nothing. Both are refused like a repeat: one line naming the
    # scorer and layer. Global allocation: -1 / N reached the pruner's gather.
    from sparsevlm_exp.scorers import DivPruneScorer

    class OffByOne(DivPruneScorer):
        def __init__(self, bad):
            self.bad = bad

        def select(self, scores, view, n):
            kept = super().select(scores, view, n)
            kept[:, -1] = self.bad if self.bad < 0 else scores.shape[1] + self.bad
            return kept

    adapter = load_any("qwen2_vl")
    req = adapter.encode(sample(n_images=2))
    for allocation in ("per_image", "global"):
        for bad in (-1, 0):
            with pytest.raises(RuntimeError, match="OffByOne selected visual token index .* outside"):
                run(adapter, req, OffByOne(bad), FixedPolicy(layer=PRE_LLM, keep=0.5, allocation=allocation),
                    DropPruner())
