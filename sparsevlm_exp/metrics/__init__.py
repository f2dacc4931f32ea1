"""Metrics: answer metrics (answers.py) and, beside them, efficiency metrics
(efficiency.py: timers, memory, FLOPs), each in its own module."""
from sparsevlm_exp.metrics.answers import (
    ExactMatch,
    GQAAccuracy,
    MMEMetric,
    MultipleChoice,
    PopeMetric,
    VQAAccuracy,
    exact_match,
    extract_choice,
    gqa_exact_match,
    mme_score,
    mme_yes_no,
    normalize_answer,
    pope_metrics,
    pope_yes_no,
    vqa_accuracy,
)

__all__ = [
    "ExactMatch", "GQAAccuracy", "MMEMetric", "MultipleChoice", "PopeMetric", "VQAAccuracy",
    "exact_match", "extract_choice", "gqa_exact_match", "mme_score", "mme_yes_no",
    "normalize_answer", "pope_metrics", "pope_yes_no", "vqa_accuracy",
]
