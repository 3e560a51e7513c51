"""Triton kernel of the fused statistics pass (:mod:`lightning_act.stats.fused`): one read of the activation.

Only imported when Triton is importable. Under ``TRITON_INTERPRET=1`` (set before Triton is first imported)
the same kernel runs on CPU tensors, which is how it is tested without a GPU.

Layout: the activation is a contiguous ``(rows, cols)`` matrix (rows = samples when per-sample statistics
are asked for, else one row). Program ``(row, split)`` reads ``split_len`` consecutive entries of one row in
blocks of ``BLOCK``, all in float32 registers, and

- writes its scalar partials (non-finite count, counts of ``|x| <= t``, and for moments the sums of ``x``,
  ``x^2`` and ``|x|``) to its own slot of a ``(rows * splits, n)`` float64 buffer, later added by
  ``torch.sum`` in a fixed order: no float atomics, so the result is deterministic. Each block's sum is
  taken in float32 by ``tl.sum`` (a tree over at most ``BLOCK`` terms, relative error of a sum of
  non-negative terms <= ``log2(BLOCK) * 2^-24``) and added to a float64 accumulator;
- writes its two maxima (``max |x|`` over finite entries; ``max |x|`` with NaN and inf as ``+inf``);
- adds its block histograms (``tl.histogram`` of the log-magnitude bin of every entry) to its row of an
  int32 ``(rows, bins)`` buffer with integer atomics (exact and order-free);
- raises a per-column maximum of ``|x|`` (NaN as inf) with ``atomic_max`` on the int32 bit patterns, which
  order like the magnitudes for non-negative floats (exact and order-free).

Masked lanes (past the end of a row) load 0 and are excluded from every count, histogram and maximum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
TARGET_PROGRAMS = 1024
# A global read inside a compiled (not interpreted) kernel must be a constexpr.
INF_BITS = tl.constexpr(0x7F800000)


@triton.jit
def _fused_statistics_kernel(
    x_ptr,
    thresholds_ptr,
    scalars_ptr,
    maxima_ptr,
    histogram_ptr,
    column_max_ptr,
    cols,
    split_len,
    splits,
    low_key,
    N_THRESHOLDS: tl.constexpr,
    THRESHOLD_PAD: tl.constexpr,
    MOMENTS: tl.constexpr,
    HISTOGRAM: tl.constexpr,
    BINS: tl.constexpr,
    KEY_SHIFT: tl.constexpr,
    COLUMN_MAX: tl.constexpr,
    N_SCALARS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    start = split * split_len
    end = tl.minimum(start + split_len, cols)
    base = row.to(tl.int64) * cols
    lanes = tl.arange(0, BLOCK)

    nonfinite = tl.zeros((), dtype=tl.int64)
    at_most = tl.zeros((THRESHOLD_PAD,), dtype=tl.int64)
    if N_THRESHOLDS > 0:
        pad = tl.arange(0, THRESHOLD_PAD)
        thresholds = tl.load(thresholds_ptr + pad, mask=pad < N_THRESHOLDS, other=-1.0)
    total = tl.zeros((), dtype=tl.float64)
    square_total = tl.zeros((), dtype=tl.float64)
    abs_total = tl.zeros((), dtype=tl.float64)
    abs_max = tl.zeros((), dtype=tl.float32)
    ranked_max_bits = tl.zeros((), dtype=tl.int32)
    if HISTOGRAM:
        histogram = tl.zeros((BINS,), dtype=tl.int32)

    for offset in range(start, end, BLOCK):
        column = offset + lanes
        mask = column < end
        value = tl.load(x_ptr + base + column, mask=mask, other=0.0).to(tl.float32)
        magnitude = tl.abs(value)
        bits = magnitude.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        finite = bits < INF_BITS
        nonfinite += tl.sum((mask & (~finite)).to(tl.int32), axis=0).to(tl.int64)
        if N_THRESHOLDS > 0:
            below = (magnitude[:, None] <= thresholds[None, :]) & mask[:, None]
            at_most += tl.sum(below.to(tl.int32), axis=0).to(tl.int64)
        if MOMENTS:
            clean = tl.where(finite, value, 0.0)
            total += tl.sum(clean, axis=0).to(tl.float64)
            square_total += tl.sum(clean * clean, axis=0).to(tl.float64)
            abs_total += tl.sum(tl.abs(clean), axis=0).to(tl.float64)
        abs_max = tl.maximum(abs_max, tl.max(tl.where(finite, magnitude, 0.0), axis=0))
        ranked_bits = tl.where(finite, bits, INF_BITS)
        ranked_bits = tl.where(mask, ranked_bits, 0)
        ranked_max_bits = tl.maximum(ranked_max_bits, tl.max(ranked_bits, axis=0))
        if HISTOGRAM:
            window = tl.minimum(tl.maximum((bits >> KEY_SHIFT) - low_key + 2, 1), BINS - 2)
            index = tl.where(bits == 0, 0, window)
            index = tl.where(finite, index, BINS - 1)
            histogram += tl.histogram(index, BINS, mask=mask)
        if COLUMN_MAX:
            tl.atomic_max(column_max_ptr + column, ranked_bits, mask=mask)

    slot = row.to(tl.int64) * splits + split
    out = scalars_ptr + slot * N_SCALARS
    tl.store(out, nonfinite.to(tl.float64))
    if N_THRESHOLDS > 0:
        tl.store(out + 1 + tl.arange(0, THRESHOLD_PAD), at_most.to(tl.float64), mask=tl.arange(0, THRESHOLD_PAD) < N_THRESHOLDS)
    if MOMENTS:
        tl.store(out + 1 + N_THRESHOLDS, total)
        tl.store(out + 2 + N_THRESHOLDS, square_total)
        tl.store(out + 3 + N_THRESHOLDS, abs_total)
    tl.store(maxima_ptr + slot * 2, abs_max)
    tl.store(maxima_ptr + slot * 2 + 1, ranked_max_bits.to(tl.float32, bitcast=True))
    if HISTOGRAM:
        bins = tl.arange(0, BINS)
        tl.atomic_add(histogram_ptr + row.to(tl.int64) * BINS + bins, histogram, mask=histogram > 0)


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def fused_statistics_triton(
    rows: torch.Tensor,
    thresholds: torch.Tensor,
    moments: bool,
    bins: tuple[int, int, int] | None,
    column_max: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Run the kernel on a contiguous ``(rows, cols)`` float16/bfloat16/float32 matrix.

    ``thresholds``: float32 vector (already rounded down to float32, see ``fused``); ``bins``:
    ``(size, key_shift, low_key)`` of the log-magnitude histogram or None. Returns ``(scalars (rows, n) float64,
    maxima (rows, 2) float32, histogram (rows, size) int32 | None, column max (cols,) float32 | None)``, the
    per-split partials already combined.
    """
    n_rows, cols = rows.shape
    device = rows.device
    splits = max(1, min(-(-cols // BLOCK), -(-TARGET_PROGRAMS // max(1, n_rows))))
    split_len = -(-max(cols, 1) // splits)
    split_len = -(-split_len // BLOCK) * BLOCK
    splits = max(1, -(-cols // split_len))
    n_thresholds = thresholds.numel()
    n_scalars = 1 + n_thresholds + (3 if moments else 0)
    scalars = torch.empty(n_rows * splits, n_scalars, dtype=torch.float64, device=device)
    maxima = torch.empty(n_rows * splits, 2, dtype=torch.float32, device=device)
    size, key_shift, low_key = bins if bins is not None else (2, 0, 0)
    histogram = torch.zeros(n_rows, size, dtype=torch.int32, device=device) if bins is not None else None
    column_bits = torch.zeros(cols, dtype=torch.int32, device=device) if column_max else None
    dummy = scalars
    _fused_statistics_kernel[(n_rows, splits)](
        rows,
        thresholds if n_thresholds else dummy,
        scalars,
        maxima,
        histogram if histogram is not None else dummy,
        column_bits if column_bits is not None else dummy,
        cols,
        split_len,
        splits,
        low_key,
        N_THRESHOLDS=n_thresholds,
        THRESHOLD_PAD=_next_power_of_two(max(1, n_thresholds)),
        MOMENTS=moments,
        HISTOGRAM=bins is not None,
        BINS=size,
        KEY_SHIFT=key_shift,
        COLUMN_MAX=column_max,
        N_SCALARS=n_scalars,
        BLOCK=BLOCK,
    )
    scalars = scalars.view(n_rows, splits, n_scalars).sum(1)
    maxima = maxima.view(n_rows, splits, 2).amax(1)
    column = column_bits.view(torch.float32) if column_bits is not None else None
    return scalars, maxima, histogram, column
