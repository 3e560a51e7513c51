"""Sufficient statistics of an activation tensor (pure tensor functions, no Lightning).

Following torchtitan's tensor logging, a tensor is summarised by sums and maxima that add up
across micro-batches and data-parallel ranks (counts, sums, sums of squares, an absolute
maximum); means, standard deviations and fractions are derived only when logging. Non-finite
entries are counted (``nonfinite``) and left out of every other statistic, so one NaN does not
blank a whole layer's numbers.
"""

from __future__ import annotations

import torch

MOMENT_SUMS = ("count", "nonfinite", "zeros", "sum", "sq_sum", "abs_sum")
MOMENT_MAXIMA = ("abs_max",)


def moment_partials(x: torch.Tensor, zero_threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(sums, maxima)`` as float64 vectors laid out as ``MOMENT_SUMS`` / ``MOMENT_MAXIMA``.

    ``zeros`` counts finite entries with ``|x| <= zero_threshold``. Low-precision inputs (bf16,
    fp16) are upcast to float32 once; sums accumulate in float64 so counts stay exact.
    """
    x = x.float()
    finite = torch.isfinite(x)
    clean = torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device))
    magnitude = clean.abs()
    count = torch.full((), x.numel(), dtype=torch.float64, device=x.device)
    sums = torch.stack(
        [
            count,
            count - finite.sum(dtype=torch.float64),
            ((magnitude <= zero_threshold) & finite).sum(dtype=torch.float64),
            clean.sum(dtype=torch.float64),
            clean.square().sum(dtype=torch.float64),
            magnitude.sum(dtype=torch.float64),
        ]
    )
    abs_max = magnitude.amax().to(torch.float64) if x.numel() else torch.zeros((), dtype=torch.float64, device=x.device)
    return sums, abs_max.reshape(1)


def summarize_moments(sums: torch.Tensor, maxima: torch.Tensor) -> dict[str, torch.Tensor]:
    """Derive count, mean, std, rms, abs_mean, abs_max, zero_frac and nonfinite from reduced partials."""
    count, nonfinite, zeros, total, sq_total, abs_total = sums.unbind()
    finite = (count - nonfinite).clamp_min(1.0)
    mean = total / finite
    return {
        "count": count,
        "mean": mean,
        "std": (sq_total / finite - mean.square()).clamp_min(0.0).sqrt(),
        "rms": (sq_total / finite).sqrt(),
        "abs_mean": abs_total / finite,
        "abs_max": maxima[0],
        "zero_frac": zeros / count.clamp_min(1.0),
        "nonfinite": nonfinite,
    }
