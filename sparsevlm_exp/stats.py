"""Small statistics for results: latency spread and accuracy uncertainty."""
from __future__ import annotations

import math
import statistics
from typing import Sequence


def spread(values: Sequence[float]) -> dict[str, float | None]:
    """{"mean", "median", "p90"} of values (None when empty). A few slow samples (a cold
    cache, a busy machine) move the mean far from what a typical sample costs, so the
    median and the 90th percentile are reported beside it. p90: linear interpolation
    between order statistics (statistics.quantiles, method="inclusive")."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return {"mean": None, "median": None, "p90": None}
    p90 = values[0] if len(values) == 1 else statistics.quantiles(values, n=10, method="inclusive")[8]
    return {"mean": statistics.fmean(values), "median": statistics.median(values), "p90": p90}


def wilson_interval(accuracy: float | None, n: int, z: float = 1.959964) -> list[float] | None:
    """95% Wilson score interval [low, high] for a proportion `accuracy` observed on n
    samples (E. B. Wilson, 1927). Exact for 0/1 scores; for fractional per-sample scores
    (VQA accuracy) it treats the mean score as the proportion, an approximation.
    None when n == 0 or accuracy is missing."""
    if accuracy is None or n <= 0 or (isinstance(accuracy, float) and math.isnan(accuracy)):
        return None
    p = min(1.0, max(0.0, float(accuracy)))
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [max(0.0, centre - half), min(1.0, centre + half)]
