"""PMish against independent evaluations of x·tanh(softplus(βx)/β)."""

from __future__ import annotations

import decimal
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_act.nn.pmish import PMish, pmish

BETAS = [1e-6, 3e-5, 1e-3, 0.05, 0.5, 1.0, 2.0, 30.0, 1e3, 1e6]
XS = [-1e4, -300.0, -40.0, -7.5, -1.0, -1e-3, 0.0, 1e-3, 0.3, 1.0, 4.0, 25.0, 800.0, 1e4]


def _reference(x: float, beta: float) -> float:
    """The formula evaluated in 60-digit decimal arithmetic, rounded to float64.

    ``log(1 + u)`` and ``tanh(s)`` switch to their Taylor series for tiny arguments, where the
    direct forms would cancel to zero even at 60 digits.
    """
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        ctx.Emax = decimal.MAX_EMAX
        ctx.Emin = decimal.MIN_EMIN
        d_x, d_beta = decimal.Decimal(x), decimal.Decimal(beta)
        u = (d_beta * d_x).exp()
        tiny = decimal.Decimal("1e-15")
        softplus = u - u**2 / 2 + u**3 / 3 if u < tiny else (1 + u).ln()
        s = softplus / d_beta
        if s < tiny:
            tanh = s - s**3 / 3 + 2 * s**5 / 15
        else:
            e2s = (2 * s).exp()
            tanh = (e2s - 1) / (e2s + 1)
        return float(d_x * tanh)


def test_float64_matches_high_precision_reference_over_wide_range() -> None:
    pairs = list(itertools.product(XS, BETAS))
    x = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    beta = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    got = pmish(x, beta).numpy()
    expected = np.array([_reference(xi, bi) for xi, bi in pairs])
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-300)


def test_float32_module_matches_reference() -> None:
    x = torch.tensor(XS, dtype=torch.float32)
    for beta in BETAS:
        act = PMish(beta_init=beta)
        got = act(x).detach().double().numpy()
        expected = np.array([_reference(float(xi), float(np.float32(beta))) for xi in x.double()])
        np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-30)


def test_naive_numpy_formula_in_its_safe_range() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(-6, 6, size=200)
    beta = rng.uniform(0.2, 4.0, size=200)
    expected = x * np.tanh(np.log(1.0 + np.exp(beta * x)) / beta)
    got = pmish(torch.from_numpy(x), torch.from_numpy(beta)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)


def test_limits_mish_relu_and_identity() -> None:
    x = torch.linspace(-8, 8, 101, dtype=torch.float64)
    torch.testing.assert_close(PMish(1.0).double()(x), F.mish(x), rtol=1e-12, atol=1e-14)
    relu_limit = x * torch.tanh(torch.relu(x))
    torch.testing.assert_close(pmish(x, 1e6), relu_limit, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pmish(x, 1e-6), x, rtol=1e-12, atol=0.0)


def test_beta_is_clamped_not_nan() -> None:
    x = torch.linspace(-5, 5, 11, dtype=torch.float64)
    for beta in (0.0, -1.0, 1e-300):
        torch.testing.assert_close(pmish(x, beta), pmish(x, 1e-8))


@pytest.mark.parametrize("beta", [1e-8, 1e-6, 1e-3, 1.0, 1e3, 1e6])
def test_float32_gradients_are_finite(beta: float) -> None:
    act = PMish(beta_init=beta)
    x = torch.cat([torch.linspace(-1e4, 1e4, 201), torch.linspace(-5, 5, 201)]).requires_grad_(True)
    act(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.isfinite(act.beta.grad)


def test_derivative_at_zero_is_tanh_log2() -> None:
    # d/dx x·tanh(softplus(βx)/β) at x = 0 equals tanh(log(2)/β); for β = 1 that is tanh(log 2) = 0.6.
    x = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    pmish(x, 1.0).sum().backward()
    assert x.grad.item() == pytest.approx(0.6, rel=1e-12)


@pytest.mark.parametrize("beta", [0.05, 1.0, 7.0])
def test_gradcheck_float64(beta: float) -> None:
    torch.manual_seed(0)
    x = (torch.randn(12, dtype=torch.float64) * 3).requires_grad_(True)
    b = torch.tensor(beta, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda xx, bb: pmish(xx, bb), (x, b))


def test_beta_is_one_learnable_scalar() -> None:
    act = PMish()
    assert act.beta.shape == () and act.beta.item() == 1.0 and act.beta.requires_grad
    assert not PMish(learnable=False).beta.requires_grad
    with pytest.raises(ValueError, match="beta_init must be > 0"):
        PMish(beta_init=0.0)


def test_half_precision_inputs_are_computed_in_float32_and_returned_in_their_dtype() -> None:
    # In float16 a beta above 65504 was infinite (NaN for every x > 0), and beta_min = 1e-8 was 0.
    x = torch.tensor([1.0, 0.5, -1.0])
    for beta in (1e5, 1e-9):
        module = PMish(beta_init=beta, beta_min=min(beta, 1e-8))  # beta_min 1e-9 is 0 in float16 too
        want = module(x)
        for dtype in (torch.float16, torch.bfloat16):
            got = module(x.to(dtype))
            assert got.dtype == dtype
            torch.testing.assert_close(got.float(), want.to(dtype).float(), rtol=0, atol=0)


def test_repr_of_a_meta_model_names_the_device_instead_of_a_value() -> None:
    """``print(model)`` of a model built under ``torch.device("meta")`` (shapes only). Before: PMish's repr called
    ``beta.item()`` and raised "Tensor.item() cannot be called on meta tensors"."""
    from lightning_act.models.spectral_nn import SpectralNN

    with torch.device("meta"):
        model = SpectralNN(in_bands=8, beta_init=0.5)
    assert repr(model).count("PMish(beta=meta, learnable=True, beta_min=1e-08)") == 2
    assert repr(PMish(beta_init=0.5, learnable=False)) == "PMish(beta=0.5, learnable=False, beta_min=1e-08)"


def test_spectral_nn_follows_timms_split_forward_and_reset_classifier() -> None:
    """``forward(x) == forward_head(forward_features(x))``, ``pre_logits`` gives the last hidden features and
    ``reset_classifier`` a fresh head (timm utilities call both). Before: neither method existed (AttributeError)."""
    from lightning_act.errors import ConfigError
    from lightning_act.models.spectral_nn import SpectralNN

    torch.manual_seed(0)
    model = SpectralNN(in_bands=6, hidden_sizes=(5, 4)).eval()
    x = torch.randn(3, 7, 6)  # a 3 x 7 patch of pixels
    with torch.no_grad():
        features = model.forward_features(x)
        assert torch.equal(model.forward_head(features), model(x)) and model(x).shape == (3, 7)
        assert torch.equal(model.forward_head(features, pre_logits=True), features)
        expected = features.double().numpy() @ model.head.weight.double().numpy().T + model.head.bias.double().numpy()
        np.testing.assert_allclose(model(x).numpy(), expected[..., 0], atol=1e-6)
        model.reset_classifier(3)
        expected = features.double().numpy() @ model.head.weight.double().numpy().T + model.head.bias.double().numpy()
        np.testing.assert_allclose(model(x).numpy(), expected, atol=1e-6)
        model.reset_classifier(0)
        assert torch.equal(model(x), features)
    with pytest.raises(ConfigError, match="global_pool='avg'"):
        model.reset_classifier(1, global_pool="avg")
