"""What a dataset hands the runner: samples, and the metric that scores them.

The types live in contracts.py (the bottom layer, so that metrics/ need not import
data/); this module re-exports them for code written against the old path.
A benchmark is data + prompt + metric, declared in its yaml (conf/dataset/*.yaml),
not a new code path. Every dataset class yields `Sample`s and names its metric.
"""
from ..contracts import Box, Metric, Sample, VQADataset

__all__ = ["Box", "Metric", "Sample", "VQADataset"]
