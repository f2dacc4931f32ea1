"""Train the embedded default model: a small Qwen2.5-VL on the shapes benchmark.

    # phase 1: the vision tower alone; phase 2: a fresh LLM on its cached features
    python scripts/train_shapes_vlm.py --vision-only --seed 10 --steps 2500 --batch 8 --lr 2e-3 \
        --warmup 50 --stages "1.0:448:8:12" --time-limit 22 --out /tmp/shapes_vision
    python scripts/train_shapes_vlm.py --vision-from /tmp/shapes_vision --feature-pool 5000 --seed 20 \
        --steps 4400 --batch 16 --lr 2e-3 --warmup 100 --pos-aux-weight 1.0 --time-limit 44 \
        --out sparsevlm_exp/assets/shapes_vlm
    python scripts/train_shapes_vlm.py --tiny --steps 5 --out /tmp/x      # seconds (tests)

Recipe (docs/embedded_training.md has the curves that chose it):
- a real `Qwen2_5_VLForConditionalGeneration` with small dimensions and the word-level
  processor of `sparsevlm_exp.models.word_processor`;
- prompts built exactly as evaluation builds them (chat_messages + apply_chat_template),
  then the answer tokens and <|im_end|>; answer loss only on those;
- phase 1: every merged visual token (a 28x28 cell) names, through the final norm and the
  tied LM head, the colour and shape words of the object whose centre lies in it;
- phase 2: the vision tower frozen, its features cached for a pool of scenes, every
  question each scene answers (`scene_questions`); head 0 of three LLM layers is told
  where to attend - look (layer 2, output held at zero: it marks the evidence for the
  scorers without reading it), read (layer 3: the attribute word reads the evidence) and
  copy (layer 4: the last token reads the attribute word) - plus word "hints" on the
  residual stream after the read and copy layers, and two position heads on layer 0
  (every visual token splits its attention between <|vision_start|> and itself by its
  column, resp. row: how the model tells left from right). Every auxiliary target is read through
  the model's own LM head or attention maps: nothing extra is saved.

Writes the model + processor (save_pretrained, safetensors) to --out and the learning
curve to --out/training_log.json (unless --log elsewhere).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutputWithPooling

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsevlm_exp.contracts import Sample  # noqa: E402
from sparsevlm_exp.data.shapes import (  # noqa: E402
    COLOURS, DEFAULT_PROMPT, QUADRANTS, QUESTION_TYPES, SHAPES, ShapesDataset, make_sample, object_cells,
    sample_seed, scene_questions, vocabulary,
)
from sparsevlm_exp.models.prompting import chat_messages  # noqa: E402
from sparsevlm_exp.models.word_processor import build_word_processor, special_token_ids  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "sparsevlm_exp" / "assets" / "shapes_vlm"

SIZES = {
    # vision: depth, width, heads, mlp; llm: layers, width, heads, kv heads, mlp
    # (3 x 128 / 4 x 192 was ~2x slower per step on 2 busy cores; the vision tower dominates)
    "default": dict(v_depth=2, v_width=96, v_heads=3, v_mlp=192, l_layers=6, l_width=128, l_heads=4,
                    l_kv=2, l_mlp=384),
    "tiny": dict(v_depth=1, v_width=32, v_heads=2, v_mlp=64, l_layers=6, l_width=32, l_heads=2,
                 l_kv=1, l_mlp=64),
}


def build_model(processor, size: str):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    s = SIZES[size]
    ids = special_token_ids(processor)
    head_dim = s["l_width"] // s["l_heads"]
    hw = (head_dim // 2) * 3 // 8              # M-RoPE sections: temporal, height, width (sum = head_dim/2),
    text = dict(
        vocab_size=ids["vocab_size"], hidden_size=s["l_width"], intermediate_size=s["l_mlp"],
        num_hidden_layers=s["l_layers"], num_attention_heads=s["l_heads"], num_key_value_heads=s["l_kv"],
        max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=True,
        # base 20, not Qwen's 10000: with head_dim 32 the width section of M-RoPE gets the 6 lowest
        # frequencies, which at base 10000 turn by < 0.05 rad across 16 columns - the model could
        # not tell left from right (measured: quadrant left/right at chance, top/bottom perfect).
        # At base 100 the fastest width frequency still turns only 0.9 rad across the image; at
        # base 20 it turns 2.5 rad, so one head can tell a column from its neighbour (the
        # position heads below)
        rope_parameters={"rope_type": "default", "rope_theta": 20.0,
                         "mrope_section": [head_dim // 2 - 2 * hw, hw, hw]},   # Qwen's 16:24:24
        eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"], bos_token_id=ids["bos_token_id"],
    )
    vision = dict(
        depth=s["v_depth"], hidden_size=s["v_width"], num_heads=s["v_heads"], intermediate_size=s["v_mlp"],
        out_hidden_size=s["l_width"], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        window_size=112, fullatt_block_indexes=[s["v_depth"] - 1],
    )
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=True,
        image_token_id=ids["image_token_id"], video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"], vision_end_token_id=ids["vision_end_token_id"],
        eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"], bos_token_id=ids["bos_token_id"],
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["eos_token_id"]
    model.generation_config.pad_token_id = ids["pad_token_id"]
    model.generation_config.bos_token_id = ids["bos_token_id"]
    return model


# --------------------------------------------------------------------------- #
# Batches
# --------------------------------------------------------------------------- #

def encode_prompt(processor, sample):
    """Exactly what evaluation feeds the model (the prompt, up to the assistant turn)."""
    return processor.apply_chat_template(chat_messages(sample.images, sample.question), tokenize=True,
                                         add_generation_prompt=True, return_dict=True, return_tensors="pt")


def answer_ids(processor, answer: str) -> list[int]:
    tok = processor.tokenizer
    return tok(answer, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]


def aux_targets(sample, grid_cells: int, cell: int):
    """Per merged-token colour / shape class (0 = no object centre in this cell)."""
    colour = torch.zeros(grid_cells * grid_cells, dtype=torch.long)
    shape = torch.zeros(grid_cells * grid_cells, dtype=torch.long)
    names_c, names_s = list(COLOURS), SHAPES
    for row, col, s, c in object_cells(sample, cell):
        colour[row * grid_cells + col] = names_c.index(c) + 1
        shape[row * grid_cells + col] = names_s.index(s) + 1
    return colour, shape


def aux_word_targets(processor, colour: torch.Tensor, shape: torch.Tensor):
    """The class targets as word ids: colour word (pad token where no object centre), shape word
    (-100 where none) - for --aux-mode words, which reads the visual features through the LM head."""
    tok = processor.tokenizer
    colour_ids = torch.tensor([tok.convert_tokens_to_ids("<|endoftext|>")] +
                              [tok.convert_tokens_to_ids(c) for c in COLOURS])
    shape_ids = torch.tensor([-100] + [tok.convert_tokens_to_ids(s) for s in SHAPES])
    return colour_ids[colour], shape_ids[shape]


def quadrant_cells(grid_cells: int) -> torch.Tensor:
    """Index into QUADRANTS of every merged-token cell, raster order."""
    rows = torch.arange(grid_cells).repeat_interleave(grid_cells)
    cols = torch.arange(grid_cells).repeat(grid_cells)
    return (rows >= grid_cells // 2).long() * 2 + (cols >= grid_cells // 2).long()


def position_targets(grid_cells: int, sharpness: float) -> torch.Tensor:
    """[cells, 2]: for every merged-token cell (raster order), the attention share the column
    head (0) and the row head (1) of --position-layer should put on <|vision_start|>; the
    rest goes to the cell itself. The share falls from ~1 at the left (top) edge to ~0 at the
    right (bottom) edge and crosses 1/2 at the middle, so the head's output tells which half
    the cell lies in. M-RoPE makes it learnable: seen from a cell at (row, col), the sink
    sits at height offset row + 1 and width offset col + 1, the cell itself at 0."""
    index = torch.arange(grid_cells, dtype=torch.float32)
    share = torch.sigmoid(sharpness * ((grid_cells - 1) / 2 - index))              # [grid]
    cols = share.repeat(grid_cells)
    rows = share.repeat_interleave(grid_cells)
    return torch.stack([cols, rows], dim=1)


def evidence_cells(sample, grid_cells: int, cell: int = 28) -> list[int]:
    """Raster index of the visual-token cell holding the centre of each evidence object."""
    return [int((y0 + y1) / 2 // cell) * grid_cells + int((x0 + x1) / 2 // cell)
            for x0, y0, x1, y1 in sample.evidence[0]]


def attention_targets(processor, prompt: list[int], sample, grid_cells: int):
    """Where the supervised heads should look, as (query rows, target distribution over keys).

    The target is uniform over the centre cells of the evidence objects plus one "sink"
    share on <|vision_start|>: with nothing to find (exists: no) the head rests on the sink,
    and the evidence : sink mass ratio (n : 1) is how a read head can count n objects.
    Rows: the question's attribute word ("circle" in "What colour is the circle?") and the
    last prompt token (the one that predicts the answer).
    """
    tok = processor.tokenizer
    image_id, sink_id = tok.convert_tokens_to_ids("<|image_pad|>"), tok.convert_tokens_to_ids("<|vision_start|>")
    attribute_ids = {tok.convert_tokens_to_ids(w) for w in list(COLOURS) + SHAPES}
    visual = [i for i, t in enumerate(prompt) if t == image_id]                  # raster order of the cells
    sink = prompt.index(sink_id)
    attribute = [i for i, t in enumerate(prompt) if t in attribute_ids and i > visual[-1]]
    target = torch.zeros(len(prompt))
    target[sink] = 1.0
    for c in evidence_cells(sample, grid_cells):
        target[visual[c]] = 1.0
    return [attribute[0], len(prompt) - 1], target / target.sum()


def prompt_ids(processor, question: str, image_size: int) -> list[int]:
    """The prompt ids evaluation would build for a question about one image_size^2 image,
    without the image itself (phase 2 feeds cached vision features instead)."""
    text = processor.apply_chat_template(chat_messages([None], question), tokenize=False, add_generation_prompt=True)
    cells = (image_size // 28) ** 2
    text = text.replace("<|image_pad|>", "<|image_pad|>" * cells)
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def hint_words(processor, sample, image_size: int) -> torch.Tensor:
    """What the attribute word should know once it has read the evidence (a distribution
    over the vocabulary, read through the LM head): the evidence object's colour, shape and
    quadrant words, or for exists / count questions the answer itself."""
    tok = processor.tokenizer
    target = torch.zeros(len(tok))
    qtype = sample.meta["question_type"]
    if qtype in ("exists", "count"):
        target[tok.convert_tokens_to_ids(sample.answers[0])] = 1.0
        return target
    x0, y0, x1, y1 = sample.evidence[0][0]
    obj = next(o for o in sample.meta["objects"] if tuple(o["box"]) == (x0, y0, x1, y1))
    half = image_size / 2 // 28 * 28                        # the quadrant of the centre cell, as M-RoPE sees it
    cx, cy = (x0 + x1) / 2 // 28 * 28, (y0 + y1) / 2 // 28 * 28
    quadrant = ("bottom" if cy >= half else "top") + ("right" if cx >= half else "left")
    for word in (obj["colour"], obj["shape"], quadrant):
        target[tok.convert_tokens_to_ids(word)] += 1 / 3
    return target


def make_batch(processor, samples, image_size: int, features=None):
    """Right-padded training batch: prompt (as evaluation builds it) + answer + <|im_end|>.
    With `features` (phase 2: a list of cached [cells, width] vision outputs, one per sample)
    the images are not processed; `cached_features` replaces the vision tower's output."""
    pad = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    rows, labels, pixel_values, grids, colours, shapes = [], [], [], [], [], []
    look_rows, look_targets, hints = [], [], []
    for s in samples:
        if features is None:
            enc = encode_prompt(processor, s)
            prompt = enc["input_ids"][0].tolist()
            pixel_values.append(enc["pixel_values"])
            grids.append(enc["image_grid_thw"])
        else:
            prompt = prompt_ids(processor, s.question, image_size)
            grids.append(torch.tensor([[1, image_size // 14, image_size // 14]]))
        ans = answer_ids(processor, s.answers[0])
        rows.append(prompt + ans)
        labels.append([-100] * len(prompt) + ans)
        c, sh = aux_targets(s, image_size // 28, 28)
        colours.append(c)
        shapes.append(sh)
        r, t = attention_targets(processor, prompt, s, image_size // 28)
        look_rows.append(r)
        look_targets.append(t)
        hints.append(hint_words(processor, s, image_size))
    length = max(len(r) for r in rows)
    attn_target = torch.zeros(len(rows), length)                                # [B, S] keys
    for i, t in enumerate(look_targets):
        attn_target[i, :len(t)] = t
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    label_t = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        input_ids[i, :len(r)] = torch.tensor(r)
        attention[i, :len(r)] = 1
        label_t[i, :len(l)] = torch.tensor(l)
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    return dict(
        input_ids=input_ids, attention_mask=attention, labels=label_t,
        mm_token_type_ids=(input_ids == image_id).long(),
        pixel_values=torch.cat(pixel_values) if features is None else torch.zeros(1),
        cached_features=None if features is None else torch.cat(features),          # [B * cells, width]
        image_grid_thw=torch.cat(grids),
        aux_colour=torch.cat(colours), aux_shape=torch.cat(shapes),
        aux_quadrant=quadrant_cells(image_size // 28).repeat(len(samples)),
        qtypes=[s.meta["question_type"] for s in samples],
        look_rows=torch.tensor(look_rows), attn_target=attn_target,              # [B, 2], [B, S]
        hint_words=torch.stack(hints),                                           # [B, vocab]
    )


def build_feature_pool(model, processor, args) -> list[dict]:
    """Phase 2: `--feature-pool` scenes from the training stream with their vision features
    computed once by the (frozen) vision tower, and every question each scene answers."""
    size, lo, hi = args.image_size, args.min_objects, args.max_objects
    key = (round(sum(float(p.double().sum()) for p in model.model.visual.parameters()), 6), args.seed, args.feature_pool, size, lo, hi, tuple(args.question_types))
    if args.pool_file and args.pool_file.exists():          # (the same frozen tower and scenes: reuse)
        saved = torch.load(args.pool_file, weights_only=False)
        if saved["key"] == key:
            print(f"feature pool: loaded {args.pool_file}", flush=True)
            return saved["pool"]
    pool, t0 = [], time.time()
    model.eval()
    with torch.no_grad():
        for start in range(0, args.feature_pool, 16):
            samples = [make_sample(sample_seed("train", args.seed, i), size, lo, hi,
                                   args.question_types[i % len(args.question_types)],
                                   turn=i // len(args.question_types))
                       for i in range(start, min(start + 16, args.feature_pool))]
            enc = processor.image_processor(images=[s.images[0] for s in samples], return_tensors="pt")
            feats = model.model.visual(enc["pixel_values"], grid_thw=enc["image_grid_thw"]).pooler_output
            for s, f in zip(samples, feats.split(feats.shape[0] // len(samples))):
                pool.append({"features": f.clone(), "objects": s.meta["objects"],
                             "questions": scene_questions(s.meta["objects"], size)})
            if start % 800 == 0:
                print(f"feature pool: {len(pool)}/{args.feature_pool} scenes, {time.time() - t0:.0f}s", flush=True)
    model.train()
    if args.pool_file:
        torch.save({"key": key, "pool": pool}, args.pool_file)
    return pool


class ExamplePicker:
    """Questions about pooled scenes, balanced: question types take turns (as in the
    stream) and, within a type, every answer is equally likely (no answer prior to learn)."""

    def __init__(self, pool: list[dict], question_types, seed: int):
        self.rng = random.Random(seed)
        self.types = list(question_types)
        self.by_answer: dict[str, dict[str, list[tuple[int, int]]]] = {}
        for p, scene in enumerate(pool):
            for q, (qtype, _, answer, _) in enumerate(scene["questions"]):
                self.by_answer.setdefault(qtype, {}).setdefault(answer, []).append((p, q))

    def pick(self, index: int) -> tuple[int, int]:
        answers = self.by_answer[self.types[index % len(self.types)]]
        return self.rng.choice(answers[self.rng.choice(sorted(answers))])


def pooled_batch(processor, pool, picker: ExamplePicker, step: int, args):
    samples, features = [], []
    for j in range(args.batch):
        p, q = picker.pick(step * args.batch + j)
        qtype, question, answer, evidence = pool[p]["questions"][q]
        samples.append(Sample(id=f"pool/{p}/{q}", question=f"{question} {DEFAULT_PROMPT}", images=[],
                              answers=[answer], evidence=[evidence],
                              meta={"question_type": qtype, "objects": pool[p]["objects"]}))
        features.append(pool[p]["features"])
    return make_batch(processor, samples, args.image_size, features)


def parse_stages(text: str) -> list[tuple[float, int, int, int]]:
    """"0.3:224:1:3,0.7:448:8:12" -> [(fraction of steps, image size, min objects, max objects), ...]"""
    stages = []
    for part in text.split(","):
        frac, size, lo, hi = part.split(":")
        stages.append((float(frac), int(size), int(lo), int(hi)))
    return stages


def curriculum(step: int, steps: int, args) -> tuple[int, int, int]:
    """(image_size, min_objects, max_objects) at this step: small, sparse scenes first."""
    if args.stages:
        end = 0.0
        for frac, size, lo, hi in parse_stages(args.stages):
            end += frac * steps
            if step < end:
                return size, lo, hi
        return size, lo, hi
    return (args.image_size,) + object_ramp(step, steps, args)


def object_ramp(step: int, steps: int, args) -> tuple[int, int]:
    """(min_objects, max_objects) at this step: few objects first, the full scenes later."""
    ramp_end = int(args.curriculum * steps)
    if step >= ramp_end:
        return args.min_objects, args.max_objects
    frac = step / max(1, ramp_end)
    lo = round(args.start_objects + frac * (args.min_objects - args.start_objects))
    hi = round(args.start_objects + 2 + frac * (args.max_objects - args.start_objects - 2))
    return max(1, lo), max(lo, hi)


def training_samples(step: int, args, steps: int):
    size, lo, hi = curriculum(step, steps, args)
    out = []
    for j in range(args.batch):
        index = step * args.batch + j
        qtype = args.question_types[index % len(args.question_types)]
        out.append(make_sample(sample_seed("train", args.seed, index), size, lo, hi, qtype,
                               turn=index // len(args.question_types)))
    return out, size


# --------------------------------------------------------------------------- #
# Evaluation (teacher-forced first answer token: every shapes answer is one word)
# --------------------------------------------------------------------------- #

@torch.no_grad()
def cell_accuracy(model, processor, samples, image_size: int) -> dict[str, float]:
    """How well the vision tower names what is in each cell, read through the LM head:
    colour and shape word at object-centre cells, and how often an empty cell names a colour."""
    model.eval()
    hits = {"colour": [], "shape": [], "empty_named": []}
    colour_ids = {processor.tokenizer.convert_tokens_to_ids(c) for c in COLOURS}
    for i in range(0, len(samples), 16):
        batch = make_batch(processor, samples[i:i + 16], image_size)
        feats = model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
        logits = model.lm_head(model.model.language_model.norm(feats))
        colour_w, shape_w = aux_word_targets(processor, batch["aux_colour"], batch["aux_shape"])
        centre = batch["aux_colour"] > 0
        colour_logits = logits[:, sorted(colour_ids)]
        shape_ids = [processor.tokenizer.convert_tokens_to_ids(s) for s in SHAPES]
        best_colour = torch.tensor(sorted(colour_ids))[colour_logits.argmax(-1)]
        best_shape = torch.tensor(shape_ids)[logits[:, shape_ids].argmax(-1)]
        hits["colour"] += (best_colour[centre] == colour_w[centre]).float().tolist()
        hits["shape"] += (best_shape[centre] == shape_w[centre]).float().tolist()
        top = logits.argmax(-1)
        hits["empty_named"] += torch.tensor([int(t) in colour_ids for t in top[~centre]]).float().tolist()
    model.train()
    return {f"cell_{k}": round(sum(v) / max(1, len(v)), 4) for k, v in hits.items()}


@torch.no_grad()
def first_token_accuracy(model, processor, samples, image_size: int) -> dict[str, float]:
    model.eval()
    per_type: dict[str, list[float]] = {}
    for i in range(0, len(samples), 16):
        chunk = samples[i:i + 16]
        batch = make_batch(processor, chunk, image_size)
        out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids",
                                             "pixel_values", "image_grid_thw")})
        for b, s in enumerate(chunk):
            pos = int((batch["labels"][b] != -100).nonzero()[0])      # first answer token
            pred = int(out.logits[b, pos - 1].argmax())
            per_type.setdefault(s.meta["question_type"], []).append(float(pred == int(batch["labels"][b, pos])))
    model.train()
    result = {f"acc_{k}": sum(v) / len(v) for k, v in per_type.items()}
    result["acc"] = sum(sum(v) for v in per_type.values()) / sum(len(v) for v in per_type.values())
    return result


# --------------------------------------------------------------------------- #
# Main
# --------------------------------------------------------------------------- #

@torch.no_grad()
def evaluate_generate(path: Path, split: str = "test", size: int = 500, threads: int = 2) -> dict:
    """Accuracy of a saved model with plain HF generate (greedy), as the framework evaluates it."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    torch.set_num_threads(threads)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    data = ShapesDataset(split=split, size=size)
    per_type: dict[str, list[float]] = {}
    t0 = time.time()
    for s in data:
        inputs = encode_prompt(processor, s)
        out = model.generate(**inputs, do_sample=False, max_new_tokens=3)
        text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        per_type.setdefault(s.meta["question_type"], []).append(data.metric.score(text, s))
    seconds = time.time() - t0
    result = {f"acc_{k}": sum(v) / len(v) for k, v in per_type.items()}
    result.update(acc=sum(sum(v) for v in per_type.values()) / len(data), split=split, n=len(data),
                  seconds=round(seconds, 1), seconds_per_question=round(seconds / len(data), 4), threads=threads)
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--log", type=Path, default=None, help="learning curve JSON (default: OUT/training_log.json)")
    p.add_argument("--steps", type=int, default=1600)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--aux-weight", type=float, default=1.0, help="0 disables the auxiliary vision targets")
    p.add_argument("--aux-steps", type=float, default=1.0, help="fraction of steps with the auxiliary loss")
    p.add_argument("--aux-mode", choices=["words", "heads"], default="words",
                   help="words: visual features -> final norm -> (tied) LM head -> colour and shape WORDS; "
                        "heads: separate linear classifiers (not saved)")
    p.add_argument("--pos-aux-layer", type=int, default=2,
                   help="LLM layer whose output, at each object's centre cell, must name the object's colour, "
                        "shape and quadrant words (a third each) through the final norm + LM head (-1: off)")
    p.add_argument("--pos-aux-weight", type=float, default=0.5)
    p.add_argument("--look-layer", type=int, default=2,
                   help="LLM layer (the framework's default pruning layer) with a 'look' head: its attention "
                        "from the attribute word and the last prompt token is trained onto the evidence, and "
                        "its output projection is held at zero, so it marks the evidence without reading it "
                        "(-1: off)")
    p.add_argument("--read-layer", type=int, default=3,
                   help="LLM layer (after the pruning layer) with a 'read' head: its attention from the question's "
                        "attribute word is trained onto the evidence (-1: off)")
    p.add_argument("--copy-layer", type=int, default=4,
                   help="LLM layer with a 'copy' head: its attention from the last prompt token is trained onto "
                        "the question's attribute word, which read the evidence one layer below (-1: off)")
    p.add_argument("--position-layer", type=int, default=0,
                   help="LLM layer whose heads 0 and 1 are position heads: every visual token splits its "
                        "attention between <|vision_start|> and itself by its column (head 0) and row (head 1), "
                        "so later layers know which quadrant a cell is in (-1: off)")
    p.add_argument("--position-sharpness", type=float, default=1.0,
                   help="slope (in logits per cell) of the position heads' sink share across the image")
    p.add_argument("--position-weight", type=float, default=1.0)
    p.add_argument("--read-sink-share", type=float, default=1.0,
                   help="the read head's target puts this many evidence-cell shares on <|vision_start|> "
                        "(the look head keeps 1): with s, n objects read as the sink ratio s / (n + s), and a "
                        "larger s spaces the ratios of 3 and 4 objects further apart")
    p.add_argument("--attn-weight", type=float, default=1.0, help="weight of the look, read and copy losses")
    p.add_argument("--hint-weight", type=float, default=0.5,
                   help="weight of the hints: the attribute word names what it read (after --read-layer), the "
                        "last token names the answer (after --copy-layer); 0: off")
    p.add_argument("--eval-objects", type=int, nargs=2, default=None, help="object range of the periodic check")
    p.add_argument("--curriculum", type=float, default=0.3, help="fraction of steps ramping the object count")
    p.add_argument("--stages", default="", help='instead of the ramp: "FRAC:IMAGE_SIZE:MIN_OBJ:MAX_OBJ,..."')
    p.add_argument("--start-objects", type=int, default=3)
    p.add_argument("--min-objects", type=int, default=8)
    p.add_argument("--max-objects", type=int, default=12)
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--question-types", nargs="+", default=QUESTION_TYPES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-size", type=int, default=200, help="val questions for the periodic check")
    p.add_argument("--time-limit", type=float, default=0, help="stop (and save) after this many minutes")
    p.add_argument("--tiny", action="store_true", help="tiny model and images (tests)")
    p.add_argument("--feature-pool", type=int, default=0,
                   help="phase 2: freeze the vision tower, cache its features for this many training scenes "
                        "and train the LLM on every question those scenes answer (0: off, images every step)")
    p.add_argument("--pool-file", type=Path, default=None, help="save / reuse the phase 2 feature pool here")
    p.add_argument("--vision-only", action="store_true",
                   help="phase 1: train only the vision tower (and the word embeddings it is read through) "
                        "on the per-cell colour/shape words")
    p.add_argument("--init", type=Path, default=None, help="continue from a saved model")
    p.add_argument("--vision-from", type=Path, default=None,
                   help="take the vision tower, word embeddings and final norm from this saved model (phase 1)")
    p.add_argument("--evaluate", type=Path, default=None,
                   help="only evaluate this saved model with HF generate on --split (no training)")
    p.add_argument("--split", default="test", choices=["val", "test"])
    args = p.parse_args(argv)
    if args.tiny:
        args.image_size, args.start_objects, args.min_objects, args.max_objects = 112, 2, 2, 3
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.evaluate is not None:
        result = evaluate_generate(args.evaluate, args.split, threads=args.threads)
        print(json.dumps(result))
        return result
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    from transformers import Qwen2_5_VLForConditionalGeneration

    processor = build_word_processor(vocabulary())
    if args.init is not None:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32)
    else:
        model = build_model(processor, "tiny" if args.tiny else "default")
    if args.vision_from is not None:    # phase 2: a fresh LLM on phase 1's vision tower and word embeddings
        source = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.vision_from, dtype=torch.float32)
        model.model.visual.load_state_dict(source.model.visual.state_dict())
        model.model.language_model.embed_tokens.load_state_dict(source.model.language_model.embed_tokens.state_dict())
        model.model.language_model.norm.load_state_dict(source.model.language_model.norm.state_dict())
    model.train()
    # eager attention in the LLM: the supervised heads need their attention probabilities
    model.model.language_model.config._attn_implementation = "eager"
    width = model.config.text_config.hidden_size
    heads = torch.nn.ModuleDict({"colour": torch.nn.Linear(width, len(COLOURS) + 1),
                                 "shape": torch.nn.Linear(width, len(SHAPES) + 1)})
    captured = {}
    model.model.visual.register_forward_hook(lambda m, i, o: captured.__setitem__("vis", o.pooler_output))
    if args.pos_aux_layer >= 0:
        layers = model.model.language_model.layers
        layers[min(args.pos_aux_layer, len(layers) - 1)].register_forward_hook(
            lambda m, i, o: captured.__setitem__("llm", o[0] if isinstance(o, tuple) else o))
    n_layers = len(model.model.language_model.layers)
    for name in ("look_layer", "read_layer", "copy_layer", "pos_aux_layer", "position_layer"):
        if getattr(args, name) >= n_layers:
            raise SystemExit(f"--{name.replace('_', '-')}={getattr(args, name)}: the LLM has {n_layers} layers")
    if args.position_layer >= 0 and args.position_layer in {args.look_layer, args.read_layer, args.copy_layer}:
        raise SystemExit(f"--position-layer={args.position_layer}: head 0 of that layer is already supervised")
    for layer in {args.read_layer, args.copy_layer} - {-1}:                       # residual after the layer
        model.model.language_model.layers[layer].register_forward_hook(
            lambda m, i, o, layer=layer: captured.__setitem__(f"hidden{layer}", o[0] if isinstance(o, tuple) else o))
    for layer in {args.look_layer, args.read_layer, args.copy_layer, args.position_layer} - {-1}:
        model.model.language_model.layers[layer].self_attn.register_forward_hook(
            lambda m, i, o, layer=layer: captured.__setitem__(f"attn{layer}", o[1]))       # [B, Hq, S, S]
    if args.look_layer >= 0:
        attn = model.model.language_model.layers[args.look_layer].self_attn
        cols = slice(0, attn.head_dim)                                                 # head 0
        with torch.no_grad():
            attn.o_proj.weight[:, cols] = 0.0
        mask = torch.ones_like(attn.o_proj.weight)
        mask[:, cols] = 0.0
        attn.o_proj.weight.register_hook(lambda g, mask=mask: g * mask)
    quadrant_ids = torch.tensor([processor.tokenizer.convert_tokens_to_ids(q) for q in QUADRANTS])
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    sink_token = processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    # "no object centre here" is most cells; down-weight it so the rare object cells matter
    class_w_c = torch.tensor([0.05] + [1.0] * len(COLOURS))
    class_w_s = torch.tensor([0.05] + [1.0] * len(SHAPES))

    params = list(model.parameters()) + list(heads.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    eval_lo, eval_hi = args.eval_objects or (args.min_objects, args.max_objects)
    val = ShapesDataset(split="val", size=args.eval_size, image_size=args.image_size,
                        min_objects=eval_lo, max_objects=eval_hi,
                        question_types=args.question_types)
    val_samples = list(val)
    n_params = sum(p.numel() for p in model.parameters())
    log = {"args": {k: str(v) for k, v in vars(args).items()}, "params": n_params,
           "threads": args.threads, "host_cpus": os.cpu_count(), "curve": [], "evals": []}
    print(f"model: {n_params / 1e6:.2f}M parameters; {args.steps} steps of {args.batch}", flush=True)
    log_path = args.log or (args.out / "training_log.json")
    t0 = time.time()
    running, per_type = None, {}
    if args.feature_pool:
        for p_ in model.model.visual.parameters():
            p_.requires_grad_(False)
        pool = build_feature_pool(model, processor, args)
        picker = ExamplePicker(pool, args.question_types, args.seed)
        check = make_sample(sample_seed("train", args.seed, 0), args.image_size, 8, 12)
        if prompt_ids(processor, check.question, args.image_size) != encode_prompt(processor, check)["input_ids"][0].tolist():
            raise SystemExit("prompt_ids differs from the processor's prompt: phase 2 would train on other inputs")
        original_image_features = model.model.get_image_features

        def image_features(pixel_values, image_grid_thw=None, **kwargs):   # cached when the batch has them
            if cache_slot["features"] is None:
                return original_image_features(pixel_values, image_grid_thw, **kwargs)
            cells = (image_grid_thw.prod(-1) // 4).tolist()
            # A real ModelOutput: transformers >= 5.24 calls .to_tuple() on what this returns.
            return BaseModelOutputWithPooling(pooler_output=torch.split(cache_slot["features"], cells))

        cache_slot = {"features": None}
        model.model.get_image_features = image_features
        batches = prefetched(lambda step: pooled_batch(processor, pool, picker, step, args), args.steps)
    else:
        batches = prefetched(lambda step: make_batch(processor, *training_samples(step, args, args.steps)),
                             args.steps)
    def checkpoint(step: int, evaluate) -> bool:
        """Every --eval-every steps and at the end (last step or --time-limit): validate and
        save. Returns True when training should stop."""
        last = step == args.steps - 1 or bool(args.time_limit and time.time() - t0 > args.time_limit * 60)
        if (step + 1) % args.eval_every == 0 or last:
            acc = evaluate(model, processor, val_samples, args.image_size)
            acc.update(step=step + 1, seconds=round(time.time() - t0, 1))
            log["evals"].append(acc)
            print("eval", json.dumps(acc), flush=True)
            save(model, processor, args.out, log, log_path)
        return last

    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        batch = next(batches)
        if args.vision_only:    # phase 1: only the vision tower, on its per-cell word targets
            feats = model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
            captured["vis"] = feats
            out = SimpleNamespace(loss=torch.zeros((), requires_grad=True), logits=None)
        else:
            if args.feature_pool:
                cache_slot["features"] = batch["cached_features"]
                captured["vis"] = batch["cached_features"]     # (the vision hook does not fire)
            out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids",
                                                 "pixel_values", "image_grid_thw", "labels")})
            if args.feature_pool:
                cache_slot["features"] = None
        loss = out.loss
        aux = torch.zeros(())
        if args.aux_weight > 0 and step < args.aux_steps * args.steps:
            feats = captured["vis"]
            if args.aux_mode == "heads":
                aux = F.cross_entropy(heads["colour"](feats), batch["aux_colour"], weight=class_w_c) + \
                    F.cross_entropy(heads["shape"](feats), batch["aux_shape"], weight=class_w_s)
            else:
                logits = model.lm_head(model.model.language_model.norm(feats))
                colour_w, shape_w = aux_word_targets(processor, batch["aux_colour"], batch["aux_shape"])
                weight = torch.where(batch["aux_colour"] > 0, 1.0, 0.05)
                aux = (F.cross_entropy(logits, colour_w, reduction="none") * weight).sum() / weight.sum() + \
                    F.cross_entropy(logits, shape_w)
            loss = loss + args.aux_weight * aux
        if args.vision_only:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            log["curve"].append({"step": step, "aux": round(aux.item(), 4), "lr": lr_at(step),
                                 "seconds": round(time.time() - t0, 1)})
            if step % 10 == 0:
                print(f"step {step} aux {aux.item():.3f} lr {lr_at(step):.2e} {time.time() - t0:.0f}s", flush=True)
            if checkpoint(step, cell_accuracy):
                break
            continue
        pos_aux = torch.zeros(())
        if args.pos_aux_layer >= 0 and step < args.aux_steps * args.steps:
            hidden = captured["llm"][batch["input_ids"] == image_token]          # [n_visual, H], raster order
            centre = batch["aux_colour"] > 0
            logits = model.lm_head(model.model.language_model.norm(hidden[centre]))
            colour_w, shape_w = aux_word_targets(processor, batch["aux_colour"], batch["aux_shape"])
            words = torch.zeros_like(logits)                                     # a third on each word
            for ids in (colour_w[centre], shape_w[centre], quadrant_ids[batch["aux_quadrant"][centre]]):
                words[torch.arange(len(ids)), ids] += 1 / 3
            pos_aux = F.cross_entropy(logits, words)
            loss = loss + args.pos_aux_weight * pos_aux
        attn_loss = torch.zeros(())
        rows_b = torch.arange(len(batch["look_rows"]))
        evidence = batch["attn_target"]                                         # [B, S]
        attribute = F.one_hot(batch["look_rows"][:, 0], evidence.shape[1]).float()
        sink_index = (batch["input_ids"] == sink_token).float().argmax(1)             # [B]
        sink_at = F.one_hot(sink_index, evidence.shape[1]).float()
        read_target = evidence * (1 + (args.read_sink_share - 1) * sink_at)       # [B, S]
        read_target = read_target / read_target.sum(-1, keepdim=True)
        # (layer, query rows (0: attribute word, 1: last prompt token), target over keys), all on head 0
        supervised = ((args.look_layer, [0, 1], evidence), (args.read_layer, [0], read_target),
                      (args.copy_layer, [1], attribute))
        for layer, which, target in supervised:
            if layer < 0:
                continue
            probs = captured[f"attn{layer}"][:, 0]                              # head 0: [B, S, S]
            for w in which:
                p_row = probs[rows_b, batch["look_rows"][:, w]]                  # [B, S]
                attn_loss = attn_loss - (target * torch.log(p_row + 1e-6)).sum(-1).mean()
        loss = loss + args.attn_weight * attn_loss
        position_loss = torch.zeros(())
        if args.position_layer >= 0:
            probs = captured[f"attn{args.position_layer}"]                        # [B, Hq, S, S]
            is_visual = batch["input_ids"] == image_token
            b_idx, q_idx = is_visual.nonzero(as_tuple=True)                       # sample by sample, raster order
            grid = math.isqrt(int(is_visual[0].sum()))                            # (one image size per batch)
            sink = sink_index[b_idx]                                              # [n_visual]
            share = position_targets(grid, args.position_sharpness).repeat(len(rows_b), 1)   # [n_visual, 2]
            for head in (0, 1):                                                   # column, row
                p_rows = probs[b_idx, head, q_idx]                                 # [n_visual, S]
                p_sink = p_rows.gather(1, sink[:, None]).squeeze(1)
                p_self = p_rows.gather(1, q_idx[:, None]).squeeze(1)
                t = share[:, head]
                position_loss = position_loss - (t * torch.log(p_sink + 1e-6) +
                                                 (1 - t) * torch.log(p_self + 1e-6)).mean()
            loss = loss + args.position_weight * position_loss
        hint_loss = torch.zeros(())
        if args.hint_weight > 0:
            # after the read layer the attribute word names what it read; after the copy layer the
            # last token names the answer (shorter paths for the gradient than the final logits)
            answer = batch["labels"].gather(1, (batch["labels"] != -100).float().argmax(1, keepdim=True)).squeeze(1)
            for layer, w, target in ((args.read_layer, 0, batch["hint_words"]),
                                     (args.copy_layer, 1, F.one_hot(answer, batch["hint_words"].shape[1]).float())):
                if layer < 0:
                    continue
                hidden = captured[f"hidden{layer}"][rows_b, batch["look_rows"][:, w]]      # [B, H]
                logits = model.lm_head(model.model.language_model.norm(hidden))
                hint_loss = hint_loss + F.cross_entropy(logits, target)
            loss = loss + args.hint_weight * hint_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running = out.loss.item() if running is None else 0.95 * running + 0.05 * out.loss.item()
        with torch.no_grad():   # loss of the first answer token, per question type (for the curves)
            first = (batch["labels"] != -100).float().argmax(1)
            rows = torch.arange(len(first))
            tok_loss = F.cross_entropy(out.logits[rows, first - 1], batch["labels"][rows, first], reduction="none")
            for qt, l in zip(batch["qtypes"], tok_loss.tolist()):
                per_type[qt] = l if qt not in per_type else 0.95 * per_type[qt] + 0.05 * l
        elapsed = time.time() - t0
        log["curve"].append({"step": step, "loss": round(out.loss.item(), 4), "aux": round(aux.item(), 4),
                             "pos_aux": round(pos_aux.item(), 4), "attn": round(attn_loss.item(), 4),
                             "hint": round(hint_loss.item(), 4), "position": round(position_loss.item(), 4),
                             "lr": lr_at(step), "objects": list(curriculum(step, args.steps, args)),
                             "per_type": {k: round(v, 3) for k, v in per_type.items()},
                             "seconds": round(elapsed, 1)})
        if step % 10 == 0:
            print(f"step {step} loss {out.loss.item():.3f} (avg {running:.3f}) aux {aux.item():.3f} "
                  f"pos {pos_aux.item():.3f} attn {attn_loss.item():.3f} hint {hint_loss.item():.3f} "
                  f"where {position_loss.item():.3f} "
                  f"lr {lr_at(step):.2e} {elapsed:.0f}s " +
                  " ".join(f"{k[:5]}={v:.2f}" for k, v in sorted(per_type.items())), flush=True)
        if checkpoint(step, first_token_accuracy):
            break
    log["train_seconds"] = round(time.time() - t0, 1)
    save(model, processor, args.out, log, log_path)
    return log


def prefetched(make, steps: int, depth: int = 4):
    """Batches built in a background thread (Pillow and numpy release the GIL), in step order."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        for step in range(steps):
            if stop.is_set():
                return
            q.put(make(step))

    threading.Thread(target=work, daemon=True).start()
    try:
        for _ in range(steps):
            yield q.get()
    finally:
        stop.set()


def save(model, processor, out: Path, log: dict, log_path: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)          # safetensors; the auxiliary heads are not part of it
    processor.save_pretrained(out)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(json.dumps(log, indent=1))


if __name__ == "__main__":
    main()
