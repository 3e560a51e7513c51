"""GroupRational (GR-KAN activation): reference gradients, shipped fits, layouts, dtypes, Triton kernels.

Values are checked against independent computations: numpy float64 power sums (not Horner), the true
activations from ``math`` (identity, x * sigmoid(x), erf GELU), and Gauss-Hermite quadrature. There is no
GPU here: the Triton kernels are checked on CPU under ``TRITON_INTERPRET=1`` in a subprocess, so the
interpreter flag never leaks into this process.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_act.errors import LightningActError
from lightning_act.nn.group_rational import (
    PREVIOUS_KERNEL_CONFIG,
    GroupRational,
    KernelConfig,
    group_rational_reference,
    rational_gain,
)

# Max |F - f| on [-3, 3] allowed for each shipped init (the fit script reports 0, 1.2e-6, 3.7e-3).
FIT_ERROR_BOUNDS = {"identity": 1e-12, "swish": 2e-6, "gelu": 4e-3}


def true_activation(name: str, x: np.ndarray) -> np.ndarray:
    if name == "identity":
        return x.copy()
    if name == "swish":
        return np.array([v / (1.0 + math.exp(-v)) for v in x])
    return np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x])


def numpy_group_rational(
    x: np.ndarray, numerator: np.ndarray, denominator: np.ndarray, channel_dim: int
) -> np.ndarray:
    """Independent float64 evaluation: explicit power sums, one channel at a time."""
    x = np.moveaxis(x.astype(np.float64), channel_dim, -1)
    channels = x.shape[-1]
    per_group = channels // numerator.shape[0]
    out = np.empty_like(x)
    for channel in range(channels):
        a = numerator[channel // per_group].astype(np.float64)
        b = denominator[channel // per_group].astype(np.float64)
        v = x[..., channel]
        p = sum(a[j] * v**j for j in range(6))
        q = 1.0 + sum(abs(b[k]) * np.abs(v) ** (k + 1) for k in range(4))
        out[..., channel] = p / q
    return np.moveaxis(out, -1, channel_dim)


def random_module(channels: int, groups: int, channel_dim: int, seed: int, **kwargs) -> GroupRational:
    module = GroupRational(channels, groups, "gelu", channel_dim, implementation="reference", **kwargs)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.weight_numerator.copy_(0.5 * torch.randn(module.weight_numerator.shape, generator=generator))
        module.weight_denominator.copy_(torch.randn(module.weight_denominator.shape, generator=generator))
    return module


@pytest.mark.parametrize(("shape", "channel_dim"), [((2, 3, 8), -1), ((2, 8, 2, 3), 1)])
def test_reference_gradcheck_float64(shape: tuple[int, ...], channel_dim: int) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, generator=generator)
    x = (x + 0.1 * torch.sign(x)).requires_grad_()  # keep away from the |x| kink at 0
    numerator = torch.randn(4, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    denominator = (torch.rand(4, 4, dtype=torch.float64, generator=generator) + 0.1) * torch.tensor(
        [1.0, -1.0, 1.0, -1.0], dtype=torch.float64
    )
    denominator.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x_, a_, b_: group_rational_reference(x_, a_, b_, channel_dim), (x, numerator, denominator)
    )


@pytest.mark.parametrize("init", sorted(FIT_ERROR_BOUNDS))
def test_shipped_init_fit_error_on_minus3_3(init: str) -> None:
    module = GroupRational(4, 1, init, implementation="reference").double()
    grid = np.linspace(-3.0, 3.0, 1201)
    fitted = module(torch.from_numpy(np.repeat(grid[:, None], 4, axis=1))).detach().numpy()[:, 0]
    assert np.max(np.abs(fitted - true_activation(init, grid))) < FIT_ERROR_BOUNDS[init]


@pytest.mark.parametrize("init", ["identity", "swish", "gelu"])
def test_rational_gain_matches_gauss_hermite_of_true_activation(init: str) -> None:
    nodes, weights = np.polynomial.hermite_e.hermegauss(120)  # weight exp(-x^2/2), sum = sqrt(2 pi)
    true_gain = float(np.sum(weights * true_activation(init, nodes) ** 2) / math.sqrt(2.0 * math.pi))
    assert rational_gain(init) == pytest.approx(true_gain, abs=1e-3)
    if init == "identity":
        assert rational_gain(init) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize(
    ("shape", "groups", "channel_dim", "sharing"),
    [
        ((2, 5, 16), 8, -1, "per_group"),
        ((2, 12, 3, 4), 4, 1, "per_group"),
        ((3, 7, 8), 2, -1, "shared_numerator"),
        ((2, 6, 2, 2), 3, 1, "shared_denominator"),
    ],
)
def test_reference_matches_numpy_formula(
    shape: tuple[int, ...], groups: int, channel_dim: int, sharing: str
) -> None:
    module = random_module(shape[channel_dim], groups, channel_dim, seed=1, sharing=sharing)
    x = 2.0 * torch.randn(shape, generator=torch.Generator().manual_seed(2))
    numerator = np.broadcast_to(module.weight_numerator.detach().numpy(), (groups, 6))
    denominator = np.broadcast_to(module.weight_denominator.detach().numpy(), (groups, 4))
    expected = numpy_group_rational(x.numpy(), numerator, denominator, channel_dim)
    np.testing.assert_allclose(module(x).detach().numpy(), expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
    ("shape", "channel_dim", "sharing"), [((2, 8, 3, 2), 1, "shared_numerator"), ((3, 5, 8), -1, "per_group")]
)
def test_torch_fx_symbolic_trace_computes_the_formula_and_checks_real_inputs(
    shape: tuple[int, ...], channel_dim: int, sharing: str
) -> None:
    """``torch.fx.symbolic_trace`` (torchvision's / timm's FX feature extractors trace the same way). Before: the
    shape checks ran on the Proxy: "TraceError: symbolically traced variables cannot be used as inputs to control
    flow"."""
    module = random_module(shape[channel_dim], 4, channel_dim, seed=3, sharing=sharing)
    traced = torch.fx.symbolic_trace(torch.nn.Sequential(module))
    x = 2.0 * torch.randn(shape, generator=torch.Generator().manual_seed(4))
    numerator = np.broadcast_to(module.weight_numerator.detach().numpy(), (4, 6))
    denominator = np.broadcast_to(module.weight_denominator.detach().numpy(), (4, 4))
    expected = numpy_group_rational(x.numpy(), numerator, denominator, channel_dim)
    np.testing.assert_allclose(traced(x).detach().numpy(), expected, rtol=2e-5, atol=2e-5)
    wrong = list(shape)
    wrong[channel_dim] += 4
    with pytest.raises(LightningActError, match=f"expects {shape[channel_dim]} channels"):
        traced(torch.randn(wrong))


def test_sharing_parameter_shapes_follow_official_layout() -> None:
    shared = GroupRational(32, 8, "swish", sharing="shared_numerator")
    assert tuple(shared.weight_numerator.shape) == (1, 6)
    assert tuple(shared.weight_denominator.shape) == (8, 4)
    shared(torch.randn(2, 3, 32)).square().sum().backward()
    assert shared.weight_numerator.grad is not None and shared.weight_numerator.grad.shape == (1, 6)


def test_zero_denominator_of_identity_init_receives_gradient() -> None:
    module = GroupRational(8, 2, "identity", implementation="reference")
    x = torch.linspace(-2.0, 2.0, 24).reshape(3, 8)
    module(x).sum().backward()
    # P = x, Q = 1 and dL/dy = 1, so dL/db_k = -sum x |x|^(k+1) over the group's elements (d|b|/db = +1 at 0).
    x_groups = x.reshape(3, 2, 4).transpose(0, 1).reshape(2, -1).double().numpy()
    expected = np.stack([-(np.abs(x_groups) ** (k + 1) * x_groups).sum(axis=1) for k in range(4)], axis=1)
    np.testing.assert_allclose(module.weight_denominator.grad.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert np.any(np.abs(expected) > 0.1)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
def test_half_inputs_keep_dtype_and_match_float32(dtype: torch.dtype, tolerance: float) -> None:
    module = random_module(16, 8, -1, seed=3)
    x = torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(4)).to(dtype)
    y = module(x)
    assert y.dtype == dtype
    expected = module(x.float())
    torch.testing.assert_close(y.float(), expected, rtol=tolerance, atol=tolerance)


def test_autocast_bfloat16_linear_then_rational() -> None:
    linear = torch.nn.Linear(8, 16)
    module = GroupRational(16, 8, "gelu", implementation="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = linear(torch.randn(3, 4, 8))
        y = module(hidden)
    assert hidden.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    expected = numpy_group_rational(
        hidden.float().detach().numpy(),
        module.weight_numerator.detach().numpy(),
        module.weight_denominator.detach().numpy(),
        -1,
    )
    np.testing.assert_allclose(y.float().detach().numpy(), expected, rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert module.weight_numerator.grad.dtype == torch.float32
    assert torch.isfinite(module.weight_denominator.grad).all()


def test_eager_geometry_cache_rechecks_every_new_input_shape() -> None:
    """The module checks an input geometry once and reuses it (host time); a new shape is checked again."""
    module = random_module(16, 4, -1, seed=6)
    reference = random_module(16, 4, -1, seed=6)
    for implementation, shape in (("reference", (5, 16)), ("triton", (2, 3, 16)), ("triton", (5, 16)), ("triton", (2, 3, 16))):
        module.implementation = implementation  # "triton" on CPU: GroupRationalFunction with the op's PyTorch kernels
        x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape)))
        torch.testing.assert_close(module(x), reference(x), rtol=1e-6, atol=1e-6)
    assert module._eager_grouped == (6, 4, 4)  # the op path was taken, with the last shape's geometry
    with pytest.raises(LightningActError, match="expects 16 channels"):
        module(torch.randn(5, 8))


def test_auto_uses_reference_on_cpu() -> None:
    assert GroupRational(8).resolved_implementation(torch.randn(2, 8)) == "reference"


def test_bad_configuration_raises_one_line_errors() -> None:
    with pytest.raises(LightningActError, match="groups"):
        GroupRational(10, 8)
    with pytest.raises(LightningActError, match="init"):
        GroupRational(8, init="relu")
    with pytest.raises(LightningActError, match="channel_dim"):
        GroupRational(8)(torch.randn(2, 8, 3))
    with pytest.raises(LightningActError, match="torch.compile the whole model"):
        GroupRational(8, implementation="compile")
    with pytest.raises(LightningActError, match="power of two"):
        GroupRational(8, kernel_config=KernelConfig(backward_tile=1000))


TRITON_CASES = [
    # (shape, groups, channel_dim, dtype, sharing, KernelConfig); tiles that do not divide either axis, tiles
    # that do (the unmasked EVEN kernels), several row tiles per backward program, and the previous kernel
    ((3, 5, 40), 8, -1, "float32", "per_group", KernelConfig(4, 32, 16, 3, 4)),
    ((2, 16, 3, 5), 4, 1, "float32", "per_group", KernelConfig(16, 32, 32, 2, 4)),
    ((7, 24), 8, -1, "float32", "shared_numerator", KernelConfig()),
    ((8, 32), 4, -1, "float32", "shared_denominator", KernelConfig(8, 16, 16, 2, 4)),
    ((3, 5, 40), 8, -1, "bfloat16", "per_group", PREVIOUS_KERNEL_CONFIG),
    ((3, 5, 40), 8, -1, "float32", "per_group", KernelConfig(8, 16, 16, 2, 4, 1)),  # group-fastest numbering
    ((3, 5, 40), 8, -1, "float32", "per_group", KernelConfig(8, 16, 16, 3, 4, 0, 1)),  # prefetch, masked edges
    ((8, 32), 4, -1, "bfloat16", "per_group", KernelConfig(8, 16, 16, 2, 4, 0, 1)),  # prefetch, EVEN tiles
]

def run_triton_cases(cases: list[tuple], device: str) -> list[dict[str, torch.Tensor]]:
    """Forward and backward of the Triton implementation on seeded inputs; everything returned on CPU."""
    results = []
    for index, (shape, groups, channel_dim, dtype, sharing, config) in enumerate(cases):
        generator = torch.Generator().manual_seed(100 + index)
        module = GroupRational(
            shape[channel_dim], groups, "gelu", channel_dim, "triton", sharing=sharing, kernel_config=config
        )
        with torch.no_grad():
            module.weight_numerator.copy_(0.5 * torch.randn(module.weight_numerator.shape, generator=generator))
            module.weight_denominator.copy_(torch.randn(module.weight_denominator.shape, generator=generator))
        module.to(device)
        x = (2.0 * torch.randn(shape, generator=generator)).to(device, getattr(torch, dtype)).requires_grad_()
        grad_y = torch.randn(shape, generator=generator).to(device, x.dtype)
        y = module(x)
        y.backward(grad_y)
        grad_x = x.grad.clone()
        first_grads = (module.weight_numerator.grad.clone(), module.weight_denominator.grad.clone())
        module.zero_grad()
        module(x).backward(grad_y)  # a second backward must give bitwise the same coefficient gradients
        assert torch.equal(first_grads[0], module.weight_numerator.grad), "numerator gradient not deterministic"
        assert torch.equal(first_grads[1], module.weight_denominator.grad), "denominator gradient not deterministic"
        tensors = {
            "numerator": module.weight_numerator, "denominator": module.weight_denominator, "x": x,
            "grad_y": grad_y, "y": y, "grad_x": grad_x, "grad_numerator": module.weight_numerator.grad,
            "grad_denominator": module.weight_denominator.grad,
        }
        results.append({name: tensor.detach().cpu() for name, tensor in tensors.items()})
    return results


def assert_triton_matches_reference(cases: list[tuple], results: list[dict[str, torch.Tensor]]) -> None:
    for (shape, groups, channel_dim, dtype, sharing, _), result in zip(cases, results, strict=True):
        module = GroupRational(shape[channel_dim], groups, "gelu", channel_dim, "reference", sharing=sharing)
        with torch.no_grad():
            module.weight_numerator.copy_(result["numerator"])
            module.weight_denominator.copy_(result["denominator"])
        x = result["x"].clone().requires_grad_()
        y = module(x)
        y.backward(result["grad_y"])
        assert result["y"].dtype == x.dtype and result["grad_x"].dtype == x.dtype
        # half outputs round at 2^-8 (bf16) / 2^-11 (fp16) relative; coefficient gradients are fp32 sums in
        # a different order, compared relative to their largest entry
        tolerance = {"bfloat16": 2e-2, "float16": 2e-3}.get(dtype, 1e-5)
        torch.testing.assert_close(result["y"].float(), y.detach().float(), rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(result["grad_x"].float(), x.grad.float(), rtol=tolerance, atol=tolerance)
        for name in ("numerator", "denominator"):
            expected = getattr(module, f"weight_{name}").grad
            scale = float(expected.abs().max())
            torch.testing.assert_close(result[f"grad_{name}"], expected, rtol=1e-4, atol=1e-4 * scale)


TRITON_CHECKER = """
import sys
import torch
sys.path.insert(0, sys.argv[1])
from test_group_rational import TRITON_CASES, run_triton_cases
torch.save(run_triton_cases(TRITON_CASES, "cpu"), sys.argv[2])
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_launch_plan_uses_64_bit_offsets_only_for_huge_tensors() -> None:
    from lightning_act.nn.triton_rational import launch_plan

    config = tuple(KernelConfig(backward_prefetch=1))
    vit_hidden = launch_plan(128 * 197, 8, 384, 8, 8, config)  # ViT-B MLP hidden, batch 128: 77M elements
    assert not vit_hidden.forward_meta["WIDE_OFFSETS"] and not vit_hidden.backward_meta["WIDE_OFFSETS"]
    rows = 2**31 // (8 * 384)  # the last masked row tiles (and the prefetch past them) reach 2^31 elements
    assert launch_plan(rows - 64, 8, 384, 1, 8, config).backward_meta["WIDE_OFFSETS"]
    assert not launch_plan(rows - 1000, 8, 384, 1, 8, config).backward_meta["WIDE_OFFSETS"]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_match_reference_under_interpreter(tmp_path: Path) -> None:
    output = tmp_path / "triton_results.pt"
    environment = {**os.environ, "TRITON_INTERPRET": "1"}
    completed = subprocess.run(
        [sys.executable, "-c", TRITON_CHECKER, str(Path(__file__).parent), str(output)],
        env=environment, capture_output=True, text=True, timeout=300, check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert_triton_matches_reference(TRITON_CASES, torch.load(output))


SECOND_ORDER_CHECKER = """
import sys
import torch
sys.path.insert(0, sys.argv[1])
from test_group_rational import gradient_penalty_grads
from test_rational_r27 import identity_outputs_and_grads
from lightning_act.nn.group_rational import GroupRational
module = GroupRational(8, 2, "swish", implementation="triton")
x = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
torch.save({"penalty": gradient_penalty_grads("triton"), "float64": module.double()(x).detach(),
            "identity": [identity_outputs_and_grads("triton", dim) for dim in (-1, 1)]}, sys.argv[2])
"""


def gradient_penalty_grads(implementation: str) -> list[torch.Tensor]:
    """Gradients of an R1-style penalty ``||d out / d input||²`` (second order through the rational)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 8)
    module = GroupRational(8, 2, "swish", implementation=implementation)
    with torch.no_grad():
        module.weight_denominator.add_(0.3)
    inputs = torch.randn(3, 4, requires_grad=True)
    (grad_inputs,) = torch.autograd.grad(module(linear(inputs)).sum(), inputs, create_graph=True)
    grad_inputs.square().sum().backward()
    return [linear.weight.grad, module.weight_numerator.grad, module.weight_denominator.grad]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_path_second_order_gradients_and_float64_inputs(tmp_path: Path) -> None:
    # Before: the kernels' backward carried no graph, so a gradient penalty's gradients through the Triton path
    # were wrong (and None for the coefficients); float64 inputs were computed in float32 (1e-7 error). In the same
    # interpreted process (one start-up), the identity init in the kernels: exactly x, gradient exactly 1 (before
    # round 27, x = 3e4 gave 57171).
    from _interpreter import run_interpreted
    from test_rational_r27 import assert_exact_identity

    output = tmp_path / "second_order.pt"
    run_interpreted(SECOND_ORDER_CHECKER, output)
    result = torch.load(output)
    for got, expected in zip(result["penalty"], gradient_penalty_grads("reference"), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    module = GroupRational(8, 2, "swish")
    x = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    numerator = np.broadcast_to(module.weight_numerator.detach().double().numpy(), (2, 6))
    denominator = np.broadcast_to(module.weight_denominator.detach().double().numpy(), (2, 4))
    expected = numpy_group_rational(x.numpy(), numerator, denominator, -1)
    assert result["float64"].dtype == torch.float64
    np.testing.assert_allclose(result["float64"].numpy(), expected, rtol=1e-13, atol=1e-15)
    for identity in result["identity"]:
        assert_exact_identity(identity)


CUDA_CASES = [
    *TRITON_CASES,
    ((4, 197, 3072), 8, -1, "float32", "per_group", KernelConfig()),
    ((4, 197, 3072), 8, -1, "bfloat16", "per_group", KernelConfig()),
    ((4, 197, 3072), 8, -1, "bfloat16", "per_group", PREVIOUS_KERNEL_CONFIG),
    ((2, 256, 14, 14), 8, 1, "float16", "shared_numerator", KernelConfig()),
]


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("triton") is None, reason="needs CUDA and triton"
)
def test_triton_kernels_match_reference_on_cuda() -> None:
    assert_triton_matches_reference(CUDA_CASES, run_triton_cases(CUDA_CASES, "cuda"))


def test_coefficient_state_loads_official_shared_numerator_layout() -> None:
    official_numerator = torch.arange(6, dtype=torch.float32).reshape(1, 6) / 10.0
    official_denominator = torch.arange(16, dtype=torch.float32).reshape(4, 4) / -20.0
    per_group = GroupRational(8, 4, sharing="per_group")
    per_group.load_state_dict(per_group.coefficient_state(official_numerator, official_denominator))
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(5))
    expected = numpy_group_rational(
        x.numpy(), np.repeat(official_numerator.numpy(), 4, axis=0), official_denominator.numpy(), -1
    )
    np.testing.assert_allclose(per_group(x).detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    shared = GroupRational(8, 4, sharing="shared_denominator")
    with pytest.raises(LightningActError, match="sharing='per_group'"):
        shared.coefficient_state(official_numerator, official_denominator)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_compile_for_hopper_without_spills() -> None:
    """The forward, backward and finish kernels at the ViT-B activation shape ((128 x 197) rows, 8 groups of 384,
    bf16), default configuration, compiled for sm_90 without a GPU: ``ptxas -v`` reports no register spills (so
    spills do not explain the backward's bandwidth, docs/kat_kernel.md)."""
    from _hopper import hopper_ptx, ptxas_report

    from lightning_act.nn import triton_rational
    from lightning_act.nn.group_rational import KernelConfig

    plan = triton_rational.launch_plan(128 * 197, 8, 384, 8, 8, tuple(KernelConfig()))
    pointers = {"numerator_ptr": "*fp32", "denominator_ptr": "*fp32", "rows": "i32"}
    kernels = [
        (triton_rational._group_rational_forward_kernel, {"x_ptr": "*bf16", "y_ptr": "*bf16", **pointers},
         plan.forward_meta),
        (triton_rational._group_rational_backward_kernel,
         {"x_ptr": "*bf16", "grad_y_ptr": "*bf16", "grad_x_ptr": "*bf16", "partial_ptr": "*fp32", **pointers},
         plan.backward_meta),
        (triton_rational._coefficient_gradient_kernel,
         {"partial_ptr": "*fp32", "grad_numerator_ptr": "*fp32", "grad_denominator_ptr": "*fp32",
          "denominator_ptr": "*fp32", "programs": "i32"}, {**plan.finish_meta, "num_warps": 4}),
    ]
    for kernel, runtime, meta in kernels:
        constants = {name: value for name, value in meta.items() if name != "num_warps"}
        ptx = hopper_ptx(kernel, runtime, constants, meta["num_warps"])
        assert ".local" not in ptx, kernel.fn.__name__
        report = ptxas_report(ptx)
        assert report is None or "0 bytes spill stores" in report, (kernel.fn.__name__, report)


@pytest.mark.parametrize("implementation", ["reference", "triton"])
def test_integer_and_bool_inputs_are_refused_like_torch_activations(implementation: str) -> None:
    """Before: computed in float32 and cast back, F([1, 2, 3, -1]) came out int64 [0, 1, 2, 0] (bool: all True)."""
    module = GroupRational(4, groups=2, init="swish", implementation=implementation)
    for x in (torch.tensor([[1, 2, 3, -1]]), torch.ones(1, 4, dtype=torch.bool)):
        with pytest.raises(LightningActError, match=f"GroupRational takes floating-point inputs, got {x.dtype}"):
            module(x)
    module(torch.ones(1, 4))  # a float input after a refused one still runs (the geometry cache keys on dtype)


def test_kernel_config_refuses_tiles_and_warps_triton_cannot_launch() -> None:
    """Triton refuses blocks of more than 2^20 elements; before, such a power of two passed the check and failed
    at the first large enough forward, inside Triton."""
    for field, value in (("forward_tile", 2**21), ("backward_tile", 2**21), ("block_k", 2**21), ("num_warps", 64)):
        limit = 32 if field == "num_warps" else 2**20
        with pytest.raises(LightningActError, match=f"kernel_config.{field}={value} exceeds {limit}"):
            GroupRational(8, kernel_config=KernelConfig(**{field: value}))
    GroupRational(8, kernel_config=KernelConfig(forward_tile=2**20, backward_tile=2**20, block_k=1024, num_warps=32))


def test_op_backward_formula_keeps_coefficient_gradients_finite_for_large_inputs() -> None:
    """``grad_p x^5`` as successive products (the kernel's order): before, ``x**5`` overflowed float32 at
    |x| = 1e8 and the op's CPU backward gave NaN numerator gradients where the forward was still finite."""
    module = GroupRational(2, groups=1, init="swish", implementation="triton")  # on CPU: the op's PyTorch formula
    x = torch.tensor([[1e8, 5e7]])  # one sign: no cancellation between the two float32 terms
    module(x).sum().backward()
    a, b = (t.detach().double()[0].numpy() for t in (module.weight_numerator, module.weight_denominator))
    xd = x.double().numpy()[0]
    q = 1.0 + sum(abs(b[k]) * np.abs(xd) ** (k + 1) for k in range(4))
    p = sum(a[j] * xd**j for j in range(6))
    expected_numerator = [np.sum(xd**j / q) for j in range(6)]
    expected_denominator = [np.sum(-p / q**2 * np.abs(xd) ** (k + 1)) * np.sign(b[k]) for k in range(4)]
    np.testing.assert_allclose(module.weight_numerator.grad[0].numpy(), expected_numerator, rtol=1e-5)
    np.testing.assert_allclose(module.weight_denominator.grad[0].numpy(), expected_denominator, rtol=1e-5)
