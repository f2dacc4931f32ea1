"""The embedded benchmark: word-level processor, shapes generator, shipped model."""
from __future__ import annotations

import torch
from PIL import Image

from sparsevlm_exp.models.prompting import chat_messages
from sparsevlm_exp.models.word_processor import build_word_processor, special_token_ids


def _encode(processor, image, question):
    return processor.apply_chat_template(chat_messages([image], question), tokenize=True,
                                         add_generation_prompt=True, return_dict=True, return_tensors="pt")


def test_word_processor_has_qwen_layout_and_round_trips(tmp_path):
    from transformers import AutoProcessor

    for family in ("qwen2_5_vl", "qwen2_vl"):
        processor = build_word_processor(["what colour is the circle ?", "red"], family=family)
        ids = special_token_ids(processor)
        out = _encode(processor, Image.new("RGB", (448, 448), "red"), "What colour is the circle?")
        tokens = processor.tokenizer.convert_ids_to_tokens(out["input_ids"][0].tolist())
        # system prefix first, then vision_start, 32*32/4 pads, vision_end, question, assistant turn
        assert tokens[:3] == ["<|im_start|>", "system", "you"]
        start = tokens.index("<|vision_start|>")
        assert tokens[start + 1:start + 257] == ["<|image_pad|>"] * 256
        assert tokens[start + 257:] == ["<|vision_end|>", "what", "colour", "is", "the", "circle", "?",
                                        "<|im_end|>", "<|im_start|>", "assistant"]
        assert out["image_grid_thw"].tolist() == [[1, 32, 32]]
        assert out["mm_token_type_ids"][0].sum() == 256
        assert (out["input_ids"][0] == ids["image_token_id"]).sum() == 256
        assert processor.tokenizer.eos_token_id == ids["eos_token_id"]

        processor.save_pretrained(tmp_path / family)
        loaded = AutoProcessor.from_pretrained(tmp_path / family)
        assert type(loaded) is type(processor)
        again = _encode(loaded, Image.new("RGB", (448, 448), "red"), "What colour is the circle?")
        assert torch.equal(again["input_ids"], out["input_ids"])
        assert torch.equal(again["pixel_values"], out["pixel_values"])


# --------------------------------------------------------------------------- #
# Generator
# --------------------------------------------------------------------------- #

import inspect  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from sparsevlm_exp.data.shapes import (  # noqa: E402
    COLOURS, QUESTION_TYPES, SHAPES, ShapesDataset, make_sample, sample_seed, training_stream,
)

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "sparsevlm_exp" / "assets" / "shapes_vlm"
# Measured accuracy of the shipped model on ShapesDataset(split="test", size=100) minus a margin.
SHIPPED_FLOOR = 0.90          # the target; measured 0.93 (HF generate, greedy; 0.930 on all 500 test questions)


def test_generator_is_deterministic():
    a, b = ShapesDataset(split="test", size=10), ShapesDataset(split="test", size=10)
    for x, y in zip(a, b):
        assert x.question == y.question and x.answers == y.answers and x.evidence == y.evidence
        assert np.array_equal(np.asarray(x.images[0]), np.asarray(y.images[0]))
    s1 = next(training_stream(seed=3))
    s2 = next(training_stream(seed=3))
    assert np.array_equal(np.asarray(s1.images[0]), np.asarray(s2.images[0])) and s1.question == s2.question
    assert next(training_stream(seed=4)).question != s1.question or \
        not np.array_equal(np.asarray(next(training_stream(seed=4)).images[0]), np.asarray(s1.images[0]))


def test_splits_use_disjoint_seeds():
    assert len({sample_seed(split, 0, 7) for split in ("train", "val", "test")}) == 3
    val = {s.images[0].tobytes() for s in ShapesDataset(split="val", size=50)}
    test = {s.images[0].tobytes() for s in ShapesDataset(split="test", size=50)}
    assert not val & test


def _stated_colour(sample, box) -> str:
    """The colour the question or answer names, else (quadrant by shape) the named object's colour."""
    words = (sample.question + " " + sample.answers[0]).lower().replace("?", " ").split()
    named = [w for w in words if w in COLOURS]
    if named:
        return named[0]
    shape = next(w for w in words if w in SHAPES)
    (obj,) = [o for o in sample.meta["objects"] if o["shape"] == shape]
    assert tuple(obj["box"]) == tuple(box)
    return obj["colour"]


def test_evidence_boxes_hold_the_stated_colour():
    data = ShapesDataset(split="test", size=100)
    seen = set()
    for s in data:
        qtype = s.meta["question_type"]
        seen.add(qtype)
        pixels = np.asarray(s.images[0])
        boxes = s.evidence[0]
        if qtype == "exists" and s.answers[0] == "no":
            assert boxes == []
            continue
        assert boxes, s.question
        if qtype == "count":
            assert len(boxes) == int(s.answers[0])
        for x0, y0, x1, y1 in boxes:
            colour = np.array(COLOURS[_stated_colour(s, (x0, y0, x1, y1))])
            crop = pixels[y0:y1, x0:x1].reshape(-1, 3)
            # the object fills a good part of its box (a triangle: half)
            assert (crop == colour).all(-1).mean() > 0.3, (s.id, s.question)
    assert seen == set(QUESTION_TYPES)


def test_exists_is_balanced_and_answers_are_single_words():
    data = ShapesDataset(split="val", size=500)
    answers = [s.answers[0] for s in data if s.meta["question_type"] == "exists"]
    assert answers.count("yes") == answers.count("no") == 50
    assert all(len(s.answers[0].split()) == 1 for s in data)


def test_yaml_holds_every_constructor_default():
    import yaml

    conf = yaml.safe_load((ROOT / "conf" / "dataset" / "shapes.yaml").read_text())
    assert conf.pop("_target_") == "sparsevlm_exp.data.shapes.ShapesDataset"
    conf.pop("metric")
    params = {k: v.default for k, v in inspect.signature(ShapesDataset).parameters.items() if k != "metric"}
    assert set(conf) == set(params)
    for key, default in params.items():
        assert conf[key] == (list(default) if isinstance(default, tuple) else default), key


def test_bad_config_values_fail_with_a_clear_error():
    from sparsevlm_exp.errors import ConfigError

    with pytest.raises(ConfigError, match="split"):
        ShapesDataset(split="train")
    with pytest.raises(ConfigError, match="question_types"):
        ShapesDataset(question_types=["colour"])


# --------------------------------------------------------------------------- #
# Training script
# --------------------------------------------------------------------------- #

def _train_module():
    sys.path.insert(0, str(ROOT / "scripts"))
    import train_shapes_vlm
    return train_shapes_vlm


def test_training_batches_are_the_evaluation_prompt_plus_the_answer():
    from sparsevlm_exp.data.shapes import vocabulary

    T = _train_module()
    processor = build_word_processor(vocabulary())
    samples = [make_sample(sample_seed("train", 0, i), 224, 2, 4, qtype) for i, qtype in enumerate(QUESTION_TYPES)]
    batch = T.make_batch(processor, samples, 224)
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for i, s in enumerate(samples):
        prompt = _encode(processor, s.images[0], s.question)
        n = prompt["input_ids"].shape[1]
        assert torch.equal(batch["input_ids"][i, :n], prompt["input_ids"][0])
        assert torch.equal(batch["mm_token_type_ids"][i, :n], prompt["mm_token_type_ids"][0])
        answer = processor.tokenizer(s.answers[0], add_special_tokens=False)["input_ids"]
        target = batch["labels"][i][batch["labels"][i] != -100].tolist()
        assert target == answer + [eos]
        assert batch["input_ids"][i, n:n + len(target)].tolist() == target


def test_scene_questions_include_the_generators_own_question():
    """The training script asks several questions per cached scene; the generator's own
    question (text, answer, evidence) must be one of them, and every answer must follow
    from the objects."""
    from sparsevlm_exp.data.shapes import scene_questions

    data = ShapesDataset(split="val", size=100)
    for s in data:
        questions = scene_questions(s.meta["objects"])
        own = s.question.removesuffix(" " + data.prompt)
        match = [q for q in questions if q[1] == own]
        assert len(match) == 1, (own, questions)
        qtype, _, answer, evidence = match[0]
        assert (qtype, answer) == (s.meta["question_type"], s.answers[0])
        assert sorted(evidence) == sorted(s.evidence[0])
        for qtype, question, answer, evidence in questions:
            if qtype == "count":
                colour = question.split()[2]
                assert int(answer) == sum(o["colour"] == colour for o in s.meta["objects"]) == len(evidence)
            if qtype == "exists":
                assert (answer == "yes") == (len(evidence) == 1)


def test_attention_targets_point_at_the_evidence_centres_and_the_sink():
    from sparsevlm_exp.data.shapes import vocabulary

    T = _train_module()
    processor = build_word_processor(vocabulary())
    tok = processor.tokenizer
    for i, qtype in enumerate(QUESTION_TYPES):
        s = make_sample(sample_seed("train", 0, i), 224, 3, 5, qtype, turn=1)    # turn 1: exists -> "no"
        prompt = _encode(processor, s.images[0], s.question)["input_ids"][0].tolist()
        rows, target = T.attention_targets(processor, prompt, s, 8)
        assert rows[1] == len(prompt) - 1
        assert tok.convert_ids_to_tokens(prompt[rows[0]]) in s.question.replace("?", " ").split()
        assert abs(float(target.sum()) - 1) < 1e-6
        visual = [j for j, t in enumerate(prompt) if t == tok.convert_tokens_to_ids("<|image_pad|>")]
        hit = sorted(visual.index(j) for j in target.nonzero().flatten().tolist() if j in visual)
        centres = sorted(int((b[1] + b[3]) / 2 // 28) * 8 + int((b[0] + b[2]) / 2 // 28) for b in s.evidence[0])
        assert hit == centres and len(hit) == len(s.evidence[0])
        sink = prompt.index(tok.convert_tokens_to_ids("<|vision_start|>"))
        assert abs(float(target[sink]) - 1 / (len(centres) + 1)) < 1e-6


def test_position_targets_split_the_image_in_halves():
    """Column head (0) and row head (1): the sink share is above 1/2 exactly in the left
    (top) half, falls monotonically across the image, and the cell keeps the rest."""
    T = _train_module()
    share = T.position_targets(16, 1.0)                                    # [256, 2], raster order
    cols = torch.arange(256) % 16
    rows = torch.arange(256) // 16
    assert torch.equal(share[:, 0] > 0.5, cols < 8)
    assert torch.equal(share[:, 1] > 0.5, rows < 8)
    assert torch.equal(share[:16, 0], share[16:32, 0])                     # the column head ignores the row
    assert bool((share[:16, 0].diff() < 0).all())
    assert torch.allclose(share[:16, 0] + share[:16, 0].flip(0), torch.ones(16))   # symmetric about the middle


def test_cached_features_give_the_same_batch_as_images():
    """Phase 2 trains on prompts built without the image and on cached vision features;
    they must be exactly what evaluation feeds the model."""
    from sparsevlm_exp.data.shapes import vocabulary

    T = _train_module()
    processor = build_word_processor(vocabulary())
    samples = [make_sample(sample_seed("train", 0, i), 224, 2, 4, q) for i, q in enumerate(QUESTION_TYPES)]
    with_images = T.make_batch(processor, samples, 224)
    cached = T.make_batch(processor, samples, 224, features=[torch.zeros(64, 8)] * len(samples))
    for key in ("input_ids", "attention_mask", "labels", "mm_token_type_ids", "image_grid_thw", "attn_target",
                "look_rows", "aux_colour", "aux_shape"):
        assert torch.equal(with_images[key], cached[key]), key


def test_a_few_training_steps_lower_the_loss(tmp_path):
    T = _train_module()
    log = T.main(["--tiny", "--steps", "40", "--warmup", "5", "--lr", "3e-3", "--threads", "1",
                  "--out", str(tmp_path / "m"), "--eval-every", "1000", "--eval-size", "5"])
    losses = [r["loss"] for r in log["curve"]]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert (tmp_path / "m" / "model.safetensors").exists()
    assert json.loads((tmp_path / "m" / "training_log.json").read_text())["curve"]
    # The look head marks the evidence without reading it: its output projection stays zero.
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "m")
    attn = model.model.language_model.layers[2].self_attn
    weight = attn.o_proj.weight.detach()
    assert float(weight[:, :attn.head_dim].abs().max()) == 0.0
    assert float(weight[:, attn.head_dim:].abs().max()) > 0.0


def test_phase_one_and_two_run_and_lower_their_losses(tmp_path):
    T = _train_module()
    log = T.main(["--tiny", "--vision-only", "--steps", "30", "--warmup", "5", "--lr", "3e-3", "--threads", "1",
                  "--out", str(tmp_path / "v"), "--eval-every", "1000", "--eval-size", "5"])
    aux = [r["aux"] for r in log["curve"]]
    assert sum(aux[-5:]) / 5 < sum(aux[:5]) / 5 - 0.5
    log = T.main(["--tiny", "--init", str(tmp_path / "v"), "--feature-pool", "24", "--steps", "30",
                  "--warmup", "5", "--lr", "3e-3", "--threads", "1", "--out", str(tmp_path / "l"),
                  "--eval-every", "1000", "--eval-size", "5"])
    losses = [r["loss"] for r in log["curve"]]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    where = [r["position"] for r in log["curve"]]                  # the position heads learn their ramps
    assert sum(where[-5:]) / 5 < sum(where[:5]) / 5 - 0.5


# --------------------------------------------------------------------------- #
# The shipped model
# --------------------------------------------------------------------------- #

def test_shipped_model_answers_the_fixed_subset():
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    assert sum(f.stat().st_size for f in ASSETS.iterdir()) <= 20 * 2**20
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(ASSETS).eval()
    processor = AutoProcessor.from_pretrained(ASSETS)
    data = ShapesDataset(split="test", size=100)
    scores = []
    with torch.no_grad():
        for s in data:
            inputs = _encode(processor, s.images[0], s.question)
            out = model.generate(**inputs, do_sample=False, max_new_tokens=3)
            text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            scores.append(data.metric.score(text, s))
    accuracy = sum(scores) / len(scores)
    # The target, 3 questions below what the shipped model measured (docs/embedded_training.md).
    assert accuracy >= SHIPPED_FLOOR, accuracy


def test_shipped_model_knows_left_from_right():
    """Layer 0 of the shipped model holds the position heads the training script supervises:
    averaged over a column, head 0 puts more than half of its attention on <|vision_start|>
    exactly in the left half of the image (head 1, over a row: the top half), and every cell
    at least 2.5 cells from the middle line is on its side. This is how the model answers
    quadrant questions; M-RoPE alone did not give it left/right. (Next to the middle, an
    object in the cell can tip the share: measured 0.32 at row 7.)"""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(ASSETS, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(ASSETS)
    s = next(iter(ShapesDataset(split="test", size=1)))
    inputs = _encode(processor, s.images[0], s.question)
    captured = {}
    model.model.language_model.layers[0].self_attn.register_forward_hook(
        lambda m, i, o: captured.__setitem__("probs", o[1]))                 # [1, heads, S, S]
    with torch.no_grad():
        model(**inputs)
    ids = inputs["input_ids"][0]
    tok = processor.tokenizer
    visual = (ids == tok.convert_tokens_to_ids("<|image_pad|>")).nonzero().flatten()   # raster order, 16 x 16
    sink = int((ids == tok.convert_tokens_to_ids("<|vision_start|>")).nonzero())
    grid = 16
    index = torch.arange(grid)
    for head in (0, 1):
        share = captured["probs"][0, head, visual, sink].view(grid, grid)           # [row, column]
        along = share if head == 0 else share.T                                     # [other axis, position]
        assert torch.equal(along.mean(0) > 0.5, index < grid // 2), (head, along.mean(0))
        far = (index <= grid // 2 - 3) | (index >= grid // 2 + 2)
        assert torch.equal(along[:, far] > 0.5, (index < grid // 2)[far].expand(grid, -1)), (head, along)
