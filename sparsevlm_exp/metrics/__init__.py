"""Metrics: answer metrics (answers.py) and, beside them, efficiency metrics
(efficiency.py: timers, memory, FLOPs), each in its own module."""
from sparsevlm_exp.metrics.answers import ExactMatch, exact_match, normalize_answer

__all__ = ["ExactMatch", "exact_match", "normalize_answer"]
