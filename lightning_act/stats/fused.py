"""One fused pass per tapped tensor for every sufficient statistic the active monitors need.

Each monitor declares what it needs from a tapped tensor as a :class:`FusedSpec` (``moment_spec``,
``zero_spec``, ``massive_spec``); the specs of all monitors tapping one module are merged with
:meth:`FusedSpec.union`, and :func:`fused_statistics` reads the activation once (on a GPU, twice more when
medians, massive counts or per-position maxima are asked for) and returns :class:`FusedStats`. Small adapters
(``moment_partials_from`` ...) turn that into exactly the partial buffers each monitor already reduces and
summarises, so no statistic changes meaning. Statistics no spec asked for are not computed (each is a
compile-time switch of the kernels and a Python branch of the fallback).

What one pass gives, from an activation of any float dtype (bf16/fp16 are read as is and widened in
registers; every comparison is made in float32, or float64 for float64 inputs):

- ``count`` and ``nonfinite`` (NaN and inf entries), always;
- ``at_most``: for each threshold ``t``, the count of entries with ``|x| <= t`` (non-finite entries never
  count). The threshold is rounded *down* to the input's compute precision, so the float32 comparison
  gives exactly the answer of comparing with the real number ``t`` (a plain ``x <= 0.1`` on bf16 compares
  with bf16(0.1) = 0.10009765625 instead);
- ``moments``: sums of ``x``, ``x^2`` and ``|x|`` over finite entries. ``x`` and ``x^2`` are summed in float64
  on every path (the square of a float32 is exact there): ``std`` is ``sqrt(Σx²/n − mean²)``, which cancels what
  the two sums share, and float32 roundings, the same for repeated values, made it percents off from
  ``|mean| = 300 std`` (round 17). ``|x|`` (no cancellation) is summed as float32 sums of at most 16 terms (the
  fallback's finite CPU path: blocks of 16 entries; Triton: 8 entries per lane) added in float64: relative
  error <= ``16 * 2^-24`` (about 1e-6);
- two maxima: ``abs_max`` over finite entries (the moments' convention, 0 when there is none) and
  ``magnitude_max`` with NaN and inf ranked as ``+inf`` (the massive-activation convention);
- per sample (row ``b`` of ``x.reshape(x.shape[0], -1)``, when a median or the column maximum is asked
  for): ``sample_magnitude_max``, ``sample_median`` (the median of ``|x|`` estimated from a log-magnitude
  histogram, :mod:`lightning_act.stats.histogram_median`, relative error <= 1.56%, capped at the sample's
  ``sample_magnitude_max``; exact on the PyTorch fallback for samples narrower than half the bins,
  :func:`exact_median_is_cheaper`) and
  ``sample_massive_count`` (entries with ``|x| > abs_threshold`` and ``|x| >= ratio_threshold * median``,
  counted exactly at that median). The Triton path builds the histogram in two levels (coarse bins, then
  the fine bins of the two coarse bins holding the middle order statistics), which gives the full
  histogram's estimate exactly for the price of two small-histogram passes;
- ``column_max``: per position (flat index within a sample) the maximum ``|x|`` over samples, from which
  the top-k distinct positions are one small ``topk`` (the full tensor is never sorted).

Reductions across ranks (torchtitan style, no host sync): ``sums`` are SUM-reducible, ``maxima``
MAX-reducible, all fixed-size float64; per-sample values are consumed locally (each sample lives on one
rank) and only their sums are reduced.

Implementations: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``;
:mod:`lightning_act.stats.triton_fused`), ``"torch"`` (the eager fallback), ``"compiled"`` (the same
fallback through ``torch.compile``, which fuses it into few kernels) and ``"auto"`` (Triton for CUDA
float16/bfloat16/float32 tensors when Triton is importable, else the eager fallback). On a CPU the eager
fallback first reads the maxima (no device to sync with) and, when every entry is finite, takes every
statistic from reductions and in-place ops on one reused buffer (``_finite_cpu_pass``): eager ops that
each allocate a tensor the size of the activation cost a CPU more in page faults than in arithmetic.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from lightning_act._triton import triton_requirement, warn_triton_unusable
from lightning_act._triton import triton_usable as triton_available
from lightning_act.stats.histogram_median import LogMagnitudeBins, histogram_median, log_magnitude_bin
from lightning_act.stats.massive import MASSIVE_SUMS, known_medians, sample_ratios
from lightning_act.stats.massive import sample_medians as exact_sample_medians
from lightning_act.stats.moments import MOMENT_SUMS, comparable_threshold

MAX_NAMES = ("abs_max", "magnitude_max")
IMPLEMENTATIONS = ("auto", "triton", "torch", "compiled")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class FusedSpec:
    """What one pass computes: ``thresholds`` for ``|x| <= t`` counts, ``moments`` (sums of x, x², |x|), the
    per-sample ``median`` of ``|x|`` (from a log-magnitude histogram of that layout), the per-sample ``massive``
    count ``|x| > abs_threshold and |x| >= ratio_threshold * median`` (a pair ``(abs_threshold, ratio_threshold)``;
    needs ``median``) and the per-position ``column_max``."""

    thresholds: tuple[float, ...] = ()
    moments: bool = False
    median: LogMagnitudeBins | None = None
    massive: tuple[float, float] | None = None
    column_max: bool = False

    def __post_init__(self) -> None:
        bad = [t for t in self.thresholds if not (math.isfinite(t) and t >= 0)]
        if bad:
            raise ValueError(f"thresholds {bad} must be finite and >= 0; pass magnitudes such as 0.0 or 1e-3")
        # + 0.0: -0.0 is the threshold 0.0 (a union of both kept one of them, and the other's count was missing)
        object.__setattr__(self, "thresholds", tuple(sorted(set(float(t) + 0.0 for t in self.thresholds))))
        if self.massive is not None:
            if self.median is None:
                raise ValueError("a massive count needs the median; pass median=LogMagnitudeBins() too")
            if not all(math.isfinite(t) and t >= 0 for t in self.massive):
                raise ValueError(f"massive thresholds {self.massive} must be finite and >= 0")
            object.__setattr__(self, "massive", (float(self.massive[0]) + 0.0, float(self.massive[1]) + 0.0))

    def union(self, *others: FusedSpec) -> FusedSpec:
        """The spec computing everything any of ``self`` and ``others`` asks for (one pass for all monitors)."""
        if not others:  # one monitor on the tap, the usual case
            return self
        specs = (self, *others)
        medians = {s.median for s in specs if s.median is not None}
        if len(medians) > 1:
            raise ValueError(f"monitors ask for different histogram layouts {medians}; use one LogMagnitudeBins")
        massive = {s.massive for s in specs if s.massive is not None}
        if len(massive) > 1:
            raise ValueError(f"monitors ask for different massive thresholds {massive}; tap the module with one")
        return FusedSpec(
            thresholds=tuple(t for s in specs for t in s.thresholds),
            moments=any(s.moments for s in specs),
            median=next(iter(medians), None),
            massive=next(iter(massive), None),
            column_max=any(s.column_max for s in specs),
        )

    @property
    def per_sample(self) -> bool:
        return self.median is not None or self.column_max

    @property
    def sum_names(self) -> tuple[str, ...]:
        """Layout of :attr:`FusedStats.sums`."""
        names = ["count", "nonfinite", *(f"at_most:{t!r}" for t in self.thresholds)]
        return tuple(names + (["sum", "sq_sum", "abs_sum"] if self.moments else []))


_specs_made: dict[tuple[tuple[str, object], ...], FusedSpec] = {}


def _spec_key(value: object) -> object:
    """``value`` as a cache key of :func:`_spec_made_once`: plain numbers as floats (``0``, ``0.0`` and ``-0.0`` make
    one spec), a histogram layout as itself; None for anything else (a tensor, whose ``repr`` rounds)."""
    if isinstance(value, tuple):
        keys = tuple(_spec_key(item) for item in value)
        return None if None in keys else keys
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return ("number", float(value) + 0.0)
    if isinstance(value, (bool, LogMagnitudeBins)):
        return value
    return None


def _spec_made_once(**fields: object) -> FusedSpec:
    """``FusedSpec(**fields)``, made once per distinct ``fields`` of plain numbers and layouts (anything else is made
    anew). The monitors ask for their spec at every tapped tensor of a due step, and making and checking one cost ~9 µs
    of a GPU host's time per tap (round 28)."""
    key = tuple(sorted((name, _spec_key(value)) for name, value in fields.items()))
    if any(value is None for _, value in key):
        return FusedSpec(**fields)  # type: ignore[arg-type]
    spec = _specs_made.get(key)
    if spec is None:
        spec = _specs_made[key] = FusedSpec(**fields)  # type: ignore[arg-type]
    return spec


def moment_spec(zero_threshold: float = 0.0) -> FusedSpec:
    """What :func:`moment_partials_from` needs (``ActivationStats``)."""
    return _spec_made_once(thresholds=(zero_threshold,), moments=True)


def zero_spec(threshold: float = 0.0) -> FusedSpec:
    """What :func:`zero_partials_from` needs (``ActivationSparsity``'s zero fraction)."""
    return _spec_made_once(thresholds=(threshold,))


def massive_spec(
    bins: LogMagnitudeBins = LogMagnitudeBins(), abs_threshold: float = 100.0, ratio_threshold: float = 1000.0
) -> FusedSpec:
    """What :func:`massive_partials_from` and :func:`topk_positions_from` need (``MassiveActivations``)."""
    return _spec_made_once(median=bins, massive=(abs_threshold, ratio_threshold), column_max=True)


@dataclass
class FusedStats:
    """Result of one pass; see the module docstring for each field's meaning and reduction."""

    spec: FusedSpec
    shape: tuple[int, ...]
    sums: torch.Tensor
    maxima: torch.Tensor
    sample_magnitude_max: torch.Tensor | None = None
    sample_median: torch.Tensor | None = None
    sample_massive_count: torch.Tensor | None = None
    column_max: torch.Tensor | None = None
    _index: dict[str, int] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self._index = {name: i for i, name in enumerate(self.spec.sum_names)}

    def value(self, name: str) -> torch.Tensor:
        """One entry of :attr:`sums` (``count``, ``nonfinite``, ``sum``, ``sq_sum``, ``abs_sum``) or :attr:`maxima`."""
        if name in MAX_NAMES:
            return self.maxima[MAX_NAMES.index(name)]
        if name not in self._index:
            raise KeyError(f"{name!r} was not computed; the spec has {self.spec.sum_names}")
        return self.sums[self._index[name]]

    def at_most(self, threshold: float) -> torch.Tensor:
        """Count of entries with ``|x| <= threshold`` (the threshold must be in the spec)."""
        return self.value(f"at_most:{float(threshold) + 0.0!r}")


# ---------------------------------------------------------------------------------------------- the pass
def _sample_rows(x: torch.Tensor, spec: FusedSpec) -> torch.Tensor:
    """``x`` as ``(samples, entries)`` when per-sample statistics are asked for, else as one row."""
    if spec.per_sample and x.dim() >= 2:
        return x.reshape(x.shape[0], math.prod(x.shape[1:]))  # not -1, which a batch of 0 samples leaves undefined
    return x.reshape(1, -1)


_cpu_scratch: dict[str, torch.Tensor] = {}


def _scratch(numel: int, name: str = "magnitude", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A reused CPU buffer of at least ``numel`` entries: allocating a fresh multi-megabyte tensor per op
    costs a CPU more (page faults) than the op itself, so the finite fast path writes into these."""
    buffer = _cpu_scratch.get(name)
    if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
        buffer = _cpu_scratch[name] = torch.empty(numel, dtype=dtype)
    return buffer[:numel]


def release_cpu_scratch() -> None:
    """Drop the reused CPU buffers (up to 16 bytes per entry of the largest tap seen), which otherwise outlive every
    monitor for the rest of the process (a notebook, a sweep); the monitors' teardown calls it, and the next pass
    allocates them afresh."""
    _cpu_scratch.clear()


def _block_sum(flat: torch.Tensor) -> torch.Tensor:
    """float64 sum of a float32 vector: float32 sums of blocks of 16 entries, added in float64."""
    main = flat.numel() - flat.numel() % 16
    head = flat[:main].view(-1, 16).sum(1).to(torch.float64).sum()
    return head + flat[main:].to(torch.float64).sum()


def above_threshold(t: float) -> float:
    """The smallest float32 above the real number ``t``: for a float32 ``m``, ``m > t`` exactly when ``m >= it``."""
    return float(np.nextafter(np.float32(comparable_threshold(t, torch.float32)), np.float32(np.inf)))


def massive_row_thresholds(
    median: torch.Tensor, massive: tuple[float, float], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Per-row threshold ``t`` of ``dtype`` (float32, or float64 for float64 activations): for every magnitude ``m``
    of that dtype, ``m >= t`` exactly when ``m > abs_threshold`` and ``m >= ratio_threshold * median`` (the product
    taken in float64; NaN where the median is NaN).

    Sun et al. 2024 (arXiv 2402.17762) call an activation massive when it is both above an absolute threshold
    and far above its sample's median; one comparison per entry then counts both conditions.
    """
    abs_threshold, ratio_threshold = massive
    relative = ratio_threshold * median.to(torch.float64)
    if dtype == torch.float64:
        return torch.clamp_min(relative, float(np.nextafter(abs_threshold, np.inf)))
    rounded = relative.to(torch.float32)
    up = torch.nextafter(rounded, torch.full_like(rounded, float("inf")))
    rounded = torch.where(rounded.to(torch.float64) < relative, up, rounded)
    return torch.clamp_min(rounded, above_threshold(abs_threshold))


def median_within_max(median: torch.Tensor, sample_max: torch.Tensor) -> torch.Tensor:
    """The per-sample median estimates capped at the samples' exact maximum ``|x|``: the histogram places a median
    inside its 1.56%-wide bin, which may reach past the largest entry (a constant row of -3.0 read 3.0156, a top-1
    ratio ``max / median`` below 1, which no data gives). Exact medians and NaN ones are left as they are."""
    ceiling = sample_max.to(torch.float64)
    return torch.where(median > ceiling, ceiling, median)


def _massive_count(ranked: torch.Tensor, thresholds: torch.Tensor, median: torch.Tensor) -> torch.Tensor:
    """Per row, the count of ``ranked >= thresholds[row]`` (float64), NaN where the median is unknown."""
    count = torch.count_nonzero(ranked >= thresholds[:, None], dim=1).to(torch.float64)
    return torch.where(torch.isnan(median), torch.full_like(count, float("nan")), count)


def _finite_cpu_pass(work: torch.Tensor, spec: FusedSpec) -> dict[str, torch.Tensor] | None:
    """The fallback's results for a float32 CPU ``work`` (``(samples, entries)``) with no NaN or inf, from
    reductions and in-place integer ops on reused buffers; None when an entry is not finite.

    Reading the maxima first costs no device sync on a CPU, and when every entry is finite (the usual case)
    no finiteness masks are needed: the maximum ``|x|`` per sample, per position and overall come from
    ``amax`` (of ``|x|``, or of ``x`` and ``-x`` when ``|x|`` is not needed otherwise; both propagate NaN, so
    any non-finite entry shows in them), the ``|x| <= 0`` count from one ``count_nonzero`` of ``x``, other
    ``|x| <= t`` counts from one comparison each, the massive counts only for samples whose maximum reaches
    their threshold, and the histogram from the float32 bits (the same bins as :func:`log_magnitude_bin`)
    counted with one ``bincount``. ``Σx`` and ``Σx²`` are float64 (one conversion, a sum and a dot product);
    ``Σ|x|`` adds float32 sums of 16-entry blocks in float64 (relative error <= ``16 * 2^-24``, about 1e-6).
    """
    if work.numel() == 0:
        return None
    flat = work.reshape(-1)
    thresholds = [comparable_threshold(t, torch.float32) for t in spec.thresholds]
    magnitude: torch.Tensor | None = None
    if any(t > 0 for t in thresholds) or spec.moments or spec.massive:
        magnitude = torch.abs(flat, out=_scratch(flat.numel())).view(work.shape)
        sample_max = magnitude.amax(1)
    else:
        sample_max = torch.maximum(work.amax(1), work.amin(1).neg())
    overall = sample_max.amax()
    if not math.isfinite(float(overall)):
        return None
    parts = [torch.zeros((), dtype=torch.float64)]
    for t in thresholds:
        if t == 0:  # |x| <= 0: the zeros (either sign), one read of x and no mask
            at_most = flat.numel() - torch.count_nonzero(flat)
        else:
            assert magnitude is not None
            at_most = torch.count_nonzero(torch.le(magnitude, t, out=_scratch(flat.numel(), "mask", torch.bool).view(work.shape)))
        parts.append(at_most.to(torch.float64))
    overall = overall.to(torch.float64)
    out = {"maxima": torch.stack([overall, overall]), "sample_max": sample_max}
    if spec.median is not None:
        if exact_median_is_cheaper(work.shape[1], spec.median):
            median = exact_sample_medians(work.abs() if magnitude is None else magnitude, torch.float64)
        else:
            keys = _scratch(flat.numel(), "keys").view(torch.int32)
            median = histogram_median(_finite_histogram(work, spec.median, keys), spec.median)
        median = out["median"] = median_within_max(median, sample_max)
        if spec.massive is not None:
            assert magnitude is not None
            row_thresholds = massive_row_thresholds(median, spec.massive)
            if bool((sample_max >= row_thresholds).any()):
                out["massive_count"] = _massive_count(magnitude, row_thresholds, median)
            else:  # no sample reaches its threshold: every count is 0 (NaN where the median is unknown)
                out["massive_count"] = torch.where(torch.isnan(median), median, torch.zeros_like(median))
    if spec.column_max:
        out["column_max"] = torch.maximum(work.amax(0), work.amin(0).neg()) if magnitude is None else magnitude.amax(0)
    if spec.moments:
        assert magnitude is not None
        wide = _scratch(flat.numel(), "wide", torch.float64).copy_(flat)
        # Σx then Σx² in place: torch's cascade sums, not BLAS ddot, whose long runs lose the digits a mean far above
        # the spread leaves to the variance (38.7M entries at mean 3e4·std: std 4% off)
        total = wide.sum()
        parts += [total, wide.square_().sum(), _block_sum(magnitude.reshape(-1))]
    out["scalars"] = torch.stack(parts)
    return out


def exact_median_is_cheaper(entries: int, bins: LogMagnitudeBins) -> bool:
    """Whether the PyTorch fallback takes a sample's median exactly (two ``kthvalue`` selections) rather than from
    its histogram: for samples of fewer entries than half ``bins``' bins. The histogram costs ``bins.size`` counts
    per sample whatever its width, so many narrow samples cost more through it than through the selections (CPU,
    whole massive pass: 14x faster at ``(16384, 64)``, which took 1.0 s and 0.5 GB; 1.7x at 512 entries; even near
    1,000 entries with the default 2,048 bins)."""
    return 0 < entries < bins.size // 2


def _finite_histogram(work: torch.Tensor, bins: LogMagnitudeBins, keys: torch.Tensor) -> torch.Tensor:
    """Per-row :func:`log_magnitude_bin` counts of a finite float32 ``work``, with ``keys`` as scratch."""
    rows, entries = work.shape
    keys = keys.view(rows, entries)
    torch.bitwise_right_shift(work.view(torch.int32), bins.key_shift, out=keys)
    keys.bitwise_and_(0x7FFFFFFF >> bins.key_shift)  # drop the sign bits: the key of |x|
    keys.clamp_(bins.low_key - 1, bins.top_key)  # keys of bins 1 .. size - 2, as in the window
    # to bin indices (key - low_key + 2), offset by the row's place in the flat histogram: one add for both
    keys.add_((torch.arange(rows, dtype=torch.int32) * bins.size - (bins.low_key - 2)).unsqueeze(1))
    counts = torch.bincount(keys.view(-1), minlength=rows * bins.size).view(rows, bins.size)
    if bool(counts[:, 1].any()):  # exact zeros share the underflow key; move them to bin 0
        zeros = entries - torch.count_nonzero(work, dim=1)
        counts[:, 1] -= zeros
        counts[:, 0] += zeros
    return counts


def _torch_pass(x: torch.Tensor, spec: FusedSpec) -> dict[str, torch.Tensor]:
    """The fallback: one function of elementwise ops and reductions that ``torch.compile`` can fuse."""
    rows = _sample_rows(x, spec)
    if rows.device.type == "cpu" and not torch.compiler.is_compiling() and rows.dtype != torch.float64:
        finite = _finite_cpu_pass(rows.float(), spec)
        if finite is not None:
            return finite
    work = rows if rows.dtype == torch.float64 else rows.float()
    magnitude = work.abs()
    finite = torch.isfinite(work)
    parts = [(~finite).sum(dtype=torch.float64)]
    parts += [(magnitude <= comparable_threshold(t, work.dtype)).sum(dtype=torch.float64) for t in spec.thresholds]
    clean_magnitude = torch.where(finite, magnitude, torch.zeros((), dtype=work.dtype, device=work.device))
    if spec.moments:
        clean = torch.where(finite, work, torch.zeros((), dtype=work.dtype, device=work.device)).to(torch.float64)
        parts += [
            clean.sum(),
            clean.square().sum(),
            clean_magnitude.sum(dtype=torch.float64),
        ]
    nonfinite = parts[0]
    if rows.numel() == 0:
        abs_max = torch.zeros((), dtype=work.dtype, device=work.device)
    else:
        abs_max = clean_magnitude.amax()
    # Any NaN or inf ranks as +inf, so the overall ranked maximum needs no pass of its own.
    ranked_max = torch.where(nonfinite > 0, torch.full_like(abs_max, float("inf")), abs_max)
    out = {"scalars": torch.stack(parts), "maxima": torch.stack([abs_max.to(torch.float64), ranked_max.to(torch.float64)])}
    if not spec.per_sample:
        out["sample_max"] = ranked_max.reshape(1)
        return out
    inf = torch.full((), float("inf"), dtype=work.dtype, device=work.device)
    ranked = torch.where(torch.isnan(magnitude), inf, magnitude)
    if rows.shape[1] == 0:
        out["sample_max"] = torch.zeros(rows.shape[0], dtype=work.dtype, device=work.device)
    else:
        out["sample_max"] = ranked.amax(1)
    if spec.median is not None:
        if exact_median_is_cheaper(rows.shape[1], spec.median):
            median = exact_sample_medians(ranked, torch.float64)
        else:
            index = log_magnitude_bin(magnitude, spec.median)
            counts = torch.zeros(rows.shape[0], spec.median.size, dtype=torch.int32, device=work.device)
            counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.int32))
            median = histogram_median(counts, spec.median)
        median = out["median"] = median_within_max(median, out["sample_max"])
        if spec.massive is not None:
            thresholds = massive_row_thresholds(median, spec.massive, work.dtype)
            out["massive_count"] = _massive_count(ranked, thresholds, median)
    if spec.column_max:
        if rows.shape[0] == 0:
            out["column_max"] = torch.zeros(rows.shape[1], dtype=work.dtype, device=work.device)
        else:
            out["column_max"] = ranked.amax(0)
    return out


@functools.lru_cache(maxsize=64)
def _compiled_pass(spec: FusedSpec):  # noqa: ANN202 - a compiled callable
    return torch.compile(functools.partial(_torch_pass, spec=spec))


_device_constants: dict[tuple[tuple[float, ...], torch.dtype, str], torch.Tensor] = {}


def _device_constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` as a vector on ``device``, made once per (values, dtype, device): a host-to-device copy waits
    for the device, and a wait per tapped tensor would stall the training step."""
    key = (values, dtype, str(device))
    tensor = _device_constants.get(key)
    if tensor is None:
        tensor = _device_constants[key] = torch.tensor(values, dtype=dtype, device=device)
    return tensor


def coarse_shift(bins: LogMagnitudeBins) -> int:
    """log2 of the fine bins per coarse bin of the two-level histogram: balances the two histograms' bin counts."""
    return (bins.size.bit_length() - 1) // 2


def _triton_pass(x: torch.Tensor, spec: FusedSpec) -> dict[str, torch.Tensor]:
    from lightning_act.stats.triton_fused import column_statistics, row_statistics, sample_medians, zeroed_buffers

    rows = _sample_rows(x, spec).contiguous()
    n_rows, cols = rows.shape
    bins = spec.median
    shift = 1 if bins is None else coarse_shift(bins)
    layout = None if bins is None else (bins.size, bins.key_shift, bins.low_key)
    # the thresholds rounded down to float32; one entry at least, as the kernel needs a pointer
    thresholds = tuple(comparable_threshold(t, torch.float32) for t in spec.thresholds) or (-1.0,)
    thresholds = _device_constant(thresholds, torch.float32, x.device)
    # every buffer the kernels add into, zeroed by one memset: massive counts, per-position maxima (as bits), the
    # coarse and the fine histograms
    counting = spec.massive is not None  # which implies a median (FusedSpec checks it)
    counts = column_bits = coarse = fine = None
    if spec.column_max or bins is not None:
        float64_sizes = (n_rows,) if counting else ()
        int32_sizes = ((cols,) if spec.column_max else ()) + (
            (n_rows * (bins.size >> shift), n_rows * (2 << shift)) if bins is not None else ()
        )
        buffers = zeroed_buffers(x.device, float64_sizes, int32_sizes)
        counts = buffers.pop(0) if counting else None
        column_bits = buffers.pop(0) if spec.column_max else None
        if bins is not None:
            coarse, fine = buffers  # flat: (rows, size >> shift) and (rows, 2 << shift), row-major
    sums, maxima, sample_max, finish = row_statistics(
        rows, thresholds, len(spec.thresholds), spec.moments, layout, shift, spec.per_sample, coarse,
        finish=bins is None,
    )
    out = {"sums": sums, "maxima": maxima}
    if sample_max is not None:
        out["sample_max"] = sample_max
    median = row_thresholds = None
    if bins is not None:
        assert coarse is not None and fine is not None and layout is not None and finish is not None
        ratio = None if spec.massive is None else _device_constant((spec.massive[1],), torch.float64, x.device)
        above_abs = 0.0 if spec.massive is None else above_threshold(spec.massive[0])
        median, row_thresholds = sample_medians(rows, coarse, fine, layout, shift, ratio, above_abs, finish)
        median = out["median"] = median_within_max(median, sample_max)
        # The kernel's thresholds are those of the median before its cap; they count the same entries (none above
        # the sample's max) unless ratio_threshold <= 1
        if spec.massive is not None and spec.massive[1] <= 1.0:
            row_thresholds = massive_row_thresholds(median, spec.massive)
    if counting or spec.column_max:
        column_statistics(rows, row_thresholds, median, column_bits, counts)
        if counts is not None:
            out["massive_count"] = counts
        if column_bits is not None:
            out["column_max"] = column_bits.view(torch.float32)
    return out


def _resolve(x: torch.Tensor, implementation: str) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}; pass one of {IMPLEMENTATIONS}")
    if implementation != "auto":
        if implementation == "triton":
            if not triton_available():
                raise ValueError(f"implementation='triton' needs {triton_requirement()}; pass 'torch' or 'compiled'")
            if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
                raise ValueError("implementation='triton' needs a CUDA tensor (or TRITON_INTERPRET=1); pass 'torch'")
            if x.dtype not in _TRITON_DTYPES:
                raise ValueError(f"implementation='triton' reads {_TRITON_DTYPES}, got {x.dtype}; pass 'torch'")
        return implementation
    if x.is_cuda and x.dtype in _TRITON_DTYPES:
        if triton_available():
            return "triton"
        warn_triton_unusable()
    return "torch"


def fused_statistics(x: torch.Tensor, spec: FusedSpec, implementation: str = "auto") -> FusedStats:
    """Every statistic ``spec`` asks for, from few reads of ``x`` and no host sync; see the module docstring."""
    x = x.detach()
    how = _resolve(x, implementation)
    if how == "triton" and x.numel() > 0:
        out = _triton_pass(x, spec)
    elif how == "compiled":
        out = _compiled_pass(spec)(x)
    else:
        out = _torch_pass(x, spec)
    sums = out.get("sums")
    if sums is None:  # the torch passes leave the entry count to this function
        count = torch.full((1,), float(x.numel()), dtype=torch.float64, device=x.device)
        sums = torch.cat([count, out["scalars"].to(torch.float64)])
    stats = FusedStats(spec=spec, shape=tuple(x.shape), sums=sums, maxima=out["maxima"])
    # each .to() only where it converts: one that returns its tensor still costs ~4 µs of a GPU host's time
    if spec.per_sample:
        sample_max = out["sample_max"]
        stats.sample_magnitude_max = sample_max if sample_max.dtype == torch.float64 else sample_max.to(torch.float64)
    if spec.median is not None:
        stats.sample_median = out["median"]
    if spec.massive is not None:
        stats.sample_massive_count = out["massive_count"]
    if spec.column_max:
        column_max = out["column_max"]  # float32 at least; a float64 activation's top-k values stay exact
        if column_max.dtype not in (torch.float32, torch.float64):
            column_max = column_max.to(torch.float32)
        stats.column_max = column_max
    return stats


# ---------------------------------------------------------------------------- monitors' partial buffers
def moment_partials_from(stats: FusedStats, zero_threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sums, maxima)`` in the layout of :func:`lightning_act.stats.moments.moment_partials`."""
    sums = torch.stack([stats.value("count"), stats.value("nonfinite"), stats.at_most(zero_threshold),
                        stats.value("sum"), stats.value("sq_sum"), stats.value("abs_sum")])
    assert sums.numel() == len(MOMENT_SUMS)
    return sums, stats.value("abs_max").reshape(1)


def _zero_sums_lead(stats: FusedStats, threshold: float) -> bool:
    """Whether the fused sums start with ``[count, nonfinite, zeros]`` (the usual layout of a zero-count pass)."""
    return stats.spec.sum_names[:3] == ("count", "nonfinite", f"at_most:{float(threshold)!r}")


def zero_partials_from(stats: FusedStats, threshold: float = 0.0) -> torch.Tensor:
    """``[count, nonfinite, zeros]`` as :func:`lightning_act.stats.sparsity.zero_partials` lays it out (a copy: the
    fused sums are shared by every monitor of the tap)."""
    if _zero_sums_lead(stats, threshold):
        return stats.sums[:3].clone()  # the usual layout: one copy instead of three picks and a stack
    return torch.stack([stats.value("count"), stats.value("nonfinite"), stats.at_most(threshold)])


def zero_partials_stacked(passes: list[FusedStats], threshold: float = 0.0) -> torch.Tensor:
    """:func:`zero_partials_from` of several passes as one ``(passes, 3)`` tensor: one stack (a copy) in the usual
    layout."""
    return torch.stack([
        stats.sums[:3] if _zero_sums_lead(stats, threshold) else zero_partials_from(stats, threshold)
        for stats in passes
    ])


def massive_partials_from(stats: FusedStats) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sums, maxima)`` as :func:`lightning_act.stats.massive.massive_partials` lays them out.

    The per-sample median is the histogram estimate (:func:`histogram_median`, relative error <= the bin
    width, 1.56% by default) and the massive count is exact at the threshold that median gives
    (:func:`massive_row_thresholds`). A sample whose median is unknown (NaN) or infinite (half its entries or more
    NaN or inf) has an unknown median, ratio and count, as in :func:`lightning_act.stats.massive.known_medians`; one
    whose median is 0 an unknown ratio (:func:`lightning_act.stats.massive.sample_ratios`).
    """
    sums, maxima = stacked_massive_partials([stats])
    return sums[0], maxima[0]


def stacked_massive_partials(stats: Sequence[FusedStats]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`massive_partials_from` of several passes over tensors of one shape at once: ``(sums (n, 4), maxima
    (n, 1))``, in a fixed number of operations (a monitor's taps at one logging step: a few launches in all
    instead of a few per tap)."""
    if any(s.sample_median is None or s.sample_massive_count is None or s.sample_magnitude_max is None
           or len(s.shape) < 2 for s in stats):
        raise ValueError("massive partials need a (batch, ...) tensor and a spec from massive_spec()")
    if len({s.shape for s in stats}) > 1:
        raise ValueError(f"stacked massive partials need passes over one shape, got {sorted({s.shape for s in stats})}")
    median = known_medians(torch.stack([s.sample_median for s in stats]))  # type: ignore[misc]
    top1 = torch.stack([s.sample_magnitude_max for s in stats])  # type: ignore[misc]
    count = torch.stack([s.sample_massive_count for s in stats])  # type: ignore[misc]
    count = torch.where(torch.isnan(median), median, count)
    samples = torch.full((len(stats),), float(stats[0].shape[0]), dtype=torch.float64, device=median.device)
    sums = torch.stack([samples, median.sum(1), sample_ratios(top1, median).sum(1), count.sum(1)], 1)
    assert sums.shape[1] == len(MASSIVE_SUMS)
    if top1.shape[1] == 0:  # a batch of no samples adds nothing; 0 is the maximum's neutral value for magnitudes
        return sums, top1.new_zeros(len(stats), 1)
    return sums, top1.amax(1, keepdim=True)


def topk_positions_from(stats: FusedStats, k: int) -> torch.Tensor:
    """The buffer of :func:`lightning_act.stats.massive.topk_positions`: ``[values, tokens, features]`` (3k).

    Positions follow the massive-activation layout: ``(B, D)`` has one token, ``(B, T, D)`` tokens ``T``,
    ``(B, C, *spatial)`` features ``C`` and tokens the flattened spatial positions.
    """
    return stacked_topk_positions([stats], k)[0]


def stacked_topk_positions(stats: Sequence[FusedStats], k: int) -> torch.Tensor:
    """:func:`topk_positions_from` of several passes over tensors of one shape at once: ``(n, 3k)``."""
    if any(s.column_max is None or len(s.shape) < 2 for s in stats):
        raise ValueError("top-k positions need a (batch, ...) tensor and a spec with column_max=True")
    shape = stats[0].shape
    if any(s.shape != shape for s in stats):
        raise ValueError(f"stacked top-k positions need passes over one shape, got {sorted({s.shape for s in stats})}")
    column_max = torch.stack([s.column_max for s in stats])  # type: ignore[misc]
    # a batch of no samples observed no position: no candidates (its column_max of zeros is the sums' neutral value,
    # which read as value 0 at positions never observed)
    take = min(k, column_max.shape[1]) if shape[0] > 0 else 0
    values, index = column_max.topk(take, dim=1)
    if len(shape) <= 3:
        features = shape[-1]
        token, feature = torch.div(index, features, rounding_mode="floor"), index % features
    else:
        spatial = math.prod(shape[2:])
        token, feature = index % spatial, torch.div(index, spatial, rounding_mode="floor")
    out = torch.stack([values.to(torch.float64), token.to(torch.float64), feature.to(torch.float64)], 1)
    if take < k:  # fewer positions than k: NaN slots
        out = torch.nn.functional.pad(out, (0, k - take), value=float("nan"))
    return out.reshape(len(stats), 3 * k)
