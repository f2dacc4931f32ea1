"""Oracles for the LLaVA-1.5 adapter on a tiny random LLaVA (CLIP vision + Llama).

The model is built from config, saved with save_pretrained and loaded back through
LlavaAdapter.load (the real loading path). A 56x56 image with patch 14 gives a 4x4
grid: 17 CLIP tokens, CLS dropped ("default" strategy) -> 16 visual tokens.

- keep=1.0 gives exactly HF `generate(do_sample=False)` (sdpa and eager);
- a pruned run gives the tokens of test_pipeline's no-cache reference;
- v1.5 scores equal those read from HF's eager attention map;
- kept tokens keep their original 1-D positions (gaps preserved).
"""
from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from sparsevlm_exp.models import adapter_for
from sparsevlm_exp.models.llava import LlavaAdapter, llava_prompt
from sparsevlm_exp.policies import FixedPolicy
from sparsevlm_exp.pruners import DropPruner
from sparsevlm_exp.scorers import FastVScorer, RandomScorer, V2Scorer, V15Scorer
from oracles import MAX_NEW, check_v15_scores_equal_hf_eager_attention, hf_generate
from test_pipeline import reference_generate, run_ours
from tiny_models import WORDS, sample, tiny_adapter_loader

SYSTEM = "a chat between a user and an assistant"
IMAGE_SIDE, PATCH = 56, 14
N_VISUAL = (IMAGE_SIDE // PATCH) ** 2                # 16 per image
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

# The llava-hf conversation layout, written for our word tokenizer: a system message
# is its text and a space, a user turn "USER: " + one "<image>\n" per image + the
# text and a space, and the generation prompt "ASSISTANT:".
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message.role != 'system' -%}{{ message.role.upper() + ': ' }}{%- endif -%}"
    "{%- for part in message.content if part.type == 'image' -%}{{ '<image>\n' }}{%- endfor -%}"
    "{%- for part in message.content if part.type == 'text' -%}{{ part.text + ' ' }}{%- endfor -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


def build_tiny_llava_processor(words=WORDS, chat_template: str | None = CHAT_TEMPLATE) -> LlavaProcessor:
    """LlavaProcessor: word-level tokenizer (BOS prepended like Llama's) + PIL CLIP
    image processor resizing/cropping to 56x56."""
    vocab: dict[str, int] = {}
    pre = pre_tokenizers.Whitespace()
    for token in SPECIAL_TOKENS + ["user", "assistant", ":"] + \
            [w for text in list(words) + [SYSTEM] for w, _ in pre.pre_tokenize_str(text.lower())]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>")
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIDE},
                                            crop_size={"height": IMAGE_SIDE, "width": IMAGE_SIDE})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=chat_template)


def tiny_llava_config(processor, n_layers: int = 4) -> LlavaConfig:
    t = processor.tokenizer
    ids = {name: t.convert_tokens_to_ids(tok) for name, tok in
           [("bos_token_id", "<s>"), ("eos_token_id", "</s>"), ("pad_token_id", "<pad>")]}
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=IMAGE_SIDE, patch_size=PATCH, projection_dim=32)
    text = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=len(t), max_position_embeddings=512,
                # large init so that random models give varied, non-degenerate tokens
                initializer_range=0.3, **ids)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=t.convert_tokens_to_ids("<image>"),
                       image_seq_length=N_VISUAL, vision_feature_layer=-2, vision_feature_select_strategy="default",
                       **ids)


def save_tiny_llava(path, n_layers: int = 4, seed: int = 0) -> str:
    processor = build_tiny_llava_processor()
    config = tiny_llava_config(processor, n_layers)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("tiny_llava") / "llava")


@pytest.fixture(scope="module")
def load_llava(llava_dir):
    get = tiny_adapter_loader({"llava": llava_dir}, LlavaAdapter, system_prompt=SYSTEM)

    def load(attn: str = "sdpa") -> LlavaAdapter:
        return get("llava", attn)

    return load


class _OneDRopeAsThreeRows:
    """Lets test_pipeline's no-cache reference (written for M-RoPE's [3, B, L]
    positions) drive a 1-D RoPE model: positions are handed out as three equal rows
    and the rotary embedding reads the first. Everything else is the real adapter."""

    def __init__(self, adapter):
        self._adapter = adapter
        self.language_model = _RotaryFromFirstRow(adapter.language_model)

    def positions(self, req):
        return self._adapter.positions(req).expand(3, -1, -1)             # [1, B, L] -> [3, B, L]

    def __getattr__(self, name):
        return getattr(self._adapter, name)


class _RotaryFromFirstRow:
    def __init__(self, lm):
        self._lm = lm

    def rotary_emb(self, hidden, positions):
        return self._lm.rotary_emb(hidden, positions[0])

    def __getattr__(self, name):
        return getattr(self._lm, name)


# ----------------------------------------------------------------------------------------
def test_prompt_layout_and_visual_grid(load_llava):
    adapter = load_llava()
    req = adapter.encode(sample(n_images=1))
    tok = adapter.processor.tokenizer
    text = tok.decode(req.input_ids[0])
    assert text.startswith("<s> a chat between a user and an assistant user : <image>")
    assert text.endswith("what colour is the circle assistant :")
    # one contiguous block of 16 visual tokens, after the prefix, on a 4x4 grid
    first = int(req.visual_index[0, 0])
    assert first > 0 and torch.equal(req.visual_index[0], torch.arange(first, first + N_VISUAL))
    assert req.image_grids == [(4, 4)]
    assert req.visual_coords[0, 5].tolist() == [0, 1, 1, 0] and req.visual_coords[0, -1].tolist() == [0, 3, 3, 0]
    # rater candidates: the question (user_turn); the official rule takes every token
    # after the image (question + "ASSISTANT:")
    assert torch.equal(req.text_index[0], torch.arange(first + N_VISUAL, req.input_ids.shape[1] - 2))
    assert torch.equal(req.after_image_index[0], torch.arange(first + N_VISUAL, req.input_ids.shape[1]))
    # the string fallback for processors without a chat template gives the same ids
    plain = build_tiny_llava_processor(chat_template=None)
    smp = sample(n_images=1)
    ids = plain(text=llava_prompt(1, smp.question, SYSTEM), images=smp.images, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, req.input_ids)


def test_registered_for_model_type_llava(load_llava):
    adapter = load_llava()
    assert adapter.model.config.model_type == "llava"
    assert isinstance(adapter_for(adapter.model, adapter.processor), LlavaAdapter)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("n_images", [1, 2])
def test_keep_all_equals_hf_generate(load_llava, attn, n_images):
    adapter = load_llava(attn)
    smp = sample(n_images=n_images)
    req, state, ours = run_ours(adapter, smp, scorer=V15Scorer(), keep=1.0, pruner=DropPruner())
    assert req.visual_index.shape[1] == N_VISUAL * n_images
    assert state.events[0].kept_index.shape[1] == req.visual_index.shape[1]
    assert ours.shape[1] > 1
    assert torch.equal(ours, hf_generate(adapter, req))
    _, _, plain = run_ours(adapter, smp)
    assert torch.equal(plain, ours)


SCORERS = {"v15": V15Scorer, "v2": V2Scorer, "fastv": FastVScorer, "random": RandomScorer}


@pytest.mark.parametrize("scorer_name", list(SCORERS))
def test_pruned_run_equals_no_cache_reference(load_llava, scorer_name):
    adapter = load_llava("sdpa")
    layer = 1
    req, state, ours = run_ours(adapter, sample(n_images=1), scorer=SCORERS[scorer_name](), keep=0.4,
                                layer=layer, pruner=DropPruner())
    kept = state.events[0].kept_index
    n_kept = round(0.4 * N_VISUAL)
    assert kept.shape[1] == n_kept
    assert state.layer_counts == [N_VISUAL] * layer + [n_kept] * (adapter.n_layers - layer)
    assert state.seq_lens[layer + 1] == req.input_ids.shape[1] - (N_VISUAL - n_kept)
    ref = reference_generate(_OneDRopeAsThreeRows(adapter), req, kept, layer, "drop")
    assert torch.equal(ours, ref)
    assert state.cache.layers[layer + 1].keys.shape[2] == state.cache.layers[0].keys.shape[2] - (N_VISUAL - n_kept)


def test_v15_scores_equal_hf_eager_attention(load_llava):
    adapter = load_llava("eager")
    check_v15_scores_equal_hf_eager_attention(adapter, adapter.encode(sample(n_images=1)), layer=2)


def test_kept_tokens_keep_original_positions(load_llava):
    adapter = load_llava("sdpa")
    req = adapter.encode(sample(n_images=1))
    seen = {}

    class SpyDrop(DropPruner):
        def cut(self, state, keep_local, scores, view):
            event = super().cut(state, keep_local, scores, view)
            seen["positions"], seen["orig_index"] = state.positions.clone(), state.orig_index.clone()
            return event

    state = adapter.prefill(req, scorer=RandomScorer(), policy=FixedPolicy(layer=0, keep=0.25), pruner=SpyDrop(),
                            generator=torch.Generator().manual_seed(3))
    L = req.input_ids.shape[1]
    # 1-D RoPE: the position of a token is its original index, gaps and all
    assert seen["positions"].shape == (1, 1, L - (N_VISUAL - 4))
    assert torch.equal(seen["positions"][0], seen["orig_index"])
    assert bool((seen["positions"][0, 0].diff() > 1).any())
    assert int(state.next_position[0]) == L


def test_recycle_pruner_runs_on_llava(load_llava):
    # SparseVLM v1.5's pruner (drop + DPC-kNN merge) over 1-D positions: the merged tokens
    # are counted as visual, and decoding goes on from the original next position.
    from sparsevlm_exp.pruners import RecyclePruner

    adapter = load_llava("sdpa")
    req, state, tokens = run_ours(adapter, sample(n_images=1), scorer=V15Scorer(), keep=0.25, layer=1,
                                  pruner=RecyclePruner())
    event = state.events[0]
    assert event.kept_index.shape[1] == 4 and event.n_recycled >= 1
    assert state.layer_counts[1] == 4 + event.n_recycled
    assert int(state.next_position[0]) == req.input_ids.shape[1]
    assert 1 <= tokens.shape[1] <= MAX_NEW


def test_cli_runs_llava_checkpoint_end_to_end(llava_dir, tmp_path):
    """`python -m sparsevlm_exp model=llava15_7b model.pretrained=<dir>`: the real yaml,
    the runner and the folder dataset on the tiny checkpoint."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    data = tmp_path / "data"
    data.mkdir()
    sample(n_images=1).images[0].save(data / "a.png")
    (data / "questions.jsonl").write_text(
        json.dumps({"id": "q1", "image": "a.png", "question": "what colour is the circle", "answers": ["red"]}) + "\n")
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "sparsevlm_exp", "model=llava15_7b", f"model.pretrained={llava_dir}",
         "dataset=folder", f"dataset.path={data}", "dataset.prompt=", "logger=none", "device=cpu", "dtype=float32",
         "scorer=v15", "keep=0.5", "layer=1", "decoder.max_new_tokens=4", f"hydra.run.dir={run_dir}"],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["n_samples"] == 1 and results["n_failed"] == 0
    assert results["n_visual"] == N_VISUAL and results["kept"] == {"1": N_VISUAL // 2}


def test_pad_images_keeps_the_whole_picture(llava_dir):
    # LLaVA-1.5's eval pads to a square with the mean colour (nothing cropped); the CLIP
    # processor alone resizes the short side and center-crops the long one.
    from PIL import Image

    from sparsevlm_exp.models.llava import pad_to_square

    padded = LlavaAdapter.load(pretrained=llava_dir, dtype="float32", device="cpu", pad_images=True)
    image = Image.new("RGB", (112, 56), (255, 0, 0))              # wide and all red
    fill = tuple(int(x * 255) for x in padded.processor.image_processor.image_mean)
    square = pad_to_square(image, fill)
    assert square.size == (112, 112)
    assert square.getpixel((0, 0)) == fill and square.getpixel((56, 56)) == (255, 0, 0)

    smp = sample(n_images=1)
    smp.images = [image]
    pixels = padded.encode(smp).model_inputs["pixel_values"]          # [1, 3, 56, 56]
    expected = padded.processor.image_processor(images=[square], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, expected)
    # the padding shows at the top and bottom rows; a center crop would be red everywhere
    red = padded.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    assert not torch.allclose(pixels[..., 0, :], red[..., 0, :])
    assert torch.allclose(pixels[..., 28, :], red[..., 28, :])
