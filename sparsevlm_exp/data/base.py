"""What a dataset hands the runner: samples, and the metric that scores them.

A benchmark is data + prompt + metric, declared in its yaml (conf/dataset/*.yaml),
not a new code path. Every dataset class yields `Sample`s and names its metric.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol, Sequence

from PIL import Image

# A box in pixel coordinates of the sample's image: (x0, y0, x1, y1), x1/y1 exclusive.
Box = tuple[int, int, int, int]


@dataclass
class Sample:
    id: str
    question: str                      # the full user text, prompt suffix included
    images: list[Image.Image]          # zero, one or several images, in prompt order
    answers: list[str]                 # reference answers (VQA: the 10 human answers)
    # Boxes of the image regions the answer depends on, per image (shapes dataset);
    # None where the dataset has no evidence annotation.
    evidence: list[list[Box]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)   # question type, category, ...


class Metric(Protocol):
    name: str

    def score(self, prediction: str, sample: Sample) -> float:
        """Per-sample score in [0, 1] (written to samples.jsonl)."""

    def summarize(self, records: Sequence[dict]) -> dict[str, float]:
        """Dataset-level numbers from the per-sample records (each has 'prediction',
        'answers', 'score', 'meta'). Must contain 'accuracy' (POPE adds F1, MME its score...)."""


class VQADataset(Protocol):
    """Indexable, and cheap to construct: images are decoded in __getitem__, so a
    corrupt image fails that one sample (recorded, the run goes on) and resuming
    skips finished samples by index without decoding them."""

    metric: Metric

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...

    def __iter__(self) -> Iterator[Sample]: ...
