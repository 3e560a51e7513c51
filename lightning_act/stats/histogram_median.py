"""Medians of ``|x|`` without a sort: a sum-reducible log-magnitude histogram (pure tensor functions).

Bins. A float32 magnitude's bit pattern, read as an integer, is monotone in the magnitude, and its top
``9 + sub_bits`` bits (exponent and the first ``sub_bits`` mantissa bits) name an interval
``[2^e (1 + j 2^-m), 2^e (1 + (j + 1) 2^-m))`` with ``m = sub_bits``: 2^m equal-width bins per octave, so every
bin is at most ``2^-m`` wide relative to its lower edge (1.6% for the default ``m = 6``). The bin index is
one shift of the bits, with no ``log``, which is what lets the fused statistics pass
(:mod:`lightning_act.stats.fused`) fill the histogram for the price of an integer op per entry. A fixed
window of ``size - 4`` such bins starting at ``2^low_exponent`` is kept, plus four special bins:

====================  =============================================================
bin 0                 exact zeros
bin 1                 underflow: ``0 < |x| < 2^low_exponent``
bins 2 .. size - 3    the log-magnitude window
bin size - 2          overflow: finite ``|x|`` above the window
bin size - 1          non-finite (NaN and ``+-inf``, ranked as ``+inf``)
====================  =============================================================

The default window (``low_exponent = -20``, ``sub_bits = 6``, ``size = 2048``) spans ``[2^-20, 2^11.9)``,
about ``[9.5e-7, 3.9e3)``.

Exact across ranks with one SUM. The bin of an entry depends only on its value and the fixed window, the
same on every rank, so adding the per-rank histograms gives exactly the histogram one process would have
built from all the entries; every estimate below is a function of that histogram only.

Estimate. For ``n`` counted entries the median is numpy's (the mean of the order statistics of ranks
``floor((n + 1) / 2)`` and ``floor(n / 2) + 1``). The bin holding rank ``r`` is found from the cumulative
counts; its ``c`` entries are taken as spread evenly over the bin (the ``i``-th at the centre of the ``i``-th
of ``c`` equal sub-intervals, linear interpolation of the empirical CDF), so the estimate stays inside the
bin that holds the true order statistic. Hence the relative error of each order statistic, and of their
mean, is at most the bin's relative width ``2^-m``: **<= 1.56% for m = 6**, with no assumption on the
distribution (smooth distributions come out far better, as the tests show). An order statistic that lands
in the zero bin is 0 exactly, in the non-finite bin ``+inf``; in the underflow or overflow bin its value is
unknown and the estimate is NaN (widen the window), never a made-up number.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_EXPONENT_BIAS = 127
_MANTISSA_BITS = 23
_INF_BITS = 0x7F800000
SPECIAL_BINS = 4


@dataclass(frozen=True)
class LogMagnitudeBins:
    """Layout of a log-magnitude histogram: ``size`` bins, ``2**sub_bits`` per octave from ``2**low_exponent``."""

    sub_bits: int = 6
    low_exponent: int = -20
    size: int = 2048

    def __post_init__(self) -> None:
        if not 0 <= self.sub_bits <= 10:
            raise ValueError(f"sub_bits={self.sub_bits} must be in [0, 10]; 6 gives bins 1.6% wide")
        if self.size < SPECIAL_BINS + 1 or self.size & (self.size - 1):
            raise ValueError(f"size={self.size} must be a power of two >= 8 (the Triton histogram needs one)")
        if self.low_exponent < 1 - _EXPONENT_BIAS or self.top_key > (_INF_BITS >> self.key_shift):
            raise ValueError(
                f"the window 2^{self.low_exponent} .. {self.size - SPECIAL_BINS} bins of 2^-{self.sub_bits} octave "
                "leaves the normal float32 range; raise low_exponent or lower size"
            )

    @property
    def key_shift(self) -> int:
        """Right shift of the float32 bits that leaves the bin key (exponent and ``sub_bits`` mantissa bits)."""
        return _MANTISSA_BITS - self.sub_bits

    @property
    def low_key(self) -> int:
        """Key of ``2**low_exponent``, the lower edge of bin 2."""
        return (_EXPONENT_BIAS + self.low_exponent) << self.sub_bits

    @property
    def top_key(self) -> int:
        """Key one past the last window bin: its lower edge is the overflow threshold."""
        return self.low_key + self.size - SPECIAL_BINS

    @property
    def relative_width(self) -> float:
        """Largest bin width relative to the bin's lower edge: the bound on a median's relative error."""
        return 2.0 ** -self.sub_bits

    def edges(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Lower and upper edges (float64, length ``size``) of every bin, special bins included."""
        keys = np.arange(self.low_key, self.top_key + 1, dtype=np.int64)
        window = (keys << self.key_shift).astype(np.int32).view(np.float32).astype(np.float64)
        inf = np.inf
        lower = np.concatenate([[0.0, 0.0], window[:-1], [window[-1], inf]])
        upper = np.concatenate([[0.0, window[0]], window[1:], [inf, inf]])
        return torch.from_numpy(lower).to(device), torch.from_numpy(upper).to(device)


_edges_cache: dict[tuple[LogMagnitudeBins, str], tuple[torch.Tensor, torch.Tensor]] = {}


def device_edges(bins: LogMagnitudeBins, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`LogMagnitudeBins.edges` on ``device``, copied there once and kept: a host-to-device copy waits for
    the device, and one per estimate would make every estimate a host sync."""
    key = (bins, str(device))
    cached = _edges_cache.get(key)
    if cached is None:
        cached = bins.edges(device)
        if not torch.compiler.is_compiling():
            _edges_cache[key] = cached
    return cached


def log_magnitude_bin(magnitude: torch.Tensor, bins: LogMagnitudeBins) -> torch.Tensor:
    """Bin index (int64) of each float32 ``|x|`` (NaN and inf go to the non-finite bin). A float64 ``|x|`` outside
    float32's range keeps its bin (under- or overflow, not "exact zero" or "non-finite"): a median of 1e-50
    entries read as 0 (ratio inf) where it is unknown, as any median below the window."""
    if magnitude.dtype == torch.float64:
        finite32 = torch.finfo(torch.float32)
        nonzero = magnitude.clamp(finite32.tiny, finite32.max)
        magnitude = torch.where((magnitude == 0) | ~torch.isfinite(magnitude), magnitude, nonzero)
    bits = magnitude.to(torch.float32).view(torch.int32) & 0x7FFFFFFF
    window = ((bits >> bins.key_shift) - bins.low_key + 2).clamp(1, bins.size - 2)
    index = torch.where(bits == 0, torch.zeros_like(window), window)
    return torch.where(bits >= _INF_BITS, torch.full_like(window, bins.size - 1), index).to(torch.int64)


def log_magnitude_histogram(x: torch.Tensor, bins: LogMagnitudeBins, dim: int | None = None) -> torch.Tensor:
    """Histogram (float64) of ``|x|``: over all entries (``dim=None``) or per row of ``x.reshape(rows, -1)``
    with ``rows = x.shape[0]`` (``dim=0``). The reference the fused pass is tested against."""
    rows = x.reshape(1, -1) if dim is None else x.reshape(x.shape[0], -1)
    index = log_magnitude_bin(rows.abs(), bins)
    counts = torch.zeros(rows.shape[0], bins.size, dtype=torch.float64, device=x.device)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float64))
    return counts[0] if dim is None else counts


def histogram_order_statistic(hist: torch.Tensor, rank: torch.Tensor, bins: LogMagnitudeBins) -> torch.Tensor:
    """Estimate of the ``rank``-th smallest ``|x|`` (1-based, float64, one per row of ``hist``); see the module doc."""
    hist = hist.to(torch.float64)
    return _order_statistics(hist, hist.cumsum(-1), rank.to(torch.float64).unsqueeze(-1), bins).squeeze(-1)


def _order_statistics(
    hist: torch.Tensor, cumulative: torch.Tensor, ranks: torch.Tensor, bins: LogMagnitudeBins
) -> torch.Tensor:
    """Estimates (``(..., r)``) of the order statistics of ranks ``(..., r)`` from a float64 ``hist`` ``(..., size)``
    and its cumulative sum: several ranks of one histogram share its conversion and cumulative sum."""
    lower, upper = device_edges(bins, hist.device)
    index = torch.searchsorted(cumulative, ranks).clamp_max(bins.size - 1)
    in_bin = hist.gather(-1, index)
    before = cumulative.gather(-1, index) - in_bin
    position = (ranks - before - 0.5) / in_bin.clamp_min(1.0)
    low, high = lower[index], upper[index]
    estimate = low + (high - low) * position
    estimate = torch.where(index == 0, torch.zeros_like(estimate), estimate)
    unknown = (index == 1) | (index == bins.size - 2) | (ranks < 1) | (ranks > cumulative[..., -1:])
    estimate = torch.where(index == bins.size - 1, torch.full_like(estimate, float("inf")), estimate)
    return torch.where(unknown, torch.full_like(estimate, float("nan")), estimate)


def histogram_median(hist: torch.Tensor, bins: LogMagnitudeBins) -> torch.Tensor:
    """numpy-definition median of ``|x|`` per row of ``hist`` (``(..., size)``), relative error <= ``2^-sub_bits``.

    NaN where a row is empty or a middle order statistic falls in the underflow or overflow bin.
    """
    hist = hist.to(torch.float64)
    cumulative = hist.cumsum(-1)
    n = cumulative[..., -1:]
    middle = _order_statistics(hist, cumulative, torch.cat([torch.floor((n + 1) / 2), torch.floor(n / 2) + 1], -1), bins)
    return (middle[..., 0] + middle[..., 1]) / 2
