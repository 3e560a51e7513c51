"""The fused statistics pass against independent float64 numpy, and the monitors' existing partials.

Every implementation (eager fallback here; the Triton kernel on CPU under ``TRITON_INTERPRET=1`` in a
subprocess, so the interpreter flag never leaks into this process) is compared with numpy on inputs with
NaN, +-inf, exact zeros, odd sizes and bf16/fp16/fp32 dtypes. The adapters are compared with the functions
the monitors call today (``moment_partials``, ``zero_partials``, ``massive_partials``, ``topk_positions``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from _interpreter import run_interpreted
from lightning_act.stats.fused import (
    FusedSpec,
    comparable_threshold,
    exact_median_is_cheaper,
    fused_statistics,
    massive_partials_from,
    massive_spec,
    moment_partials_from,
    moment_spec,
    topk_positions_from,
    zero_partials_from,
    zero_spec,
)
from lightning_act.stats.histogram_median import LogMagnitudeBins, histogram_median, log_magnitude_histogram
from lightning_act.stats.massive import massive_partials, topk_positions
from lightning_act.stats.moments import moment_partials
from lightning_act.stats.sparsity import zero_partials

SPEC = moment_spec(0.0).union(zero_spec(0.25), massive_spec())
# counts only (ActivationSparsity's pass): on the Triton path its programs add into the results with atomics
COUNTS_SPEC = zero_spec(0.0).union(zero_spec(0.25))
# (shape, dtype): odd sizes that leave partial blocks, a 4-D conv map, one sample, fp16/bf16.
# (19, 3, 5): more samples than one program of the column kernel reads (8), so its row groups are merged too
CASES = [((3, 5, 7), "float32"), ((2, 3, 4, 5), "bfloat16"), ((1, 1031), "float16"), ((4, 2053), "float32"),
         ((19, 3, 5), "float32")]


def one_entry_input() -> torch.Tensor:
    """Samples of a single entry: both middle ranks are 1 (an int Triton specialises to a constexpr)."""
    return torch.tensor([[0.5], [0.0], [float("nan")], [2e3]])


def late_maximum_input() -> torch.Tensor:
    """One row over several programs of the row kernel (8192 entries each), whose two maxima (an inf, and 300 as the
    largest finite magnitude) both lie in the last program only."""
    x = torch.randn(1, 3 * 8192 + 5, generator=torch.Generator().manual_seed(4))
    x[0, -3] = 300.0
    x[0, -1] = float("inf")
    return x


def split_median_input() -> torch.Tensor:
    """Rows whose two middle order statistics lie far apart (in different coarse bins of the two-level histogram)."""
    x = torch.ones(3, 2000)
    x[0, 1000:] = 1000.0
    x[1, :999] = -1e-3
    x[2, ::2] = 0.0
    return x


def special_rows_input() -> torch.Tensor:
    """Rows whose median lies in each special bin: zeros, underflow and overflow (unknown: NaN), non-finite (inf);
    and a row of massive entries at exactly the absolute threshold (100 is not above it) and just above it."""
    x = torch.ones(6, 11)
    x[0] = 0.0
    x[1] = 1e-9
    x[2] = -1e6
    x[3, :6] = float("nan")
    x[3, 6:8] = float("-inf")
    x[4, :3] = 100.0
    x[4, 3:5] = float(np.nextafter(np.float32(100.0), np.float32(200.0)))
    x[4, 5:] = 1e-3
    x[5, ::2] = 0.0
    return x


def make_input(shape: tuple[int, ...], dtype: str, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = 2.0 * torch.randn(shape, generator=generator)
    flat = x.view(-1)
    flat[:: 7] = 0.0
    flat[3] = float("nan")
    flat[-2] = float("inf")
    flat[-1] = 300.0
    if flat.numel() > 11:
        flat[11] = float("-inf")
        flat[5] = 0.25  # exactly on a threshold
    return x.to(getattr(torch, dtype))


def numpy_reference(x: torch.Tensor, spec: FusedSpec) -> dict[str, np.ndarray]:
    """Independent float64 statistics of ``x`` (read as float64 exactly from its stored values)."""
    v = x.double().numpy()
    rows = v.reshape(v.shape[0], -1)
    mag = np.abs(rows)
    finite = np.isfinite(rows)
    clean = np.where(finite, rows, 0.0)
    ranked = np.where(np.isnan(mag), np.inf, mag)
    return {
        "count": np.array(v.size, dtype=np.float64),
        "nonfinite": np.array((~finite).sum(), dtype=np.float64),
        "at_most": np.array([(finite & (mag <= t)).sum() for t in spec.thresholds], dtype=np.float64),
        "sum": clean.sum(), "sq_sum": (clean**2).sum(), "abs_sum": np.abs(clean).sum(),
        "abs_max": np.where(finite, mag, 0.0).max(), "magnitude_max": ranked.max(),
        "sample_max": ranked.max(1), "column_max": ranked.max(0),
    }


def assert_matches_numpy(x: torch.Tensor, stats, spec: FusedSpec, triton: bool = False) -> None:
    ref = numpy_reference(x, spec)
    assert stats.value("count").item() == ref["count"]
    assert stats.value("nonfinite").item() == ref["nonfinite"]
    np.testing.assert_array_equal([stats.at_most(t).item() for t in spec.thresholds], ref["at_most"])
    scale = ref["abs_sum"]
    # fp32 block sums added in fp64: relative error <= ~11 * 2^-24 of the sum of magnitudes.
    np.testing.assert_allclose(stats.value("sum").item(), ref["sum"], atol=1e-6 * scale)
    np.testing.assert_allclose(stats.value("abs_sum").item(), ref["abs_sum"], rtol=1e-6)
    np.testing.assert_allclose(stats.value("sq_sum").item(), ref["sq_sum"], rtol=1e-6)
    assert stats.value("abs_max").item() == ref["abs_max"]
    assert stats.value("magnitude_max").item() == ref["magnitude_max"]
    np.testing.assert_array_equal(stats.sample_magnitude_max.numpy(), ref["sample_max"])
    np.testing.assert_array_equal(stats.column_max.double().numpy(), ref["column_max"])
    assert_median_and_massive_count(x, stats, spec, triton)


def assert_counts_match_numpy(x: torch.Tensor, stats) -> None:
    """A pass of :data:`COUNTS_SPEC`: every count and both maxima exactly numpy's."""
    ref = numpy_reference(x, COUNTS_SPEC)
    assert stats.value("count").item() == ref["count"]
    assert stats.value("nonfinite").item() == ref["nonfinite"]
    np.testing.assert_array_equal([stats.at_most(t).item() for t in COUNTS_SPEC.thresholds], ref["at_most"])
    assert stats.value("abs_max").item() == ref["abs_max"]
    assert stats.value("magnitude_max").item() == ref["magnitude_max"]


def assert_median_and_massive_count(x: torch.Tensor, stats, spec: FusedSpec, triton: bool) -> None:
    """The median is exactly the estimate of the full reference histogram (scatter-add of every entry's bin),
    within one bin of numpy's median, or (the eager fallback's narrow samples) numpy's median exactly; the
    massive count is numpy's count at that median."""
    bins = spec.median
    median = stats.sample_median.double().numpy()
    ranked = np.abs(x.double().numpy().reshape(x.shape[0], -1))
    ranked[np.isnan(ranked)] = np.inf
    exact = np.median(ranked, axis=1)
    if not triton and exact_median_is_cheaper(ranked.shape[1], bins):
        np.testing.assert_array_equal(median, exact)
    else:
        expected = histogram_median(log_magnitude_histogram(x.float(), bins, dim=0), bins).numpy()
        expected = np.where(expected > ranked.max(1), ranked.max(1), expected)  # capped at the sample's max |x|
        np.testing.assert_array_equal(median, expected)
        known = np.isfinite(median) & (exact > 0) & np.isfinite(exact)
        assert np.all(np.abs(median[known] / exact[known] - 1) <= bins.relative_width)
    abs_threshold, ratio_threshold = spec.massive
    with np.errstate(invalid="ignore"):
        count = ((ranked > abs_threshold) & (ranked >= ratio_threshold * median[:, None])).sum(1).astype(np.float64)
    count[np.isnan(median)] = np.nan
    np.testing.assert_array_equal(stats.sample_massive_count.double().numpy(), count)


@pytest.mark.parametrize("shape,dtype", CASES)
def test_eager_fallback_matches_float64_numpy(shape: tuple[int, ...], dtype: str) -> None:
    x = make_input(shape, dtype, seed=len(shape))
    assert_matches_numpy(x, fused_statistics(x, SPEC, "torch"), SPEC)


@pytest.mark.parametrize("make", [split_median_input, special_rows_input, one_entry_input])
def test_eager_fallback_special_medians_match_float64_numpy(make) -> None:  # noqa: ANN001 - a test input factory
    x = make()
    assert_matches_numpy(x, fused_statistics(x, SPEC, "torch"), SPEC)


def make_finite_input(shape: tuple[int, ...], dtype: str, seed: int) -> torch.Tensor:
    """All-finite input (the CPU fast path): zeros, -0.0, a subnormal, and magnitudes past both histogram ends."""
    generator = torch.Generator().manual_seed(seed)
    x = 2.0 * torch.randn(shape, generator=generator)
    flat = x.view(-1)
    flat[::7] = 0.0
    flat[1] = -0.0
    flat[2] = 1e-40 if dtype == "float32" else 1e-30  # float32 subnormal; below the window in any dtype
    flat[4] = 0.25  # exactly on a threshold
    flat[-1] = 5e4  # past the top of the window
    flat[-3] = -300.0
    return x.to(getattr(torch, dtype))


@pytest.mark.parametrize("shape,dtype", CASES)
def test_eager_fallback_on_finite_input_matches_float64_numpy(shape: tuple[int, ...], dtype: str) -> None:
    x = make_finite_input(shape, dtype, seed=10 + len(shape))
    assert_matches_numpy(x, fused_statistics(x, SPEC, "torch"), SPEC)


def test_thresholds_compare_as_real_numbers_not_in_the_input_dtype() -> None:
    """bf16(0.1) = 0.10009765625 > 0.1: it must not count as ``|x| <= 0.1`` (a bf16 comparison says it does)."""
    x = torch.tensor([0.1, -0.1, 0.09], dtype=torch.bfloat16)
    stats = fused_statistics(x, zero_spec(0.1), "torch")
    exact = float((np.abs(x.double().numpy()) <= 0.1).sum())
    assert stats.at_most(0.1).item() == exact == 1.0
    assert float((x.abs() <= 0.1).sum()) == 3.0  # what an input-dtype comparison gives
    assert comparable_threshold(0.1, torch.float32) <= 0.1


def test_adapters_reproduce_the_monitors_partials() -> None:
    x = make_input((4, 9, 16), "float32", seed=1)
    stats = fused_statistics(x, SPEC, "torch")
    sums, maxima = moment_partials(x, 0.0)
    fused_sums, fused_maxima = moment_partials_from(stats, 0.0)
    np.testing.assert_allclose(fused_sums.numpy(), sums.numpy(), rtol=1e-12)
    assert torch.equal(fused_maxima, maxima)
    assert torch.equal(zero_partials_from(stats, 0.25), zero_partials(x, 0.25))


def test_massive_partials_from_histogram_match_exact_within_the_median_bound() -> None:
    generator = torch.Generator().manual_seed(5)
    h = torch.randn(6, 33, 48, generator=generator)
    h[:, 0, 7] = 4.0e3  # massive: > 100 and > 1000 x median, in the overflow bin of the default window
    h[2, 5, 11] = 700.0
    bins = LogMagnitudeBins()
    stats = fused_statistics(h, massive_spec(bins), "torch")
    exact_sums, exact_max = massive_partials(h)
    sums, maxima = massive_partials_from(stats)
    assert sums[0] == exact_sums[0]
    np.testing.assert_allclose(sums[1:3].numpy(), exact_sums[1:3].numpy(), rtol=bins.relative_width)
    assert sums[3].item() == pytest.approx(exact_sums[3].item(), abs=1e-9) and exact_sums[3] == 7
    assert torch.equal(maxima, exact_max)


def test_rank_partials_reduce_to_the_whole_with_one_sum_and_one_max() -> None:
    """Two "ranks" holding halves of the batch: SUM of sums, MAX of maxima, per-sample values = the whole."""
    x = make_input((6, 11, 13), "bfloat16", seed=4)
    whole = fused_statistics(x, SPEC, "torch")
    halves = [fused_statistics(part, SPEC, "torch") for part in x.split(3)]
    np.testing.assert_allclose((halves[0].sums + halves[1].sums).numpy(), whole.sums.numpy(), rtol=1e-12)
    assert torch.equal(torch.maximum(halves[0].maxima, halves[1].maxima), whole.maxima)
    for name in ("sample_median", "sample_massive_count", "sample_magnitude_max"):
        parts = torch.cat([getattr(half, name) for half in halves])
        np.testing.assert_array_equal(parts.numpy(), getattr(whole, name).numpy())


@pytest.mark.parametrize("shape", [(5, 40), (3, 6, 10), (2, 4, 3, 5), (3, 2)])  # (3, 2): 2 positions, 2 NaN slots
def test_topk_positions_match_the_monitors_layout(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    stats = fused_statistics(x, massive_spec(), "torch")
    torch.testing.assert_close(topk_positions_from(stats, 4), topk_positions(x, 4), rtol=0, atol=0, equal_nan=True)


def test_spec_union_and_bad_input() -> None:
    spec = moment_spec(0.0).union(zero_spec(0.0), zero_spec(1e-3))
    assert spec.thresholds == (0.0, 1e-3) and spec.moments and spec.median is None and not spec.per_sample
    stats = fused_statistics(torch.zeros(0, 3), spec, "torch")
    assert stats.value("count").item() == 0 and stats.value("abs_max").item() == 0
    with pytest.raises(KeyError, match="was not computed"):
        fused_statistics(torch.ones(3), zero_spec(0.0), "torch").value("sum")
    with pytest.raises(ValueError, match="finite and >= 0"):
        FusedSpec(thresholds=(-1.0,))
    with pytest.raises(ValueError, match="different histogram layouts"):
        massive_spec().union(massive_spec(LogMagnitudeBins(sub_bits=5, size=1024)))
    with pytest.raises(ValueError, match="different massive thresholds"):
        massive_spec().union(massive_spec(abs_threshold=50.0))
    with pytest.raises(ValueError, match="needs the median"):
        FusedSpec(massive=(100.0, 1000.0))
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        if os.environ.get("TRITON_INTERPRET") != "1" and importlib.util.find_spec("triton") is not None:
            fused_statistics(torch.ones(3), zero_spec(0.0), "triton")
        else:
            raise ValueError("needs a CUDA tensor")


TRITON_CHECKER = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from test_fused_stats import (CASES, COUNTS_SPEC, SPEC, late_maximum_input, make_input, one_entry_input,
                              special_rows_input, split_median_input)
from lightning_act.stats.fused import fused_statistics
out = []
extra = [split_median_input(), special_rows_input(), one_entry_input(), late_maximum_input()]
for x in [make_input(shape, dtype, seed=len(shape)) for shape, dtype in CASES] + extra:
    s = fused_statistics(x, SPEC, "triton")
    fields = (s.sums, s.maxima, s.sample_magnitude_max, s.sample_median, s.sample_massive_count, s.column_max)
    counts = fused_statistics(x, COUNTS_SPEC, "triton")
    # copies: some fields are typed views of one zeroed buffer
    out.append((x, [t.clone() for t in fields], [counts.sums.clone(), counts.maxima.clone()]))
torch.save(out, sys.argv[2])
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernel_matches_float64_numpy_under_interpreter(tmp_path: Path) -> None:
    from lightning_act.stats.fused import FusedStats

    output = tmp_path / "fused.pt"
    run_interpreted(TRITON_CHECKER, output)
    for x, fields, (sums, maxima) in torch.load(output):
        stats = FusedStats(SPEC, tuple(x.shape), *fields)
        assert_matches_numpy(x, stats, SPEC, triton=True)
        assert_counts_match_numpy(x, FusedStats(COUNTS_SPEC, tuple(x.shape), sums, maxima))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_kernel_matches_float64_numpy_on_cuda() -> None:
    inputs = [make_input(shape, dtype, seed=3) for shape, dtype in [*CASES, ((128, 197, 384), "bfloat16"),
                                                                     ((16, 197, 1536), "float16")]]
    for x in [*inputs, split_median_input(), special_rows_input(), one_entry_input(), late_maximum_input()]:
        stats = fused_statistics(x.cuda(), SPEC, "triton")
        fields = (stats.sums, stats.maxima, stats.sample_magnitude_max, stats.sample_median, stats.sample_massive_count,
                  stats.column_max)
        cpu = type(stats)(SPEC, stats.shape, *(t.cpu() for t in fields))
        assert_matches_numpy(x, cpu, SPEC, triton=True)
        assert_counts_match_numpy(x, fused_statistics(x.cuda(), COUNTS_SPEC, "triton"))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_compile_for_hopper_without_spills() -> None:
    """Ahead-of-time compile to sm_90 (no GPU needed): catches what the interpreter forgives (e.g. globals), and
    ``ptxas -v`` (where Triton ships it) reports no register spills."""
    from _hopper import hopper_ptx, ptxas_report

    from lightning_act.stats import triton_fused

    bins = LogMagnitudeBins()
    shift = (bins.size.bit_length() - 1) // 2
    kernels = [
        (triton_fused._row_statistics_kernel,
         {"x_ptr": "*bf16", "thresholds_ptr": "*fp32", "scalars_ptr": "*fp64", "maxima_ptr": "*fp32", "coarse_ptr": "*i32",
          "cols": "i32", "split_len": "i32", "splits": "i32", "low_key": "i32"},
         {"N_THRESHOLDS": 2, "THRESHOLD_PAD": 2, "MOMENTS": True, "HISTOGRAM": True, "BINS": bins.size,
          "KEY_SHIFT": bins.key_shift, "COARSE_SHIFT": shift, "N_SCALARS": 6, "BLOCK": triton_fused.BLOCK,
          "INNER": triton_fused.INNER, "ATOMIC": False}),
        # a pass of counts only: results added with atomics, maxima as int64 bits
        (triton_fused._row_statistics_kernel,
         {"x_ptr": "*bf16", "thresholds_ptr": "*fp32", "scalars_ptr": "*fp64", "maxima_ptr": "*i64", "coarse_ptr": "*fp64",
          "cols": "i32", "split_len": "i32", "splits": "i32", "low_key": "i32"},
         {"N_THRESHOLDS": 2, "THRESHOLD_PAD": 2, "MOMENTS": False, "HISTOGRAM": False, "BINS": 2, "KEY_SHIFT": 0,
          "COARSE_SHIFT": 1, "N_SCALARS": 3, "BLOCK": triton_fused.BLOCK, "INNER": triton_fused.INNER, "ATOMIC": True}),
        (triton_fused._refine_histogram_kernel,
         {"x_ptr": "*bf16", "coarse_ptr": "*i32", "targets_ptr": "*i32", "fine_ptr": "*i32", "cols": "i32",
          "split_len": "i32", "low_key": "i32", "rank_low": "i32", "rank_high": "i32"},
         {"BINS": bins.size, "KEY_SHIFT": bins.key_shift, "COARSE_SHIFT": shift, "SUB": 1 << shift,
          "BLOCK": triton_fused.BLOCK}),
        (triton_fused._median_kernel,
         {"coarse_ptr": "*i32", "fine_ptr": "*i32", "targets_ptr": "*i32", "ratio_ptr": "*fp64", "median_ptr": "*fp64",
          "threshold_ptr": "*fp32", "cols": "i32", "rank_low": "i32", "rank_high": "i32", "low_key": "i32",
          "above_abs": "fp32", "scalars_ptr": "*fp64", "maxima_ptr": "*fp32", "sums_ptr": "*fp64",
          "overall_ptr": "*fp64", "sample_max_ptr": "*fp64", "count": "i64", "rows": "i32", "splits": "i32"},
         {"MASSIVE": True, "BINS": bins.size, "KEY_SHIFT": bins.key_shift, "COARSE": bins.size >> shift,
          "SUB": 1 << shift, "N_SCALARS": 6, "SCALARS_PAD": 8, "PER_SAMPLE": True,
          "BLOCK_P": triton_fused.FINISH_BLOCK // 4}),
        (triton_fused._column_statistics_kernel,
         {"x_ptr": "*bf16", "row_thresholds_ptr": "*fp32", "median_ptr": "*fp64", "column_max_ptr": "*i32",
          "counts_ptr": "*fp64", "rows": "i32", "cols": "i32"},
         {"COUNT": True, "COLUMN_MAX": True, "ROWS_PER_PROGRAM": triton_fused.ROWS_PER_PROGRAM,
          "COLUMN_BLOCK": triton_fused.COLUMN_BLOCK}),
    ]
    kernels.append(
        (triton_fused._finish_row_statistics_kernel,
         {"scalars_ptr": "*fp64", "maxima_ptr": "*fp32", "sums_ptr": "*fp64", "overall_ptr": "*fp64",
          "sample_max_ptr": "*fp64", "count": "i64", "rows": "i32", "splits": "i32"},
         {"N_SCALARS": 6, "SCALARS_PAD": 8, "PER_SAMPLE": True, "BLOCK_P": triton_fused.FINISH_BLOCK}),
    )
    # Triton passes an int argument equal to 1 as a constexpr: a sample of one entry (ranks and count 1)
    _, median_signature, median_options = next(k for k in kernels if k[0] is triton_fused._median_kernel)
    median_constants = {**median_options, "cols": 1, "rank_low": 1, "rank_high": 1, "rows": 1, "splits": 1, "count": 1}
    median_runtime = {k: v for k, v in median_signature.items() if k not in median_constants}
    kernels.append((triton_fused._median_kernel, median_runtime, median_constants))
    for kernel, runtime, constants in kernels:
        # each with the warps it is launched with: the median kernel (and the finish it runs) with one
        warps = 1 if kernel is triton_fused._median_kernel else triton_fused.NUM_WARPS
        ptx = hopper_ptx(kernel, runtime, constants, warps)
        assert ".local" not in ptx, kernel.fn.__name__
        report = ptxas_report(ptx)
        assert report is None or "0 bytes spill stores" in report, (kernel.fn.__name__, report)


def test_float64_massive_count_compares_in_float64() -> None:
    """A float64 entry exactly at ratio * median is massive, the float32 just below it and one at the absolute
    threshold are not; a float32 threshold (rounded up) would miss the first."""
    row = torch.full((1, 9), 0.1, dtype=torch.float64)
    row[0, :3] = torch.tensor([200.0, 200.0, 50.0], dtype=torch.float64)  # above the median's bin: no effect on it
    median = fused_statistics(row, massive_spec(abs_threshold=50.0, ratio_threshold=999.9), "torch").sample_median.item()
    threshold = 999.9 * median  # the estimate stays the same when these entries move, still above its bin
    assert float(np.float32(threshold)) != threshold  # not a float32 number: the case a float32 threshold gets wrong
    row[0, 0] = threshold
    row[0, 1] = float(np.nextafter(np.float32(threshold), np.float32(0.0)))
    stats = fused_statistics(row, massive_spec(abs_threshold=50.0, ratio_threshold=999.9), "torch")
    assert stats.sample_median.item() == median
    expected = float(((row.numpy() > 50.0) & (row.numpy() >= threshold)).sum())
    assert stats.sample_massive_count.item() == expected == 1.0


def offset_moment_inputs() -> list[torch.Tensor]:
    """Two-valued rows ``m ± s`` at ``|mean| / std`` = 300, 3000 and 30000 (float32 squares of repeated values are
    rounded alike: std was 0.7–4.5% off from 300 before round 17), and entries of 1e-25 and 3e-25, whose float32
    squares underflow (rms was 0)."""
    signs = torch.tensor([1.0, -1.0]).repeat(512)
    rows = [(7838.25 * ratio + 7838.25 * signs).float()[None] for ratio in (300.0, 3000.0, 30000.0)]
    return [*rows, (1e-25 * (2.0 + signs)).float()[None]]


MOMENTS_CHECKER = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from test_fused_stats import offset_moment_inputs
from lightning_act.stats.fused import fused_statistics, moment_partials_from, moment_spec
torch.save([moment_partials_from(fused_statistics(x, moment_spec(), "triton")) for x in offset_moment_inputs()],
           sys.argv[2])
"""


def test_std_and_rms_match_numpy_on_every_path_where_float32_squares_were_off(tmp_path: Path) -> None:
    from lightning_act.stats.moments import summarize_moments

    paths = {
        "moment_partials": [moment_partials(x) for x in offset_moment_inputs()],
        "fused torch": [moment_partials_from(fused_statistics(x, moment_spec(), "torch")) for x in offset_moment_inputs()],
    }
    if importlib.util.find_spec("triton") is not None:
        run_interpreted(MOMENTS_CHECKER, tmp_path / "moments.pt")
        paths["triton"] = torch.load(tmp_path / "moments.pt")
    for path, partials in paths.items():
        for x, (sums, maxima) in zip(offset_moment_inputs(), partials, strict=True):
            values = x.double().numpy()
            stats = summarize_moments(sums, maxima)
            assert stats["std"].item() == pytest.approx(values.std(), rel=2e-3), (path, values.mean() / values.std())
            assert stats["rms"].item() == pytest.approx(np.sqrt((values**2).mean()), rel=1e-6), path


def test_cpu_std_keeps_its_digits_on_millions_of_entries_far_from_zero() -> None:
    """Σx² over 4M float64 entries by BLAS ddot was 2e-3 of std off at |mean| = 3e4·std (1.7% at 16.8M entries)."""
    from lightning_act.stats.moments import summarize_moments

    rng = np.random.default_rng(0)
    values = np.where(rng.random(1 << 22) < 0.5, 1.0 - 1.0 / 3e4, 1.0 + 1.0 / 3e4).astype(np.float32)
    stats = summarize_moments(*moment_partials_from(fused_statistics(torch.from_numpy(values).view(64, -1), moment_spec(), "torch")))
    assert stats["std"].item() == pytest.approx(values.astype(np.float64).std(), rel=1e-5)
