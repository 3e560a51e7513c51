"""Known-answer tests of EigenScore, its kernel-polynomial estimate and SeND sensitivity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_act.stats.eigenscore import (
    chebyshev_log_coefficients,
    efficient_eigenscore,
    eigenscore,
    gershgorin_upper_bound,
    jaccard,
    jackson_damping,
    logdet_kpm,
    send_sensitivity,
    top_fraction_indices,
)


def numpy_eigenscore(z: np.ndarray, alpha: float = 1e-3) -> float:
    d, k = z.shape
    j = np.eye(d) - np.ones((d, d)) / d
    sign, logdet = np.linalg.slogdet(z.T @ j @ z + alpha * np.eye(k))
    assert sign > 0
    return float(logdet / k)


def test_eigenscore_matches_numpy_and_batches() -> None:
    rng = np.random.default_rng(0)
    zs = rng.normal(size=(3, 40, 6)) + rng.normal(size=(3, 40, 1))
    scores = eigenscore(torch.from_numpy(zs))
    np.testing.assert_allclose(scores.numpy(), [numpy_eigenscore(z) for z in zs], rtol=1e-10)


def test_eigenscore_of_identical_passes_is_hand_computable() -> None:
    # Σ = ‖c‖² 11ᵀ has eigenvalues K‖c‖² and 0 (K − 1 times), c the column centred over features.
    z = torch.tensor([1.0, 2.0, 6.0], dtype=torch.float64)[:, None].repeat(1, 4)
    c_norm2 = 14.0  # the column (1, 2, 6) centred over features is (-2, -1, 3): 4 + 1 + 9
    expected = (math.log(4 * c_norm2 + 1e-3) + 3 * math.log(1e-3)) / 4
    assert eigenscore(z).item() == pytest.approx(expected, rel=1e-12)


def test_jackson_damping_and_gershgorin_hand_values() -> None:
    g = jackson_damping(20)
    assert g[0].item() == pytest.approx(1.0, abs=1e-12)
    assert bool((g[1:] <= g[:-1]).all())
    matrix = torch.tensor([[2.0, -1.0], [-1.0, 3.0]], dtype=torch.float64)
    assert gershgorin_upper_bound(matrix).item() == 4.0
    assert np.linalg.eigvalsh(matrix.numpy()).max() <= 4.0


def test_chebyshev_coefficients_reconstruct_log_on_the_interval() -> None:
    a, b = 1.0, 10.0
    c = chebyshev_log_coefficients(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), 60)
    c = c.numpy()
    x = np.linspace(-1, 1, 101)
    series = np.polynomial.chebyshev.chebval(x, c)
    np.testing.assert_allclose(series, np.log(((b - a) * x + b + a) / 2), atol=1e-8)


def test_kpm_polynomial_error_on_a_diagonal_matrix() -> None:
    # Rademacher probes give tr(D) exactly for a diagonal D, so only the polynomial error remains.
    diagonal = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
    exact = math.lgamma(11.0)  # log 10!
    errors = [abs(logdet_kpm(diagonal, 0.5, num_moments=m, num_probes=2).item() - exact) for m in (10, 20, 80)]
    assert errors[1] < 0.01 * exact
    assert errors[2] < 0.01
    assert errors[0] > errors[1] > errors[2]


def well_conditioned_passes() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(64, 1, generator=generator, dtype=torch.float64) + torch.randn(
        64, 8, generator=generator, dtype=torch.float64
    )


def dropout_like_passes(scale: float, d: int = 384, k: int = 8, rate: float = 0.1, seed: int = 0) -> torch.Tensor:
    """K passes of one d-dim embedding under dropout-like noise: ``e ⊙ (1 + scale · (m/(1−p) − 1))``,
    m ~ Bernoulli(1 − p); ``scale`` sets how different the passes are, hence the condition number."""
    generator = torch.Generator().manual_seed(seed)
    embedding = torch.randn(d, 1, generator=generator, dtype=torch.float64)
    keep = (torch.rand(d, k, generator=generator, dtype=torch.float64) >= rate).to(torch.float64)
    return embedding * (1.0 + scale * (keep / (1.0 - rate) - 1.0))


@pytest.mark.parametrize("scale", [1.0, 0.1, 0.01, 1e-3, 1e-4])
def test_efficient_eigenscore_defaults_match_exact_on_eigenscore_like_passes(scale: float) -> None:
    """d = 384, K = 8, α = 1e-3: the condition numbers of Σ + αI that EigenScore meets (1e2–1e7).
    With 20 Chebyshev moments the KPM was off by up to tens of nats here."""
    z = dropout_like_passes(scale)
    d = z.shape[0]
    gram = z.numpy().T @ (np.eye(d) - np.ones((d, d)) / d) @ z.numpy() + 1e-3 * np.eye(z.shape[1])
    eigenvalues = np.linalg.eigvalsh(gram)
    condition = eigenvalues.max() / eigenvalues.min()
    assert 1e2 <= condition <= 1e8, condition
    exact = numpy_eigenscore(z.numpy())
    assert efficient_eigenscore(z).item() == pytest.approx(exact, abs=0.1)


def test_efficient_eigenscore_is_nan_not_an_error_on_non_finite_passes() -> None:
    z = dropout_like_passes(0.1)
    z[0, 0] = float("nan")
    assert math.isnan(efficient_eigenscore(z).item())


def spd_with_spectrum(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    n = eigenvalues.numel()
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q @ torch.diag(eigenvalues) @ q.T


def test_kpm_estimator_within_its_stated_validity_range() -> None:
    """KPM for large K (n = 300, above the exact-log-det cut-off): per-dimension error below 0.1 nats
    with M = 20 for condition number 1e2, and with M = 200 for 1e4; M = 20 at 1e4 is out of range."""
    n = 300
    for condition, moments in ((1e2, 20), (1e4, 200)):
        eigenvalues = torch.logspace(0, math.log10(condition), n, dtype=torch.float64)
        estimate = logdet_kpm(spd_with_spectrum(eigenvalues), 1.0, moments, 20, torch.Generator().manual_seed(0))
        assert abs(estimate.item() - eigenvalues.log().sum().item()) / n < 0.1
    eigenvalues = torch.logspace(0, 4, n, dtype=torch.float64)
    too_few = logdet_kpm(spd_with_spectrum(eigenvalues), 1.0, 20, 20, torch.Generator().manual_seed(0))
    assert abs(too_few.item() - eigenvalues.log().sum().item()) / n > 0.1


def test_efficient_eigenscore_kpm_path_close_to_exact() -> None:
    """Forcing the KPM (exact_up_to=0) on passes with condition number ~20: M = 20 moments and N_z = 20
    Rademacher probes within 5% of the exact EigenScore; M = 100, N_z = 200 within 1%."""
    z = well_conditioned_passes()
    exact = numpy_eigenscore(z.numpy())
    default = efficient_eigenscore(z, generator=torch.Generator().manual_seed(0), exact_up_to=0).item()
    assert default == pytest.approx(exact, rel=0.05)
    fine = efficient_eigenscore(
        z, num_moments=100, num_probes=200, generator=torch.Generator().manual_seed(0), exact_up_to=0
    ).item()
    assert fine == pytest.approx(exact, rel=0.01)
    generator = torch.Generator().manual_seed(0)
    gaussian = efficient_eigenscore(
        z, num_moments=100, num_probes=400, probe="gaussian", generator=generator, exact_up_to=0
    )
    assert gaussian.item() == pytest.approx(exact, rel=0.03)


def test_more_passes_than_features_is_exact_through_the_dual() -> None:
    # K = 300 passes of d = 64 features: 237 eigenvalues of Σ + αI sit exactly at α. Before, the KPM took it
    # (K > 256) and Jackson damping smeared that point mass: 2.714 for an exact 1.173.
    z = torch.randn(64, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for alpha in (1.0, 1e-3):
        assert efficient_eigenscore(z, alpha=alpha).item() == pytest.approx(numpy_eigenscore(z.numpy(), alpha), rel=1e-10)


def test_efficient_eigenscore_uses_only_its_generator() -> None:
    z = well_conditioned_passes()
    before = torch.get_rng_state()
    first = efficient_eigenscore(z, generator=torch.Generator().manual_seed(5), exact_up_to=0)
    assert torch.equal(before, torch.get_rng_state())
    assert torch.equal(first, efficient_eigenscore(z, generator=torch.Generator().manual_seed(5), exact_up_to=0))
    with pytest.raises(ValueError, match="rademacher"):
        efficient_eigenscore(z, probe="uniform", exact_up_to=0)


def numpy_sensitivity(e: np.ndarray) -> np.ndarray:
    """V_i = Var over the last C checkpoints × Σ of the C last absolute changes, per example, averaged."""
    c = e.shape[0] - 1
    last = e[-c:]
    variance = ((last - last.mean(0)) ** 2).mean(0)
    change = sum(np.abs(e[t] - e[t - 1]) for t in range(1, c + 1))
    return (variance * change).mean(0)


def test_send_sensitivity_matches_numpy() -> None:
    e = np.random.default_rng(2).normal(size=(4, 5, 7))
    np.testing.assert_allclose(send_sensitivity(torch.from_numpy(e)).numpy(), numpy_sensitivity(e), rtol=1e-12)


def test_swinging_neuron_outranks_a_steady_drift() -> None:
    # C = 3. Swing 0, 2, 0, 2: Var{2, 0, 2} = 8/9, Σ|Δ| = 6 -> V = 16/3.
    # Drift 0, 1, 2, 3 (moves further overall): Var{1, 2, 3} = 2/3, Σ|Δ| = 3 -> V = 2. Constant: 0.
    e = torch.zeros(4, 1, 3, dtype=torch.float64)
    e[:, 0, 0] = torch.tensor([0.0, 2.0, 0.0, 2.0])
    e[:, 0, 1] = torch.tensor([0.0, 1.0, 2.0, 3.0])
    e[:, 0, 2] = 5.0
    v = send_sensitivity(e)
    torch.testing.assert_close(v, torch.tensor([16 / 3, 2.0, 0.0], dtype=torch.float64))
    assert top_fraction_indices(v, 0.34).tolist() == [0]
    assert top_fraction_indices(v, 0.67).tolist() == [0, 1]


def test_top_fraction_ties_and_jaccard() -> None:
    v = torch.tensor([1.0, 3.0, 3.0, 0.0, 2.0])
    assert top_fraction_indices(v, 0.4).tolist() == [1, 2]
    assert top_fraction_indices(v, 0.2).tolist() == [1]
    assert top_fraction_indices(v, 0.01).tolist() == [1]
    assert jaccard(torch.tensor([1, 2, 3]), torch.tensor([2, 3, 4])) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="fraction"):
        top_fraction_indices(v, 0.0)
    with pytest.raises(ValueError, match="checkpoints"):
        send_sensitivity(torch.zeros(2, 3))
