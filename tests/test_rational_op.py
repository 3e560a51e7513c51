"""The registered op ``lightning_act::group_rational``: its CPU kernel's closed-form gradients, its registration
(schema, fake tensor, autograd), ``torch.compile(fullgraph=True)`` of whole KAT models through it, and what a
trace of it contains: the Triton kernels themselves on CUDA (a ``triton_op``), the PyTorch formula on CPU."""

from __future__ import annotations

import importlib.util
import json
import re
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

import lightning_act.models.kat  # noqa: F401  (registers the KAT models with timm)
from lightning_act.nn.group_rational import (
    GroupRational,
    KernelConfig,
    group_rational_backward_op,
    group_rational_op,
    group_rational_reference,
    triton_available,
)

CONFIG = list(KernelConfig())


@pytest.mark.parametrize(("numerator_sets", "denominator_sets"), [(2, 2), (1, 2), (2, 1)])
def test_op_cpu_kernel_gradients_match_finite_differences(numerator_sets: int, denominator_sets: int) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 5, dtype=torch.float64, generator=generator)
    x = (x + 0.1 * torch.sign(x)).requires_grad_()  # keep away from the |x| kink at 0
    numerator = torch.randn(numerator_sets, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    denominator = (torch.rand(denominator_sets, 4, dtype=torch.float64, generator=generator) + 0.1) * torch.tensor(
        [1.0, -1.0, 1.0, -1.0], dtype=torch.float64
    )
    denominator.requires_grad_()
    assert torch.autograd.gradcheck(lambda *inputs: group_rational_op(*inputs, CONFIG), (x, numerator, denominator))


def test_op_registration_schema_fake_autograd_and_dynamic_aot_trace() -> None:
    """``opcheck``'s default utilities, both ops: schema, fake kernel, autograd registration, and an AOTAutograd trace
    with dynamic shapes (on CPU the triton_op's body traces its PyTorch formula)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, 3, generator=generator, requires_grad=True)
    numerator = torch.randn(1, 6, generator=generator, requires_grad=True)
    denominator = torch.randn(2, 4, generator=generator, requires_grad=True)
    torch.library.opcheck(group_rational_op, (x, numerator, denominator, CONFIG))
    backward_inputs = (x.detach(), torch.randn(4, 2, 3, generator=generator), numerator.detach(), denominator.detach())
    torch.library.opcheck(group_rational_backward_op, (*backward_inputs, CONFIG))


def _recording_backend() -> tuple[object, list[torch.fx.GraphModule]]:
    """An AOTAutograd backend that keeps the forward and backward graphs and runs them eagerly."""
    graphs: list[torch.fx.GraphModule] = []

    def keep(graph: torch.fx.GraphModule, example_inputs: object) -> object:
        graphs.append(graph)
        return make_boxed_func(graph.forward)

    return aot_autograd(fw_compiler=keep, bw_compiler=keep), graphs


def _opaque_op_calls(graph: torch.fx.GraphModule) -> list[str]:
    return [str(node.target) for node in graph.graph.nodes if str(node.target).startswith("lightning_act.")]


def _tiny_kat(impl: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "kat_micro_patch4_32", img_size=8, depth=2, embed_dim=48, in_chans=1, rational_impl=impl,
        rational_sharing="shared_numerator",
    )


def _logits_and_grads(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(images)
    logits.logsumexp(-1).sum().backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters()]


def _assert_close_to_float64(ours: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    """``ours`` within ``tolerance`` of a float64 ``expected``, relative to its largest magnitude."""
    scale = float(expected.abs().max()) or 1.0
    error = float((ours.double() - expected).abs().max()) / scale
    assert error <= tolerance, f"relative error {error:.1e} > {tolerance:.0e}"


def test_whole_kat_compiles_fullgraph_on_cpu_with_the_ops_formula_traced_in() -> None:
    model = _tiny_kat("triton")  # on CPU the op's body is its PyTorch formula, which AOTAutograd traces into
    images = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    reference = _tiny_kat("reference").double()
    reference.load_state_dict(model.state_dict())
    expected_logits, expected_grads = _logits_and_grads(reference, images.double())
    backend, graphs = _recording_backend()
    compiled = torch.compile(model, fullgraph=True, backend=backend)  # raises on any graph break
    model(images)  # an eager call first: the module's eager-only geometry cache must not leak into the trace
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logits, grads = _logits_and_grads(compiled, images)
    assert not [w for w in caught if "lru_cache" in str(w.message)], [str(w.message) for w in caught]
    # the forward calls triton_available() on CUDA only (`x.is_cuda and ...`): a traced call of it must not warn either
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(lambda x: x + triton_available(), backend="eager", fullgraph=True)(images)
    assert not [w for w in caught if "lru_cache" in str(w.message)], [str(w.message) for w in caught]
    for _ in range(2):  # eager and compiled calls interleaved: no recompilation (one forward, one backward graph)
        model(images[:2])
        _logits_and_grads(compiled, images)
    assert len(graphs) == 2
    for graph in graphs:  # a triton_op: no opaque op call is left for the backend, only the formula's aten ops
        assert not _opaque_op_calls(graph), _opaque_op_calls(graph)
    _assert_close_to_float64(logits, expected_logits, 1e-5)
    for grad, expected in zip(grads, expected_grads, strict=True):
        _assert_close_to_float64(grad, expected, 1e-4)


# Traces the op's forward and backward on fake CUDA tensors (no GPU needed) with AOTAutograd, as torch.compile does,
# and prints what each graph calls. Triton lowers a kernel to TTIR (where PyTorch finds which arguments a kernel
# writes) only for a GPU target, so one is named.
CUDA_TRACE_CHECKER = """
import json
import re
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction


class HopperTarget:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


triton.runtime.driver.set_active(HopperTarget())
from torch._functorch.aot_autograd import aot_function, make_boxed_func
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._subclasses.fake_tensor import FakeTensorMode

from lightning_act.nn.group_rational import KernelConfig, group_rational_backward_op, group_rational_op

graphs = []


def keep(graph, example_inputs):
    graphs.append(graph)
    return make_boxed_func(graph.forward)


def calls(graph):
    found = []
    for node in graph.graph.nodes:
        if node.op != "call_function":
            continue
        if "triton_kernel_wrapper" in str(node.target):
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            while not isinstance(kernel, JITFunction):  # num_warps wraps the kernel in a one-config autotuner
                kernel = kernel.fn
            found.append([str(node.target), kernel.fn.__name__, sorted(node.kwargs["tensors_to_clone"])])
        else:
            found.append([str(node.target)])
    return found


config = list(KernelConfig(block_k=8, forward_tile=16, backward_tile=16, backward_row_tiles=2))
forward = aot_function(lambda x, a, b: group_rational_op(x, a, b, config), fw_compiler=keep)
backward = aot_function(lambda x, g, a, b: group_rational_backward_op(x, g, a, b, config), fw_compiler=keep)
with FakeTensorMode():
    x = torch.empty(6, 4, 24, device="cuda", dtype=torch.bfloat16)
    numerator, denominator = torch.empty(1, 6, device="cuda"), torch.empty(4, 4, device="cuda")
    y = forward(x, numerator, denominator)
    backward(x, y, numerator, denominator)
print(json.dumps([calls(graph) for graph in graphs]))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_cuda_trace_calls_the_triton_kernels_not_an_opaque_op() -> None:
    completed = subprocess.run(
        [sys.executable, "-c", CUDA_TRACE_CHECKER], capture_output=True, text=True, timeout=300, check=False,
        env={key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "assuming every input is mutated" not in completed.stderr, completed.stderr[-3000:]
    forward_calls, backward_calls = json.loads(completed.stdout.strip().splitlines()[-1])
    kernel = "triton_kernel_wrapper_functional"
    # only the outputs are written (cloned before functional kernels, then re-inplaced by Inductor): a kernel
    # thought to write its inputs would copy x and grad_y on every call
    assert [c for c in forward_calls if kernel in c[0]] == [
        [kernel, "_group_rational_forward_kernel", ["y_ptr"]]
    ]
    assert [c for c in backward_calls if kernel in c[0]] == [
        [kernel, "_group_rational_backward_kernel", ["grad_x_ptr", "partial_ptr"]],
        [kernel, "_coefficient_gradient_kernel", ["grad_denominator_ptr", "grad_numerator_ptr"]],
    ]
    others = {c[0] for c in forward_calls + backward_calls if kernel not in c[0]}
    assert others <= {"aten.empty_like.default", "aten.new_empty.default", "<built-in function getitem>"}, others


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_op_names_its_kernels_for_the_compile_cache_key() -> None:
    """AOTAutograd's cache keys a graph that calls a triton_op by the source of the kernels found in the op's body:
    a kernel it missed could be served stale from the cache after the kernel's code changed."""
    from torch._library.triton import get_triton_kernels_for_op

    def names(op: str) -> list[str]:
        return sorted(kernel.fn.__name__ for kernel in get_triton_kernels_for_op(op))

    assert names("lightning_act::group_rational") == ["_group_rational_forward_kernel"]
    assert names("lightning_act::group_rational_backward") == [
        "_coefficient_gradient_kernel", "_group_rational_backward_kernel"
    ]


# The registered op called eagerly (through the dispatcher, so the triton_op's own body) under the interpreter.
INTERPRETER_OP_CHECKER = """
import json
import re
import sys
import torch
from lightning_act.nn.group_rational import KernelConfig, group_rational_op

results = []
for index, (shape, numerator_sets, dtype_name, config) in enumerate(json.loads(sys.argv[2])):
    generator = torch.Generator().manual_seed(200 + index)
    dtype = getattr(torch, dtype_name)
    x = (2.0 * torch.randn(shape, generator=generator)).to(dtype).requires_grad_()
    numerator = (0.5 * torch.randn(numerator_sets, 6, generator=generator)).requires_grad_()
    denominator = torch.randn(shape[1], 4, generator=generator).requires_grad_()
    grad_y = torch.randn(shape, generator=generator).to(dtype)
    y = group_rational_op(x, numerator, denominator, list(KernelConfig(*config)))
    y.backward(grad_y)
    tensors = (x, numerator, denominator, grad_y, y, x.grad, numerator.grad, denominator.grad)
    results.append([t.detach() for t in tensors])
torch.save(results, sys.argv[1])
"""

INTERPRETER_OP_CASES = [
    # (shape (rows, groups, width), numerator sets, dtype, KernelConfig): masked tiles with several backward row
    # tiles and a shared numerator; unmasked (EVEN) tiles in bfloat16
    ((5, 4, 24), 1, "float32", (8, 16, 16, 2, 4)),
    ((8, 4, 32), 4, "bfloat16", (8, 16, 16, 2, 4)),
]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_op_under_interpreter_matches_float64_reference(tmp_path: Path) -> None:
    output = tmp_path / "op_results.pt"
    completed = subprocess.run(
        [sys.executable, "-c", INTERPRETER_OP_CHECKER, str(output), json.dumps(INTERPRETER_OP_CASES)],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=300, check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    for (shape, _, dtype, _), result in zip(INTERPRETER_OP_CASES, torch.load(output), strict=True):
        x, numerator, denominator, grad_y, *ours = result
        leaves = [t.double().requires_grad_() for t in (x, numerator, denominator)]
        groups = shape[1]
        expected_y = group_rational_reference(
            leaves[0], leaves[1].expand(groups, -1), leaves[2].expand(groups, -1), channel_dim=1
        )
        expected_y.backward(grad_y.double())
        output_tolerance = 8e-3 if dtype == "bfloat16" else 1e-6  # one bf16 rounding of y and of dx
        assert ours[0].dtype == ours[1].dtype == x.dtype
        for value, expected, tolerance in zip(
            ours, [expected_y.detach(), *(leaf.grad for leaf in leaves)], [output_tolerance] * 2 + [1e-5] * 2,
            strict=True,
        ):
            _assert_close_to_float64(value, expected, tolerance)


# Without Triton (CPU builds of PyTorch) the op is a plain custom_op whose body (the PyTorch formula) is also its
# fake kernel; ``sys.modules["triton"] = None`` makes Triton unimportable in that process.
NO_TRITON_CHECKER = """
import sys
sys.modules["triton"] = None
import torch
from lightning_act.nn.group_rational import GroupRational, KernelConfig, group_rational_op, triton_available

assert not triton_available()
generator = torch.Generator().manual_seed(4)
inputs = (torch.randn(4, 2, 3, generator=generator, requires_grad=True),
          torch.randn(1, 6, generator=generator, requires_grad=True),
          torch.randn(2, 4, generator=generator, requires_grad=True), list(KernelConfig()))
torch.library.opcheck(group_rational_op, inputs)
module = GroupRational(16, 4, "swish", implementation="triton")
reference = GroupRational(16, 4, "swish", implementation="reference")
x = torch.randn(3, 16, generator=generator)
compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
print(float((compiled(x) - reference(x)).abs().max()), float((module(x) - reference(x)).abs().max()))
"""


def test_op_without_triton_is_a_custom_op_with_the_pytorch_formula() -> None:
    completed = subprocess.run(
        [sys.executable, "-c", NO_TRITON_CHECKER], capture_output=True, text=True, timeout=300, check=False
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    compiled_error, eager_error = map(float, completed.stdout.split())
    assert compiled_error < 1e-6 and eager_error < 1e-6


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("triton") is None, reason="needs CUDA and triton"
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_kat_compiles_fullgraph_with_inductor_on_cuda(dtype: torch.dtype) -> None:
    model = timm.create_model("kat_tiny_patch16_224", depth=2, num_classes=10).cuda()
    reference = timm.create_model("kat_tiny_patch16_224", depth=2, num_classes=10, rational_impl="reference").cuda()
    reference.load_state_dict(model.state_dict())
    for batch in (4, 3):  # a second batch size must not crash the compiled model (issue 13)
        images = torch.randn(batch, 3, 224, 224, device="cuda")
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            expected_logits, expected_grads = _logits_and_grads(reference, images)
            compiled = torch.compile(model, fullgraph=True)
            logits, grads = _logits_and_grads(compiled, images)
        tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-3
        torch.testing.assert_close(logits.float(), expected_logits.float(), rtol=tolerance, atol=tolerance)
        for grad, expected in zip(grads, expected_grads, strict=True):
            scale = float(expected.abs().max()) or 1.0
            torch.testing.assert_close(grad / scale, expected / scale, rtol=tolerance, atol=tolerance)


def test_eager_triton_path_on_cpu_matches_reference_module() -> None:
    generator = torch.Generator().manual_seed(3)
    op_module = GroupRational(16, 4, "swish", channel_dim=1, implementation="triton", sharing="shared_denominator")
    reference = GroupRational(16, 4, "swish", channel_dim=1, implementation="reference", sharing="shared_denominator")
    with torch.no_grad():
        op_module.weight_numerator.normal_(generator=generator)
        op_module.weight_denominator.normal_(generator=generator)
    reference.load_state_dict(op_module.state_dict())
    x = torch.randn(2, 16, 3, 3, generator=generator)
    results = []
    for module in (op_module, reference):
        leaf = x.clone().requires_grad_()
        y = module(leaf)
        y.square().sum().backward()
        results.append((y.detach(), leaf.grad, module.weight_numerator.grad, module.weight_denominator.grad))
    for ours, expected in zip(*results, strict=True):
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_gradient_penalty_gradient_at_a_zero_denominator_on_the_op_path() -> None:
    """Every KAT act1 starts at b = 0; d|b|/db is +1 there. Before: the op's backward used torch.abs, whose derivative
    is 0 at 0, so the penalty's gradient to b came out a third of its true value under create_graph."""
    from lightning_act.nn.group_rational import GroupRational

    x0 = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def penalty(rational: GroupRational) -> torch.Tensor:
        x = x0.clone().requires_grad_(True)
        (grad_x,) = torch.autograd.grad((rational(x) ** 2).sum(), x, create_graph=True)
        return (grad_x**2).sum()

    rational = GroupRational(8, groups=2, implementation="triton").double()  # on CPU: the op's PyTorch formula
    penalty(rational).backward()
    # right derivative by hand: y = x / (1 + b|x|) on group 0's columns, so dy/dx = 1 / (1 + b|x|)^2
    def by_hand(b: float) -> float:
        group0 = x0[:, :4].numpy()
        return float(np.sum((2 * group0 / (1 + b * np.abs(group0)) / (1 + b * np.abs(group0)) ** 2) ** 2)
                     + np.sum((2 * x0[:, 4:].numpy()) ** 2))

    step = 1e-7
    expected = (by_hand(step) - by_hand(0.0)) / step
    assert rational.weight_denominator.grad[0, 0].item() == pytest.approx(expected, rel=1e-4)


def test_op_refuses_coefficient_shapes_the_kernels_would_read_past() -> None:
    """The kernels index coefficient set ``group`` unchecked: on the Triton path a (2, 6) numerator for 4 groups,
    5 numerator or 3 denominator terms read past the tensors. Before: garbage there, an unrelated error here."""
    from lightning_act.errors import LightningActError
    from lightning_act.nn.group_rational import group_rational

    x3 = torch.randn(2, 4, 3)
    for numerator, denominator, says in (
        (torch.randn(2, 6), torch.zeros(4, 4), "numerator of shape (2, 6) does not fit 4 groups"),
        (torch.randn(4, 5), torch.zeros(4, 4), "numerator of shape (4, 5) does not fit 4 groups"),
        (torch.randn(4, 6), torch.zeros(4, 3), "denominator of shape (4, 3) does not fit 4 groups"),
    ):
        for call in (
            lambda: group_rational_op(x3, numerator, denominator, CONFIG),
            lambda: group_rational_backward_op(x3, x3, numerator, denominator, CONFIG),
            lambda: group_rational(x3, numerator, denominator),
        ):
            with pytest.raises(LightningActError, match=re.escape(says)):
                call()
    with pytest.raises(LightningActError, match="floating-point tensors, got torch.int64"):
        group_rational_op(torch.ones(2, 4, 3, dtype=torch.int64), torch.randn(1, 6), torch.zeros(4, 4), CONFIG)


def _numpy_rational(x: np.ndarray, numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """float64 power sums of the documented formula for one coefficient set (independent of Horner's rule)."""
    p = sum(numerator[j] * x**j for j in range(6))
    return p / (1.0 + sum(abs(denominator[k]) * np.abs(x) ** (k + 1) for k in range(4)))


def test_torch_func_transforms_on_the_op_path_match_float64_numpy() -> None:
    """grad / vmap / jacrev / per-sample gradients / vmapped ensembles on the op path (the default on CUDA).
    Before: "an autograd.Function with functorch transforms ... must override the setup_context staticmethod"."""
    from torch.func import functional_call, grad, jacrev, stack_module_state, vmap

    def module(shift: float) -> GroupRational:
        rational = GroupRational(4, groups=1, init="swish", implementation="triton")  # CPU: the op's formula
        with torch.no_grad():
            rational.weight_numerator.add_(shift)
            rational.weight_denominator.add_(0.3 + shift)
        return rational

    def coefficients(rational: GroupRational) -> tuple[np.ndarray, np.ndarray]:
        return tuple(t.detach().double()[0].numpy() for t in (rational.weight_numerator, rational.weight_denominator))

    x = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(5))
    xd = x.double().numpy()
    rational = module(0.0)
    a, b = coefficients(rational)
    step = 1e-6
    derivative = (_numpy_rational(xd + step, a, b) - _numpy_rational(xd - step, a, b)) / (2 * step)
    np.testing.assert_allclose(grad(lambda t: rational(t).sum())(x).detach().numpy(), derivative, rtol=1e-5, atol=1e-6)
    batched = vmap(rational, in_dims=1)(x).detach().numpy()  # a batch of inputs: more rows of one launch
    np.testing.assert_allclose(batched, _numpy_rational(xd, a, b).swapaxes(0, 1), rtol=1e-6)
    jacobian = jacrev(rational)(x[0]).reshape(8, 8).detach().numpy()
    np.testing.assert_allclose(jacobian, np.diag(derivative[0].reshape(-1)), rtol=1e-5, atol=1e-6)

    def loss(parameters: dict[str, torch.Tensor], sample: torch.Tensor) -> torch.Tensor:
        return functional_call(rational, parameters, (sample,)).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(dict(rational.named_parameters()), x)["weight_numerator"]
    q = 1.0 + sum(abs(b[k]) * np.abs(xd) ** (k + 1) for k in range(4))
    expected = np.stack([(xd**j / q).sum((1, 2)) for j in range(6)], 1)[:, None, :]  # dL/da_j = sum x^j / Q
    np.testing.assert_allclose(per_sample.detach().numpy(), expected, rtol=1e-5, atol=1e-6)

    members = [module(0.1 * index) for index in range(3)]  # per-sample coefficients: the vmapped PyTorch formula
    parameters, _ = stack_module_state(members)
    outputs = vmap(lambda p, sample: functional_call(rational, p, (sample,)))(parameters, x)
    for index, member in enumerate(members):
        expected = _numpy_rational(xd[index], *coefficients(member))
        np.testing.assert_allclose(outputs[index].detach().numpy(), expected, rtol=1e-6)


def test_jit_trace_of_a_fresh_module_on_the_op_path() -> None:
    """Before: the geometry computed under the tracer (0-d tensors) reached the Function: "unordered_map::at"."""
    rational = GroupRational(8, groups=2, init="swish", implementation="triton")
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings, and the tracer's deprecation
        traced = torch.jit.trace(rational, x)
    a = rational.weight_numerator.detach().double()[0].numpy()
    b = rational.weight_denominator.detach().double()[0].numpy()
    np.testing.assert_allclose(traced(x).detach().numpy(), _numpy_rational(x.double().numpy(), a, b), rtol=1e-6)


def test_jit_trace_on_the_op_path_runs_at_other_batch_sizes() -> None:
    """Before: the Function's cached int geometry was recorded as a constant, so a trace at batch 1 failed at batch 4
    ("shape '[5, 2, 4]' is invalid for input of size 160"). Checked against the float64 formula."""
    rational = GroupRational(8, groups=2, init="swish", implementation="triton")
    with torch.no_grad():
        rational.weight_denominator.add_(torch.tensor([[0.2], [-0.4]]))  # two different groups
    generator = torch.Generator().manual_seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings, and the tracer's deprecation
        traced = torch.jit.trace(rational, torch.randn(1, 5, 8, generator=generator))
    x = torch.randn(4, 5, 8, generator=generator)
    a, b = (t.detach().double().numpy() for t in (rational.weight_numerator, rational.weight_denominator))
    xd = x.double().numpy()
    expected = np.concatenate([_numpy_rational(xd[..., 4 * g : 4 * g + 4], a[g], b[g]) for g in range(2)], -1)
    np.testing.assert_allclose(traced(x).detach().numpy(), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rational(x).detach().numpy(), expected, rtol=1e-6, atol=1e-7)  # eager afterwards


def test_forward_mode_ad_on_the_op_path_matches_float64_finite_differences() -> None:
    """torch.func.jvp / jacfwd and torch.autograd.forward_ad on the op path (the default on CUDA), in float64,
    against central differences of the float64 formula. Before: "You must implement the jvp function"."""
    from torch.autograd import forward_ad
    from torch.func import functional_call, hessian, jacfwd, jvp

    rational = GroupRational(4, groups=1, init="swish", implementation="triton").double()  # CPU: the op's formula
    with torch.no_grad():
        rational.weight_denominator.add_(torch.tensor([[0.3, -0.2, 0.1, 0.05]], dtype=torch.float64))
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(3, 4, dtype=torch.float64, generator=generator)
    v = torch.randn(3, 4, dtype=torch.float64, generator=generator)
    params = {name: p.detach() for name, p in rational.named_parameters()}
    tangents = {name: torch.randn(p.shape, dtype=torch.float64, generator=generator) for name, p in params.items()}
    a, b = params["weight_numerator"][0].numpy(), params["weight_denominator"][0].numpy()
    ta, tb = tangents["weight_numerator"][0].numpy(), tangents["weight_denominator"][0].numpy()
    xd, vd, step = x.numpy(), v.numpy(), 1e-6
    along_x = (_numpy_rational(xd + step * vd, a, b) - _numpy_rational(xd - step * vd, a, b)) / (2 * step)
    along_all = (
        _numpy_rational(xd + step * vd, a + step * ta, b + step * tb)
        - _numpy_rational(xd - step * vd, a - step * ta, b - step * tb)
    ) / (2 * step)

    _, tangent = jvp(rational, (x,), (v,))
    np.testing.assert_allclose(tangent.detach().numpy(), along_x, rtol=1e-7, atol=1e-9)
    _, tangent = jvp(lambda p, t: functional_call(rational, p, (t,)), (params, x), (tangents, v))
    np.testing.assert_allclose(tangent.detach().numpy(), along_all, rtol=1e-7, atol=1e-9)
    derivative = (_numpy_rational(xd + step, a, b) - _numpy_rational(xd - step, a, b)) / (2 * step)
    np.testing.assert_allclose(jacfwd(rational)(x[0]).detach().numpy(), np.diag(derivative[0]), rtol=1e-7, atol=1e-9)
    wide = 1e-4  # second differences: rounding grows as 1 / step^2
    second = (_numpy_rational(xd + wide, a, b) - 2 * _numpy_rational(xd, a, b) + _numpy_rational(xd - wide, a, b))
    second /= wide**2
    np.testing.assert_allclose(
        hessian(lambda t: rational(t).sum())(x[0]).detach().numpy(), np.diag(second[0]), rtol=1e-5, atol=1e-7
    )
    with forward_ad.dual_level():
        tangent = forward_ad.unpack_dual(rational(forward_ad.make_dual(x, v))).tangent
    np.testing.assert_allclose(tangent.detach().numpy(), along_x, rtol=1e-7, atol=1e-9)
