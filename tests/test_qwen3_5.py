"""Oracles for Qwen3.5 (hybrid Gated DeltaNet + full attention) on a tiny random model.

The tiny model alternates linear and full attention (layers 0, 2 linear; 1, 3 full),
so a cut at full layer 1 is followed by a linear AND a full layer.

- keep=1.0 == HF `generate` token for token (sdpa, eager; one and two images);
- a pruned run == a no-cache reference built from HF's decoder layers that recomputes
  the whole sequence at every step and physically drops the pruned tokens before the
  layers after the cut, so the linear-attention layers there run over the kept tokens
  only (cuts at -1, 0 and 2 with scorers that read no attention - allowed before a
  linear layer too - and at full layer 1 with v1.5);
- v1.5 scores at a full-attention layer (gated q_proj, q_norm, partial rotary) == HF
  eager attention maps;
- an attention-reading scorer at a linear-attention layer, and kv_only, are refused in
  one line.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sparsevlm_exp.contracts import PRE_LLM
from sparsevlm_exp.errors import ConfigError
from sparsevlm_exp.models import adapter_for
from sparsevlm_exp.models.qwen3_5 import Qwen3_5Adapter
from sparsevlm_exp.policies import FixedPolicy
from sparsevlm_exp.pruners import KVOnlyPruner
from sparsevlm_exp.scorers import RandomScorer, UniformScorer, V15Scorer, VisionAttentionScorer
from oracles import MAX_NEW, check_v15_scores_equal_hf_eager_attention, hf_generate, hf_inputs, run
from tiny_models import sample, save_tiny_qwen, tiny_adapter_loader

W, H = 160, 128          # a 4 x 5 token grid per image


@pytest.fixture(scope="module")
def q35_dir(tmp_path_factory):
    return save_tiny_qwen("qwen3_5", tmp_path_factory.mktemp("tiny_qwen3_5") / "qwen3_5")


@pytest.fixture(scope="module")
def load35(q35_dir):
    get = tiny_adapter_loader({"qwen3_5": q35_dir}, Qwen3_5Adapter)

    def load(attn: str = "sdpa") -> Qwen3_5Adapter:
        return get("qwen3_5", attn)

    return load


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("n_images", [1, 2])
def test_keep_all_equals_hf_generate(load35, attn, n_images):
    adapter = load35(attn)
    assert adapter.attention_layers == [1, 3]
    req = adapter.encode(sample(n_images=n_images, w=W, h=H))
    state, ours = run(adapter, req, V15Scorer(), layer=1, keep=1.0)
    assert state.events[0].kept_index.shape[1] == req.visual_index.shape[1] == 20 * n_images
    assert torch.equal(ours, hf_generate(adapter, req))
    assert isinstance(adapter_for(adapter.model, adapter.processor), Qwen3_5Adapter)


@torch.no_grad()
def reference_generate(adapter, req, kept_index, layer_k, n_new=MAX_NEW, first_logits: list | None = None):
    """Greedy tokens recomputed from scratch at every step with HF's decoder layers and no
    cache: layers 0..K run over the whole sequence, then the pruned visual tokens are
    dropped and layers K+1.. (every layer for K = -1) run over the rest, so their
    Gated DeltaNet conv and recurrent states never see a pruned token. Kept tokens keep
    their original M-RoPE positions; new tokens continue from the original next one."""
    lm = adapter.language_model
    embeds, positions, _ = hf_inputs(adapter, req)                   # no DeepStack in Qwen3.5
    L = embeds.shape[1]
    pruned = torch.zeros(L, dtype=torch.bool)
    pruned[req.visual_index[0]] = True
    pruned[kept_index[0]] = False
    next_pos = int(positions.max()) + 1
    eos, generated = set(adapter.eos_token_ids), []
    for _ in range(n_new):
        hidden = torch.cat([embeds, lm.embed_tokens(torch.tensor([generated], dtype=torch.long))], dim=1)
        extra = torch.arange(next_pos, next_pos + len(generated)).view(1, 1, -1).expand(3, 1, -1)
        pos = torch.cat([positions, extra], dim=2)
        keep = torch.cat([~pruned, torch.ones(len(generated), dtype=torch.bool)])
        for i, layer in enumerate(lm.layers):
            if i == layer_k + 1:
                hidden, pos = hidden[:, keep], pos[:, :, keep]
            cos_sin = lm.rotary_emb(hidden, pos)
            hidden = layer(hidden, attention_mask=None, position_embeddings=cos_sin, position_ids=None,
                           use_cache=False)                   # sdpa: causal without a mask
        logits = adapter.model.lm_head(lm.norm(hidden[:, -1:]))[:, -1].float()
        if first_logits is not None and not generated:
            first_logits.append(logits)
        token = int(logits[0].argmax())
        generated.append(token)
        if token in eos:
            break
    return torch.tensor([generated])


@pytest.mark.parametrize("layer, scorer", [(PRE_LLM, RandomScorer), (PRE_LLM, VisionAttentionScorer),
                                           (0, UniformScorer), (1, V15Scorer), (2, RandomScorer)])
def test_pruned_run_equals_no_cache_reference(load35, layer, scorer):
    adapter = load35()
    req = adapter.encode(sample(n_images=2, w=W, h=H))
    state, ours = run(adapter, req, scorer(), layer=layer, keep=0.3)
    kept = state.events[0].kept_index
    n_full = max(layer, 0)
    assert state.layer_counts == [40] * n_full + [12] * (adapter.n_layers - n_full)
    # the full-attention layer after the cut holds a KV cache without the 28 pruned tokens
    # (plus the generated tokens but the last, which decoding fed back)
    assert state.cache.layers[3].keys.shape[2] == req.input_ids.shape[1] - 28 + ours.shape[1] - 1
    first = []
    assert torch.equal(ours, reference_generate(adapter, req, kept, layer, first_logits=first))
    torch.testing.assert_close(state.next_logits, first[0], rtol=1e-4, atol=1e-4)


def test_pruned_reference_sees_which_tokens_are_kept(load35):
    adapter = load35()
    req = adapter.encode(sample(n_images=2, w=W, h=H))
    (s0, _), (s1, _) = [run(adapter, req, RandomScorer(), layer=0, keep=0.3, seed=s) for s in (0, 1)]
    a, b = [], []
    reference_generate(adapter, req, s0.events[0].kept_index, 0, n_new=1, first_logits=a)
    reference_generate(adapter, req, s1.events[0].kept_index, 0, n_new=1, first_logits=b)
    assert (a[0] - b[0]).abs().max() > 1e-3            # another kept set, other logits
    torch.testing.assert_close(s1.next_logits, b[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layer", [1, 3])
def test_v15_scores_equal_hf_eager_attention_at_full_layers(load35, layer):
    """Queries recomputed with the gated q_proj, q_norm and partial rotary == HF's eager
    attention map (HF returns maps for the full-attention layers only, in order)."""
    adapter = load35("eager")
    check_v15_scores_equal_hf_eager_attention(adapter, adapter.encode(sample(n_images=2, w=W, h=H)), layer=layer)


def test_attention_scorer_at_a_linear_layer_is_refused_naming_the_nearest(load35):
    adapter = load35()
    req = adapter.encode(sample(n_images=1, w=W, h=H))
    with pytest.raises(ConfigError, match=r"layer=2 is a linear-attention layer.*nearest full-attention layers: 1, 3"):
        run(adapter, req, V15Scorer(), layer=2, keep=0.5)
    with pytest.raises(ConfigError, match="pruner=kv_only is not allowed with Qwen3.5"):
        run(adapter, req, V15Scorer(), layer=1, keep=0.5, pruner=KVOnlyPruner())


def test_check_parts_refuses_an_attention_scorer_at_a_linear_layer_before_weights_load():
    """engine.check_parts with the config's attention layers (read without weights):
    the same one-line refusal before any model loads; scorers that read no attention
    may cut anywhere."""
    from omegaconf import OmegaConf

    from sparsevlm_exp.engine import check_parts
    from sparsevlm_exp.models.loading import attention_layers, model_config, num_layers

    arch = OmegaConf.load(Path(__file__).resolve().parent.parent / "conf" / "model" / "qwen3_5_9b.yaml").architecture
    config = model_config("unused", random_init=True, architecture=arch)
    layers = attention_layers(config)
    assert layers == list(range(3, 32, 4))
    with pytest.raises(ConfigError, match="layer=5 is not allowed with scorer V15Scorer.*layers: 3, 7"):
        check_parts(V15Scorer(), FixedPolicy(layer=5, keep=0.5), num_layers(config), layers)
    check_parts(V15Scorer(), FixedPolicy(layer=7, keep=0.5), num_layers(config), layers)
    check_parts(RandomScorer(), FixedPolicy(layer=5, keep=0.5), num_layers(config), layers)
    # a model whose layers all attend has no restriction
    qwen3 = OmegaConf.load(Path(__file__).resolve().parent.parent / "conf" / "model" / "qwen3_vl_8b.yaml").architecture
    assert attention_layers(model_config("unused", random_init=True, architecture=qwen3)) is None


def test_the_cli_refuses_an_attention_scorer_at_a_linear_layer_before_weights_load(q35_dir, tmp_path):
    """The runner passes the checkpoint's attention layers to check_parts: one line,
    before any weights load, not a failure in every sample."""
    from hydra import compose, initialize_config_dir

    from sparsevlm_exp.paths import CONF_DIR
    from sparsevlm_exp.runner import Experiment

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name="config", overrides=[
            "model=qwen3_5_9b", f"model.pretrained={q35_dir}", "scorer=v15", "layer=2", "logger=none"])
    with pytest.raises(ConfigError, match="layer=2"):
        Experiment(cfg, tmp_path / "run")


@pytest.mark.parametrize("batch_size", [1, 4])
def test_kv_only_is_refused_before_weights_load(q35_dir, tmp_path, batch_size):
    """kv_only rewrites every layer's KV after the prefill; Gated DeltaNet layers hold a
    recurrent state with no tokens to drop. Refused in one line by check_parts (config
    only), at batch 1 and in batches, not sample by sample once the model is loaded;
    the same pruner on a model whose layers all attend is fine."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from sparsevlm_exp.engine import check_parts
    from sparsevlm_exp.paths import CONF_DIR
    from sparsevlm_exp.pruners import KVOnlyPruner
    from sparsevlm_exp.runner import Experiment

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name="config", overrides=[
            "model=qwen3_5_9b", f"model.pretrained={q35_dir}", "scorer=random", "pruner=kv_only",
            f"batch_size={batch_size}", "logger=none"])
    with pytest.raises(ConfigError, match="pruner=kv_only is not allowed on this model.*recurrent state"):
        Experiment(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "samples.jsonl").exists()
    check_parts(V15Scorer(), FixedPolicy(layer=3, keep=0.5), 8, None, KVOnlyPruner())
