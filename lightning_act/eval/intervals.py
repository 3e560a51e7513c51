"""Seed-level summaries for the results tables: a mean with its Student-t confidence interval."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from scipy import stats


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)`` with ``mean ± t_{n−1, (1+confidence)/2} · sd / √n``; NaN bounds for one value, and all
    three NaN when a value is NaN or infinite.

    Applied to per-seed paired differences it is the paired t interval: seeds are the independent
    replicates, the pixels or images within a seed are not.
    """
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_interval needs at least one value; pass the per-seed results")
    if not 0.0 < confidence < 1.0:  # 95 would give NaN bounds, printed as a one-seed mean
        raise ValueError(f"mean_interval: confidence={confidence!r} must be in (0, 1); pass e.g. 0.95")
    if not all(map(math.isfinite, values)):  # a seed without a result: no mean of the others would be honest
        return math.nan, math.nan, math.nan
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def format_interval(interval: tuple[float, float, float], digits: int = 3, signed: bool = False, scale: float = 1.0) -> str:
    """``"mean [low, high]"`` (just the mean when the bounds are NaN), each value times ``scale``."""
    sign = "+" if signed else ""
    mean, low, high = (scale * v + 0.0 for v in interval)  # + 0.0 turns -0.0 into 0.0
    if math.isnan(low):
        return f"{mean:{sign}.{digits}f}"
    return f"{mean:{sign}.{digits}f} [{low:{sign}.{digits}f}, {high:{sign}.{digits}f}]"
