"""Parametric Mish (PMish), the activation of Spectral-NN.

``PMish(x) = x · tanh(softplus(β x) / β)`` with one learnable scalar β per module
(Pulakurthi et al. 2024; used by Lekhak et al., arXiv 2602.10434). β = 1 is Mish
(``x · tanh(softplus(x))``); β → ∞ tends to ``x · tanh(ReLU(x))``; β → 0 tends to the
identity, because ``softplus(β x) / β ≈ log(2) / β → ∞`` and ``tanh → 1``.

Numerical safety:

* ``softplus(β x)`` is evaluated as ``logaddexp(β x, 0)``, which never overflows for large
  ``|β x|`` and has the exact derivative ``sigmoid(β x)`` everywhere (including ``x = 0``).
* β is clamped to ``[beta_min, ∞)`` before use. A β at or below 0 has no meaning here (the
  β → 0 limit is the identity) and a β so small that ``β²`` underflows would turn the
  gradient ``∂/∂β [softplus(β x) / β]`` into ``0 · ∞ = nan``. With the default
  ``beta_min = 1e-8`` every intermediate stays finite in float32; below the clamp the
  function equals its value at ``beta_min`` (the identity to float precision for
  ``|x| ≪ 1 / beta_min``) and β receives no gradient, like any clamped parameter.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def pmish(x: torch.Tensor, beta: torch.Tensor | float, beta_min: float = 1e-8) -> torch.Tensor:
    """``x · tanh(softplus(β x) / β)`` with β clamped to at least ``beta_min`` (see module docstring), computed in
    float32 at least and returned in ``x``'s dtype: in float16 a β above 65504 is infinite and ``beta_min`` is 0."""
    out_dtype = x.dtype
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    beta_t = torch.as_tensor(beta, dtype=x.dtype, device=x.device).clamp_min(beta_min)
    scaled_softplus = torch.logaddexp(beta_t * x, torch.zeros((), dtype=x.dtype, device=x.device)) / beta_t
    return (x * torch.tanh(scaled_softplus)).to(out_dtype)


class PMish(nn.Module):
    """Parametric Mish with one learnable scalar β (init 1, i.e. Mish at the start of training).

    Args:
        beta_init: initial β (> 0).
        learnable: train β (``True``, as in the paper) or keep it fixed.
        beta_min: smallest β used in the forward pass; keeps gradients finite as β → 0.
    """

    def __init__(self, beta_init: float = 1.0, learnable: bool = True, beta_min: float = 1e-8) -> None:
        super().__init__()
        # finite too: an infinite β gives inf / inf = NaN outputs
        if isinstance(beta_init, bool) or not (beta_init > 0 and math.isfinite(beta_init)):
            raise ValueError(f"PMish beta_init must be > 0 and finite, got {beta_init}; pass a positive value such as 1.0")
        if isinstance(beta_min, bool) or not (beta_min > 0 and math.isfinite(beta_min)):
            raise ValueError(
                f"PMish beta_min must be > 0 and finite, got {beta_min}; pass a small positive value such as 1e-8"
            )
        if beta_init < beta_min:  # the forward would use beta_min, and the clamped β would get no gradient
            raise ValueError(
                f"PMish beta_init={beta_init:g} is below beta_min={beta_min:g}, so β would be clamped and never train; "
                "pass beta_init >= beta_min"
            )
        self.beta_min = float(beta_min)
        self.beta = nn.Parameter(torch.tensor(float(beta_init)), requires_grad=learnable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pmish(x, self.beta, self.beta_min)

    def extra_repr(self) -> str:
        # a meta β (a model built under torch.device("meta")) has no value to print
        beta = "meta" if self.beta.is_meta else f"{self.beta.item():.4g}"
        return f"beta={beta}, learnable={self.beta.requires_grad}, beta_min={self.beta_min:g}"
