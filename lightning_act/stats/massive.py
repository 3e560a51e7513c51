"""Massive activations in the residual stream, and the emergence model of their growth.

Statistics (Sun et al. 2024, "Massive Activations in Large Language Models", arXiv 2402.17762;
Gallego-Feliciano et al., "Hidden Dynamics of Massive Activations", arXiv 2508.03616), per block
output ``h`` of shape ``(B, T, D)`` (tokens × features), ``(B, D)``, or ``(B, C, H, W)`` (features =
channels, token = flattened spatial position):

- per sample (sequence) ``b``: ``top1_b = max |h_b|``, ``median_b = median |h_b|`` over all of that
  sample's entries (numpy's median: the mean of the two middle values for an even count) and
  ``ratio_b = top1_b / median_b``;
- massive entries: ``|a| > abs_threshold`` (100) and ``|a| / median_b >= ratio_threshold`` (1000);
- the ``k`` largest ``|a|`` at distinct (token, feature) positions, each position valued by its
  maximum over the observed samples.

The papers average per-sequence statistics over sequences, so the partials are sums over samples
(``median`` and ``ratio`` are means of the per-sample values), the overall maximum and the count
of massive entries; all of them add (or max-reduce) exactly across micro-batches and ranks. The
top-k candidates are kept per rank, merged by :func:`merge_topk` and merged again after gathering.

The emergence model is the Hidden Dynamics paper's Eq. 9, fitted as the paper describes (see
:func:`fit_emergence`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

MASSIVE_SUMS = ("samples", "median_sum", "ratio_sum", "count")
MASSIVE_MAXIMA = ("top1",)


def _as_samples_tokens_features(h: torch.Tensor) -> torch.Tensor:
    """``h`` as ``(B, tokens, features)``: ``(B, D)`` has one token; ``(B, C, *spatial)`` has features ``C``."""
    if h.dim() == 2:
        return h[:, None, :]
    if h.dim() == 3:
        return h
    if h.dim() > 3:
        return h.flatten(2).transpose(1, 2)
    raise ValueError(f"massive activations need a (batch, ..., features) tensor, got shape {tuple(h.shape)}")


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Upcast low-precision (and integer) tensors to float32 once; float32/float64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def has_token_axis(h: torch.Tensor) -> bool:
    """Whether ``h`` has a token/position axis (anything but ``(B, D)``)."""
    return h.dim() >= 3


def sample_medians(magnitude: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-row median of ``(B, n)`` magnitudes, numpy's definition (mean of the two middle values), averaged in
    float64 (in float32 two middle values above ~1.7e38, finite in bf16, summed to inf) and returned in ``dtype``
    (the magnitudes' by default; float64 keeps the mean exact, which a massive count at that median needs)."""
    n = magnitude.shape[1]
    lower = torch.kthvalue(magnitude, (n + 1) // 2, dim=1).values
    upper = torch.kthvalue(magnitude, n // 2 + 1, dim=1).values
    return ((lower.double() + upper.double()) / 2).to(dtype or magnitude.dtype)


def massive_partials(
    h: torch.Tensor, abs_threshold: float = 100.0, ratio_threshold: float = 1000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sums, maxima)`` of one block output, laid out as ``MASSIVE_SUMS`` / ``MASSIVE_MAXIMA`` (float64).

    Non-finite entries count as infinitely large, so a blown-up residual stream shows as an
    infinite ``top1`` (and ``ratio`` while its sample's median stays finite and above 0) instead of disappearing. A
    sample whose median is infinite (half its entries or more NaN or inf) has an unknown median, and with it an
    unknown ``ratio`` and ``count`` (|a| / median >= ratio_threshold is inf / inf there): NaN, see
    :func:`known_medians`. A sample whose median is 0 has an unknown ``ratio`` (:func:`sample_ratios`).
    """
    return massive_partials_from_magnitude(block_magnitude(h), abs_threshold, ratio_threshold)


def block_magnitude(h: torch.Tensor) -> torch.Tensor:
    """``|h|`` as float32+ ``(B, tokens, features)``, NaN as +inf: the one pass both statistics read."""
    return torch.nan_to_num(_at_least_float32(_as_samples_tokens_features(h)).abs(), nan=float("inf"), posinf=float("inf"))


def known_medians(median: torch.Tensor) -> torch.Tensor:
    """``median`` with NaN where it is not finite: an infinite median (NaN and inf entries rank as +inf) is not a
    measurement, and ``|a| / median`` (``ratio``, the massive criterion) is undefined at it."""
    return torch.where(torch.isfinite(median), median, torch.full_like(median, float("nan")))


def sample_ratios(top1: torch.Tensor, median: torch.Tensor) -> torch.Tensor:
    """Per-sample ``ratio_b = top1_b / median_b``, NaN where ``median_b`` is 0 or unknown (NaN).

    A median of exactly 0 (more than half a sample's entries exactly zero: a ReLU's or a closed gate's output) is a
    measurement, but ``max / 0`` is not one: it was logged as ``inf`` on every post-ReLU tap (before round 30), where
    0/0 (an all-zero sample) and a median below the histogram's window were already unknown. The layer's mean ratio
    is then unknown at that step (not logged, said once), as for those; ``median``, ``top1`` and ``count`` stay.
    Two operations after the division, ~4 µs of host time (a ``where`` with a tensor of NaN took 17 µs)."""
    return (top1 / median).masked_fill_(median == 0, float("nan"))


def massive_partials_from_magnitude(
    magnitude: torch.Tensor, abs_threshold: float = 100.0, ratio_threshold: float = 1000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`massive_partials` of a :func:`block_magnitude` tensor."""
    samples = magnitude.shape[0]
    magnitude = magnitude.flatten(1)
    top1 = magnitude.amax(dim=1)
    median = known_medians(sample_medians(magnitude))
    massive = (magnitude > abs_threshold) & (magnitude >= ratio_threshold * median[:, None])
    count = torch.where(torch.isnan(median), median.to(torch.float64), massive.sum(dim=1, dtype=torch.float64))
    sums = torch.stack(
        [
            torch.full((), float(samples), dtype=torch.float64, device=magnitude.device),
            median.sum(dtype=torch.float64),
            sample_ratios(top1.to(torch.float64), median.to(torch.float64)).sum(),
            count.sum(),
        ]
    )
    if samples == 0:  # a batch of no samples adds nothing; 0 is the maximum's neutral value for magnitudes
        return sums, torch.zeros(1, dtype=torch.float64, device=magnitude.device)
    return sums, top1.amax().to(torch.float64).reshape(1)


def summarize_massive(sums: torch.Tensor, maxima: torch.Tensor) -> dict[str, torch.Tensor]:
    """``top1`` (max over all entries), ``median`` and ``ratio`` (means over samples), ``count`` (total)."""
    names, values = summarize_massive_stacked(sums[None], maxima[:1])
    return dict(zip(names, values[0].unbind()))


def summarize_massive_stacked(sums: torch.Tensor, top1: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """:func:`summarize_massive` of ``n`` taps at once: ``sums (n, 4)`` and ``top1 (n,)`` give the statistic names and
    their values ``(n, 5)``."""
    samples, median_sum, ratio_sum, count = sums.unbind(1)
    n = samples.clamp_min(1.0)
    names = ["top1", "median", "ratio", "count", "count_per_sample"]
    return names, torch.stack([top1.to(sums.dtype), median_sum / n, ratio_sum / n, count, count / n], 1)


def topk_positions(h: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` distinct (token, feature) positions of ``h`` by max ``|a|`` over samples.

    Returns ``[values (k), tokens (k), features (k)]`` as float64; unused slots are NaN. A slot of value 0 keeps the
    position ``topk`` gave, so that buffers merge as one process's would (:func:`merge_topk`); :func:`topk_stats`
    clears it.
    """
    return topk_positions_from_magnitude(block_magnitude(h), k)


def topk_positions_from_magnitude(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`topk_positions` of a :func:`block_magnitude` tensor."""
    features = magnitude.shape[2]
    magnitude = magnitude.amax(dim=0).flatten()
    take = min(k, magnitude.numel())
    values, index = magnitude.topk(take)
    out = torch.full((3, k), float("nan"), dtype=torch.float64, device=magnitude.device)
    out[0, :take] = values.to(torch.float64)
    out[1, :take] = torch.div(index, features, rounding_mode="floor").to(torch.float64)
    out[2, :take] = (index % features).to(torch.float64)
    return out.reshape(-1)


def clear_zero_positions(buffer: torch.Tensor) -> torch.Tensor:
    """Set NaN token and feature where the value is 0 in a top-k buffer ``(..., 3, k)``, in place (~7 µs of host
    time; a copy took 30 µs); returns it.

    Every position of value 0 ties with every other, so the one ``topk`` names is arbitrary (a closed gate's all-zero
    output read as a massive activation at "token 3, feature 15" before round 30): no position is a measurement
    there. The value 0 is one (the ``j``-th largest ``|a|`` is 0, as ``top1`` is) and stays. Applied to merged buffers
    only (:func:`topk_stats_stacked`): cleared before the merge, the zero slots of two ranks or micro-batches were
    positions of their own and did not merge, and a tap with fewer positions than ``k`` logged zero slots one process
    leaves empty."""
    buffer[..., 1:, :].masked_fill_(buffer[..., :1, :] == 0, float("nan"))
    return buffer


def merge_topk(candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Merge stacked top-k buffers ``(m, 3k)`` into one ``(3k,)``: the ``k`` largest distinct positions.

    A position present in several buffers keeps its largest value (the first buffer's among equal ones); NaN slots
    are absent. One
    buffer (one rank) is already merged and is returned as it is. A sort and a per-position minimum:
    the pairwise comparison of every candidate with every other it replaced (before round 26) took
    ``(m k)^2`` memory, 1.3 GB for 4 ranks at ``top_k=4096``.
    """
    if candidates.numel() == 3 * k:
        return candidates.reshape(-1)
    parts = candidates.reshape(-1, 3, k).transpose(0, 1).reshape(3, -1)
    values, tokens, features = parts[0], parts[1], parts[2]
    present = ~torch.isnan(values)
    score = torch.where(present, values, torch.full_like(values, float("-inf")))
    order = torch.sort(score, descending=True, stable=True).indices  # by value, then by buffer and slot
    index = torch.arange(values.numel(), device=values.device)
    absent_key = -1.0 - index.to(tokens.dtype)  # an absent slot is a position of its own
    positions = torch.stack([torch.where(present, tokens, absent_key), torch.where(present, features, absent_key)], 1)
    _, group = torch.unique(positions[order], dim=0, return_inverse=True)
    first = torch.full((int(group.max()) + 1,), values.numel(), dtype=torch.long, device=values.device)
    first.scatter_reduce_(0, group, index, reduce="amin")  # each position's first place in the order: its largest
    kept = order[(first[group] == index) & present[order]][:k]
    out = torch.full((3, k), float("nan"), dtype=torch.float64, device=values.device)
    for row, source in enumerate((values, tokens, features)):
        out[row, : kept.numel()] = source[kept]
    return out.reshape(-1)


def topk_stats(merged: torch.Tensor, k: int, with_token: bool = True) -> dict[str, torch.Tensor]:
    """``top{j}_value``, ``top{j}_token`` (when the input had tokens) and ``top{j}_feature`` for ``j < k``."""
    names, values = topk_stats_stacked(merged.reshape(1, -1), k, with_token)
    return dict(zip(names, values[0].unbind()))


def topk_stats_stacked(merged: torch.Tensor, k: int, with_token: bool = True) -> tuple[list[str], torch.Tensor]:
    """:func:`topk_stats` of ``n`` merged buffers ``(n, 3k)`` at once: the names and their values ``(n, 2k or 3k)``;
    a slot of value 0 has no token or feature (:func:`clear_zero_positions`)."""
    fields = ("value", "token", "feature") if with_token else ("value", "feature")
    by_position = clear_zero_positions(merged.reshape(-1, 3, k).clone())
    if not with_token:
        by_position = by_position[:, 0::2]  # values and features
    names = [f"top{j}_{field}" for j in range(k) for field in fields]
    return names, by_position.transpose(1, 2).reshape(merged.shape[0], len(fields) * k)


# ---------------------------------------------------------------------------------- emergence model
def emergence_curve(t: np.ndarray, a: float, lam: float, gamma: float, t0: float, k: float) -> np.ndarray:
    """Hidden Dynamics Eq. 9: ``f(t) = A exp(-lambda x) log(x) + K`` with ``x = gamma t + t0``."""
    x = gamma * np.asarray(t, dtype=np.float64) + t0
    return a * np.exp(-lam * x) * np.log(x) + k


def emergence_peak(a: float, lam: float, gamma: float, t0: float) -> float:
    """Peak step ``(exp(W(1/lambda)) - t0) / gamma`` (Lambert W), Hidden Dynamics paper; NaN if none.

    ``d/dx [exp(-lambda x) log x] = 0`` gives ``lambda x log x = 1``, i.e. ``log x = W(1/lambda)``.
    That extremum is a peak for ``A > 0`` (a trough for ``A < 0``, reported as NaN), exists for
    ``lambda > 0`` and is observable when the step is positive.
    """
    from scipy.special import lambertw

    if not (a > 0 and lam > 0) or gamma == 0:
        return math.nan
    x_peak = math.exp(float(lambertw(1.0 / lam).real))
    step = (x_peak - t0) / gamma
    return step if step > 0 else math.nan


@dataclass
class EmergenceFit:
    """Fitted parameters of :func:`emergence_curve` on the original step and value scales."""

    a: float
    lam: float
    gamma: float
    t0: float
    k: float
    r2: float
    peak_step: float
    points: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def __call__(self, t: np.ndarray) -> np.ndarray:
        return emergence_curve(t, self.a, self.lam, self.gamma, self.t0, self.k)


_LOG_GAMMA_BOUND = 30.0


def _reparametrised_model(t: np.ndarray, a1: float, log_gamma: float, beta: float, tau0: float, k: float) -> np.ndarray:
    """The form the Hidden Dynamics fit solves: ``exp(-beta t) [A1 log(t + tau0) + A2] + K``, ``A2 = A1 log gamma``.

    It equals Eq. 9 with ``beta = lambda gamma``, ``tau0 = t0 / gamma``, ``A1 = A exp(-lambda t0)``;
    unlike Eq. 9 its parameters are not all scale-coupled, which makes it far better conditioned.
    ``log gamma`` is bounded to ±30 so that a near-pure log climb (where only ``A2 + K`` is
    determined) cannot drift to overflowing ``gamma`` and ``K``.
    """
    return np.exp(-beta * t) * a1 * (np.log(t + tau0) + log_gamma) + k


def _reparametrised_jacobian(
    t: np.ndarray, a1: float, log_gamma: float, beta: float, tau0: float, k: float
) -> np.ndarray:
    """Analytic Jacobian of :func:`_reparametrised_model` in ``(A1, log gamma, beta, tau0, K)``."""
    decay = np.exp(-beta * t)
    shifted_log = np.log(t + tau0) + log_gamma
    return np.stack(
        [decay * shifted_log, decay * a1, -t * decay * a1 * shifted_log, decay * a1 / (t + tau0), np.ones_like(t)],
        axis=1,
    )


def _linear_part(t: np.ndarray, y: np.ndarray, beta: float, tau0: float) -> tuple[np.ndarray, float]:
    """Least-squares ``(A1, A2 = A1 log gamma, K)`` for fixed ``(beta, tau0)`` (the model is linear in
    them there), and the squared error left."""
    decay = np.exp(-beta * t)
    basis = np.stack([decay * np.log(t + tau0), decay, np.ones_like(t)], axis=1)
    coefficients, *_ = np.linalg.lstsq(basis, y, rcond=None)
    return coefficients, float(np.sum((basis @ coefficients - y) ** 2))


# A history whose best grid start has an adjusted R² (for the model's 4 parameters besides K) below this is flat or
# noise: it explains no more of the variance than 4 free parameters fitted to noise would, so there is no climb to fit.
_FLAT_ADJUSTED_R2 = 0.05
_FREE_PARAMETERS = 4  # A, lambda, gamma, t0 (K is the mean)
_STARTS = 4  # the best grid points tried as starts


def fit_emergence(
    steps: np.ndarray, values: np.ndarray, min_points: int = 6, max_evaluations: int = 5000, good_enough: float = 1e-3
) -> EmergenceFit:
    """Fit the emergence model to one layer's ratio history, as the Hidden Dynamics paper does.

    ``scipy.optimize.least_squares`` with the trust-region-reflective method and the analytic
    Jacobian on the paper's reparametrised form (:func:`_reparametrised_model`; ``beta >= 0``, i.e.
    ``lambda >= 0``, and ``t + tau0 > 0``), on normalised data (steps divided by the last step,
    values mapped to [0, 1]) then mapped back to Eq. 9's ``A, lambda, gamma, t0, K`` on the
    original scales. For fixed ``(beta, tau0)`` the form is linear in ``A1, A2, K``, so the starts are the best points of a
    fixed grid over ``(beta, tau0)`` with those three solved by linear least squares (no
    randomness); the fit with the lowest squared error is kept, stopping early once it leaves at
    most ``good_enough`` of the variance unexplained. The starts share one budget of ``max_evaluations``
    model evaluations per layer, so that a flat or noisy history, which never reaches ``good_enough``, costs at most
    that; each start gets an equal share of what the earlier ones left (200 per start stopped scipy early on noisy
    histories), and a start that uses up its share hands on to the next: on curves peaking near 10 % of the run the
    best-ranked start can spend any budget without converging while the next ones converge in a few hundred
    (docs/monitors_sparsity_massive.md has the measured rates and costs). A start that runs out of its share after at
    least one step still offers the point it reached (the lowest squared error on its path) and competes on that
    error, so a history is not skipped because each start needed a little more than its share. A
    history whose best grid start's adjusted R² is below ``_FLAT_ADJUSTED_R2`` is flat: skipped before any iterative
    fit.

    Raises ``ValueError`` with the reason when the history cannot be fitted, including, when no start took a step (or
    each failed), how many starts ran, the evaluations they spent and scipy's message or the error for each.
    """
    from scipy.optimize import least_squares

    t = np.asarray(steps, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(t) & np.isfinite(y)
    t, y = t[finite], y[finite]
    needed = max(min_points, _FREE_PARAMETERS + 2)  # one residual degree of freedom at least
    if t.size < needed:
        raise ValueError(f"{t.size} finite points, the fit needs at least {needed}")
    step_scale = float(np.max(np.abs(t)))
    y_min, y_range = float(np.min(y)), float(np.ptp(y))
    if step_scale == 0 or np.ptp(t) == 0:
        raise ValueError("all points are at the same step")
    if y_range == 0:
        raise ValueError("the history is constant")
    tn = t / step_scale
    yn = (y - y_min) / y_range

    tau_floor = -float(np.min(tn)) + 1e-9
    grid = [
        (beta, tau_floor + offset)
        for beta in (0.0, 0.3, 1.0, 3.0, 10.0)
        for offset in (1e-3, 1e-2, 0.1, 1.0, 10.0)
    ]
    grid_errors = {point: _linear_part(tn, yn, *point)[1] for point in grid}
    ranked = sorted(grid, key=grid_errors.__getitem__)
    total = float(np.sum((yn - yn.mean()) ** 2))
    adjusted_r2 = 1.0 - (grid_errors[ranked[0]] / total) * (t.size - 1) / (t.size - _FREE_PARAMETERS - 1)
    if adjusted_r2 < _FLAT_ADJUSTED_R2:
        raise ValueError(
            f"the history is flat or noise (the best start's adjusted R² {adjusted_r2:.2f} < {_FLAT_ADJUSTED_R2}), "
            "no emergence to fit"
        )
    lower = [-np.inf, -_LOG_GAMMA_BOUND, 0.0, tau_floor, -np.inf]
    upper = [np.inf, _LOG_GAMMA_BOUND, np.inf, np.inf, np.inf]

    def residuals(params: np.ndarray) -> np.ndarray:
        return _reparametrised_model(tn, *params) - yn

    def jacobian(params: np.ndarray) -> np.ndarray:
        return _reparametrised_jacobian(tn, *params)

    best: tuple[float, np.ndarray] | None = None
    failures: list[str] = []
    budget_left = max_evaluations
    starts = ranked[:_STARTS]
    for tried, (beta, tau0) in enumerate(starts):
        if budget_left <= 0:
            break
        # An equal share of what is left (rounded up), so that a start which cannot converge leaves the others theirs.
        share = -(-budget_left // (len(starts) - tried))
        (a1, a2, k), _ = _linear_part(tn, yn, beta, tau0)
        log_gamma = float(np.clip(a2 / a1, -0.99 * _LOG_GAMMA_BOUND, 0.99 * _LOG_GAMMA_BOUND)) if a1 != 0 else 0.0
        try:
            # least_squares, not curve_fit (which wraps it): a start that runs out of its share (status 0) still gives
            # the point it reached, where curve_fit raises and loses it
            result = least_squares(
                residuals, [a1, log_gamma, beta, tau0, k], jac=jacobian, method="trf", bounds=(lower, upper),
                max_nfev=share,
            )
        except (ValueError, np.linalg.LinAlgError) as error:
            failures.append(f"start beta={beta:g}, tau0={tau0:g}: {error}")
            continue
        budget_left -= int(result.nfev)
        if result.status == 0 and result.njev == 1:  # out of its share before any step lowered the error
            failures.append(f"start beta={beta:g}, tau0={tau0:g}: {result.message} ({result.nfev} evaluations)")
            continue
        # trf takes only steps that lower the squared error, so a start cut short by its share (status 0) offers the
        # best point it reached; it competes on that error like a converged one (before, it was dropped, and a history
        # whose every start needed a little more than its share was skipped although each had all but converged). One
        # that took no step is still at its grid point, a linear solve for fixed (beta, tau0), not a fit.
        residual = float(np.sum(result.fun**2))
        if not np.isfinite(residual):
            failures.append(f"start beta={beta:g}, tau0={tau0:g}: non-finite residual")
            continue
        if best is None or residual < best[0]:
            best = (residual, result.x)
        # Only a converged start ends the search early: one cut short can sit far along a valley of near-equal error
        # (A ~1e23, lambda ~49 on a noise-free early peak the next start fits exactly)
        if result.status > 0 and residual <= good_enough * total:
            break
    if best is None:
        raise ValueError(
            f"the emergence fit made no usable step from any of the {len(failures)} starts it tried "
            f"({max_evaluations - budget_left} evaluations in all): " + "; ".join(failures)
        )
    a1_n, log_gamma_n, beta_n, tau0_n, k_n = (float(p) for p in best[1])
    gamma_n = math.exp(log_gamma_n)
    lam, t0 = beta_n / gamma_n, tau0_n * gamma_n
    a_n = a1_n * math.exp(min(beta_n * tau0_n, 700.0))
    fit = EmergenceFit(
        a=a_n * y_range, lam=lam, gamma=gamma_n / step_scale, t0=t0, k=y_min + k_n * y_range,
        # R² is scale-free, so it is taken on the normalised values the fit minimised: on the original scale the
        # squared residuals of a history reaching ~1e154 overflow to inf.
        r2=1.0 - best[0] / total, peak_step=math.nan, points=int(t.size),
    )
    fit.peak_step = emergence_peak(fit.a, fit.lam, fit.gamma, fit.t0)
    return fit
