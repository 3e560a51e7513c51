"""The registered op ``lightning_act::group_rational``: its CPU kernel's closed-form gradients, its registration
(schema, fake tensor, autograd), and ``torch.compile(fullgraph=True)`` of whole KAT models through it."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import timm
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

import lightning_act.models.kat  # noqa: F401  (registers the KAT models with timm)
from lightning_act.nn.group_rational import GroupRational, KernelConfig, group_rational_op

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


def test_op_registration_schema_fake_and_autograd() -> None:
    generator = torch.Generator().manual_seed(1)
    inputs = (torch.randn(4, 2, 3, generator=generator, requires_grad=True),
              torch.randn(1, 6, generator=generator, requires_grad=True),
              torch.randn(2, 4, generator=generator, requires_grad=True), CONFIG)
    torch.library.opcheck(
        group_rational_op, inputs, test_utils=("test_schema", "test_autograd_registration", "test_faketensor")
    )


def _recording_backend() -> tuple[object, list[torch.fx.GraphModule]]:
    """An AOTAutograd backend that keeps the forward and backward graphs and runs them eagerly."""
    graphs: list[torch.fx.GraphModule] = []

    def keep(graph: torch.fx.GraphModule, example_inputs: object) -> object:
        graphs.append(graph)
        return make_boxed_func(graph.forward)

    return aot_autograd(fw_compiler=keep, bw_compiler=keep), graphs


def _op_calls(graph: torch.fx.GraphModule, op: object) -> int:
    return sum(node.target is op for node in graph.graph.nodes)


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


def test_whole_kat_compiles_fullgraph_through_the_op_with_backward() -> None:
    model = _tiny_kat("triton")  # on CPU the op runs its PyTorch kernel
    images = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    reference = _tiny_kat("reference")
    reference.load_state_dict(model.state_dict())
    expected_logits, expected_grads = _logits_and_grads(reference, images)
    backend, graphs = _recording_backend()
    compiled = torch.compile(model, fullgraph=True, backend=backend)  # raises on any graph break
    model(images)  # an eager call first: the module's eager-only geometry cache must not leak into the trace
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logits, grads = _logits_and_grads(compiled, images)
    assert not [w for w in caught if "lru_cache" in str(w.message)], [str(w.message) for w in caught]
    for _ in range(2):  # eager and compiled calls interleaved: no recompilation (one forward, one backward graph)
        model(images[:2])
        _logits_and_grads(compiled, images)
    assert len(graphs) == 2
    forward_graph, backward_graph = graphs
    # two rationals per block, depth 2: four forward ops and four backward ops, nothing decomposed
    assert _op_calls(forward_graph, torch.ops.lightning_act.group_rational.default) == 4
    assert _op_calls(backward_graph, torch.ops.lightning_act.group_rational_backward.default) == 4
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    for grad, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5)


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
