"""Train the embedded default model: a small Qwen2.5-VL on the shapes benchmark.

    python scripts/train_shapes_vlm.py --threads 2                 # the shipped model
    python scripts/train_shapes_vlm.py --tiny --steps 5 --out /tmp/x   # seconds (tests)

Recipe (see docs/embedded_training.md for the curves that chose it):
- a real `Qwen2_5_VLForConditionalGeneration` with small dimensions and the word-level
  processor of `sparsevlm_exp.models.word_processor`;
- prompts built exactly as evaluation builds them (chat_messages + apply_chat_template),
  then the answer tokens and <|im_end|>; loss only on those;
- auxiliary per-token targets for the vision tower: for each merged visual token (a 28x28
  cell), the colour and shape of the object whose centre lies in it (or "none"), from the
  generator's ground truth, through two linear heads that are NOT part of the saved model;
- curriculum on the number of objects; AdamW with linear warm-up and cosine decay.

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

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsevlm_exp.data.shapes import (  # noqa: E402
    COLOURS, QUADRANTS, QUESTION_TYPES, SHAPES, ShapesDataset, make_sample, object_cells, sample_seed, vocabulary,
)
from sparsevlm_exp.models.prompting import chat_messages  # noqa: E402
from sparsevlm_exp.models.word_processor import build_word_processor, special_token_ids  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "sparsevlm_exp" / "assets" / "shapes_vlm"

SIZES = {
    # vision: depth, width, heads, mlp; llm: layers, width, heads, kv heads, mlp
    # (3 x 128 / 4 x 192 was ~2x slower per step on 2 busy cores; the vision tower dominates)
    "default": dict(v_depth=2, v_width=96, v_heads=3, v_mlp=192, l_layers=4, l_width=128, l_heads=4,
                    l_kv=2, l_mlp=384),
    "tiny": dict(v_depth=1, v_width=32, v_heads=2, v_mlp=64, l_layers=1, l_width=32, l_heads=2,
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
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
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


def make_batch(processor, samples, image_size: int):
    """Right-padded training batch: prompt (as evaluation builds it) + answer + <|im_end|>."""
    pad = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    rows, labels, pixel_values, grids, colours, shapes = [], [], [], [], [], []
    for s in samples:
        enc = encode_prompt(processor, s)
        prompt = enc["input_ids"][0].tolist()
        ans = answer_ids(processor, s.answers[0])
        rows.append(prompt + ans)
        labels.append([-100] * len(prompt) + ans)
        pixel_values.append(enc["pixel_values"])
        grids.append(enc["image_grid_thw"])
        c, sh = aux_targets(s, image_size // 28, 28)
        colours.append(c)
        shapes.append(sh)
    length = max(len(r) for r in rows)
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
        pixel_values=torch.cat(pixel_values), image_grid_thw=torch.cat(grids),
        aux_colour=torch.cat(colours), aux_shape=torch.cat(shapes),
        aux_quadrant=quadrant_cells(image_size // 28).repeat(len(samples)),
        qtypes=[s.meta["question_type"] for s in samples],
    )


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
    p.add_argument("--pos-aux-layer", type=int, default=1,
                   help="LLM layer whose output, at every visual token, must name the token's quadrant word "
                        "through the final norm + LM head (-1: off)")
    p.add_argument("--pos-aux-weight", type=float, default=0.5)
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
    p.add_argument("--init", type=Path, default=None, help="continue from a saved model")
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
    model.train()
    width = model.config.text_config.hidden_size
    heads = torch.nn.ModuleDict({"colour": torch.nn.Linear(width, len(COLOURS) + 1),
                                 "shape": torch.nn.Linear(width, len(SHAPES) + 1)})
    captured = {}
    model.model.visual.register_forward_hook(lambda m, i, o: captured.__setitem__("vis", o.pooler_output))
    if args.pos_aux_layer >= 0:
        layers = model.model.language_model.layers
        layers[min(args.pos_aux_layer, len(layers) - 1)].register_forward_hook(
            lambda m, i, o: captured.__setitem__("llm", o[0] if isinstance(o, tuple) else o))
    quadrant_ids = torch.tensor([processor.tokenizer.convert_tokens_to_ids(q) for q in QUADRANTS])
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
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
    batches = prefetched(lambda step: make_batch(processor, *training_samples(step, args, args.steps)),
                         args.steps)
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        batch = next(batches)
        out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids",
                                             "pixel_values", "image_grid_thw", "labels")})
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
        pos_aux = torch.zeros(())
        if args.pos_aux_layer >= 0 and step < args.aux_steps * args.steps:
            hidden = captured["llm"][batch["input_ids"] == image_token]          # [n_visual, H], raster order
            logits = model.lm_head(model.model.language_model.norm(hidden))
            pos_aux = F.cross_entropy(logits, quadrant_ids[batch["aux_quadrant"]])
            loss = loss + args.pos_aux_weight * pos_aux
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
                             "pos_aux": round(pos_aux.item(), 4),
                             "lr": lr_at(step), "objects": list(curriculum(step, args.steps, args)),
                             "per_type": {k: round(v, 3) for k, v in per_type.items()},
                             "seconds": round(elapsed, 1)})
        if step % 10 == 0:
            print(f"step {step} loss {out.loss.item():.3f} (avg {running:.3f}) aux {aux.item():.3f} "
                  f"pos {pos_aux.item():.3f} "
                  f"lr {lr_at(step):.2e} {elapsed:.0f}s " +
                  " ".join(f"{k[:5]}={v:.2f}" for k, v in sorted(per_type.items())), flush=True)
        last = step == args.steps - 1 or (args.time_limit and elapsed > args.time_limit * 60)
        if (step + 1) % args.eval_every == 0 or last:
            acc = first_token_accuracy(model, processor, val_samples, args.image_size)
            acc.update(step=step + 1, seconds=round(time.time() - t0, 1))
            log["evals"].append(acc)
            print("eval", json.dumps(acc), flush=True)
            save(model, processor, args.out, log, log_path)
        if last:
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
