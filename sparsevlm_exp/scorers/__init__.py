"""Scorers: one file per family. A new scorer is one class here and one yaml in conf/scorer/."""
from .base import Scorer
from .fastv import FastVScorer
from .simple import RandomScorer, UniformScorer
from .sparsevlm import V15Scorer, V2Scorer, rope_gravity, select_raters

__all__ = ["Scorer", "V15Scorer", "V2Scorer", "FastVScorer", "RandomScorer", "UniformScorer",
           "rope_gravity", "select_raters"]
