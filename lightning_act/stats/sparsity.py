"""Activation sparsity as sum-reducible partials (pure tensor functions, no Lightning).

Three measures, each reduced to fixed-size float64 sums that add up across micro-batches and
data-parallel ranks, so the logged value is the same however the data was split:

- **zero fraction** (Lazy Neuron Phenomenon, Li et al. 2022, arXiv 2210.06313): the fraction of
  entries with ``|a| <= threshold`` (``threshold = 0``: exact zeros, the paper's post-ReLU
  "nonzero%" complement). Every token has the same width, so the fraction over all entries equals
  the paper's per-token fraction averaged over tokens.
- **CETT activation ratio** (Sparsing Law, Luo et al. 2024, arXiv 2411.02335): neuron ``i`` of a
  token contributes ``n_i = a_i * W_out[:, i]`` to the FFN output, ``||n_i|| = |a_i| ||W_out[:, i]||``;
  ``CETT(eps) = ||sum_{i: ||n_i|| < eps} n_i|| / ||FFN(x)||`` per token. The per-layer threshold is
  the ``eps`` at which the token-averaged CETT reaches a target, and the activation ratio is the
  fraction of (token, neuron) pairs with ``||n_i|| >= eps`` there.
- **temporal sparsity** (Delta activations, Yousefzadeh & Sifalakis 2021): the fraction of
  ``|a_t - a_{t-1}| <= eps`` along a time axis.

CETT design: a bisection per batch would need either a collective per bisection step or a
per-batch threshold that does not combine into the threshold of the whole step. Instead each
batch adds, on a fixed per-layer log-spaced grid of ``eps`` candidates, the sum over tokens of
CETT and the count of active pairs; these sums are exact across ranks and micro-batches, memory
is fixed (two vectors of the grid size), and at flush time the accumulated, token-averaged curve
is searched for the first crossing of the target (bisection on a monotone curve finds the same
point) and interpolated linearly in ``log eps`` between the two bracketing grid points. The
activation ratio is monotone in ``eps``, so the exact ratio at the exact threshold always lies
between the ratios at those two grid points; the grid's spacing bounds the error.

``FFN(x)`` is taken as ``W_out a``, the sum of all neuron outputs, without the down-projection's
bias: the paper's FFNs have no bias, a bias is no neuron's output, and truncating neurons never
changes it, so CETT stays the relative error of the neuron sum as the paper defines it.
"""

from __future__ import annotations

import math

import torch

from lightning_act.stats.moments import comparable_threshold

ZERO_SUMS = ("count", "nonfinite", "zeros")
TEMPORAL_SUMS = ("pairs", "unchanged")


def zero_partials(x: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """``[count, nonfinite, zeros]`` (float64): entries, non-finite entries, finite ``|a| <= threshold``.

    The comparison runs in float32 or wider, as real numbers: in bf16 a threshold of 0.01 would become 0.0100098
    and values just above it would count as zeros, and a float32 ``0.1`` (above the real 0.1) is not one.
    """
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    finite = torch.isfinite(x)
    count = float(x.numel())
    zeros = ((x.abs() <= comparable_threshold(threshold, x.dtype)) & finite).sum(dtype=torch.float64)
    nonfinite = count - finite.sum(dtype=torch.float64)
    return torch.stack([torch.full_like(zeros, count), nonfinite, zeros])


def zero_fraction(sums: torch.Tensor) -> dict[str, torch.Tensor]:
    """``zero_frac`` (over all entries) and ``nonfinite`` (a count) from reduced :func:`zero_partials`."""
    names, values = zero_fraction_stacked(sums[None])
    return dict(zip(names, values[0].unbind()))


def zero_fraction_stacked(sums: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """:func:`zero_fraction` of ``n`` taps at once: ``sums (n, 3)`` give the names and their values ``(n, 2)``."""
    count, nonfinite, zeros = sums.unbind(1)
    return ["zero_frac", "nonfinite"], torch.stack([zeros / count.clamp_min(1.0), nonfinite], 1)


def has_time_axis(x: torch.Tensor, dim: int) -> bool:
    """Whether ``x`` has axis ``dim`` (negative allowed) with at least two steps along it, beside its sample and
    feature axes: a ``(B, D)`` tap has none (``temporal_dim=1`` compared neighbouring features of it)."""
    if x.dim() < 3 or not -x.dim() <= dim < x.dim():
        return False
    return x.shape[dim] >= 2


def temporal_partials(x: torch.Tensor, dim: int = 1, eps: float = 0.0) -> torch.Tensor:
    """``[pairs, unchanged]`` (float64): consecutive pairs along ``dim`` with finite ``|a_t - a_{t-1}| <= eps``.

    ``x`` must have axis ``dim`` (see :func:`has_time_axis`); a pair is counted once per entry of
    the other axes. The difference and the comparison are float64, as real numbers (like :func:`zero_partials`): in
    float32 a step of float32 ``0.1`` counted as unchanged at ``eps=0.1``, and one of ``1 + 1e-8`` at ``eps=1``.
    """
    steps = x.shape[dim]
    delta = x.narrow(dim, 1, steps - 1).to(torch.float64) - x.narrow(dim, 0, steps - 1).to(torch.float64)
    unchanged = ((delta.abs() <= eps) & torch.isfinite(delta)).sum(dtype=torch.float64)
    return torch.stack([torch.full_like(unchanged, float(delta.numel())), unchanged])


def temporal_fraction(sums: torch.Tensor) -> torch.Tensor:
    """``temporal_frac`` from reduced :func:`temporal_partials` (NaN when no pair was seen)."""
    pairs, unchanged = sums.unbind()
    return unchanged / pairs


def cett_grid(
    weight: torch.Tensor, size: int = 64, low: float = 1e-6, high: float = 1e3
) -> torch.Tensor:
    """Log-spaced ``eps`` candidates for one layer: ``median_i ||W_out[:, i]|| * logspace(low, high)``.

    Scaling by the median column norm puts ``low``/``high`` in units of activation magnitude
    (``||n_i|| = |a_i| ||W_out[:, i]||``). The grid depends only on the weight, which is the same on
    every data-parallel rank, so all ranks add their sums on the same grid. The median is over the non-zero (finite)
    columns: a zero column's neuron contributes nothing, and once half of them are zero (structured pruning) the
    median of all was 0, every threshold 0 and the CETT NaN at every step. With no such column the scale is NaN;
    then no token has a non-zero finite output either, and :func:`cett_partials` counts none.
    """
    if size < 2 or not 0.0 < low < high:
        raise ValueError(f"CETT grid needs size >= 2 and 0 < low < high, got size={size}, low={low}, high={high}")
    column_norms = weight.detach().float().norm(dim=0)
    used = (column_norms > 0) & torch.isfinite(column_norms)
    scale = torch.where(used, column_norms, float("nan")).nanmedian().to(torch.float64)  # lower median, sync-free
    exponents = torch.linspace(math.log10(low), math.log10(high), size, dtype=torch.float64, device=weight.device)
    return scale * torch.pow(10.0, exponents)


def spread_row_index(rows: int, max_rows: int) -> torch.Tensor | None:
    """Which ``max_rows`` of ``rows`` rows to keep (sorted, on the CPU), or None to keep them all: a fixed
    pseudo-random choice (seed 0), the same for every tensor of that length, without the global RNG.

    Evenly strided rows alias with the token axis of a flattened ``(B, T, d)``: with a stride that is a multiple of
    ``T`` (B = 256 for a 197-token ViT) every kept row was token 0, the CLS token.
    """
    if rows <= max_rows:
        return None
    return torch.randperm(rows, generator=torch.Generator().manual_seed(0))[:max_rows].sort().values


def cett_partials(
    activations: torch.Tensor, weight: torch.Tensor, grid: torch.Tensor, chunk_elements: int = 1 << 22
) -> torch.Tensor:
    """Sums over tokens for the CETT curve on ``grid``: ``[tokens, sum CETT(eps_g) ..., active pairs(eps_g) ..., pairs]``.

    ``activations``: ``(..., d_ff)``, the input of the down-projection; ``weight``: its
    ``(d_model, d_ff)`` weight. Tokens whose FFN output is zero or non-finite have no CETT and are
    left out. Length ``2 * len(grid) + 2``; add these across batches and ranks, then call
    :func:`cett_threshold`. The tail sums of several grid points are computed as one batched
    matmul, in chunks of at most ``chunk_elements`` masked activations.
    """
    d_ff = weight.shape[1]
    dtype = torch.float64 if torch.float64 in (activations.dtype, weight.dtype) else torch.float32
    a = activations.reshape(-1, d_ff).to(dtype)
    w = weight.detach().to(dtype)
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    contribution = a.abs() * w.norm(dim=0)
    output_norm = (a @ w.T).norm(dim=1)
    valid = torch.isfinite(output_norm) & (output_norm > 0) & torch.isfinite(contribution).all(dim=1)
    a = torch.where(valid[:, None], a, zero)
    contribution = torch.where(valid[:, None], contribution, zero)
    safe_norm = torch.where(valid, output_norm, torch.ones((), dtype=a.dtype, device=a.device))
    eps = grid.to(a.dtype)
    per_chunk = max(1, chunk_elements // max(1, a.numel()))
    cett_sums, active_sums = [], []
    for chunk in eps.split(per_chunk):
        tail = contribution[None] < chunk[:, None, None]
        tail_norm = (torch.where(tail, a[None], zero) @ w.T).norm(dim=2)
        cett_sums.append((torch.where(valid[None], tail_norm / safe_norm[None], zero)).sum(dim=1, dtype=torch.float64))
        active_sums.append(((~tail) & valid[None, :, None]).sum(dim=(1, 2), dtype=torch.float64))
    tokens = valid.sum(dtype=torch.float64)
    return torch.cat([tokens.reshape(1), torch.cat(cett_sums), torch.cat(active_sums), (tokens * d_ff).reshape(1)])


def cett_threshold(sums: torch.Tensor, grid: torch.Tensor, target: float) -> dict[str, torch.Tensor]:
    """Threshold ``eps`` where the token-averaged CETT first reaches ``target``, and the activation ratio there.

    Returns ``cett_eps`` and ``cett_ratio`` (fraction of (token, neuron) pairs with
    ``||n_i|| >= eps``), interpolated linearly in ``log eps`` between the bracketing grid points;
    NaN when no token was seen or the target lies outside the grid's CETT range (widen the grid).
    Sync-free: the search is tensor arithmetic.
    """
    size = grid.numel()
    tokens, pairs = sums[0], sums[-1]
    cett = sums[1 : 1 + size] / tokens
    ratio = sums[1 + size : 1 + 2 * size] / pairs
    log_eps = grid.to(torch.float64).log()
    reached = cett >= target
    upper = torch.argmax(reached.to(torch.int64))
    lower = (upper - 1).clamp_min(0)
    span = cett[upper] - cett[lower]
    safe_span = torch.where(span > 0, span, torch.ones_like(span))
    weight = torch.where(span > 0, (target - cett[lower]) / safe_span, torch.ones_like(span))
    found = reached.any() & (upper > 0) & (tokens > 0)
    nan = torch.full_like(span, float("nan"))
    eps = torch.where(found, (log_eps[lower] + weight * (log_eps[upper] - log_eps[lower])).exp(), nan)
    active = torch.where(found, ratio[lower] + weight * (ratio[upper] - ratio[lower]), nan)
    return {"cett_eps": eps, "cett_ratio": active}
