"""`dataset=shapes`: the embedded benchmark, procedural scenes drawn with Pillow.

Each sample is one scene (a plain canvas with 8-12 coloured shapes) and one question
whose answer depends on one small region among distractors. Everything follows from
a seed string, so the same (split, seed, index) gives the same pixels and question on
any machine. Every question records its evidence: the boxes of the objects the
answer depends on.

Question types (single-word answers):
    colour_of_shape  "What colour is the circle?"          the circle is the only circle;
                                                            other objects share its colour
    shape_of_colour  "What shape is the red object?"       the only red object; others share its shape
    quadrant         "Where is the circle?" / "Where is the red object?"
                                                            topleft/topright/bottomleft/bottomright;
                                                            the only circle (red object), inside one
                                                            quadrant; others share its colour (shape)
    exists           "Is there a circle?" / "Are there red objects?"
                                                            yes/no, balanced; "yes": exactly one;
                                                            "no": none (evidence empty)
    count            "How many red objects are there?"     1-4; evidence = all red objects

The scene is drawn for its question (the target is placed first, distractors are
chosen to be confusable with it). Objects never overlap and are at least
`MIN_SIZE` = 28 px wide, so each object's centre falls in its own 28x28 cell, i.e. its
own Qwen2-VL visual token (patch 14, 2x2 merge) - the training script uses that for
its auxiliary per-token targets (`object_cells`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, Sequence

from PIL import Image, ImageDraw

from sparsevlm_exp.contracts import Box, Sample

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 50),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
SHAPES = ["circle", "square", "triangle", "diamond", "cross"]
QUADRANTS = ["topleft", "topright", "bottomleft", "bottomright"]
COUNTS = ["1", "2", "3", "4"]
QUESTION_TYPES = ["colour_of_shape", "shape_of_colour", "quadrant", "exists", "count"]
BACKGROUND = (96, 96, 96)
MIN_SIZE, MAX_SIZE = 28, 52          # object width/height in pixels (at 448 x 448)
GAP = 4                              # empty pixels kept between objects

DEFAULT_PROMPT = "Answer with one word."

# Disjoint seed namespaces: training draws from "train", evaluation from "val" / "test".
SPLITS = ("train", "val", "test")


@dataclass
class Obj:
    shape: str
    colour: str
    box: Box                      # (x0, y0, x1, y1), x1/y1 exclusive

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)

    def as_dict(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "box": list(self.box)}


# --------------------------------------------------------------------------- #
# Drawing
# --------------------------------------------------------------------------- #

def draw_object(draw: ImageDraw.ImageDraw, obj: Obj) -> None:
    x0, y0, x1, y1 = obj.box
    x1, y1 = x1 - 1, y1 - 1          # PIL boxes are inclusive
    fill = COLOURS[obj.colour]
    w, h = x1 - x0, y1 - y0
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(x0 + w / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(x0 + w / 2, y0), (x1, y0 + h / 2), (x0 + w / 2, y1), (x0, y0 + h / 2)], fill=fill)
    elif obj.shape == "cross":
        tx, ty = w / 3, h / 3
        draw.rectangle((x0 + tx, y0, x1 - tx, y1), fill=fill)
        draw.rectangle((x0, y0 + ty, x1, y1 - ty), fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def render(objects: Sequence[Obj], image_size: int) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        draw_object(draw, obj)
    return image


# --------------------------------------------------------------------------- #
# Scenes
# --------------------------------------------------------------------------- #

def _overlaps(a: Box, b: Box, gap: int = GAP) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _quadrant_of(box: Box, image_size: int) -> str | None:
    half = image_size / 2
    if box[2] <= half and box[3] <= half:
        return "topleft"
    if box[0] >= half and box[3] <= half:
        return "topright"
    if box[2] <= half and box[1] >= half:
        return "bottomleft"
    if box[0] >= half and box[1] >= half:
        return "bottomright"
    return None


def _place(rng: random.Random, placed: list[Obj], image_size: int, quadrant: str | None = None,
           tries: int = 200) -> Box | None:
    scale = image_size / 448
    lo, hi = max(MIN_SIZE, round(MIN_SIZE * scale)), max(MIN_SIZE, round(MAX_SIZE * scale))
    for _ in range(tries):
        w = h = rng.randint(lo, hi)
        x0, y0 = rng.randint(0, image_size - w), rng.randint(0, image_size - h)
        if quadrant is not None:
            half = image_size // 2
            x0 = rng.randint(0, half - w) + (half if quadrant.endswith("right") else 0)
            y0 = rng.randint(0, half - h) + (half if quadrant.startswith("bottom") else 0)
        box = (x0, y0, x0 + w, y0 + h)
        if quadrant is None or _quadrant_of(box, image_size) == quadrant:
            if not any(_overlaps(box, o.box) for o in placed):
                return box
    return None


def _pick(rng: random.Random, options: Sequence[str], exclude: Sequence[str] = ()) -> str:
    return rng.choice([o for o in options if o not in exclude])


def make_question(rng: random.Random, qtype: str, image_size: int, n_objects: int,
                  turn: int | None = None) -> tuple[list[Obj], str, str, list[Box], dict]:
    """Scene objects, question, answer, evidence boxes and meta for one question type.
    `turn` (the how-many-th question of this type) balances yes/no exactly: even -> yes."""
    colours, shapes = list(COLOURS), SHAPES
    objects: list[Obj] = []

    def add(shape: str, colour: str, quadrant: str | None = None) -> Obj | None:
        box = _place(rng, objects, image_size, quadrant)
        if box is None:
            return None
        obj = Obj(shape, colour, box)
        objects.append(obj)
        return obj

    def name_by_one_attribute(by_shape: bool, shape: str, colour: str, by_shape_question: str,
                              by_colour_question: str):
        """The object is named by its shape (or colour) alone: place a look-alike sharing the
        other attribute, and allow only distractors without the naming attribute."""
        if by_shape:
            add(_pick(rng, shapes, [shape]), colour)
            return (lambda s, c: s != shape), by_shape_question
        add(shape, _pick(rng, colours, [colour]))
        return (lambda s, c: c != colour), by_colour_question

    # `allowed(shape, colour)` says which distractors keep the answer unambiguous;
    # `confusers` are distractors placed first so that the target has look-alikes.
    if qtype == "colour_of_shape":
        shape, colour = rng.choice(shapes), rng.choice(colours)
        target = add(shape, colour)
        add(_pick(rng, shapes, [shape]), colour)                       # same colour, other shape
        allowed = lambda s, c: s != shape
        question, answer, evidence = f"What colour is the {shape}?", colour, [target.box]
    elif qtype == "shape_of_colour":
        shape, colour = rng.choice(shapes), rng.choice(colours)
        target = add(shape, colour)
        add(shape, _pick(rng, colours, [colour]))                      # same shape, other colour
        allowed = lambda s, c: c != colour
        question, answer, evidence = f"What shape is the {colour} object?", shape, [target.box]
    elif qtype == "quadrant":
        # The object is named by one attribute that only it has; look-alikes share the other.
        shape, colour, quadrant = rng.choice(shapes), rng.choice(colours), rng.choice(QUADRANTS)
        by_shape = rng.random() < 0.5
        target = add(shape, colour, quadrant)
        allowed, question = name_by_one_attribute(by_shape, shape, colour,
                                                  f"Where is the {shape}?", f"Where is the {colour} object?")
        answer, evidence = quadrant, [target.box]
    elif qtype == "exists":
        # "yes": exactly one object has the attribute; "no": none has it, look-alikes share the other.
        shape, colour = rng.choice(shapes), rng.choice(colours)
        present = rng.random() < 0.5 if turn is None else turn % 2 == 0
        by_shape = rng.random() < 0.5
        target = add(shape, colour) if present else None
        allowed, question = name_by_one_attribute(by_shape, shape, colour, f"Is there a {shape}?",
                                                  f"Are there {colour} objects?")   # ("a orange": small vocabulary)
        answer = "yes" if present else "no"
        evidence = [target.box] if present else []
    elif qtype == "count":
        colour, count = rng.choice(colours), rng.randint(1, len(COUNTS))
        members = [add(rng.choice(shapes), colour) for _ in range(count)]
        allowed = lambda s, c: c != colour
        question, answer = f"How many {colour} objects are there?", str(count)
        evidence = [m.box for m in members if m is not None]
        target = members[0]
    else:
        raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")
    if target is None and qtype != "exists":
        raise RuntimeError("could not place the target object")   # cannot happen on an empty canvas

    while len(objects) < n_objects:
        s, c = rng.choice(shapes), rng.choice(colours)
        if not allowed(s, c):
            continue
        if add(s, c) is None:
            break                                                   # canvas full: fewer objects
    if qtype == "count" and len(evidence) != count:
        raise RuntimeError("could not place every counted object")
    rng.shuffle(objects)                                            # drawing order carries no hint
    meta = {"question_type": qtype, "objects": [o.as_dict() for o in objects]}
    return objects, question, answer, evidence, meta


def make_sample(seed: str, image_size: int = 448, min_objects: int = 8, max_objects: int = 12,
                question_type: str = "colour_of_shape", prompt: str = DEFAULT_PROMPT,
                turn: int | None = None) -> Sample:
    rng = random.Random(seed)
    n_objects = rng.randint(min_objects, max_objects)
    for attempt in range(20):
        try:
            objects, question, answer, evidence, meta = make_question(rng, question_type, image_size,
                                                                      n_objects, turn)
            break
        except RuntimeError:
            continue
    else:
        raise RuntimeError(f"shapes: no scene for seed {seed!r}; image_size={image_size} is too small")
    text = f"{question} {prompt}".strip() if prompt else question
    return Sample(id=seed, question=text, images=[render(objects, image_size)], answers=[answer],
                  evidence=[evidence], meta=meta)


def sample_seed(split: str, seed: int, index: int) -> str:
    if split not in SPLITS:
        raise ValueError(f"shapes split={split!r}: expected one of {SPLITS}")
    return f"shapes/{split}/{seed}/{index}"


def training_stream(seed: int = 0, image_size: int = 448, min_objects: int = 8, max_objects: int = 12,
                    question_types: Sequence[str] = QUESTION_TYPES, prompt: str = DEFAULT_PROMPT,
                    start: int = 0) -> Iterator[Sample]:
    """An infinite, seeded stream of training samples (seed namespace "train", disjoint
    from val/test). Question types cycle, so every window of len(question_types) holds each once."""
    index = start
    while True:
        qtype = question_types[index % len(question_types)]
        yield make_sample(sample_seed("train", seed, index), image_size, min_objects, max_objects, qtype, prompt,
                          turn=index // len(question_types))
        index += 1


def scene_questions(objects: Sequence[dict], image_size: int = 448) -> list[tuple[str, str, str, list[Box]]]:
    """Every question of the five types that one scene answers unambiguously, as the
    generator would phrase it: (question type, question, answer, evidence boxes).

    `objects` are `meta["objects"]` dicts. Used by the training script to ask several
    questions about one scene (its vision features are computed once); the generator's
    own question is always among them (tests/test_shapes.py checks that).
    """
    def having(key: str, value: str) -> list[dict]:
        return [o for o in objects if o[key] == value]

    out: list[tuple[str, str, str, list[Box]]] = []
    for shape in SHAPES:
        found = having("shape", shape)
        if len(found) == 1:
            out.append(("colour_of_shape", f"What colour is the {shape}?", found[0]["colour"], [tuple(found[0]["box"])]))
            quadrant = _quadrant_of(tuple(found[0]["box"]), image_size)
            if quadrant:
                out.append(("quadrant", f"Where is the {shape}?", quadrant, [tuple(found[0]["box"])]))
        if len(found) <= 1:
            out.append(("exists", f"Is there a {shape}?", "yes" if found else "no", [tuple(o["box"]) for o in found]))
    for colour in COLOURS:
        found = having("colour", colour)
        if len(found) == 1:
            out.append(("shape_of_colour", f"What shape is the {colour} object?", found[0]["shape"],
                        [tuple(found[0]["box"])]))
            quadrant = _quadrant_of(tuple(found[0]["box"]), image_size)
            if quadrant:
                out.append(("quadrant", f"Where is the {colour} object?", quadrant, [tuple(found[0]["box"])]))
        if len(found) <= 1:
            out.append(("exists", f"Are there {colour} objects?", "yes" if found else "no",
                        [tuple(o["box"]) for o in found]))
        if 1 <= len(found) <= len(COUNTS):
            out.append(("count", f"How many {colour} objects are there?", str(len(found)),
                        [tuple(o["box"]) for o in found]))
    return out


def object_cells(sample: Sample, cell: int = 28) -> list[tuple[int, int, str, str]]:
    """(row, col, shape, colour) of the visual-token cell holding each object's centre."""
    out = []
    for o in sample.meta["objects"]:
        x0, y0, x1, y1 = o["box"]
        out.append((int((y0 + y1) / 2 // cell), int((x0 + x1) / 2 // cell), o["shape"], o["colour"]))
    return out


def vocabulary(prompt: str = DEFAULT_PROMPT) -> list[str]:
    """Every word the questions and answers use (for the word-level tokenizer)."""
    words = ["what", "colour", "is", "the", "shape", "object", "where", "there", "a", "how", "many",
             "objects", "are", "?", "yes", "no"]
    words += list(COLOURS) + SHAPES + QUADRANTS + COUNTS + prompt.split()
    return words


# --------------------------------------------------------------------------- #
# Dataset
# --------------------------------------------------------------------------- #

class ShapesDataset:
    """A fixed split of `size` questions; question types take turns (balanced)."""

    def __init__(self, split: str = "test", seed: int = 0, size: int = 500, image_size: int = 448,
                 min_objects: int = 8, max_objects: int = 12,
                 question_types: Sequence[str] = tuple(QUESTION_TYPES), prompt: str = DEFAULT_PROMPT,
                 metric=None):
        from sparsevlm_exp.errors import ConfigError

        if split not in ("val", "test"):
            raise ConfigError(f"dataset.split={split!r}: expected 'val' or 'test' (training uses training_stream)")
        unknown = [q for q in question_types if q not in QUESTION_TYPES]
        if unknown or not question_types:
            raise ConfigError(f"dataset.question_types={list(question_types)}: expected a non-empty subset of {QUESTION_TYPES}")
        if not 1 <= min_objects <= max_objects:
            raise ConfigError(f"dataset.min_objects={min_objects}, max_objects={max_objects}: need 1 <= min <= max")
        if image_size < 112:
            raise ConfigError(f"dataset.image_size={image_size}: expected >= 112")
        if size < 1:
            raise ConfigError(f"dataset.size={size}: expected >= 1")
        self.split, self.seed, self.size = split, seed, size
        self.image_size, self.min_objects, self.max_objects = image_size, min_objects, max_objects
        self.question_types, self.prompt = list(question_types), prompt
        if metric is None:
            from sparsevlm_exp.metrics import ExactMatch
            metric = ExactMatch()
        self.metric = metric

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.size:
            raise IndexError(index)
        qtype = self.question_types[index % len(self.question_types)]
        return make_sample(sample_seed(self.split, self.seed, index), self.image_size, self.min_objects,
                           self.max_objects, qtype, self.prompt, turn=index // len(self.question_types))

    def __iter__(self) -> Iterator[Sample]:
        for index in range(self.size):
            yield self[index]
