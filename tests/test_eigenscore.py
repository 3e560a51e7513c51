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


def test_efficient_eigenscore_close_to_exact() -> None:
    """Stated tolerance: for a Σ + αI with condition number ~20, M = 20 moments and N_z = 20
    Rademacher probes give EES within 5% of the exact EigenScore; M = 100, N_z = 200 within 1%."""
    z = well_conditioned_passes()
    exact = numpy_eigenscore(z.numpy())
    default = efficient_eigenscore(z, generator=torch.Generator().manual_seed(0)).item()
    assert default == pytest.approx(exact, rel=0.05)
    fine = efficient_eigenscore(z, num_moments=100, num_probes=200, generator=torch.Generator().manual_seed(0)).item()
    assert fine == pytest.approx(exact, rel=0.01)
    generator = torch.Generator().manual_seed(0)
    gaussian = efficient_eigenscore(z, num_moments=100, num_probes=400, probe="gaussian", generator=generator)
    assert gaussian.item() == pytest.approx(exact, rel=0.03)


def test_efficient_eigenscore_uses_only_its_generator() -> None:
    z = well_conditioned_passes()
    before = torch.get_rng_state()
    first = efficient_eigenscore(z, generator=torch.Generator().manual_seed(5))
    assert torch.equal(before, torch.get_rng_state())
    assert torch.equal(first, efficient_eigenscore(z, generator=torch.Generator().manual_seed(5)))
    with pytest.raises(ValueError, match="rademacher"):
        efficient_eigenscore(z, probe="uniform")


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
