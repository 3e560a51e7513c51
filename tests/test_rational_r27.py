"""Round 27's GroupRational fixes: the identity init is exactly the identity, and ``torch.jit.script`` is refused in
one clear line.

Expected values are the documented behaviour: ``F(x) = x`` and ``dF/dx = 1`` bitwise for the identity init (its
coefficients are exact, ``P(x) = x``, ``Q(x) = 1``), and TorchScript refused with the supported alternatives named.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import timm
import torch

from lightning_act.errors import LightningActError
from lightning_act.nn.group_rational import GroupRational
from lightning_act.nn.rational_coefficients import INIT_COEFFICIENTS

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
# Magnitudes where the old least-squares coefficients failed (a5 = 1.1e-18 outgrew x from |x| ~ 1e4; the gradient
# was 559 at 1e5 and NaN at 5e7), up to the float32 maximum for the forward. The gradient is checked up to 1e8:
# beyond ~2e8 float32 overflows in the powers of x (docs/kat_kernel.md, "Range").
FORWARD_MAGNITUDES = [0.0, 1e-30, 0.5, 3.0, 1e4, 3e4, 1e5, 5e7, 1e10, 1e20, 1e30, 3e38]
GRADIENT_MAGNITUDES = [0.0, 1e-30, 0.5, 3.0, 1e4, 3e4, 1e5, 5e7, 1e8]


def identity_outputs_and_grads(implementation: str, channel_dim: int) -> list[tuple[torch.Tensor, ...]]:
    """(x, F(x)) over FORWARD_MAGNITUDES and (x, dF/dx) over GRADIENT_MAGNITUDES, both signs, 3 groups."""
    results = []
    for magnitudes in (FORWARD_MAGNITUDES, GRADIENT_MAGNITUDES):
        values = torch.tensor(magnitudes + [-m for m in magnitudes])
        module = GroupRational(values.numel(), 2, "identity", channel_dim=channel_dim, implementation=implementation)
        x = values.reshape(1, -1, 1, 1) if channel_dim == 1 else values.reshape(1, -1)
        x.requires_grad_(True)
        y = module(x)
        y.sum().backward()
        results.append((x.detach(), y.detach() if magnitudes is FORWARD_MAGNITUDES else x.grad))
    return results


def assert_exact_identity(results: list[tuple[torch.Tensor, ...]]) -> None:
    (x_forward, y), (x_backward, grad) = results
    assert torch.equal(y, x_forward), (x_forward.flatten().tolist(), y.flatten().tolist())
    assert torch.equal(grad, torch.ones_like(x_backward)), (x_backward.flatten().tolist(), grad.flatten().tolist())


def test_shipped_identity_coefficients_are_exact() -> None:
    # Before: (1.06e-16, 0.9999999999999998, -2.8e-16, 3.5e-17, 5.0e-17, 1.1e-18), least-squares noise.
    assert INIT_COEFFICIENTS["identity"] == ((0.0, 1.0, 0.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0))


@pytest.mark.parametrize("channel_dim", [-1, 1])
@pytest.mark.parametrize("implementation", ["reference", "triton"])  # "triton" on CPU: the op's PyTorch formula
def test_identity_init_is_exactly_x_with_gradient_one_at_large_inputs(implementation: str, channel_dim: int) -> None:
    # Before: x = 3e4 gave 57171 (dF/dx 5.5), x = 1e5 gave 1.1e7 (dF/dx 559), x = 5e7 a NaN gradient.
    assert_exact_identity(identity_outputs_and_grads(implementation, channel_dim))


def test_fit_script_keeps_exact_coefficients_of_a_polynomial_target(monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: fit("identity") returned the least-squares noise shipped above (its docstring said it kept P = x, Q = 1).
    pytest.importorskip("scipy")
    monkeypatch.syspath_prepend(str(SCRIPTS))
    monkeypatch.delitem(sys.modules, "fit_rational_init", raising=False)
    fit_script = importlib.import_module("fit_rational_init")
    numerator, denominator, error = fit_script.fit("identity")
    assert (tuple(numerator.tolist()), tuple(denominator.tolist())) == INIT_COEFFICIENTS["identity"]
    assert error == 0.0


@pytest.mark.parametrize("sharing", ["per_group", "shared_numerator"])
def test_torch_jit_script_is_refused_in_one_line_naming_the_alternatives(sharing: str) -> None:
    # Before: "UnsupportedNodeError: import statements aren't supported" from inside torch/fx/proxy.py (15 lines).
    expected = r"^GroupRational .*torch\.jit\.script; use torch\.jit\.trace, torch\.export or torch\.compile"
    with pytest.raises(LightningActError, match=expected) as raised:
        torch.jit.script(GroupRational(8, 2, "swish"))
    assert "\n" not in str(raised.value)
    kwargs = dict(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=10)
    model = timm.create_model("kat_micro_patch4_32", rational_sharing=sharing, **kwargs).eval()
    with pytest.raises(LightningActError, match=expected):
        torch.jit.script(model)
    traced = torch.jit.trace(model, torch.randn(2, 3, 32, 32))  # the named alternative works on the same model
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(traced(x), model(x))
