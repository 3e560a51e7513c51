"""Round 27: EigenScore of finite embeddings of large scale; the fused pass and massive partials on a batch of 0."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from lightning_act.stats.eigenscore import DEFAULT_ALPHA, efficient_eigenscore, eigenscore
from lightning_act.stats.fused import fused_statistics, massive_partials_from, massive_spec
from lightning_act.stats.massive import massive_partials


def identical_passes(d: int, k: int, scale: float) -> tuple[torch.Tensor, float]:
    """K copies of one d-vector (a model without dropout) and their exact EigenScore: ``Σ = s 11ᵀ`` with
    ``s = ‖c − mean c‖²``, so ``log det(Σ + αI) = log(α + K s) + (K − 1) log α``."""
    c = torch.linspace(-1.0, 1.0, d, dtype=torch.float64) * scale
    s = float(((c - c.mean()) ** 2).sum())
    exact = (math.log(DEFAULT_ALPHA + k * s) + (k - 1) * math.log(DEFAULT_ALPHA)) / k
    return c[:, None].expand(d, k).clone(), exact


def numpy_eigenscore_by_svd(z: np.ndarray, alpha: float = DEFAULT_ALPHA) -> float:
    """``(1/K) log det(Zᵀ J_d Z + αI)`` from the singular values of the centred passes (never forming ``ZᵀJZ``)."""
    d, k = z.shape
    sigma = np.linalg.svd(z - z.mean(0, keepdims=True), compute_uv=False)
    return float((np.log(sigma**2 + alpha).sum() + (k - min(d, k)) * math.log(alpha)) / k)


@pytest.mark.parametrize("scale", [1e5, 1e6, 1e7])
def test_eigenscore_of_identical_passes_of_large_scale_is_exact(scale: float) -> None:
    # Σ formed explicitly rounded α away: -2.6837 for -2.6812 at 1e5, 15% off at 1e6, NaN / -447 at 1e7
    z, exact = identical_passes(16, 8, scale)
    assert eigenscore(z).item() == pytest.approx(exact, rel=1e-9)
    assert efficient_eigenscore(z).item() == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize("scale", [1e13, 1e15, 1e20])
def test_eigenscore_beyond_what_the_qr_resolves_is_unknown(scale: float) -> None:
    # the QR's backward error eps·‖M‖ swamps √α there: 1.9271 for 1.9239 at 1e13, 24% off at 1e15 (round 27's
    # first QR version); a formed Σ's Cholesky gave NaN there before
    z, _ = identical_passes(16, 8, scale)
    assert math.isnan(eigenscore(z).item()) and math.isnan(efficient_eigenscore(z).item())
    z, exact = identical_passes(16, 8, 1e10)  # resolved, just below the cut
    assert eigenscore(z).item() == pytest.approx(exact, rel=1e-6)


def test_eigenscore_of_passes_far_from_the_origin_matches_numpy() -> None:
    # dropout-like passes: a common embedding of scale 1e6 and small per-pass differences, batched (2, d, K)
    generator = torch.Generator().manual_seed(0)
    common = 1e6 * torch.randn(2, 64, 1, generator=generator, dtype=torch.float64)
    z = common + torch.randn(2, 64, 8, generator=generator, dtype=torch.float64)
    expected = [numpy_eigenscore_by_svd(one.numpy()) for one in z]
    assert eigenscore(z).tolist() == pytest.approx(expected, rel=1e-9)
    assert efficient_eigenscore(z).tolist() == pytest.approx(expected, rel=1e-9)


def test_dual_path_of_more_passes_than_features_is_exact_at_large_scale() -> None:
    z, exact = identical_passes(16, 300, 1e6)  # K = 300 > 256 passes, d = 16: the d×d dual
    assert efficient_eigenscore(z).item() == pytest.approx(exact, rel=1e-9)


def test_kpm_estimate_is_unknown_where_the_formed_matrix_has_lost_alpha() -> None:
    # K = d = 300 (the KPM): Σ's entries are rounded by far more than α, so no estimate is a measurement
    z, _ = identical_passes(300, 300, 1e7)
    assert math.isnan(efficient_eigenscore(z, generator=torch.Generator().manual_seed(0)).item())


def test_non_finite_passes_give_nan_not_an_error() -> None:
    z, _ = identical_passes(16, 8, 1.0)
    z[3, 2] = float("inf")
    assert math.isnan(eigenscore(z).item()) and math.isnan(efficient_eigenscore(z).item())


@pytest.mark.parametrize("shape", [(0, 16), (0, 4, 16)])
def test_a_batch_of_no_samples_adds_nothing(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    stats = fused_statistics(x, massive_spec(), "torch")
    sums, maxima = massive_partials_from(stats)
    assert sums.tolist() == [0.0, 0.0, 0.0, 0.0] and maxima.tolist() == [0.0]
    assert stats.sums.tolist() == [0.0, 0.0]  # count, nonfinite
    assert stats.column_max is not None and stats.column_max.tolist() == [0.0] * math.prod(shape[1:])
    sums, maxima = massive_partials(x)
    assert sums.tolist() == [0.0, 0.0, 0.0, 0.0] and maxima.tolist() == [0.0]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_triton_falls_back_on_a_batch_of_no_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    # an empty tensor never reaches a kernel (none is defined here), so the interpreter flag only passes the check
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    sums, maxima = massive_partials_from(fused_statistics(torch.randn(0, 16), massive_spec(), "triton"))
    assert sums.tolist() == [0.0, 0.0, 0.0, 0.0] and maxima.tolist() == [0.0]
