"""The per-sample record: one dataclass written by the runner, stored by tracking
(samples.jsonl, the W&B table) and summarised for results.json and the report.

Field names are spelled here only; other modules use attributes (record.score) or
SampleRecord field lists, never string keys of their own.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class SampleRecord:
    index: int                                   # dataset index (resume skips finished indices)
    id: str                                      # the dataset's own sample id
    question: str | None = None
    answers: list[str] | None = None
    prediction: str | None = None
    score: float | None = None                   # the metric's per-sample score in [0, 1]
    meta: dict[str, Any] = field(default_factory=dict)     # question type, category, ...
    n_visual: int | None = None                  # visual tokens before pruning
    prune_layers: list[int] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)          # visual tokens selected at each pruning layer
    recycled: list[int] = field(default_factory=list)      # merged tokens added at each pruning layer
    layer_counts: list[int] = field(default_factory=list)  # visual tokens alive after each decoder layer
    equivalent_tokens: float | None = None       # mean of layer_counts (the paper's "192")
    prefill_flops: float | None = None           # analytic, exact for GQA (metrics.efficiency.prefill_flops_of)
    prefill_flops_paper: float | None = None     # the paper's formula (K/V full width), for its tables
    vision_ms: float | None = None
    prefill_ms: float | None = None
    decode_ms_per_token: float | None = None
    new_tokens: int | None = None
    # >1: the sample was answered in a batch of this size (its answer and kept tokens are
    # batch 1's); vision_ms / prefill_ms / decode_ms_per_token are then its SHARE of the
    # batch's times (batch time / batch size), not a time of its own.
    batch_size: int | None = None
    evidence_tokens: int | None = None           # visual tokens inside the evidence boxes
    evidence_recall: list[float | None] | None = None      # per pruning layer
    pictures: dict[str, str] | None = None       # W&B key -> PNG path
    error: str | None = None                     # "Type: message" of a failed sample
    traceback: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def alive_kept(self) -> int | None:
        """Visual tokens alive after the last cut: kept plus recycled (merged) ones."""
        if not self.kept:
            return None
        return self.kept[-1] + (self.recycled[-1] if self.recycled else 0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SampleRecord":
        """From a samples.jsonl line; unknown keys (a newer writer) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# The columns of the per-sample W&B table (tracking.py).
TABLE_COLUMNS = ("id", "question", "prediction", "answers", "score", "n_visual", "kept", "recycled",
                 "evidence_recall", "error")
# Per-sample timings (milliseconds) summarised as mean, median and p90.
LATENCY_FIELDS = ("vision_ms", "prefill_ms", "decode_ms_per_token")
