"""Scorers: one file per family. A new scorer is one class here and one yaml in conf/scorer/."""
from .base import Scorer
from .cdpruner import CDPrunerScorer, conditional_dpp_map, conditional_kernel, dpp_greedy_map
from .dart import DARTScorer, dart_select
from .divprune import DivPruneScorer, max_min_diverse
from .fastv import FastVScorer
from .pdrop import PDropScorer
from .simple import RandomScorer, UniformScorer
from .sparsevlm import V15Scorer, V2Scorer, rater_visual_attention, rope_gravity, select_raters
from .vision import VisionAttentionScorer
from .vispruner import VisPrunerScorer, deduplicate, vispruner_select
from .visionzip import VisionZipScorer, visionzip_select

__all__ = ["Scorer", "V15Scorer", "V2Scorer", "FastVScorer", "RandomScorer", "UniformScorer",
           "VisionAttentionScorer", "DivPruneScorer", "DARTScorer", "VisionZipScorer", "PDropScorer", "CDPrunerScorer", "VisPrunerScorer", "deduplicate", "vispruner_select", "conditional_kernel", "conditional_dpp_map", "dpp_greedy_map", "visionzip_select", "dart_select", "max_min_diverse", "rater_visual_attention", "rope_gravity", "select_raters"]
