"""GroupRational: the group-rational KAN activation (GR-KAN) of the Kolmogorov-Arnold Transformer.

Yang & Wang 2024, "Kolmogorov-Arnold Transformer" (arXiv 2409.10594). Every channel ``c`` of group
``g = c // (C / groups)`` is mapped by the rational function of order (5, 4)

    F_g(x) = P_g(x) / Q_g(x)
    P_g(x) = a0 + a1 x + a2 x^2 + a3 x^3 + a4 x^4 + a5 x^5                     (Horner's rule)
    Q_g(x) = 1 + |b0| |x| + |b1| |x|^2 + |b2| |x|^3 + |b3| |x|^4              ("absolute-value" form)

Denominator: the absolute-value form of the public rational_kat_cu kernels (not the paper's "safe Padé"
``1 + |b1 x + ... + b4 x^4|``). ``Q >= 1`` everywhere, so ``F`` has no poles, and official KAT checkpoints
(which were evaluated with these kernels) load without refitting. The shipped initial coefficients were
fitted in this same form (``scripts/fit_rational_init.py``).

Derivative conventions at kinks: ``d|x|/dx = sign(x)`` with ``sign(0) = 0``; ``d|b|/db = +1`` at ``b = 0``
(the right derivative), so a denominator initialised at exactly zero (the identity init) still learns.

Sharing (``sharing=``): ``"per_group"`` (default; numerator and denominator per group, the most general),
``"shared_numerator"`` (one numerator, per-group denominators: the released KAT code; parameter shapes then
equal the official ``weight_numerator`` (1, 6) / ``weight_denominator`` (groups, 4)), ``"shared_denominator"``
(per-group numerators, one denominator: the paper's description).

Implementations (``implementation=``): ``"reference"`` (pure PyTorch, any device, autograd through torch
ops; under ``torch.compile`` Inductor fuses it), ``"triton"`` (the registered op ``lightning_act::group_rational``
with its own backward: the fused Triton kernels of :mod:`lightning_act.nn.triton_rational` on CUDA, or on CPU
under ``TRITON_INTERPRET=1``; on other CPU tensors the op's PyTorch formula with the same closed-form gradients),
``"auto"`` (``"triton"`` on CUDA tensors when Triton imports, else ``"reference"``). All compute in float32 with
autocast disabled and return the input dtype (float32, bfloat16, float16; integer inputs are refused). Range: ``P``
and ``Q`` are formed before dividing, so float32 overflows from ``|x|`` ~ 2e8 (inf / NaN, ``docs/kat_kernel.md``).

Under ``torch.fx.symbolic_trace`` the forward records one call of the checked reference formula (a Proxy has no shape
to check); timm's FX feature extraction keeps the module itself one node (``lightning_act.models.kat`` registers it).

The op is what ``torch.compile`` sees: a ``torch.library.triton_op``, so ``fullgraph=True`` traces whole KAT models
into the Triton launches themselves (Inductor launches the kernels from its generated code, and CUDA graphs
capture them); eager calls skip the dispatcher and go through :class:`GroupRationalFunction`, the same kernels with
about half the host time per call (``docs/kat_kernel.md``).
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from torch.autograd import forward_ad as _forward_ad

from lightning_act._triton import triton_import_problem, triton_requirement, triton_usable, warn_triton_unusable
from lightning_act.errors import LightningActError
from lightning_act.nn.rational_coefficients import INIT_COEFFICIENTS
from lightning_act.precision import autocast_off

NUMERATOR_TERMS = 6
DENOMINATOR_TERMS = 4
IMPLEMENTATIONS = ("auto", "reference", "triton")
SHARINGS = ("per_group", "shared_numerator", "shared_denominator")


def _abs_with_right_derivative(values: torch.Tensor) -> torch.Tensor:
    """|values| whose gradient is +1 at 0 (torch.abs gives 0 there, which would freeze a zero denominator)."""
    return torch.where(values >= 0, values, -values)


def grouped_view(x: torch.Tensor, groups: int, channel_dim: int) -> torch.Tensor:
    """View ``x`` as ``(rows, groups, width)``: channels of ``channel_dim`` split into contiguous groups."""
    dim = channel_dim % x.ndim
    rows = math.prod(x.shape[:dim])
    width = x.shape[dim] // groups * math.prod(x.shape[dim + 1 :])
    return x.reshape(rows, groups, width)


def group_rational_reference(
    x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, channel_dim: int = -1
) -> torch.Tensor:
    """Pure-PyTorch group rational (any device, differentiable by autograd).

    ``numerator`` is ``(groups, 6)`` (a0..a5), ``denominator`` ``(groups, 4)`` (b0..b3); the channel count of
    ``x`` along ``channel_dim`` must be divisible by ``groups``. Computes in float32 (float64 if any input is
    float64, for gradcheck), returns ``x.dtype``.
    """
    groups = numerator.shape[0]
    float64_inputs = torch.float64 in (x.dtype, numerator.dtype, denominator.dtype)
    compute_dtype = torch.float64 if float64_inputs else torch.float32
    with autocast_off(x.device.type):
        x3 = grouped_view(x, groups, channel_dim).to(compute_dtype)
        width = x3.shape[2]
        # Coefficient j of every element of one row, (1, groups, width) contiguous: broadcasting only over
        # rows keeps PyTorch's CPU kernels vectorised (a (1, groups, 1) operand is several times slower).
        a = numerator.to(compute_dtype).t()[:, None, :, None].expand(-1, 1, groups, width).contiguous()
        b = _abs_with_right_derivative(denominator.to(compute_dtype)).t()[:, None, :, None]
        b = b.expand(-1, 1, groups, width).contiguous()
        p = torch.addcmul(a[4], a[5], x3)  # Horner, one fused multiply-add pass per term
        for power in range(3, -1, -1):
            p = torch.addcmul(a[power], p, x3)
        ax = x3.abs()
        q = torch.addcmul(b[2], b[3], ax)
        for power in range(1, -1, -1):
            q = torch.addcmul(b[power], q, ax)
        q = torch.addcmul(torch.ones_like(b[0]), q, ax)
        return (p / q).to(x.dtype).reshape(x.shape)


def check_rational_input(x: torch.Tensor, num_channels: int, channel_dim: int) -> None:
    """One clear error for an input of another channel count or an integer dtype."""
    if x.ndim == 0 or not -x.ndim <= channel_dim < x.ndim or x.shape[channel_dim] != num_channels:
        raise LightningActError(
            f"GroupRational expects {num_channels} channels in dim {channel_dim}, got input of shape "
            f"{tuple(x.shape)}; pass channel_dim=1 for (B, C, H, W) or -1 for (B, L, C)"
        )
    if not x.is_floating_point():  # as torch's activations: the float result would be truncated to x.dtype
        raise LightningActError(f"GroupRational takes floating-point inputs, got {x.dtype}; pass x.float()")


def _traced_group_rational(
    x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, num_channels: int, channel_dim: int
) -> torch.Tensor:
    """The checked reference formula as one node of a ``torch.fx`` graph: symbolic tracing hands ``forward`` a
    Proxy, whose shape and dtype cannot steer the checks and the dtype choice; the graph runs them on real inputs."""
    check_rational_input(x, num_channels, channel_dim)
    return group_rational_reference(x, numerator, denominator, channel_dim)


torch.fx.wrap("_traced_group_rational")

# Triton installed and importable (lightning_act._triton: a broken install counts as absent, and says so on CUDA)
_TRITON_USABLE = triton_usable()
_TRITON_IMPORT_PROBLEM = triton_import_problem()
if _TRITON_USABLE:  # imported here (not on first use) so that triton_op finds the kernels the op bodies launch
    from lightning_act.nn.triton_rational import group_rational_backward as triton_backward
    from lightning_act.nn.triton_rational import group_rational_forward as triton_forward


def triton_available() -> bool:
    """True when Triton is installed and imports (it ships with CUDA builds of PyTorch on Linux). A module constant,
    not a cached function: ``torch.compile`` traces this call, and Dynamo warns on ``lru_cache`` wrappers."""
    return _TRITON_USABLE


class KernelConfig(NamedTuple):
    """Launch configuration of the Triton kernels (powers of two; design in ``docs/kat_kernel.md``).

    ``block_k``: tile width along a group's channels (0: the power of two that pads the group width least);
    ``forward_tile``: elements per forward program; ``backward_tile``: elements per backward row tile (each
    holds 10 fp32 accumulators per element, so it is smaller than the forward tile); ``backward_row_tiles``:
    row tiles a backward program accumulates before its one reduction (any positive integer; the others are
    powers of two); ``num_warps``: warps per program; ``interleave_groups``: 1 numbers the programs
    group-fastest, so the tiles in flight cover whole rows (memory order), 0 group by group (each group's
    column slice of every row, then the next group: ``groups`` strided passes over the tensor);
    ``backward_prefetch``: 1 loads the next backward row tile before computing the current one (more memory
    requests in flight per thread, at the cost of registers), 0 loads each tile when it is computed.
    """

    # Defaults: the best measured configuration of H100 run 3 (docs/kat_kernel.md), checked there against float64:
    # forward 91% / fwd+bwd 57% of copy bandwidth against 80% / 53% for the round-2 default (backward_tile=1024,
    # backward_row_tiles=8, interleave_groups=0).
    block_k: int = 0
    forward_tile: int = 4096
    backward_tile: int = 512
    backward_row_tiles: int = 16
    num_warps: int = 4
    interleave_groups: int = 1
    backward_prefetch: int = 0


# The launch configuration before issue 13 (one reduction per 4096-element backward tile), for A/B runs.
PREVIOUS_KERNEL_CONFIG = KernelConfig(forward_tile=4096, backward_tile=4096, backward_row_tiles=1, interleave_groups=0)


# Triton refuses blocks of more than 2^20 elements (TRITON_MAX_TENSOR_NUMEL); CUDA, more than 1024 threads.
KERNEL_CONFIG_LIMITS = {"block_k": 2**20, "forward_tile": 2**20, "backward_tile": 2**20, "num_warps": 32}


def check_kernel_config(config: KernelConfig) -> None:
    """One clear error for a configuration the kernels cannot launch."""
    for name, value in zip(KernelConfig._fields, config, strict=True):
        if value > KERNEL_CONFIG_LIMITS.get(name, value):
            raise LightningActError(
                f"kernel_config.{name}={value} exceeds {KERNEL_CONFIG_LIMITS[name]}, the most Triton can launch"
            )
        if name == "backward_row_tiles":  # a loop count: any positive integer
            if value < 1:
                raise LightningActError(f"kernel_config.backward_row_tiles={value} must be >= 1")
        elif name in ("interleave_groups", "backward_prefetch"):
            if value not in (0, 1):
                raise LightningActError(f"kernel_config.{name}={value} must be 0 or 1")
        elif value < (0 if name == "block_k" else 1) or value & (value - 1):
            raise LightningActError(
                f"kernel_config.{name}={value} must be a power of two"
                + (" (or 0 for automatic)" if name == "block_k" else "")
                + "; pass e.g. KernelConfig(block_k=128)"
            )


def _runs_triton(x: torch.Tensor, *coefficients: torch.Tensor) -> bool:
    """Whether the Triton kernels take ``x``: CUDA tensors, and real CPU tensors under ``TRITON_INTERPRET=1``
    (the interpreter runs kernels on data, so a trace's fake CPU tensors take the PyTorch formula). Not float64
    ones: the kernels compute in float32, and a float64 input (gradcheck) is computed in float64. Without a usable
    Triton, never."""
    if not _TRITON_USABLE or torch.float64 in (x.dtype, *(c.dtype for c in coefficients)):
        return False
    if x.is_cuda:
        return True
    return os.environ.get("TRITON_INTERPRET") == "1" and not is_fake(x)


_is_legacy_batched = torch._C._functorch.is_legacy_batchedtensor  # grads of autograd's own batched backward


def _static_geometry(x3: torch.Tensor) -> tuple[int, int, int]:
    """``(rows, groups, width)`` of ``x3`` as ints. The launch plan (grids, tile flags) needs integers, so under
    dynamic shapes a symbolic size is specialised: a guard, and a new batch size recompiles."""
    rows, groups, width = (int(size) for size in x3.shape)
    return rows, groups, width


def _per_group(coefficients: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """``(sets, terms)`` coefficients as ``(terms, 1, groups, 1)`` columns for a ``(rows, groups, width)`` input."""
    return coefficients.to(dtype).expand(groups, -1).t()[:, None, :, None]


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _pytorch_forward(x3: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """The op's PyTorch formula for the forward: coefficient sets ``(1 or groups, k)`` broadcast over the groups."""
    groups = x3.shape[1]
    return group_rational_reference(x3, numerator.expand(groups, -1), denominator.expand(groups, -1), channel_dim=1)


def _pytorch_backward(
    x3: torch.Tensor, grad_y: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's PyTorch formula for the backward: the closed-form gradients the Triton backward computes.

    ``dx = grad_y (P' Q - P Q') / Q^2``; ``dL/da_j = sum grad_y x^j / Q``; ``dL/d|b_k| = -sum grad_y P |x|^(k+1) / Q^2``,
    times ``d|b|/db`` (+1 at 0); shared sets sum over their groups.
    """
    groups = x3.shape[1]
    dtype = _compute_dtype(x3, numerator, denominator)
    x, grad_y = x3.to(dtype), grad_y.to(dtype)
    a = _per_group(numerator, groups, dtype)
    b = _abs_with_right_derivative(_per_group(denominator, groups, dtype))  # differentiated again under create_graph
    ax = x.abs()
    p, dp = a[5], 5.0 * a[5]
    for power in range(4, -1, -1):
        p = p * x + a[power]
        if power:
            dp = dp * x + power * a[power]
    q, dq = b[3], 4.0 * b[3]
    for power in range(2, -1, -1):
        q = q * ax + b[power]
        dq = dq * ax + (power + 1) * b[power]
    q = q * ax + 1.0
    dq = dq * torch.sign(x)
    inv_q = 1.0 / q
    y = p * inv_q
    grad_x = (grad_y * (dp - y * dq) * inv_q).to(x3.dtype)
    grad_p = grad_y * inv_q
    grad_q = -grad_p * y
    # grad_p x^j by successive products, as the kernel does: x**5 alone overflows float32 from |x| ~ 5e7
    terms = [grad_p]
    for _ in range(NUMERATOR_TERMS - 1):
        terms.append(terms[-1] * x)
    grad_numerator = torch.stack([term.sum((0, 2)) for term in terms], 1)
    terms = [grad_q * ax]
    for _ in range(DENOMINATOR_TERMS - 1):
        terms.append(terms[-1] * ax)
    grad_abs_denominator = torch.stack([term.sum((0, 2)) for term in terms], 1)
    if numerator.shape[0] == 1:
        grad_numerator = grad_numerator.sum(0, keepdim=True)
    if denominator.shape[0] == 1:
        grad_abs_denominator = grad_abs_denominator.sum(0, keepdim=True)
    grad_denominator = grad_abs_denominator * torch.where(denominator >= 0, 1.0, -1.0).to(dtype)
    return grad_x, grad_numerator.to(numerator.dtype), grad_denominator.to(denominator.dtype)


# The op bodies are ordinary PyTorch code plus Triton launches: with Triton installed they are registered with
# ``torch.library.triton_op``, so AOTAutograd traces INTO them (each launch becomes a Triton-kernel node that
# Inductor launches from its own generated code, capturable by CUDA graphs; on CPU the PyTorch formula is traced
# and fused); without Triton, ``custom_op`` with the body as its fake kernel.
_register_op = torch.library.triton_op if _TRITON_USABLE else torch.library.custom_op


def _check_op_inputs(x3: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor) -> None:
    """One clear error for inputs the op cannot take. The kernels index coefficient set ``group`` (or 0 when shared)
    unchecked, so any other coefficient shape would read past the tensors; integer inputs would be truncated."""
    if x3.ndim != 3:
        raise LightningActError(f"group_rational takes x3 of shape (rows, groups, width), got {tuple(x3.shape)}")
    for tensor in (x3, numerator, denominator):
        if not tensor.is_floating_point():
            raise LightningActError(f"group_rational takes floating-point tensors, got {tensor.dtype}")
    groups = x3.shape[1]
    for name, coefficients, terms in (
        ("numerator", numerator, NUMERATOR_TERMS), ("denominator", denominator, DENOMINATOR_TERMS)
    ):
        if coefficients.ndim != 2 or coefficients.shape[1] != terms or coefficients.shape[0] not in (1, groups):
            raise LightningActError(
                f"group_rational: {name} of shape {tuple(coefficients.shape)} does not fit {groups} groups; "
                f"pass a (1, {terms}) or ({groups}, {terms}) tensor"
            )


def _group_rational_forward(
    x3: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, config: list[int]
) -> torch.Tensor:
    """The rational on ``x3`` of shape ``(rows, groups, width)`` with coefficient sets ``(1 or groups, 6)`` and
    ``(1 or groups, 4)``; ``config`` is a :class:`KernelConfig` as a list. Triton where it runs, else PyTorch."""
    _check_op_inputs(x3, numerator, denominator)
    if _runs_triton(x3, numerator, denominator):  # launches traced as kernel nodes on CUDA; interpreter launches on CPU
        return triton_forward(
            x3.contiguous(), numerator.contiguous(), denominator.contiguous(), tuple(config), _static_geometry(x3),
            traced=x3.is_cuda,
        )
    return _pytorch_forward(x3, numerator, denominator)


def _group_rational_backward(
    x3: torch.Tensor, grad_y: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, config: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_numerator, grad_denominator)`` of :func:`group_rational_op`, in the inputs' shapes and dtypes."""
    _check_op_inputs(x3, numerator, denominator)
    if _runs_triton(x3, numerator, denominator):
        return triton_backward(
            x3.contiguous(), grad_y.contiguous(), numerator.contiguous(), denominator.contiguous(), tuple(config),
            _static_geometry(x3), traced=x3.is_cuda,
        )
    return _pytorch_backward(x3, grad_y, numerator, denominator)


group_rational_op = _register_op("lightning_act::group_rational", _group_rational_forward, mutates_args=())
group_rational_backward_op = _register_op(
    "lightning_act::group_rational_backward", _group_rational_backward, mutates_args=()
)
if not _TRITON_USABLE:  # triton_op registers the body as the fake kernel itself
    group_rational_op.register_fake(_group_rational_forward)
    group_rational_backward_op.register_fake(_group_rational_backward)


def _save_for_backward(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x3, numerator, denominator, config = inputs
    ctx.save_for_backward(x3, numerator, denominator)
    ctx.config = config


def _op_backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x3, numerator, denominator = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: the formula autograd can differentiate again (see below)
        return *_pytorch_backward(x3, grad_y, numerator, denominator), None
    return *group_rational_backward_op(x3, grad_y, numerator, denominator, ctx.config), None


group_rational_op.register_autograd(_op_backward, setup_context=_save_for_backward)


def _eager_forward(
    x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, grouped: tuple[int, int, int],
    config: tuple[int, ...],
) -> torch.Tensor:
    """Forward of the eager Functions: contiguous ``x`` of any shape whose memory is ``grouped``."""
    if _runs_triton(x, numerator, denominator):
        return triton_forward(x, numerator, denominator, config, grouped)
    return _pytorch_forward(x.view(grouped), numerator, denominator).view(x.shape)


class GroupRationalFunction(torch.autograd.Function):
    """Eager path of :func:`group_rational_op`: the same kernels without the dispatcher's per-call overhead.

    Takes contiguous tensors and the ``(rows, groups, width)`` geometry of ``x`` as ints, so ``x`` keeps its
    shape and no view of the output is needed (a view of a custom Function's output costs host time). The
    context is set up in ``forward``: with a ``setup_context`` staticmethod, ``apply`` binds its arguments
    through ``inspect.signature`` on every call (about 20 us); :class:`GroupRationalTransformFunction` has one,
    for ``torch.func`` transforms only.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor,
        grouped: tuple[int, int, int], config: tuple[int, ...],
    ) -> torch.Tensor:
        ctx.save_for_backward(x, numerator, denominator)
        ctx.grouped, ctx.config = grouped, config
        return _eager_forward(x, numerator, denominator, grouped, config)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, numerator, denominator = ctx.saved_tensors
        grouped = ctx.grouped
        # Under create_graph=True (gradient penalties; torch.func always) the backward must itself be
        # differentiable: the kernels' outputs carry no graph, so autograd took grad_x for a constant and second
        # derivatives came out wrong. Autograd's batched grads (jacobian(vectorize=True), is_grads_batched) hand a
        # legacy-vmap BatchedTensor, which has no storage for a kernel to read: the formula batches it.
        if (
            _runs_triton(x, numerator, denominator) and not torch.is_grad_enabled()
            and not _is_legacy_batched(grad_y)
        ):
            return *triton_backward(x, grad_y.contiguous(), numerator, denominator, ctx.config, grouped), None, None
        grad_x, grad_numerator, grad_denominator = _pytorch_backward(
            x.view(grouped), grad_y.reshape(grouped), numerator, denominator
        )
        return grad_x.view(x.shape), grad_numerator, grad_denominator, None, None


class GroupRationalTransformFunction(GroupRationalFunction):
    """:class:`GroupRationalFunction` under ``torch.func`` transforms (grad, vmap, jacrev: per-sample gradients,
    functional penalties), which need ``setup_context`` and a ``vmap`` rule. Forward launches the kernels on the
    unwrapped tensors; functorch runs backwards with ``create_graph``, so the PyTorch formula computes them."""

    @staticmethod
    def forward(  # type: ignore[override]
        x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, grouped: tuple[int, int, int],
        config: tuple[int, ...],
    ) -> torch.Tensor:
        return _eager_forward(x, numerator, denominator, grouped, config)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x, numerator, denominator, grouped, config = inputs
        ctx.save_for_backward(x, numerator, denominator)
        ctx.grouped, ctx.config = grouped, config

    @staticmethod
    def vmap(  # type: ignore[override]
        info: Any, in_dims: tuple[int | None, ...], x: torch.Tensor, numerator: torch.Tensor,
        denominator: torch.Tensor, grouped: tuple[int, int, int], config: tuple[int, ...],
    ) -> tuple[torch.Tensor, int]:
        """A batch of inputs is more rows of the same groups: one launch. Per-sample coefficients (e.g. a vmapped
        ensemble) take the PyTorch formula, vmapped."""
        if in_dims[1] is None and in_dims[2] is None:
            rows, groups, width = grouped
            x = x.movedim(in_dims[0], 0).contiguous()
            return _apply_function(x, numerator, denominator, (info.batch_size * rows, groups, width), config), 0

        def formula(x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
            return _pytorch_forward(x.reshape(grouped), numerator, denominator).view(x.shape)

        vmapped = torch.vmap(formula, in_dims=in_dims[:3], randomness=info.randomness)
        return vmapped(x, numerator, denominator), 0


_functorch_active = torch._C._are_functorch_transforms_active  # ~25 ns: the eager path asks on every call
_is_tracing = torch._C._is_tracing  # torch.jit.is_tracing() without its scripting check: half the time


def _functions_unusable() -> bool:
    """Whether the eager Functions must give way to the reference ops: under ``torch.jit.trace`` (their int
    geometry would be recorded as constants, so the trace ran at the traced batch size only) and under forward-mode
    AD (they have no ``jvp``; ``torch.func.jvp`` / ``jacfwd`` / ``hessian`` and ``forward_ad`` all run inside a dual
    level). The reference ops trace batch-agnostic and have forward derivatives. ~70 ns per eager call."""
    return _forward_ad._current_level >= 0 or _is_tracing()


def _apply_function(
    x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, grouped: tuple[int, int, int],
    config: tuple[int, ...],
) -> torch.Tensor:
    """The eager Function for contiguous tensors: :class:`GroupRationalTransformFunction` inside a ``torch.func``
    transform (which refuses the other), else :class:`GroupRationalFunction`."""
    function = GroupRationalTransformFunction if _functorch_active() else GroupRationalFunction
    return function.apply(x, numerator, denominator, grouped, config)


def group_rational(
    x3: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, config: KernelConfig = KernelConfig()
) -> torch.Tensor:
    """Differentiable rational of ``x3`` ``(rows, groups, width)``: the registered op while ``torch.compile``
    traces, :class:`GroupRationalFunction` in eager mode (its PyTorch formula under ``torch.jit.trace`` and forward-mode
    AD, which the Function cannot take)."""
    _check_op_inputs(x3, numerator, denominator)
    if torch.compiler.is_compiling():
        return group_rational_op(x3, numerator, denominator, list(config))
    if _functions_unusable():
        return _pytorch_forward(x3, numerator, denominator)
    return _apply_function(x3.contiguous(), numerator.contiguous(), denominator.contiguous(), tuple(x3.shape), config)


def rational_value(x: np.ndarray, numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """The same rational in numpy float64 (for fitting and gains, not for training)."""
    p = np.polyval(np.asarray(numerator, dtype=np.float64)[::-1], x)
    ax = np.abs(x)
    b = np.abs(np.asarray(denominator, dtype=np.float64))
    return p / (1.0 + ax * (b[0] + ax * (b[1] + ax * (b[2] + ax * b[3]))))


@functools.cache
def rational_gain(init: str) -> float:
    """``E[F(x)^2]`` for ``x ~ N(0, 1)`` of the shipped ``init`` rational.

    KAT's variance-preserving init (Yang & Wang 2024, arXiv 2409.10594) draws the following linear
    layer's weights with variance ``1 / (d_in * E[F^2])``, so that its output keeps unit variance.
    Trapezoid rule on [-12, 12] (the Gaussian density beyond is below 1e-31).
    """
    numerator, denominator = _init_coefficients(init)
    x, step = np.linspace(-12.0, 12.0, 240_001, retstep=True)
    integrand = rational_value(x, numerator, denominator) ** 2 * np.exp(-0.5 * x**2) / math.sqrt(2.0 * math.pi)
    return float(step * (integrand.sum() - 0.5 * (integrand[0] + integrand[-1])))


def _init_coefficients(init: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if init not in INIT_COEFFICIENTS:
        raise LightningActError(f"unknown rational init {init!r}; pass init= one of {sorted(INIT_COEFFICIENTS)}")
    return INIT_COEFFICIENTS[init]


class GroupRational(nn.Module):
    """Group-rational activation of order (5, 4) with ``groups`` coefficient sets over the channels (GR-KAN).

    Args:
        num_channels: channel count ``C`` of the input along ``channel_dim``.
        groups: number of contiguous channel groups (KAT uses 8); must divide ``num_channels``.
        init: function the rational starts as: ``"identity"``, ``"gelu"`` (exact erf GELU) or ``"swish"``.
        channel_dim: dimension holding the channels: ``-1`` for ``(B, L, C)``, ``1`` for ``(B, C, H, W)``.
        implementation: ``"auto"``, ``"reference"`` or ``"triton"`` (see module docstring).
        sharing: ``"per_group"``, ``"shared_numerator"`` or ``"shared_denominator"``.
        kernel_config: launch configuration of the Triton kernels (:class:`KernelConfig`; default tuned a priori).
    """

    def __init__(
        self,
        num_channels: int,
        groups: int = 8,
        init: str = "identity",
        channel_dim: int = -1,
        implementation: str = "auto",
        sharing: str = "per_group",
        kernel_config: KernelConfig = KernelConfig(),
    ) -> None:
        super().__init__()
        for name, value in (("num_channels", num_channels), ("groups", groups)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise LightningActError(
                    f"GroupRational: {name}={value!r} must be a whole number >= 1; pass e.g. GroupRational(64, groups=8)"
                )
        if num_channels % groups:
            raise LightningActError(
                f"GroupRational: {num_channels} channels cannot be split into {groups} equal groups; "
                "pass a groups= that divides num_channels"
            )
        if implementation == "compile":
            raise LightningActError(
                "implementation='compile' was removed; torch.compile the whole model instead (the op traces "
                "without graph breaks) and use implementation='auto'"
            )
        if implementation not in IMPLEMENTATIONS:
            raise LightningActError(f"unknown implementation {implementation!r}; pass one of {IMPLEMENTATIONS}")
        if sharing not in SHARINGS:
            raise LightningActError(f"unknown sharing {sharing!r}; pass one of {SHARINGS}")
        check_kernel_config(KernelConfig(*kernel_config))
        numerator_sets = 1 if sharing == "shared_numerator" else groups
        denominator_sets = 1 if sharing == "shared_denominator" else groups
        self.num_channels = num_channels
        self.groups = groups
        self.init = init
        self.channel_dim = channel_dim
        self.implementation = implementation
        self.sharing = sharing
        self.kernel_config = KernelConfig(*kernel_config)
        self._eager_input: tuple[torch.Size, torch.device, torch.dtype, str] | None = None  # last eager input checked
        self._eager_grouped: tuple[int, int, int] | None = None
        self.weight_numerator = nn.Parameter(torch.empty(numerator_sets, NUMERATOR_TERMS, dtype=torch.float32))
        self.weight_denominator = nn.Parameter(torch.empty(denominator_sets, DENOMINATOR_TERMS, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The coefficients of ``init`` in every set; also what materialises a model built on the meta device
        (``to_empty()`` then ``init_weights()``: KAT's MLP calls this)."""
        numerator, denominator = _init_coefficients(self.init)
        with torch.no_grad():
            self.weight_numerator.copy_(torch.tensor(numerator).expand_as(self.weight_numerator))
            self.weight_denominator.copy_(torch.tensor(denominator).expand_as(self.weight_denominator))

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group ``(groups, 6)`` numerator and ``(groups, 4)`` denominator (shared sets broadcast)."""
        numerator = self.weight_numerator.expand(self.groups, NUMERATOR_TERMS)
        denominator = self.weight_denominator.expand(self.groups, DENOMINATOR_TERMS)
        return numerator, denominator

    def coefficient_state(self, numerator: torch.Tensor, denominator: torch.Tensor) -> dict[str, torch.Tensor]:
        """State-dict entries for this module from coefficients given shared ``(1, k)`` or per group ``(groups, k)``.

        E.g. an official KAT ``KAT_Group``: ``weight_numerator`` (1, 6), ``weight_denominator`` (groups, 4),
        which were evaluated in the same absolute-value form, so they load unchanged into any ``sharing``
        (a shared set is repeated per group; per-group sets load into a shared parameter only if all equal).
        """
        state = {}
        for name, given in (("weight_numerator", numerator), ("weight_denominator", denominator)):
            target = getattr(self, name)
            sets, terms = target.shape
            if given.ndim != 2 or given.shape[1] != terms or given.shape[0] not in (1, self.groups):
                raise LightningActError(
                    f"{name} of shape {tuple(given.shape)} does not fit {self.groups} groups of {terms} terms; "
                    f"pass a (1, {terms}) or ({self.groups}, {terms}) tensor (for a KAT checkpoint: build the model "
                    "with rational_groups= equal to the checkpoint's group count)"
                )
            if given.shape[0] == sets:
                state[name] = given.clone()
            elif sets == self.groups:
                state[name] = given.repeat(self.groups, 1)
            elif torch.equal(given, given[:1].expand_as(given)):
                state[name] = given[:1].clone()
            else:
                raise LightningActError(
                    f"{name} differs between groups but this module shares it (sharing={self.sharing!r}); "
                    "build the module with sharing='per_group' (KAT models: rational_sharing='per_group')"
                )
        return state

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any], strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:
        """Accept coefficients in any sharing layout (e.g. an official checkpoint's one shared numerator) by
        converting them with :meth:`coefficient_state`, so every loader (``load_state_dict``, timm's
        ``checkpoint_path``, Lightning checkpoints) takes them."""
        keys = (prefix + "weight_numerator", prefix + "weight_denominator")
        if all(key in state_dict for key in keys):
            given = [state_dict[key] for key in keys]
            if [tuple(t.shape) for t in given] != [tuple(self.weight_numerator.shape), tuple(self.weight_denominator.shape)]:
                for name, tensor in self.coefficient_state(*given).items():
                    state_dict[prefix + name] = tensor
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def resolved_implementation(self, x: torch.Tensor) -> str:
        """The implementation ``forward`` uses for ``x``."""
        if self.implementation == "auto":
            if x.is_cuda and _TRITON_IMPORT_PROBLEM is not None and not torch.compiler.is_compiling():
                warn_triton_unusable()  # not traced: torch.compile refuses its cached call (said by the eager calls)
            return "triton" if x.is_cuda and triton_available() else "reference"
        if self.implementation == "triton" and x.is_cuda and not triton_available():
            raise LightningActError(
                f"implementation='triton' on CUDA needs {triton_requirement()}; "
                "pass implementation='auto' or 'reference'"
            )
        return self.implementation

    def _grouped_shape(self, x: torch.Tensor) -> tuple[int, int, int] | None:
        """``(rows, groups, width)`` of ``x`` for the op, or ``None`` where the reference runs; checks ``x``."""
        check_rational_input(x, self.num_channels, self.channel_dim)
        if self.resolved_implementation(x) != "triton":
            return None
        return tuple(grouped_view(x, self.groups, self.channel_dim).shape)  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):  # torch.fx.symbolic_trace (without timm's leaf registration)
            numerator, denominator = self.coefficients()
            return _traced_group_rational(x, numerator, denominator, self.num_channels, self.channel_dim)
        if torch.compiler.is_compiling():
            grouped = self._grouped_shape(x)
        elif _functions_unusable():  # checked on every call, so that jit.trace's check run records the same ops
            check_rational_input(x, self.num_channels, self.channel_dim)
            grouped = None
        else:  # eager: check an input geometry once, then reuse it (host time per call, issue 13)
            seen = (x.shape, x.device, x.dtype, self.implementation)
            if seen != self._eager_input:
                self._eager_grouped = self._grouped_shape(x)
                self._eager_input = seen
            grouped = self._eager_grouped
        if grouped is None:
            numerator, denominator = self.coefficients()
            return group_rational_reference(x, numerator, denominator, self.channel_dim)
        numerator, denominator = self.weight_numerator, self.weight_denominator
        if torch.compiler.is_compiling():
            x3 = x.reshape(grouped).contiguous()
            return group_rational_op(x3, numerator, denominator, list(self.kernel_config)).view(x.shape)
        return _apply_function(x.contiguous(), numerator, denominator, grouped, self.kernel_config)

    def __prepare_scriptable__(self) -> nn.Module:
        """Refuse ``torch.jit.script`` in one line: TorchScript cannot compile the forward's dispatch (torch.fx
        proxies, ``torch.compiler`` checks, autograd Functions) and failed deep inside torch.fx instead."""
        raise LightningActError(
            "GroupRational (KAT's rational activation) cannot be compiled by torch.jit.script; "
            "use torch.jit.trace, torch.export or torch.compile, which all support it"
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_channels}, groups={self.groups}, init={self.init!r}, channel_dim={self.channel_dim}, "
            f"implementation={self.implementation!r}, sharing={self.sharing!r}"
        )
