"""Triton kernels of the fused statistics (:mod:`lightning_act.stats.fused`): a few reads of the activation,
each at memory speed.

Only imported when Triton is importable. Under ``TRITON_INTERPRET=1`` (set before Triton is first imported)
the same kernels run on CPU tensors, which is how they are tested without a GPU.

The activation is a contiguous ``(rows, cols)`` matrix (rows = samples when per-sample statistics are asked
for, else one row). Three kernels (and a finishing program for the first), each launched only when a statistic
needs it:

1. ``_row_statistics_kernel``, program ``(row, split)`` over ``split_len`` consecutive entries of one row: the
   non-finite count, counts of ``|x| <= t``, sums of ``x``, ``x^2``, ``|x|``, both maxima of ``|x|``, and the
   *coarse* log-magnitude histogram of the row (each coarse bin is ``2^coarse_shift`` consecutive bins of the
   :class:`~lightning_act.stats.histogram_median.LogMagnitudeBins` layout). Every per-entry statistic is
   accumulated per lane in registers and reduced across lanes once, at the end of the program: a
   cross-lane reduction per block (what the first kernel did, 7 per 1024 entries) costs more than the
   memory read. Sums: ``x`` and ``x²`` in float64 per lane (a float32 square is exact there), ``|x|`` in float32
   per lane over ``INNER`` blocks, then float64 (relative error <= ``INNER * 2^-24``). Partials go to the program's own slot; one finishing program
   (``_finish_row_statistics``) adds them in a fixed order (deterministic) and writes the results the
   monitors read (the entry count and sums, the overall and per-row maxima), where a chain of small tensor
   operations used to run: a launch of its own in a pass without a median, else one more program of the
   median kernel (2b); the coarse histogram is added with integer atomics (exact). A pass of counts only (no
   moments, no per-sample statistics) needs no finish: its programs add their counts (whole numbers, exact in
   any order) and maxima (int64 atomic maximum of the bits) into the results directly.
2. ``_refine_histogram_kernel``, same grid: the fine bins of the two coarse bins per row that hold the median's
   two middle order statistics (each program finds them from the row's coarse histogram). With (1) this gives
   exactly the cumulative counts the full histogram would give at those bins, so the median estimate is the
   full histogram's, bit for bit, while every ``tl.histogram`` has few bins (its cost grows with the bin count:
   2048 bins made the first kernel 2.3x slower than a sort). ``_median_kernel`` (one program per row) then
   computes that estimate and the row's massive-count threshold with the same float64 operations as
   :func:`~lightning_act.stats.histogram_median.histogram_median` and ``fused.massive_row_thresholds``: the glue
   between the kernels stays on the device in two launches instead of some fifty small tensor operations,
   whose launches made the statistics host-bound.
3. ``_column_statistics_kernel``, program ``(column block, row group)``: the per-position maximum of ``|x|``
   over the rows of its group, merged across groups with an integer atomic maximum of the float32 bits (which
   order like the non-negative floats: exact in any order; NaN as inf), and per row the count of
   ``|x| >= threshold[row]`` (the massive-activation count), added across column blocks with float64 atomics
   (whole numbers: exact in any order), NaN for a row whose median is.

The buffers the kernels add into (coarse and fine histograms, massive counts, per-position maxima) are views of
one zeroed allocation (:func:`zeroed_buffers`): one memset per pass.

Masked lanes (past the end of a row) load 0 and are excluded from every count, histogram and maximum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
INNER = 8
TARGET_PROGRAMS = 1024
COLUMN_BLOCK = 1024
ROWS_PER_PROGRAM = 8
FINISH_BLOCK = 256
NUM_WARPS = 4
# A global read inside a compiled (not interpreted) kernel must be a constexpr.
INF_BITS = tl.constexpr(0x7F800000)


@triton.jit
def _fine_bin(bits, low_key, BINS: tl.constexpr, KEY_SHIFT: tl.constexpr):
    """The LogMagnitudeBins index of ``|x|`` given its float32 bits with the sign cleared."""
    window = tl.minimum(tl.maximum((bits >> KEY_SHIFT) - low_key + 2, 1), BINS - 2)
    index = tl.where(bits == 0, 0, window)
    return tl.where(bits < INF_BITS, index, BINS - 1)


@triton.jit
def _row_segment(cols, split_len):
    """Program ``(row, split)``'s row, split, column range ``[start, end)`` and the row's offset in the matrix."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    start = split * split_len
    return row, split, start, tl.minimum(start + split_len, cols), row.to(tl.int64) * cols


@triton.jit
def _load_float32(x_ptr, offsets, mask):
    """Entries as float32 and the bits of their magnitudes (sign cleared); masked lanes read 0."""
    value = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    return value, value.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _row_statistics_kernel(
    x_ptr,
    thresholds_ptr,
    scalars_ptr,
    maxima_ptr,
    coarse_ptr,
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
    COARSE_SHIFT: tl.constexpr,
    N_SCALARS: tl.constexpr,
    BLOCK: tl.constexpr,
    INNER: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    row, split, start, end, base = _row_segment(cols, split_len)
    lanes = tl.arange(0, BLOCK)
    pad = tl.arange(0, THRESHOLD_PAD)
    thresholds = tl.load(thresholds_ptr + pad, mask=pad < N_THRESHOLDS, other=-1.0)

    nonfinite = tl.zeros((BLOCK,), dtype=tl.int32)
    at_most = tl.zeros((BLOCK, THRESHOLD_PAD), dtype=tl.int32)
    total = tl.zeros((BLOCK,), dtype=tl.float64)
    square_total = tl.zeros((BLOCK,), dtype=tl.float64)
    abs_total = tl.zeros((BLOCK,), dtype=tl.float64)
    abs_max = tl.zeros((BLOCK,), dtype=tl.float32)
    ranked_max = tl.zeros((BLOCK,), dtype=tl.int32)
    coarse = tl.zeros((BINS >> COARSE_SHIFT,), dtype=tl.int32)

    for outer in range(start, end, BLOCK * INNER):
        abs_part = tl.zeros((BLOCK,), dtype=tl.float32)
        for inner in range(INNER):
            column = outer + inner * BLOCK + lanes
            mask = column < end
            value, bits = _load_float32(x_ptr, base + column, mask)
            magnitude = bits.to(tl.float32, bitcast=True)
            finite = bits < INF_BITS
            nonfinite += (mask & (~finite)).to(tl.int32)
            if N_THRESHOLDS > 0:
                at_most += ((magnitude[:, None] <= thresholds[None, :]) & mask[:, None]).to(tl.int32)
            if MOMENTS:
                # x and x² summed in float64 (a float32 square is exact there): std = sqrt(Σx²/n − mean²) cancels
                # what both share, and float32 roundings, identical for repeated values, made it percents off
                clean = tl.where(finite, value, 0.0)
                wide = clean.to(tl.float64)
                total += wide
                square_total += wide * wide
                abs_part += tl.abs(clean)
            abs_max = tl.maximum(abs_max, tl.where(finite, magnitude, 0.0))
            ranked_max = tl.maximum(ranked_max, tl.where(mask, tl.minimum(bits, INF_BITS), 0))
            if HISTOGRAM:
                index = _fine_bin(bits, low_key, BINS, KEY_SHIFT)
                coarse += tl.histogram(index >> COARSE_SHIFT, BINS >> COARSE_SHIFT, mask=mask)
        if MOMENTS:
            abs_total += abs_part.to(tl.float64)

    if ATOMIC:
        # Counts only (no moments, one row): each program adds its counts to the results themselves, which whole
        # numbers do exactly in any order, and its maxima as the int64 bits of non-negative float64s (ordered like
        # the values); scalars_ptr is then the zeroed [count, scalars...] and maxima_ptr the zeroed bits of the two
        # maxima. No partials, no finishing program.
        tl.atomic_add(scalars_ptr, (end - start).to(tl.float64))
        tl.atomic_add(scalars_ptr + 1, tl.sum(nonfinite, axis=0).to(tl.float64))
        if N_THRESHOLDS > 0:
            tl.atomic_add(scalars_ptr + 2 + pad, tl.sum(at_most, axis=0).to(tl.float64), mask=pad < N_THRESHOLDS)
        tl.atomic_max(maxima_ptr, tl.max(abs_max, axis=0).to(tl.float64).to(tl.int64, bitcast=True))
        ranked = tl.max(ranked_max, axis=0).to(tl.float32, bitcast=True).to(tl.float64)
        tl.atomic_max(maxima_ptr + 1, ranked.to(tl.int64, bitcast=True))
    else:
        slot = row.to(tl.int64) * splits + split
        out = scalars_ptr + slot * N_SCALARS
        tl.store(out, tl.sum(nonfinite, axis=0).to(tl.float64))
        if N_THRESHOLDS > 0:
            tl.store(out + 1 + pad, tl.sum(at_most, axis=0).to(tl.float64), mask=pad < N_THRESHOLDS)
        if MOMENTS:
            tl.store(out + 1 + N_THRESHOLDS, tl.sum(total, axis=0))
            tl.store(out + 2 + N_THRESHOLDS, tl.sum(square_total, axis=0))
            tl.store(out + 3 + N_THRESHOLDS, tl.sum(abs_total, axis=0))
        tl.store(maxima_ptr + slot * 2, tl.max(abs_max, axis=0))
        tl.store(maxima_ptr + slot * 2 + 1, tl.max(ranked_max, axis=0).to(tl.float32, bitcast=True))
        if HISTOGRAM:
            coarse_bins = tl.arange(0, BINS >> COARSE_SHIFT)
            tl.atomic_add(coarse_ptr + row.to(tl.int64) * (BINS >> COARSE_SHIFT) + coarse_bins, coarse, mask=coarse > 0)


@triton.jit
def _finish_row_statistics(
    scalars_ptr, maxima_ptr, sums_ptr, overall_ptr, sample_max_ptr, count, rows, splits,
    N_SCALARS: tl.constexpr, SCALARS_PAD: tl.constexpr, PER_SAMPLE: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Kernel 1's per-program partials into the pass's results, by one program in a fixed order (deterministic):
    ``[count, scalar sums...]`` (float64), the two overall maxima (float64) and, per row, the ranked maximum over
    that row's programs (float64). One program instead of the half-dozen small tensor operations it replaces."""
    programs = rows * splits
    columns = tl.arange(0, SCALARS_PAD)
    in_columns = columns < N_SCALARS
    total = tl.zeros((SCALARS_PAD,), dtype=tl.float64)
    abs_max = tl.zeros((BLOCK_P,), dtype=tl.float32)
    ranked_max = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for start in range(0, programs, BLOCK_P):
        slots = start + tl.arange(0, BLOCK_P)
        present = slots < programs
        block = tl.load(scalars_ptr + slots[:, None] * N_SCALARS + columns[None, :],
                        mask=present[:, None] & in_columns[None, :], other=0.0)
        total += tl.sum(block, axis=0)
        abs_max = tl.maximum(abs_max, tl.load(maxima_ptr + slots * 2, mask=present, other=0.0))
        ranked_max = tl.maximum(ranked_max, tl.load(maxima_ptr + slots * 2 + 1, mask=present, other=0.0))
    # count + 0.0: a float64 scalar whether Triton passed the count as an integer or, equal to 1, as a constexpr
    tl.store(sums_ptr, count + tl.zeros((), tl.float64))
    tl.store(sums_ptr + 1 + columns, total, mask=in_columns)
    tl.store(overall_ptr, tl.max(abs_max, axis=0).to(tl.float64))
    tl.store(overall_ptr + 1, tl.max(ranked_max, axis=0).to(tl.float64))
    if PER_SAMPLE:
        for start in range(0, rows, BLOCK_P):
            row = start + tl.arange(0, BLOCK_P)
            present = row < rows
            row_max = tl.zeros((BLOCK_P,), dtype=tl.float32)
            for split in range(0, splits):
                slot = row.to(tl.int64) * splits + split
                row_max = tl.maximum(row_max, tl.load(maxima_ptr + slot * 2 + 1, mask=present, other=0.0))
            tl.store(sample_max_ptr + row, row_max.to(tl.float64), mask=present)


@triton.jit
def _finish_row_statistics_kernel(
    scalars_ptr,
    maxima_ptr,
    sums_ptr,
    overall_ptr,
    sample_max_ptr,
    count,
    rows,
    splits,
    N_SCALARS: tl.constexpr,
    SCALARS_PAD: tl.constexpr,
    PER_SAMPLE: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """The finishing program on its own (a pass without a median, whose kernel would otherwise run it)."""
    _finish_row_statistics(scalars_ptr, maxima_ptr, sums_ptr, overall_ptr, sample_max_ptr, count, rows, splits,
                           N_SCALARS, SCALARS_PAD, PER_SAMPLE, BLOCK_P)


@triton.jit
def _middle_coarse_bins(coarse_ptr, row, rank_low, rank_high, COARSE: tl.constexpr):
    """The coarse bins holding the order statistics of ranks ``rank_low`` and ``rank_high`` of one row: the count of
    coarse bins whose cumulative count is below the rank (the first bin reaching it), at most the last bin."""
    bins = tl.arange(0, COARSE)
    cumulative = tl.cumsum(tl.load(coarse_ptr + row.to(tl.int64) * COARSE + bins), axis=0)
    low = tl.minimum(tl.sum((cumulative < rank_low).to(tl.int32), axis=0), COARSE - 1)
    high = tl.minimum(tl.sum((cumulative < rank_high).to(tl.int32), axis=0), COARSE - 1)
    return low, high


@triton.jit
def _refine_histogram_kernel(
    x_ptr,
    coarse_ptr,
    targets_ptr,
    fine_ptr,
    cols,
    split_len,
    low_key,
    rank_low,
    rank_high,
    BINS: tl.constexpr,
    KEY_SHIFT: tl.constexpr,
    COARSE_SHIFT: tl.constexpr,
    SUB: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row, split, start, end, base = _row_segment(cols, split_len)
    lanes = tl.arange(0, BLOCK)
    low_target, high_target = _middle_coarse_bins(coarse_ptr, row, rank_low, rank_high, BINS >> COARSE_SHIFT)
    if split == 0:
        tl.store(targets_ptr + row * 2, low_target)
        tl.store(targets_ptr + row * 2 + 1, high_target)
    fine = tl.zeros((2 * SUB,), dtype=tl.int32)
    for offset in range(start, end, BLOCK):
        column = offset + lanes
        mask = column < end
        _, bits = _load_float32(x_ptr, base + column, mask)
        index = _fine_bin(bits, low_key, BINS, KEY_SHIFT)
        coarse = index >> COARSE_SHIFT
        sub = index & (SUB - 1)
        slot = tl.where(coarse == low_target, sub, SUB + sub)
        keep = mask & ((coarse == low_target) | (coarse == high_target))
        fine += tl.histogram(slot, 2 * SUB, mask=keep)
    fine_bins = tl.arange(0, 2 * SUB)
    tl.atomic_add(fine_ptr + row.to(tl.int64) * (2 * SUB) + fine_bins, fine, mask=fine > 0)


@triton.jit
def _bin_edge(key, KEY_SHIFT: tl.constexpr):
    """The magnitude (float64) whose float32 bits are ``key << KEY_SHIFT``: the lower edge of that key's bin."""
    return (key << KEY_SHIFT).to(tl.int32).to(tl.float32, bitcast=True).to(tl.float64)


@triton.jit
def _order_statistic(coarse, fine, target, rank, total, low_key, BINS: tl.constexpr, KEY_SHIFT: tl.constexpr,
                     COARSE: tl.constexpr, SUB: tl.constexpr):
    """``histogram_order_statistic`` of one rank from the coarse counts and the fine counts of its coarse bin:
    the same operations in the same order, so the same float64 result."""
    coarse_bins = tl.arange(0, COARSE)
    sub_bins = tl.arange(0, SUB)
    before_coarse = tl.sum(tl.where(coarse_bins < target, coarse, 0), axis=0)
    cumulative = tl.cumsum(fine, axis=0) + before_coarse
    j = tl.minimum(tl.sum((cumulative < rank).to(tl.int32), axis=0), SUB - 1)
    in_bin = tl.sum(tl.where(sub_bins == j, fine, 0), axis=0)
    before = tl.sum(tl.where(sub_bins < j, fine, 0), axis=0) + before_coarse
    index = target * SUB + j
    # rank + 0.0: a float64 scalar whether Triton passed the rank as an int32 or, equal to 1, as a constexpr
    position = (rank + tl.zeros((), tl.float64) - before.to(tl.float64) - 0.5) / tl.maximum(in_bin, 1).to(tl.float64)
    window_low = _bin_edge(low_key + index - 2, KEY_SHIFT)
    window_high = _bin_edge(low_key + index - 1, KEY_SHIFT)
    low = tl.where(index <= 1, 0.0, window_low)
    high = tl.where(index == 0, 0.0, window_high)
    estimate = low + (high - low) * position
    estimate = tl.where(index == 0, 0.0, estimate)
    estimate = tl.where(index == BINS - 1, float("inf"), estimate)
    unknown = (index == 1) | (index == BINS - 2) | (rank < 1) | (rank > total)
    return tl.where(unknown, float("nan"), estimate)


@triton.jit
def _row_median(coarse_ptr, fine_ptr, targets_ptr, ratio_ptr, median_ptr, threshold_ptr, cols, rank_low, rank_high,
                low_key, above_abs, MASSIVE: tl.constexpr, BINS: tl.constexpr, KEY_SHIFT: tl.constexpr,
                COARSE: tl.constexpr, SUB: tl.constexpr):
    """The median kernel's work for the row of this program."""
    row = tl.program_id(0).to(tl.int64)
    coarse = tl.load(coarse_ptr + row * COARSE + tl.arange(0, COARSE))
    low_fine = tl.load(fine_ptr + row * 2 * SUB + tl.arange(0, SUB))
    high_fine = tl.load(fine_ptr + row * 2 * SUB + SUB + tl.arange(0, SUB))
    low_target = tl.load(targets_ptr + row * 2)
    high_target = tl.load(targets_ptr + row * 2 + 1)
    high_fine = tl.where(high_target == low_target, low_fine, high_fine)
    low = _order_statistic(coarse, low_fine, low_target, rank_low, cols, low_key, BINS, KEY_SHIFT, COARSE, SUB)
    high = _order_statistic(coarse, high_fine, high_target, rank_high, cols, low_key, BINS, KEY_SHIFT, COARSE, SUB)
    median = (low + high) / 2
    tl.store(median_ptr + row, median)
    if MASSIVE:
        relative = tl.load(ratio_ptr) * median
        rounded = relative.to(tl.float32)
        up = (rounded.to(tl.int32, bitcast=True) + 1).to(tl.float32, bitcast=True)
        rounded = tl.where(rounded.to(tl.float64) < relative, up, rounded)
        threshold = tl.where(rounded != rounded, rounded, tl.maximum(rounded, above_abs))
        tl.store(threshold_ptr + row, threshold)


@triton.jit
def _median_kernel(
    coarse_ptr,
    fine_ptr,
    targets_ptr,
    ratio_ptr,
    median_ptr,
    threshold_ptr,
    cols,
    rank_low,
    rank_high,
    low_key,
    above_abs,
    scalars_ptr,
    maxima_ptr,
    sums_ptr,
    overall_ptr,
    sample_max_ptr,
    count,
    rows,
    splits,
    MASSIVE: tl.constexpr,
    BINS: tl.constexpr,
    KEY_SHIFT: tl.constexpr,
    COARSE: tl.constexpr,
    SUB: tl.constexpr,
    N_SCALARS: tl.constexpr,
    SCALARS_PAD: tl.constexpr,
    PER_SAMPLE: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Per row: the median of ``|x|`` (``histogram_median``) and, for the massive count, the float32 threshold of
    ``massive_row_thresholds`` (``max(next float32 above abs_threshold, ratio * median rounded up)``). One program
    more (the last) runs kernel 1's finishing program, which reads only kernel 1's partials: one launch fewer."""
    if tl.program_id(0) == rows:
        _finish_row_statistics(scalars_ptr, maxima_ptr, sums_ptr, overall_ptr, sample_max_ptr, count, rows, splits,
                               N_SCALARS, SCALARS_PAD, PER_SAMPLE, BLOCK_P)
    else:
        _row_median(coarse_ptr, fine_ptr, targets_ptr, ratio_ptr, median_ptr, threshold_ptr, cols, rank_low, rank_high,
                    low_key, above_abs, MASSIVE, BINS, KEY_SHIFT, COARSE, SUB)


@triton.jit
def _column_statistics_kernel(
    x_ptr,
    row_thresholds_ptr,
    median_ptr,
    column_max_ptr,
    counts_ptr,
    rows,
    cols,
    COUNT: tl.constexpr,
    COLUMN_MAX: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr,
    COLUMN_BLOCK: tl.constexpr,
):
    column_block = tl.program_id(0)
    group = tl.program_id(1)
    column = column_block * COLUMN_BLOCK + tl.arange(0, COLUMN_BLOCK)
    in_row = column < cols
    ranked_max = tl.zeros((COLUMN_BLOCK,), dtype=tl.int32)
    for i in range(ROWS_PER_PROGRAM):
        row = group * ROWS_PER_PROGRAM + i
        present = row < rows
        mask = in_row & present
        _, bits = _load_float32(x_ptr, row.to(tl.int64) * cols + column, mask)
        ranked = tl.minimum(bits, INF_BITS)  # NaN ranks as inf
        if COLUMN_MAX:
            ranked_max = tl.maximum(ranked_max, ranked)
        if COUNT:
            threshold = tl.load(row_thresholds_ptr + row, mask=present, other=float("inf"))
            above = (ranked.to(tl.float32, bitcast=True) >= threshold) & mask
            # whole numbers below 2^53 add exactly in any order; a row whose median is unknown (NaN) counts NaN
            count = tl.sum(above.to(tl.int32), axis=0).to(tl.float64)
            median = tl.load(median_ptr + row, mask=present, other=0.0)
            count = tl.where(median != median, float("nan"), count)
            tl.atomic_add(counts_ptr + row, count, mask=present)
    if COLUMN_MAX:
        # the bits of non-negative floats order like the floats: an integer maximum, the same in any order
        tl.atomic_max(column_max_ptr + column, ranked_max, mask=in_row)


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _split(rows: int, cols: int) -> tuple[int, int]:
    """``(split_len, splits)``: about TARGET_PROGRAMS programs in all, each a whole number of ``BLOCK * INNER``."""
    step = BLOCK * INNER
    splits = max(1, min(-(-cols // step), -(-TARGET_PROGRAMS // max(1, rows))))
    split_len = -(-max(cols, 1) // splits)
    split_len = -(-split_len // step) * step
    return split_len, max(1, -(-cols // split_len))


def zeroed_buffers(device: torch.device, float64_sizes: tuple[int, ...], int32_sizes: tuple[int, ...]) -> list[torch.Tensor]:
    """Zeroed float64 and int32 buffers of these sizes, in that order, as views of one allocation: one memset for
    all the buffers a pass accumulates into (on a GPU each ``torch.zeros`` is a launch)."""
    # the float64 buffers first, so that each starts at an even int32 offset (8-byte aligned)
    sizes = [2 * size for size in float64_sizes] + list(int32_sizes)
    parts = torch.zeros(sum(sizes), dtype=torch.int32, device=device).split(sizes)
    return [part.view(torch.float64) for part in parts[: len(float64_sizes)]] + list(parts[len(float64_sizes) :])


def row_statistics(
    rows: torch.Tensor, thresholds: torch.Tensor, n_thresholds: int, moments: bool, bins: tuple[int, int, int] | None,
    coarse_shift: int, per_sample: bool, coarse: torch.Tensor | None, finish: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, tuple[object, ...] | None]:
    """Kernel 1 and its finish on a contiguous ``(rows, cols)`` float16/bfloat16/float32 matrix.

    ``thresholds``: float32 vector on the device whose first ``n_thresholds`` entries are the thresholds (already
    rounded down to float32, see ``fused``; at least one entry, as the kernel needs a pointer); ``bins``:
    ``(size, key_shift, low_key)`` of the log-magnitude layout or None; ``coarse``: with ``bins``, the zeroed int32
    buffer of ``rows x (size >> coarse_shift)`` counts (row-major, flat or not) the coarse histogram is added into. Returns ``(sums (1 + n,)
    float64: the entry count and the scalars over all rows, maxima (2,) float64, per-row ranked maxima (rows,)
    float64 | None (with ``per_sample``), finish)``; the partials of every program are added by one finishing
    program in a fixed order (deterministic). With ``finish=False`` that program is not launched here: ``finish``
    holds its arguments for :func:`sample_medians`, whose kernel runs it as one more program (the results are
    written by then); else ``finish`` is None. A pass of counts only (no moments, no per-sample statistics, e.g.
    ``ActivationSparsity``'s) has no finishing program: its programs add their counts and maxima to the results
    with atomics, exact in any order for whole numbers and maxima.
    """
    n_rows, cols = rows.shape
    device = rows.device
    split_len, splits = _split(n_rows, cols)
    n_scalars = 1 + n_thresholds + (3 if moments else 0)
    size, key_shift, low_key = bins if bins is not None else (1 << coarse_shift, 0, 0)
    # Only counts and the two maxima: the programs add them into the results (see the kernel), with no finish.
    atomic = not moments and not per_sample and bins is None
    if atomic:
        sums, overall = torch.zeros(1 + n_scalars + 2, dtype=torch.float64, device=device).split([1 + n_scalars, 2])
        scalars, maxima = sums, overall.view(torch.int64)
    else:
        scalars = torch.empty(n_rows * splits, n_scalars, dtype=torch.float64, device=device)
        maxima = torch.empty(n_rows * splits, 2, dtype=torch.float32, device=device)
    _row_statistics_kernel[(n_rows, splits)](
        rows, thresholds, scalars, maxima, coarse if coarse is not None else scalars,
        cols, split_len, splits, low_key,
        N_THRESHOLDS=n_thresholds, THRESHOLD_PAD=_next_power_of_two(max(1, n_thresholds)), MOMENTS=moments,
        HISTOGRAM=bins is not None, BINS=size, KEY_SHIFT=key_shift, COARSE_SHIFT=coarse_shift, N_SCALARS=n_scalars,
        BLOCK=BLOCK, INNER=INNER, ATOMIC=atomic, num_warps=NUM_WARPS,
    )
    if atomic:
        return sums, overall, None, None
    sums = torch.empty(1 + n_scalars, dtype=torch.float64, device=device)
    overall = torch.empty(2, dtype=torch.float64, device=device)
    sample_max = torch.empty(n_rows, dtype=torch.float64, device=device) if per_sample else None
    args = (scalars, maxima, sums, overall, sample_max if sample_max is not None else overall, n_rows * cols, n_rows,
            splits, n_scalars, per_sample)
    if not finish:
        return sums, overall, sample_max, args
    *pointers, n_scalars, per_sample = args
    _finish_row_statistics_kernel[(1,)](
        *pointers, N_SCALARS=n_scalars, SCALARS_PAD=_next_power_of_two(n_scalars), PER_SAMPLE=per_sample,
        BLOCK_P=FINISH_BLOCK, num_warps=NUM_WARPS,
    )
    return sums, overall, sample_max, None


def sample_medians(
    rows: torch.Tensor, coarse: torch.Tensor, fine: torch.Tensor, bins: tuple[int, int, int], coarse_shift: int,
    ratio: torch.Tensor | None, above_abs: float, finish: tuple[object, ...],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kernels 2 and 2b: per row the median of ``|x|`` (float64, the full histogram's ``histogram_median`` estimate)
    from kernel 1's ``coarse`` histogram, and, when ``ratio`` (a float64 device scalar) is given, the float32
    massive threshold ``max(above_abs, ratio * median rounded up)`` (NaN where the median is). ``fine`` is a zeroed int32
    buffer of ``rows x (2 << coarse_shift)`` counts (row-major); kernel 2b also runs kernel 1's finishing program (``finish``, from
    :func:`row_statistics` with ``finish=False``)."""
    n_rows, cols = rows.shape
    split_len, splits = _split(n_rows, cols)
    size, key_shift, low_key = bins
    sub = 1 << coarse_shift
    device = rows.device
    targets = torch.empty(n_rows, 2, dtype=torch.int32, device=device)
    ranks = ((cols + 1) // 2, cols // 2 + 1)
    _refine_histogram_kernel[(n_rows, splits)](
        rows, coarse, targets, fine, cols, split_len, low_key, *ranks, BINS=size, KEY_SHIFT=key_shift,
        COARSE_SHIFT=coarse_shift, SUB=sub, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    median = torch.empty(n_rows, dtype=torch.float64, device=device)
    threshold = torch.empty(n_rows, dtype=torch.float32, device=device) if ratio is not None else None
    *pointers, n_scalars, per_sample = finish
    _median_kernel[(n_rows + 1,)](
        coarse, fine, targets, ratio if ratio is not None else median, median,
        threshold if threshold is not None else median, cols, *ranks, low_key, above_abs, *pointers,
        MASSIVE=ratio is not None, BINS=size, KEY_SHIFT=key_shift, COARSE=size >> coarse_shift, SUB=sub,
        N_SCALARS=n_scalars, SCALARS_PAD=_next_power_of_two(n_scalars), PER_SAMPLE=per_sample,
        BLOCK_P=FINISH_BLOCK // 4,  # one warp here (below): a quarter of the block per step keeps its registers
        num_warps=1, enable_fp_fusion=False,  # no fused multiply-add: the same roundings as the torch functions
    )
    return median, threshold


def column_statistics(
    rows: torch.Tensor, row_thresholds: torch.Tensor | None, median: torch.Tensor | None,
    column_max: torch.Tensor | None, counts: torch.Tensor | None,
) -> None:
    """Kernel 3, into zeroed buffers: ``column_max`` (cols,) int32 receives the bits of the per-position max ``|x|``
    (NaN as inf; read it with ``.view(torch.float32)``), ``counts`` (rows,) float64 per row the count of
    ``|x| >= row_thresholds`` (NaN where the row's ``median`` is); ``row_thresholds`` is float32 ``(rows,)`` and
    ``median`` float64 ``(rows,)``, or all three None for no count."""
    n_rows, cols = rows.shape
    column_blocks = -(-cols // COLUMN_BLOCK)
    groups = -(-n_rows // ROWS_PER_PROGRAM)
    dummy = column_max if column_max is not None else counts
    _column_statistics_kernel[(column_blocks, groups)](
        rows, row_thresholds if row_thresholds is not None else dummy, median if median is not None else dummy,
        column_max if column_max is not None else dummy, counts if counts is not None else dummy, n_rows, cols,
        COUNT=row_thresholds is not None, COLUMN_MAX=column_max is not None, ROWS_PER_PROGRAM=ROWS_PER_PROGRAM,
        COLUMN_BLOCK=COLUMN_BLOCK, num_warps=NUM_WARPS,
    )
