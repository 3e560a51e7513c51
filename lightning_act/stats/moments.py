"""Sufficient statistics of an activation tensor (pure tensor functions, no Lightning).

Following torchtitan's tensor logging, a tensor is summarised by sums and maxima that add up
across micro-batches and data-parallel ranks (counts, sums, sums of squares, an absolute
maximum); means, standard deviations and fractions are derived only when logging. Non-finite
entries are counted (``nonfinite``) and left out of every other statistic, so one NaN does not
blank a whole layer's numbers.
"""

from __future__ import annotations

import numpy as np
import torch

MOMENT_SUMS = ("count", "nonfinite", "zeros", "sum", "sq_sum", "abs_sum")
MOMENT_MAXIMA = ("abs_max",)

#: ``std`` comes from ``Σx²/n − mean²``, float64 sums of ``x`` and of exact squares (every path since round 17;
#: float32 squares, rounded alike for repeated values, were percents off from ``|mean| = 300 std``): their
#: rounding, ~1e-15 of ``Σx²/n`` for a summation tree of depth ~log2(n), would dominate a variance below this
#: fraction of ``Σx²/n`` (``|mean| > ~1e5 std``), where ``std`` is NaN (unknown), not a number off by percents.
STD_RESOLUTION = 1e-10


def comparable_threshold(t: float, dtype: torch.dtype) -> float:
    """The largest value of ``dtype``'s compute precision (float32, or float64 for float64) that is <= ``t``.

    For an entry ``v`` of that precision, ``v <= comparable_threshold(t)`` exactly when ``v <= t`` as reals.
    """
    if dtype == torch.float64:
        return float(t)
    rounded = np.float32(t)
    if float(rounded) > t:
        rounded = np.nextafter(rounded, np.float32(-np.inf))
    return float(rounded)


def moment_partials(x: torch.Tensor, zero_threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(sums, maxima)`` as float64 vectors laid out as ``MOMENT_SUMS`` / ``MOMENT_MAXIMA``.

    ``zeros`` counts finite entries with ``|x| <= zero_threshold`` (as real numbers). Low-precision inputs (bf16,
    fp16) are upcast to float32 once, float64 ones kept; sums accumulate in float64 so counts stay exact.
    """
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    finite = torch.isfinite(x)
    clean = torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device))
    magnitude = clean.abs()
    count = torch.full((), x.numel(), dtype=torch.float64, device=x.device)
    sums = torch.stack(
        [
            count,
            count - finite.sum(dtype=torch.float64),
            ((magnitude <= comparable_threshold(zero_threshold, x.dtype)) & finite).sum(dtype=torch.float64),
            clean.sum(dtype=torch.float64),
            clean.to(torch.float64).square().sum(),
            magnitude.sum(dtype=torch.float64),
        ]
    )
    abs_max = magnitude.amax().to(torch.float64) if x.numel() else torch.zeros((), dtype=torch.float64, device=x.device)
    return sums, abs_max.reshape(1)


def summarize_moments(sums: torch.Tensor, maxima: torch.Tensor) -> dict[str, torch.Tensor]:
    """Derive count, mean, std, rms, abs_mean, abs_max, zero_frac and nonfinite from reduced partials.

    The moments of a tensor without a finite entry are NaN (unknown; they read 0 before round 15), and so is a
    ``std`` below the sums' resolution (:data:`STD_RESOLUTION`), unless every entry is the same (``std`` 0)."""
    count, nonfinite, zeros, total, sq_total, abs_total = sums.unbind()
    finite = count - nonfinite
    entries = finite.clamp_min(1.0)
    unknown = torch.full_like(total, float("nan"))
    mean_square, mean = sq_total / entries, total / entries
    variance = mean_square - mean.square()
    resolved = (variance >= STD_RESOLUTION * mean_square) & torch.isfinite(mean_square)
    constant = maxima[0] == mean.abs()  # |mean| = max|x| only when every entry is the same: std 0, whatever its size
    std = torch.where(constant, torch.zeros_like(mean), torch.where(resolved, variance.clamp_min(0.0).sqrt(), unknown))
    rms = torch.where(torch.isfinite(mean_square), mean_square.sqrt(), unknown)
    moments = {"mean": mean, "std": std, "rms": rms, "abs_mean": abs_total / entries, "abs_max": maxima[0]}
    moments = {name: torch.where(finite > 0, value, unknown) for name, value in moments.items()}
    return {"count": count, **moments, "zero_frac": zeros / count.clamp_min(1.0), "nonfinite": nonfinite}
