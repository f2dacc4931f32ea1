"""Benchmark datasets read from local copies of their Hugging Face parquet releases.

Each class reads the layout of one public release (the lmms-lab ones that
lmms-eval uses), named in its docstring with the files and columns it expects.
`path` is a local directory holding that layout (for example a
`huggingface-cli download --repo-type dataset lmms-lab/textvqa` snapshot), or
the hub id itself, which is then fetched with `huggingface_hub.snapshot_download`.

The constructor fails early: it checks the path, the files and the columns (from
the parquet schemas) before anything is read. The files are then read with HF
`datasets` (`load_dataset("parquet", data_files=...)`, local files only, no hub
call: the first read of a file writes its memory-mapped arrow copy into the HF
datasets cache); the small text columns are read up front, and each image is
decoded, by the `datasets.Image` feature's own decoder, when its sample is asked for.

Prompts, splits and paths are declared in conf/dataset/<name>.yaml (the single
source of truth for defaults); the classes only format.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any, Iterator, Sequence
from abc import ABC, abstractmethod

import pyarrow.parquet as pq
from PIL import Image

from sparsevlm_exp.contracts import Metric, Sample
from sparsevlm_exp.data.video import load_video
from sparsevlm_exp.errors import ConfigError
from sparsevlm_exp.metrics.answers import (
    LETTERS,
    MME_COGNITION,
    ExactMatch,
    GQAAccuracy,
    MMEMetric,
    MultipleChoice,
    PopeMetric,
    VQAAccuracy,
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# --------------------------------------------------------------------------- #
# Locating the data
# --------------------------------------------------------------------------- #

def _looks_like_hub_id(path: str) -> bool:
    return bool(_HUB_ID.match(path)) and not path.startswith((".", "~"))


def resolve_root(path: str | os.PathLike | None, hub_id: str, patterns: Sequence[str]) -> str:
    """The local directory holding the dataset: `path` itself, or a snapshot of
    the hub repository `path` names (only the files matching `patterns`)."""
    if path is None or str(path).strip() == "":
        raise ConfigError(f"dataset.path={path!r} is not set: expected a local copy of {hub_id} "
                          f"or the hub id {hub_id!r}")
    path = os.path.expanduser(str(path))
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ConfigError(f"dataset.path={path!r} is a file: expected a directory holding a copy of {hub_id}")
    if not _looks_like_hub_id(path):
        raise ConfigError(f"dataset.path={path!r} does not exist: expected a local directory with "
                          f"a copy of {hub_id} ({', '.join(patterns)})")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(repo_id=path, repo_type="dataset", allow_patterns=list(patterns))
    except Exception as exc:  # offline, gated, unknown repo: one line, with the way out
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(f"dataset.path={path!r}: could not download this dataset from the "
                          f"Hugging Face hub ({type(exc).__name__}: {reason[:120]}); download it "
                          f"where there is a network and set dataset.path=/local/dir") from None


def find_parquet(root: str, patterns: Sequence[str], hub_id: str, split: str) -> list[str]:
    """The parquet files of the first pattern (relative to root) that matches any."""
    for pattern in patterns:
        files = sorted(glob.glob(os.path.join(root, pattern)))
        if files:
            return files
    raise ConfigError(f"dataset.path={root!r} has no parquet files for dataset.split={split!r}: "
                      f"expected {' or '.join(patterns)} (the {hub_id} layout)")


def check_columns(files: Sequence[str], required: Sequence[str], hub_id: str) -> None:
    for file in files:
        names = set(pq.read_schema(file).names)
        missing = [c for c in required if c not in names]
        if missing:
            raise ConfigError(f"dataset.path: {file!r} lacks the columns {missing}: expected "
                              f"the {hub_id} columns {list(required)}")


def image_value(cell: Any, root: str) -> dict:
    """A parquet image cell as the {'bytes', 'path'} value of the Hugging Face Image
    feature: the feature's own struct, raw bytes, or a path. A path without bytes is
    made absolute against `root` (the old loaders' rule: image paths are relative to the
    dataset directory); a remote path (scheme://...) is refused, so that decoding never
    reaches for the network.
    Raises ValueError for an empty cell or a remote path."""
    if isinstance(cell, Mapping):
        data, path = cell.get("bytes"), cell.get("path")
    elif isinstance(cell, (bytes, bytearray, memoryview)):
        data, path = bytes(cell), None
    else:
        data, path = None, None if cell is None else str(cell)
    if data:
        return {"bytes": bytes(data), "path": None}
    if not path:
        raise ValueError("empty image cell")
    if "://" in path:
        raise ValueError(f"image path {path!r} is remote: only local files are read")
    return {"bytes": None, "path": os.path.join(root, path)}


def decode_image(cell: Any, root: str) -> Image.Image:
    """A PIL RGB image from a parquet image cell (see image_value), decoded by
    `datasets.Image().decode_example`, i.e. exactly as HF datasets and so lmms-eval decode
    it (including its EXIF orientation transpose), then converted to RGB."""
    from datasets import Image as ImageFeature

    return ImageFeature(decode=True).decode_example(image_value(cell, root)).convert("RGB")


def _is_missing(value: Any) -> bool:
    """pandas writes a missing hint as None, NaN or the string 'nan'."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip() in ("", "nan")


def load_parquet(files: Sequence[str]):
    """The rows of local parquet files as one HF `datasets.Dataset`, offline.

    `load_dataset("parquet", data_files=...)` with local files only: the packaged
    parquet builder reads them and writes a memory-mapped arrow copy under the HF
    datasets cache (HF_DATASETS_CACHE, ~/.cache/huggingface/datasets by default; a file
    changed on disk gets a new copy), so rows are then read lazily from disk. No hub
    call is made (tests/test_benchmarks.py runs it with sockets refused).
    Raises ConfigError (one line) when the files cannot be read as one table (e.g.
    files whose schemas differ)."""
    import datasets
    from datasets.utils import logging as datasets_logging

    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()        # one bar per load would flood the run log
    verbosity = datasets_logging.get_verbosity()
    datasets_logging.set_verbosity_error()
    try:
        return datasets.load_dataset("parquet", data_files={"rows": [os.path.abspath(f) for f in files]},
                                     split="rows")
    except Exception as exc:   # noqa: BLE001 - a data problem becomes one line naming the files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(f"dataset.path: could not read {files[0]!r} (+{len(files) - 1} more files) with "
                          f"HF datasets ({type(exc).__name__}: {reason[:160]})") from None
    finally:
        datasets_logging.set_verbosity(verbosity)
        if bars_were_on:
            datasets.enable_progress_bars()


class ParquetRows:
    """Random access to rows of a list of parquet files, read with HF `datasets`:
    the text columns eagerly (as Python values), images lazily, one raw cell at a time.

    rows: the `text_columns` present in the files, one dict a row, in file order;
    image_cell(i): the undecoded image cell of row i (a {'bytes', 'path'} dict, bytes or
    a path), decoded by decode_image.
    """

    def __init__(self, files: Sequence[str], text_columns: Sequence[str], image_column: str | None):
        self.files = list(files)
        self.image_column = image_column
        dataset = load_parquet(self.files)
        present = [c for c in text_columns if c in dataset.column_names]
        self.rows: list[dict] = dataset.select_columns(present).to_list()
        # arrow format: a row comes back as its stored cell, not through the Image feature
        # (whose automatic decoding would skip our root-relative paths and RGB rule)
        self.images = dataset.select_columns([image_column]).with_format("arrow") if image_column else None

    def __len__(self) -> int:
        return len(self.rows)

    def image_cell(self, i: int) -> Any:
        return self.images[i].column(0)[0].as_py()


def _build_metric(metric: Any, default: type) -> Metric:
    """The metric object: given, built from a config mapping with _target_, or the default."""
    if metric is None:
        return default()
    if isinstance(metric, Mapping) and "_target_" in metric:
        from hydra.utils import instantiate
        return instantiate(metric)
    return metric


def format_multiple_choice(question: str, options: Sequence[str], hint: str | None,
                           hint_format: str, prompt: str) -> str:
    """'{hint}{question}\\nA. x\\nB. y{prompt}', the LLaVA / lmms-eval layout."""
    context = hint_format.format(hint=hint) if hint and not _is_missing(hint) else ""
    lines = "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(options))
    return f"{context}{question}\n{lines}{prompt}"


# --------------------------------------------------------------------------- #
# The benchmark classes
# --------------------------------------------------------------------------- #

class ParquetBenchmark(ABC):
    """Shared machinery: locate, check, read text, yield Samples with lazy images.

    Subclasses name their release (`hub_id`), where a split's files live
    (`file_patterns`), the columns they need, and turn a row into a Sample.
    """

    hub_id: str = ""
    required_columns: tuple[str, ...] = ()
    optional_columns: tuple[str, ...] = ()
    image_column: str | None = "image"
    default_metric: type = ExactMatch

    def __init__(self, path: str, split: str, prompt: str, metric: Any = None):
        self.split = split
        self.prompt = prompt
        patterns = self.file_patterns(split)
        self.root = resolve_root(path, self.hub_id, patterns)
        files = find_parquet(self.root, patterns, self.hub_id, split)
        required = list(self.required_columns) + ([self.image_column] if self.image_column else [])
        check_columns(files, required, self.hub_id)
        self.table = ParquetRows(files, list(self.required_columns) + list(self.optional_columns),
                                 self.image_column)
        self.indices = self.select_rows(self.table.rows)
        self.metric = _build_metric(metric, self.default_metric)

    # -- what subclasses declare ------------------------------------------------
    def file_patterns(self, split: str) -> list[str]:
        return [f"data/{split}-*.parquet", f"{split}-*.parquet", f"{split}.parquet"]

    def select_rows(self, rows: list[dict]) -> list[int]:
        return list(range(len(rows)))

    @abstractmethod
    def make_sample(self, i: int, row: dict) -> Sample:
        """Row i of the table (its text columns in `row`) as a Sample; images via images_of(i)."""

    # -- the dataset protocol ---------------------------------------------------
    def __len__(self) -> int:
        return len(self.indices)

    def images_of(self, i: int) -> list[Image.Image]:
        if not self.image_column:
            return []
        cell = self.table.image_cell(i)
        return [] if cell is None else [decode_image(cell, self.root)]

    def __getitem__(self, index: int) -> Sample:
        i = self.indices[index]
        return self.make_sample(i, self.table.rows[i])

    def __iter__(self) -> Iterator[Sample]:
        for index in range(len(self)):
            yield self[index]


class TextVQA(ParquetBenchmark):
    """TextVQA in the lmms-lab/textvqa layout: data/{split}-*.parquet (splits
    train / validation / test), columns question_id, question, answers (the 10
    human answers), image_id, image, ocr_tokens (confirmed from the release's
    dataset card). Scored with VQA accuracy.

    ocr_tokens=True adds the line "Reference OCR token: a, b, c" after the
    question, as LLaVA's TextVQA evaluation file does.
    """

    hub_id = "lmms-lab/textvqa"
    required_columns = ("question_id", "question", "answers")
    optional_columns = ("image_id", "ocr_tokens")
    default_metric = VQAAccuracy

    def __init__(self, path: str = "lmms-lab/textvqa", split: str = "validation",
                 prompt: str = "\nAnswer the question using a single word or phrase.",
                 ocr_tokens: bool = False, metric: Any = None):
        self.ocr_tokens = ocr_tokens
        super().__init__(path, split, prompt, metric)

    def make_sample(self, i, row):
        question = row["question"].strip()
        question = question[:1].upper() + question[1:]
        if self.ocr_tokens and row.get("ocr_tokens"):
            question += "\nReference OCR token: " + ", ".join(row["ocr_tokens"])
        return Sample(id=str(row["question_id"]), question=question + self.prompt, images=self.images_of(i),
                      answers=[str(a) for a in (row["answers"] or [])],
                      meta={"image_id": row.get("image_id")})


class GQA(ParquetBenchmark):
    """GQA in the lmms-lab/GQA layout: questions in
    {split}_{subset}_instructions/{split}-*.parquet (columns id, imageId,
    question, answer, fullAnswer, types, ...) and images in
    {split}_{subset}_images/{split}-*.parquet (columns id, image), joined on
    imageId = id (confirmed from the release's dataset card and lmms-eval's GQA
    task). Default: testdev, balanced. Scored with GQAAccuracy (GQA's exact match,
    the same metric conf/dataset/gqa.yaml names).
    """

    hub_id = "lmms-lab/GQA"
    default_metric = GQAAccuracy
    required_columns = ("id", "imageId", "question", "answer")
    optional_columns = ("fullAnswer", "types")
    image_column = None      # images live in a second table, see images_of

    def __init__(self, path: str = "lmms-lab/GQA", split: str = "testdev", subset: str = "balanced",
                 prompt: str = "\nAnswer the question using a single word or phrase.",
                 metric: Any = None):
        self.subset = subset
        super().__init__(path, split, prompt, metric)
        image_patterns = self.image_patterns(split)
        image_files = find_parquet(self.root, image_patterns, self.hub_id, split)
        check_columns(image_files, ["id", "image"], self.hub_id)
        self.image_table = ParquetRows(image_files, ["id"], "image")
        self.image_row = {str(r["id"]): k for k, r in enumerate(self.image_table.rows)}
        missing = {str(r["imageId"]) for r in self.table.rows} - set(self.image_row)
        if missing:
            raise ConfigError(f"dataset.path={self.root!r}: {len(missing)} images named by the questions "
                              f"are not in {image_patterns[0]} (e.g. {sorted(missing)[0]!r})")

    def file_patterns(self, split):
        folder = f"{split}_{self.subset}_instructions"
        return [f"{folder}/{split}-*.parquet", f"{folder}/*.parquet"]

    def image_patterns(self, split):
        folder = f"{split}_{self.subset}_images"
        return [f"{folder}/{split}-*.parquet", f"{folder}/*.parquet"]

    def images_of(self, i):
        k = self.image_row[str(self.table.rows[i]["imageId"])]
        return [decode_image(self.image_table.image_cell(k), self.root)]

    def make_sample(self, i, row):
        types = row.get("types") or {}
        return Sample(id=str(row["id"]), question=row["question"].strip() + self.prompt,
                      images=self.images_of(i),
                      answers=[str(row["answer"])],
                      meta={"image_id": row["imageId"], "full_answer": row.get("fullAnswer"),
                            "structural": types.get("structural"), "semantic": types.get("semantic")})


class POPE(ParquetBenchmark):
    """POPE in the lmms-lab/POPE layout: data/{split}-*.parquet (one split,
    'test', 9000 questions: 3000 each of the adversarial / popular / random
    sampling), columns id, question_id, question, answer ('yes'/'no'),
    image_source, image, category (confirmed from the release's dataset card).
    `categories` keeps only those sampling categories (None: all three).
    """

    hub_id = "lmms-lab/POPE"
    required_columns = ("question_id", "question", "answer", "category")
    optional_columns = ("id", "image_source")
    default_metric = PopeMetric

    def __init__(self, path: str = "lmms-lab/POPE", split: str = "test",
                 categories: Sequence[str] | None = None,
                 prompt: str = "\nAnswer the question using a single word or phrase.",
                 metric: Any = None):
        self.categories = None if categories is None else [str(c) for c in categories]
        super().__init__(path, split, prompt, metric)
        if self.categories is not None and not self.indices:
            found = sorted({str(r["category"]) for r in self.table.rows})
            raise ConfigError(f"dataset.categories={self.categories!r} selects no question: "
                              f"the data has {found}")

    def select_rows(self, rows):
        if self.categories is None:
            return list(range(len(rows)))
        return [i for i, r in enumerate(rows) if str(r["category"]) in self.categories]

    def make_sample(self, i, row):
        # question_id repeats across the three categories; id (or category + question_id) does not
        sample_id = row.get("id") or f"{row['category']}/{row['question_id']}"
        return Sample(id=str(sample_id), question=row["question"].strip() + self.prompt,
                      images=self.images_of(i),
                      answers=[str(row["answer"]).strip().lower()],
                      meta={"category": row["category"], "question_id": str(row["question_id"]),
                            "image_source": row.get("image_source")})


class MME(ParquetBenchmark):
    """MME in the lmms-lab/MME layout: data/{split}-*.parquet (one split,
    'test', 2374 questions), columns question_id (the image, e.g.
    'artwork/10002.jpg': two questions per image), image, question, answer
    ('Yes'/'No'), category (the 14 subtasks) (confirmed from the release's
    dataset card and lmms-eval's MME task).

    The questions end in " Please answer yes or no."; when `prompt` is not
    empty that sentence (`replace`) is swapped for it, as lmms-eval does. With
    prompt="" the original question is kept.
    """

    hub_id = "lmms-lab/MME"
    required_columns = ("question_id", "question", "answer", "category")
    default_metric = MMEMetric

    def __init__(self, path: str = "lmms-lab/MME", split: str = "test",
                 prompt: str = "\nAnswer the question using a single word or phrase.",
                 replace: str = " Please answer yes or no.", metric: Any = None):
        self.replace = replace
        super().__init__(path, split, prompt, metric)
        # two questions share an image (question_id): number them for unique sample ids
        seen: dict[str, int] = {}
        self.ordinal = []
        for row in self.table.rows:
            qid = str(row["question_id"])
            self.ordinal.append(seen.get(qid, 0))
            seen[qid] = seen.get(qid, 0) + 1

    def make_sample(self, i, row):
        question = row["question"].strip()
        if self.prompt:
            question = question.replace(self.replace, "") + self.prompt
        category = str(row["category"])
        return Sample(id=f"{row['question_id']}#{self.ordinal[i]}", question=question,
                      images=self.images_of(i), answers=[str(row["answer"]).strip().lower()],
                      meta={"category": category, "question_id": str(row["question_id"]),
                            "task": "cognition" if category in MME_COGNITION else "perception"})


class ScienceQA(ParquetBenchmark):
    """ScienceQA (image questions) in the lmms-lab/ScienceQA layout, config
    ScienceQA-IMG: ScienceQA-IMG/{split}-*.parquet (also accepted: the
    lmms-lab/ScienceQA-IMG repository's data/{split}-*.parquet), columns image,
    question, choices (list of option texts), answer (index of the right
    choice), hint, subject, grade, category, ... (confirmed from the release's
    dataset card and lmms-eval's ScienceQA task). Default split: test.
    """

    hub_id = "lmms-lab/ScienceQA"
    required_columns = ("question", "choices", "answer", "hint")
    optional_columns = ("subject", "grade", "category", "topic")
    default_metric = MultipleChoice

    def __init__(self, path: str = "lmms-lab/ScienceQA", split: str = "test",
                 config: str = "ScienceQA-IMG", hint_format: str = "Context: {hint}\n",
                 prompt: str = "\nAnswer with the option's letter from the given choices directly.",
                 metric: Any = None):
        self.config = config
        self.hint_format = hint_format
        super().__init__(path, split, prompt, metric)

    def file_patterns(self, split):
        return [f"{self.config}/{split}-*.parquet", f"data/{split}-*.parquet", f"{split}-*.parquet"]

    def make_sample(self, i, row):
        options = [str(c) for c in row["choices"]]
        question = format_multiple_choice(row["question"].strip(), options, row.get("hint"),
                                          self.hint_format, self.prompt)
        return Sample(id=f"{self.split}-{i}", question=question, images=self.images_of(i),
                      answers=[LETTERS[int(row["answer"])]],
                      meta={"options": options, "subject": row.get("subject"),
                            "grade": row.get("grade"), "category": row.get("category")})


class MMBench(ParquetBenchmark):
    """MMBench in the lmms-lab/MMBench layout, config en: en/{split}-*.parquet
    (splits dev / test; only dev has answers), columns index, question, hint,
    answer (a letter), A, B, C, D (E where present; missing options are None or
    'nan'), category, L2-category, image, source, split (confirmed from the
    release's dataset card and lmms-eval's MMBench task). Default split: dev.

    Scored per row (no CircularEval: the rotated copies of a question are
    separate rows, each counted on its own).
    """

    hub_id = "lmms-lab/MMBench"
    required_columns = ("index", "question", "hint", "answer", "A", "B")
    optional_columns = ("C", "D", "E", "category", "L2-category", "source")
    default_metric = MultipleChoice

    def __init__(self, path: str = "lmms-lab/MMBench", split: str = "dev", config: str = "en",
                 hint_format: str = "{hint}\n",
                 prompt: str = "\nAnswer with the option's letter from the given choices directly.",
                 metric: Any = None):
        self.config = config
        self.hint_format = hint_format
        super().__init__(path, split, prompt, metric)

    def file_patterns(self, split):
        return [f"{self.config}/{split}-*.parquet", f"data/{split}-*.parquet", f"{split}-*.parquet"]

    def make_sample(self, i, row):
        options = []
        for letter in "ABCDE":       # options are consecutive: stop at the first missing one
            if _is_missing(row.get(letter)):
                break
            options.append(str(row[letter]))
        question = format_multiple_choice(row["question"].strip(), options, row.get("hint"),
                                          self.hint_format, self.prompt)
        return Sample(id=str(row["index"]), question=question, images=self.images_of(i),
                      answers=[str(row["answer"]).strip().upper()],
                      meta={"options": options, "category": row.get("category"),
                            "l2_category": row.get("L2-category")})


# --------------------------------------------------------------------------- #
# A folder of the user's own images
# --------------------------------------------------------------------------- #

def _checked_answers(answers, where: str) -> list[str]:
    """The reference answers of one questions.jsonl line: a string or a non-empty list of
    strings (a line without answers would silently score 0)."""
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ConfigError(f"dataset.path: {where} has answers={answers!r}: expected a string or a non-empty "
                          f"list of strings (the reference answers)")
    return answers


class FolderDataset:
    """A directory of images and/or videos plus questions.jsonl, one JSON object a line:
    {"id": "...", "image": "cat.png" (or a list of paths), "question": "...",
     "answers": ["..."]}; or "video": "clip.mp4" (a video file or a directory of frame
    images; or a list of them) instead of, or beside, "image". Paths are relative to the
    directory. Clips are sampled at `video.fps` frames per second (`video.max_frames`,
    `video.min_frames`; a frame directory counts as recorded at `video.frames_fps`),
    see data/video.py; they come before the images in the prompt.
    """

    def __init__(self, path: str | None = None, questions_file: str = "questions.jsonl",
                 prompt: str = "\nAnswer the question using a single word or phrase.",
                 metric: Any = None, video: Mapping | None = None):
        if path is None or str(path).strip() == "":
            raise ConfigError(f"dataset.path={path!r} is not set: expected a directory with "
                              f"images and {questions_file}")
        self.root = os.path.expanduser(str(path))
        if not os.path.isdir(self.root):
            raise ConfigError(f"dataset.path={self.root!r} does not exist: expected a directory "
                              f"with images and {questions_file}")
        questions = os.path.join(self.root, questions_file)
        if not os.path.isfile(questions):
            raise ConfigError(f"dataset.path={self.root!r} has no {questions_file}: expected one JSON "
                              f'object a line, {{"id", "image" or "video", "question", "answers"}}')
        self.prompt = prompt
        self.video = checked_video_options(video)
        self.records = self._read(questions)
        self.metric = _build_metric(metric, ExactMatch)

    def _read(self, questions: str) -> list[dict]:
        """The records of questions.jsonl, each checked; a bad line is one ConfigError
        naming file:line (an empty file, a missing or null question, answers that are
        missing or not strings, an image or video that is not there, an id used twice)."""
        records, first_line_of = [], {}
        with open(questions, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{questions}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"dataset.path: {where} is not valid JSON ({exc.msg})") from None
                if not isinstance(record, dict) or "question" not in record or \
                        ("image" not in record and "video" not in record):
                    raise ConfigError(f"dataset.path: {where} needs the keys 'question' and 'image' or 'video'")
                if not isinstance(record["question"], str) or not record["question"].strip():
                    raise ConfigError(f"dataset.path: {where} has question={record['question']!r}: "
                                      f"expected a non-empty string")
                media = {}
                for key in ("image", "video"):
                    names = record.get(key, [])
                    names = names if isinstance(names, list) else [names]
                    for name in names:
                        full = os.path.join(self.root, str(name))
                        there = os.path.isfile(full) or (key == "video" and os.path.isdir(full))
                        if not there:
                            raise ConfigError(f"dataset.path: {where} names the {key} {name!r}, "
                                              f"which is not in {self.root!r}")
                    media[key] = [str(n) for n in names]
                record["answers"] = _checked_answers(record.get("answers"), where)
                record["images"], record["videos"] = media["image"], media["video"]
                record["id"] = str(record.get("id", number))
                if record["id"] in first_line_of:
                    # ids name result records and picture files: two samples must not share one
                    raise ConfigError(f"dataset.path: {where} repeats the id {record['id']!r} of line "
                                      f"{first_line_of[record['id']]}: every id must be unique")
                first_line_of[record["id"]] = number
                records.append(record)
        if not records:
            raise ConfigError(f"dataset.path: {questions} holds no questions: expected one JSON object a line, "
                              f'{{"id", "image" or "video", "question", "answers"}}')
        return records

    def __len__(self) -> int:
        return len(self.records)

    def sample_id(self, index: int) -> str:
        """The id of sample `index` without decoding its images (names a failed sample's record)."""
        return self.records[index]["id"]

    def __getitem__(self, index: int) -> Sample:
        record = self.records[index]
        images = [decode_image(name, self.root) for name in record["images"]]
        videos = [load_video(os.path.join(self.root, name), **self.video) for name in record["videos"]]
        meta = {k: v for k, v in record.items()
                if k not in ("id", "image", "images", "video", "videos", "question", "answers")}
        return Sample(id=record["id"], question=str(record["question"]).strip() + self.prompt,
                      images=images, answers=[str(a) for a in record["answers"]], meta=meta, videos=videos)

    def __iter__(self) -> Iterator[Sample]:
        for index in range(len(self)):
            yield self[index]


# --------------------------------------------------------------------------- #
# Video QA: the layout the video-LLM evaluations share
# --------------------------------------------------------------------------- #

VIDEO_OPTIONS = {"fps": (int, float, type(None)), "max_frames": (int,), "min_frames": (int,),
                 "frames_fps": (int, float)}
VIDEO_SUFFIXES = ("", ".mp4", ".avi", ".mkv", ".webm", ".mov", ".gif")


def checked_video_options(video: Mapping | None) -> dict:
    """dataset.video as load_video's keyword arguments, each checked (one ConfigError line
    naming the key, the value and what is allowed)."""
    options = dict(video or {})
    for key, value in options.items():
        if key not in VIDEO_OPTIONS:
            raise ConfigError(f"dataset.video.{key} is not an option: allowed {', '.join(VIDEO_OPTIONS)}")
        if isinstance(value, bool) or not isinstance(value, VIDEO_OPTIONS[key]):
            raise ConfigError(f"dataset.video.{key}={value!r} is not allowed: expected a number")
        if value is not None and value <= 0:
            raise ConfigError(f"dataset.video.{key}={value!r} is not allowed: expected a positive number")
    return options


class VideoQA:
    """Open-ended video QA in the layout of the Video-LLaVA / Video-ChatGPT zero-shot QA
    evaluation (the one SparseVLM's video numbers follow): a directory holding

        test_q.json   [{"video_name": "vid1", "question": "...", "question_id": "q1"}, ...]
        test_a.json   [{"answer": "...", "question_id": "q1", ...}, ...]
        videos/       vid1.mp4 (or .avi, .mkv, .webm, .mov, .gif, or a directory of frames)

    as published for MSVD-QA (MSVD_Zero_Shot_QA), MSRVTT-QA, TGIF-QA and ActivityNet-QA.
    Scored by exact match after VQA normalisation (metric in conf/dataset/msvd_qa.yaml):
    the papers score these sets with a GPT judge, which is not available offline, so
    our accuracies are exact-match accuracies and read lower than the papers'.
    """

    def __init__(self, path: str | None = None, questions_file: str = "test_q.json",
                 answers_file: str = "test_a.json", video_dir: str = "videos", prompt: str = "",
                 metric: Any = None, video: Mapping | None = None):
        if path is None or str(path).strip() == "":
            raise ConfigError(f"dataset.path={path!r} is not set: expected a directory with {questions_file}, "
                              f"{answers_file} and {video_dir}/")
        self.root = os.path.expanduser(str(path))
        files = {name: os.path.join(self.root, name) for name in (questions_file, answers_file)}
        for name, full in files.items():
            if not os.path.isfile(full):
                raise ConfigError(f"dataset.path={self.root!r} has no {name}: expected the zero-shot QA layout "
                                  f"({questions_file}, {answers_file}, {video_dir}/)")
        self.video_dir = os.path.join(self.root, video_dir)
        if not os.path.isdir(self.video_dir):
            raise ConfigError(f"dataset.path={self.root!r} has no {video_dir}/ directory of videos")
        self.prompt = prompt
        self.video = checked_video_options(video)
        questions = json.load(open(files[questions_file], encoding="utf-8"))
        answers = {str(a["question_id"]): a for a in json.load(open(files[answers_file], encoding="utf-8"))}
        self.records = []
        for q in questions:
            qid = str(q.get("question_id"))
            if qid not in answers:
                raise ConfigError(f"dataset.path: {answers_file} has no answer for question_id {qid!r}")
            self.records.append({"id": qid, "video": str(q["video_name"]), "question": str(q["question"]),
                                 "answers": [str(answers[qid]["answer"])],
                                 "meta": {k: v for k, v in answers[qid].items() if k not in ("answer", "question_id")}})
        self.metric = _build_metric(metric, ExactMatch)

    def video_path(self, name: str) -> str:
        """The file (or frame directory) of a video name, trying the usual suffixes."""
        for suffix in VIDEO_SUFFIXES:
            candidate = os.path.join(self.video_dir, name + suffix)
            if os.path.exists(candidate):
                return candidate
        raise ConfigError(f"dataset.path: no video named {name!r} in {self.video_dir!r} "
                          f"(tried {', '.join(s or '(no suffix)' for s in VIDEO_SUFFIXES)})")

    def __len__(self) -> int:
        return len(self.records)

    def sample_id(self, index: int) -> str:
        return self.records[index]["id"]

    def __getitem__(self, index: int) -> Sample:
        record = self.records[index]
        video = load_video(self.video_path(record["video"]), **self.video)
        return Sample(id=record["id"], question=record["question"].strip() + self.prompt, images=[],
                      answers=record["answers"], meta=dict(record["meta"], video=record["video"]), videos=[video])

    def __iter__(self) -> Iterator[Sample]:
        for index in range(len(self)):
            yield self[index]
