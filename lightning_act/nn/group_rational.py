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
ops), ``"compile"`` (``torch.compile`` of the reference), ``"triton"`` (fused Triton kernels of
:mod:`lightning_act.nn.triton_rational`, CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"auto"`` (Triton on
CUDA tensors when Triton imports, else the reference). All compute in float32 with autocast disabled and
return the input dtype (float32, bfloat16, float16).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from lightning_act.errors import LightningActError
from lightning_act.nn.rational_coefficients import INIT_COEFFICIENTS

NUMERATOR_TERMS = 6
DENOMINATOR_TERMS = 4
IMPLEMENTATIONS = ("auto", "reference", "triton", "compile")
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
    with torch.autocast(device_type=x.device.type, enabled=False):
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


@functools.cache
def triton_available() -> bool:
    """True when Triton can be imported (it ships with CUDA builds of PyTorch on Linux)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _compiled_reference() -> Callable[..., torch.Tensor]:
    """``torch.compile`` of the reference (one fused elementwise kernel per pass); shapes that change after
    the first call (e.g. a smaller last batch) are recompiled once as dynamic."""
    return torch.compile(group_rational_reference)


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
        implementation: ``"auto"``, ``"reference"``, ``"triton"`` or ``"compile"`` (see module docstring).
        sharing: ``"per_group"``, ``"shared_numerator"`` or ``"shared_denominator"``.
        triton_tile: optional ``(BLOCK_R, BLOCK_K)`` powers of two for the Triton kernels (default: automatic).
    """

    def __init__(
        self,
        num_channels: int,
        groups: int = 8,
        init: str = "identity",
        channel_dim: int = -1,
        implementation: str = "auto",
        sharing: str = "per_group",
        triton_tile: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if groups < 1 or num_channels % groups:
            raise LightningActError(
                f"GroupRational: {num_channels} channels cannot be split into {groups} equal groups; "
                "pass a groups= that divides num_channels"
            )
        if implementation not in IMPLEMENTATIONS:
            raise LightningActError(f"unknown implementation {implementation!r}; pass one of {IMPLEMENTATIONS}")
        if sharing not in SHARINGS:
            raise LightningActError(f"unknown sharing {sharing!r}; pass one of {SHARINGS}")
        numerator, denominator = _init_coefficients(init)
        numerator_sets = 1 if sharing == "shared_numerator" else groups
        denominator_sets = 1 if sharing == "shared_denominator" else groups
        self.num_channels = num_channels
        self.groups = groups
        self.init = init
        self.channel_dim = channel_dim
        self.implementation = implementation
        self.sharing = sharing
        self.triton_tile = triton_tile
        self.weight_numerator = nn.Parameter(torch.tensor(numerator, dtype=torch.float32).repeat(numerator_sets, 1))
        self.weight_denominator = nn.Parameter(
            torch.tensor(denominator, dtype=torch.float32).repeat(denominator_sets, 1)
        )

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
                    f"pass a (1, {terms}) or ({self.groups}, {terms}) tensor"
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
                    "build the module with sharing='per_group'"
                )
        return state

    def resolved_implementation(self, x: torch.Tensor) -> str:
        """The implementation ``forward`` uses for ``x``."""
        if self.implementation == "auto":
            return "triton" if x.is_cuda and triton_available() else "reference"
        if self.implementation == "triton":
            if not triton_available():
                raise LightningActError("implementation='triton' but Triton is not installed; pip install triton")
            if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
                raise LightningActError(
                    "implementation='triton' needs a CUDA tensor (or TRITON_INTERPRET=1); "
                    "use implementation='reference' on CPU"
                )
        return self.implementation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 0 or not -x.ndim <= self.channel_dim < x.ndim or x.shape[self.channel_dim] != self.num_channels:
            raise LightningActError(
                f"GroupRational expects {self.num_channels} channels in dim {self.channel_dim}, got input of shape "
                f"{tuple(x.shape)}; pass channel_dim=1 for (B, C, H, W) or -1 for (B, L, C)"
            )
        numerator, denominator = self.coefficients()
        implementation = self.resolved_implementation(x)
        if implementation == "triton":
            from lightning_act.nn.triton_rational import group_rational_triton

            x3 = grouped_view(x, self.groups, self.channel_dim)
            return group_rational_triton(x3, numerator, denominator, self.triton_tile).reshape(x.shape)
        if implementation == "compile":
            return _compiled_reference()(x, numerator, denominator, self.channel_dim)
        return group_rational_reference(x, numerator, denominator, self.channel_dim)

    def extra_repr(self) -> str:
        return (
            f"{self.num_channels}, groups={self.groups}, init={self.init!r}, channel_dim={self.channel_dim}, "
            f"implementation={self.implementation!r}, sharing={self.sharing!r}"
        )
