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
    histogram_count_at_least,
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


def test_count_at_least_brackets_the_exact_count() -> None:
    rng = np.random.default_rng(11)
    rows = numpy_rows("heavy_tailed_massive", rng)
    x = torch.from_numpy(rows).float()
    magnitude = np.abs(x.double().numpy())
    hist = log_magnitude_histogram(x, BINS, dim=0)
    lower, upper = BINS.edges()
    for threshold in (0.5, 3.0, 150.0, 2500.0):
        t = torch.full((rows.shape[0],), threshold, dtype=torch.float64)
        got = histogram_count_at_least(hist, t, BINS).numpy()
        exact = (magnitude >= threshold).sum(1)
        index = int(log_magnitude_bin(torch.tensor([threshold]), BINS))
        in_threshold_bin = hist[:, index].numpy()
        assert np.all(np.abs(got - exact) <= in_threshold_bin + 1e-9)
    above_window = torch.full((rows.shape[0],), 1e5, dtype=torch.float64)
    got = histogram_count_at_least(hist, above_window, BINS)
    overflow = hist[:, BINS.size - 2] > 0
    assert overflow.any() and (~overflow).any()
    assert torch.isnan(got[overflow]).all()
    np.testing.assert_array_equal(got[~overflow].numpy(), (magnitude >= 1e5).sum(1)[~overflow.numpy()])


def test_invalid_layouts_are_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="power of two"):
        LogMagnitudeBins(size=1000)
    with pytest.raises(ValueError, match="normal float32 range"):
        LogMagnitudeBins(low_exponent=120, size=1 << 14)
