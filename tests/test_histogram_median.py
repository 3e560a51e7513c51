"""Log-magnitude histogram medians against numpy's exact median (float64), on varied distributions.

The histogram is built by :func:`log_magnitude_histogram` (the reference the fused pass is tested against
in ``test_fused_stats.py``); here only the bin edges and the estimates are checked, independently, with
numpy: edges by ``np.searchsorted`` on exactly-computed float32 edges, medians by ``np.median``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_act.stats.histogram_median import (
    LogMagnitudeBins,
    device_edges,
    histogram_median,
    log_magnitude_bin,
    log_magnitude_histogram,
)

BINS = LogMagnitudeBins()
TOLERANCE = 0.02


def numpy_rows(name: str, rng: np.random.Generator) -> np.ndarray:
    """(rows, entries) float64 test data, one distribution per name."""
    if name == "gaussian":
        return rng.standard_normal((16, 4099))
    if name == "heavy_tailed_massive":
        rows = rng.standard_cauchy((16, 3000))
        rows[:, :5] = 2.0e3 * (1 + rng.random((16, 5)))
        return rows
    if name == "lognormal_wide":
        return rng.lognormal(mean=-3.0, sigma=3.0, size=(8, 5001))
    if name == "gelu_like":
        z = rng.standard_normal((8, 3072))
        return 0.5 * z * (1 + np.tanh(0.7978845608 * (z + 0.044715 * z**3)))
    if name == "bfloat16":
        return torch.from_numpy(2.0 * rng.standard_normal((8, 1537))).to(torch.bfloat16).double().numpy()
    if name == "constant_rows":
        return np.repeat(np.array([[0.37], [-5.0], [1e-3]]), 999, axis=1)
    if name == "mostly_zero":
        rows = rng.standard_normal((6, 1000))
        rows[:, :500] = 0.0  # even count, half zeros: numpy's median is half the smallest non-zero |x|
        rows[1, :600] = 0.0
        rows[0] = 0.0
        return rows
    raise KeyError(name)


@pytest.mark.parametrize(
    "name", ["gaussian", "heavy_tailed_massive", "lognormal_wide", "gelu_like", "bfloat16", "constant_rows", "mostly_zero"]
)
def test_median_within_two_percent_of_numpy(name: str) -> None:
    rng = np.random.default_rng(7)
    rows = numpy_rows(name, rng)
    x = torch.from_numpy(rows).float()
    exact = np.median(np.abs(x.double().numpy()), axis=1)
    estimate = histogram_median(log_magnitude_histogram(x, BINS, dim=0), BINS).numpy()
    zero = exact == 0
    np.testing.assert_array_equal(estimate[zero], 0.0)
    relative = np.abs(estimate[~zero] / exact[~zero] - 1)
    assert (~zero).any() and relative.max() <= min(TOLERANCE, BINS.relative_width), (name, relative.max())
    layer_exact = np.median(np.abs(x.double().numpy()))
    layer = histogram_median(log_magnitude_histogram(x, BINS), BINS).item()
    assert layer == layer_exact == 0 if layer_exact == 0 else abs(layer / layer_exact - 1) <= BINS.relative_width


def test_bin_index_matches_numpy_search_on_exact_edges() -> None:
    lower, upper = BINS.edges()
    lower, upper = lower.numpy(), upper.numpy()
    assert np.all(upper[2:-2] / lower[2:-2] - 1 <= BINS.relative_width + 1e-15)
    window_edges = lower[2:-1].astype(np.float32)
    rng = np.random.default_rng(0)
    values = np.concatenate([
        window_edges, np.nextafter(window_edges, np.float32(0)), np.float32(2.0) ** rng.uniform(-25, 14, 5000).astype(np.float32),
        np.array([0.0, 1e-30, 3.0e38, np.inf, np.nan], dtype=np.float32),
    ]).astype(np.float32)
    expected = np.where(
        values == 0, 0,
        np.where(np.isnan(values) | np.isinf(values), BINS.size - 1, 1 + np.searchsorted(window_edges, values, side="right")),
    )
    got = log_magnitude_bin(torch.from_numpy(values), BINS).numpy()
    np.testing.assert_array_equal(got, expected)


def test_sum_of_rank_histograms_gives_the_same_estimate() -> None:
    """One SUM across ranks: each rank bins its own entries; the added histogram equals the pooled one."""
    x = torch.from_numpy(numpy_rows("heavy_tailed_massive", np.random.default_rng(3))).float().reshape(-1)
    ranks = x.chunk(3)
    summed = sum(log_magnitude_histogram(part, BINS) for part in ranks)
    pooled = log_magnitude_histogram(x, BINS)
    assert torch.equal(summed, pooled)
    assert histogram_median(summed, BINS).item() == histogram_median(pooled, BINS).item()


def test_unknown_and_non_finite_medians_are_never_made_up() -> None:
    tiny = torch.full((1, 11), 1e-9)
    huge = torch.full((1, 11), 1e6)
    blown = torch.tensor([[float("nan"), float("inf"), float("-inf"), 1.0]])
    empty = torch.zeros(1, BINS.size, dtype=torch.float64)
    assert torch.isnan(histogram_median(log_magnitude_histogram(tiny, BINS, dim=0), BINS)).all()
    assert torch.isnan(histogram_median(log_magnitude_histogram(huge, BINS, dim=0), BINS)).all()
    assert histogram_median(log_magnitude_histogram(blown, BINS, dim=0), BINS).item() == float("inf")
    assert torch.isnan(histogram_median(empty, BINS)).all()
    # float64 magnitudes beyond float32's range are below or above the window, not zero or non-finite
    # (before: 1e-50 entries had median 0, and 1e39 ones median inf)
    for value in (1e-50, 1e39):
        beyond = torch.full((1, 5), value, dtype=torch.float64)
        assert torch.isnan(histogram_median(log_magnitude_histogram(beyond, BINS, dim=0), BINS)).all()
    assert log_magnitude_bin(torch.tensor([0.0, float("inf")], dtype=torch.float64), BINS).tolist() == [0, BINS.size - 1]


def test_device_edges_equal_the_exact_edges() -> None:
    """The edges the estimates use are built on the device from the keys; they must equal the numpy ones."""
    for bins in (BINS, LogMagnitudeBins(sub_bits=3, low_exponent=-8, size=64)):
        lower, upper = device_edges(bins, "cpu")
        expected_lower, expected_upper = bins.edges()
        assert torch.equal(lower, expected_lower) and torch.equal(upper, expected_upper)
