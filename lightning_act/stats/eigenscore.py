"""EigenScore, its kernel-polynomial estimate, and SeND neuron sensitivity (pure tensor functions).

EigenScore (INSIDE, Chen et al. 2024): for K embeddings ``Z = [z_1 … z_K] ∈ R^{d×K}`` of K
stochastic passes over one input, ``Σ = Zᵀ J_d Z`` with ``J_d = I − (1/d) 11ᵀ`` and
``E = (1/K) log det(Σ + α I_K)``, α = 1e-3. :func:`eigenscore` computes it exactly.

Efficient EigenScore (Hallucination Detox / SeND, arXiv 2410.15460) estimates ``log det H =
tr log H`` with the kernel polynomial method (Weiße et al. 2006): the spectrum of ``H = Σ + αI``
lies in ``[α, b]`` with ``b`` a Gershgorin bound, so ``B = (2H − (b + α)I) / (b − α)`` has its
spectrum in [−1, 1]; ``tr log H ≈ Σ_m g_m c_m μ_m`` with ``c_m`` the Chebyshev coefficients of
``log`` on ``[α, b]``, ``g_m`` Jackson damping and ``μ_m = (1/N_z) Σ_j z_jᵀ T_m(B) z_j``
Hutchinson estimates of ``tr T_m(B)``. Unlike the public code, T_m is the Chebyshev polynomial
(``cos(m arccos x)``, by the three-term recurrence), m = 0 is kept, and the spectrum is mapped to
[−1, 1] first.

The KPM is only accurate where ``log`` is well approximated by M Chebyshev terms on ``[α, b]``:
the truncation error decays like ``exp(−2M/√κ)`` with ``κ = b/α``, so M = 20 moments need
``κ ≲ 1e2``. EigenScore's α = 1e-3 puts κ at 1e4–1e7 for K nearly identical passes, where M = 20
is off by tens of nats. ``Σ`` is only K×K, so :func:`efficient_eigenscore` takes the exact
log-det (one QR factorisation of the d×K passes, about the cost of forming ``Σ`` for the KPM) for
``K <= exact_up_to`` and uses the KPM only above it, where ``num_moments`` must be chosen for the condition number.

The exact log-det never forms ``Σ``: its entries are rounded by about ``eps·‖Σ‖``, which swamps α once
the passes' spread ``‖Σ‖ ≳ α/eps`` (~1e10 for α = 1e-3; a Cholesky of the formed ``Σ + αI`` of 8 identical
passes was 1% off at ``‖Σ‖`` = 4e12 and NaN at 5e15). See :func:`logdet_gram_plus_alpha`.

SeND sensitivity (same paper): with ``e_i^t`` neuron i's embedding at checkpoint t,
``V_i = Var_t(e_i) · Σ_{t=T−C+1..T} |e_i^t − e_i^{t−1}|`` over the last C checkpoints; the
variance is across checkpoints as the paper's text defines it (the public code takes it across
examples instead).
"""

from __future__ import annotations

import math

import torch

DEFAULT_ALPHA = 1e-3


def centred_passes(z: torch.Tensor) -> torch.Tensor:
    """``J_d Z`` in float64 for embeddings ``z`` of shape (…, d, K): each pass minus its mean over the d features."""
    z = z.to(torch.float64)
    return z - z.mean(dim=-2, keepdim=True)


def eigenscore_matrix(z: torch.Tensor, alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """``Σ + αI = Zᵀ J_d Z + αI`` (…, K, K) in float64 for embeddings ``z`` of shape (…, d, K).

    Formed explicitly, it loses α once ``‖Σ‖ ≳ α/eps``: exact log-dets use :func:`logdet_gram_plus_alpha`.
    """
    centred = centred_passes(z)
    sigma = centred.transpose(-1, -2) @ centred
    eye = torch.eye(z.shape[-1], dtype=torch.float64, device=z.device)
    return sigma + alpha * eye


def logdet_gram_plus_alpha(m: torch.Tensor, alpha: float) -> torch.Tensor:
    """``log det(MᵀM + αI_n)`` for ``m`` of shape (…, r, n) in float64, without forming ``MᵀM``.

    The R factor of the QR of ``[M; √α I_n]`` has ``RᵀR = MᵀM + αI_n``, so the log-det is ``2 Σ log |R_ii|``.
    Householder QR resolves α where forming ``MᵀM`` first rounds it away (once ``‖M‖² ≳ α/eps``), but only while
    its backward error ``eps·‖M‖`` stays well below ``√α``: beyond ``eps·‖M‖_F > 1e-3·√α`` (‖M‖_F ≳ 1.4e11 for
    α = 1e-3; 0.2% off at 7e13, 24% at 7e15 on 8 identical passes) the value is NaN, unknown rather than wrong.
    NaN or inf in ``m`` gives NaN, not an exception, and, unlike an SVD or eigensolver, QR has no convergence
    check that reads the host, so a monitor calling this neither stops a fit nor syncs.
    """
    m = m.to(torch.float64)
    n = m.shape[-1]
    root_alpha = math.sqrt(alpha) * torch.eye(n, dtype=torch.float64, device=m.device).expand(*m.shape[:-2], n, n)
    factor = torch.linalg.qr(torch.cat([m, root_alpha], dim=-2), mode="r").R
    logdet = 2.0 * factor.diagonal(dim1=-2, dim2=-1).abs().log().sum(-1)
    unresolved = torch.finfo(torch.float64).eps * torch.linalg.matrix_norm(m) > 1e-3 * math.sqrt(alpha)
    return torch.where(unresolved, torch.full_like(logdet, float("nan")), logdet)


def eigenscore(z: torch.Tensor, alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """Exact EigenScore ``(1/K) log det(Zᵀ J_d Z + αI)`` for ``z`` of shape (…, d, K)."""
    return logdet_gram_plus_alpha(centred_passes(z), alpha) / z.shape[-1]


def gershgorin_upper_bound(matrix: torch.Tensor) -> torch.Tensor:
    """An upper bound of the largest eigenvalue of a symmetric matrix: ``max_i Σ_j |a_ij|``."""
    return matrix.abs().sum(-1).amax(-1)


def jackson_damping(
    num_moments: int, dtype: torch.dtype = torch.float64, device: torch.device | None = None
) -> torch.Tensor:
    """Jackson kernel factors ``g_m``, m = 0 … M−1 (Weiße et al. 2006, eq. 71), removing Gibbs ringing."""
    m = torch.arange(num_moments, dtype=dtype, device=device)
    q = math.pi / (num_moments + 1)
    return ((num_moments - m + 1) * torch.cos(q * m) + torch.sin(q * m) / math.tan(q)) / (num_moments + 1)


def chebyshev_log_coefficients(
    lower: torch.Tensor, upper: torch.Tensor, num_moments: int, num_nodes: int | None = None
) -> torch.Tensor:
    """Chebyshev coefficients ``c_m`` (…, M) of ``x ↦ log(((b − a) x + b + a) / 2)`` on [−1, 1].

    Computed by Chebyshev–Gauss quadrature on ``num_nodes`` nodes (default ``max(256, 4M)``):
    ``c_m = (2 − δ_m0)/Q Σ_k f(cos θ_k) cos(m θ_k)``, θ_k = π(k + ½)/Q.
    """
    nodes = num_nodes or max(256, 4 * num_moments)
    lower = torch.as_tensor(lower, dtype=torch.float64)
    upper = torch.as_tensor(upper, dtype=torch.float64, device=lower.device)
    theta = math.pi * (torch.arange(nodes, dtype=torch.float64, device=lower.device) + 0.5) / nodes
    x = torch.cos(theta)
    half_width, centre = (upper - lower)[..., None] / 2, (upper + lower)[..., None] / 2
    values = torch.log(half_width * x + centre)
    m = torch.arange(num_moments, dtype=torch.float64, device=lower.device)
    basis = torch.cos(m[:, None] * theta[None, :])
    coefficients = (values @ basis.T) * (2.0 / nodes)
    coefficients[..., 0] /= 2.0
    return coefficients


def hutchinson_probes(
    shape: tuple[int, ...], generator: torch.Generator, kind: str = "rademacher", device: torch.device | None = None
) -> torch.Tensor:
    """Random probes with ``E[z zᵀ] = I`` (Rademacher ±1 or standard Gaussian), from ``generator`` only."""
    if kind == "rademacher":
        bits = torch.randint(0, 2, shape, generator=generator, device=device)
        return bits.to(torch.float64).mul_(2.0).sub_(1.0)
    if kind == "gaussian":
        return torch.randn(shape, generator=generator, dtype=torch.float64, device=device)
    raise ValueError(f"probe kind {kind!r} is unknown; use 'rademacher' or 'gaussian'")


def logdet_kpm(
    matrix: torch.Tensor,
    lower: float | torch.Tensor,
    num_moments: int = 20,
    num_probes: int = 20,
    generator: torch.Generator | None = None,
    probe: str = "rademacher",
) -> torch.Tensor:
    """Kernel-polynomial estimate of ``log det`` of SPD matrices (…, n, n) with eigenvalues >= ``lower``.

    The upper end of the spectrum is bounded with Gershgorin's theorem; both ends are widened by
    1e-9 relative so that round-off never puts an eigenvalue outside [−1, 1] after the map.
    """
    if num_moments < 1 or num_probes < 1:
        raise ValueError(f"num_moments and num_probes must be >= 1, got {num_moments} and {num_probes}")
    matrix = matrix.to(torch.float64)
    n = matrix.shape[-1]
    device = matrix.device
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(0)
    a = torch.as_tensor(lower, dtype=torch.float64, device=device).expand(matrix.shape[:-2]) * (1 - 1e-9)
    b = torch.maximum(gershgorin_upper_bound(matrix), a * (1 + 1e-6)) * (1 + 1e-9)
    eye = torch.eye(n, dtype=torch.float64, device=device)
    scaled = (2.0 * matrix - (b + a)[..., None, None] * eye) / (b - a)[..., None, None]

    probes = hutchinson_probes((*matrix.shape[:-2], n, num_probes), generator, probe, device)
    previous, current = probes, scaled @ probes
    moments = [(probes * previous).sum(-2).mean(-1), (probes * current).sum(-2).mean(-1)]
    for _ in range(2, num_moments):
        previous, current = current, 2.0 * (scaled @ current) - previous
        moments.append((probes * current).sum(-2).mean(-1))
    mu = torch.stack(moments[:num_moments], dim=-1)
    weights = chebyshev_log_coefficients(a, b, num_moments) * jackson_damping(num_moments, device=device)
    return (weights * mu).sum(-1)


EXACT_LOGDET_UP_TO = 256


def logdet_spd(matrix: torch.Tensor) -> torch.Tensor:
    """Exact ``log det`` of SPD matrices (…, n, n) in float64 via Cholesky: ``2 Σ log diag(L)``.

    A matrix that is not positive definite (non-finite embeddings) gives NaN, not an exception,
    so a monitor calling this never stops a fit. A formed ``Σ + αI`` has lost α once ``‖Σ‖ ≳ α/eps``: take
    EigenScore's log-det with :func:`logdet_gram_plus_alpha` instead.
    """
    factor, info = torch.linalg.cholesky_ex(matrix.to(torch.float64))
    logdet = 2.0 * factor.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return torch.where(info == 0, logdet, torch.full_like(logdet, float("nan")))


def efficient_eigenscore(
    z: torch.Tensor,
    alpha: float = DEFAULT_ALPHA,
    num_moments: int = 20,
    num_probes: int = 20,
    generator: torch.Generator | None = None,
    probe: str = "rademacher",
    exact_up_to: int = EXACT_LOGDET_UP_TO,
) -> torch.Tensor:
    """Efficient EigenScore ``(1/K) log det(Zᵀ J_d Z + αI)`` for ``z`` of shape (…, d, K).

    For ``K <= exact_up_to`` passes the K×K log-det is exact (:func:`logdet_gram_plus_alpha`): at EigenScore's
    condition numbers (1e4–1e7 with α = 1e-3) the KPM needs hundreds of moments, each costing a
    K×K matrix product, so the exact factorisation is both cheaper and right. With more passes than
    features (``d <= exact_up_to < K``) the d×d dual is exact too: ``J_d Z Zᵀ J_d`` has the nonzero eigenvalues
    of ``Zᵀ J_d Z``, so ``log det(Σ + αI_K) = log det(J_d Z Zᵀ J_d + αI_d) + (K − d) log α`` (the KPM smeared
    that point mass of K − d eigenvalues at α: 17% off at κ = 13). Above both,
    :func:`logdet_kpm` with ``num_moments`` Chebyshev moments and ``num_probes`` probes, accurate
    when ``num_moments ≳ √κ`` (κ the condition number of ``Σ + αI``). The KPM needs ``Σ + αI`` formed, whose
    eigenvalues near α are only known to about ``K·eps·b`` (``b`` its Gershgorin bound): where that exceeds 1% of
    α the estimate is NaN (unknown), not a number that α no longer shapes.
    """
    d, k = z.shape[-2], z.shape[-1]
    if k <= exact_up_to:
        return eigenscore(z, alpha)
    if d <= exact_up_to:
        dual = logdet_gram_plus_alpha(centred_passes(z).transpose(-1, -2), alpha)
        return (dual + (k - d) * math.log(alpha)) / k
    matrix = eigenscore_matrix(z, alpha)
    unresolved = k * torch.finfo(torch.float64).eps * gershgorin_upper_bound(matrix) > 1e-2 * alpha
    estimate = logdet_kpm(matrix, alpha, num_moments, num_probes, generator, probe) / k
    return torch.where(unresolved, torch.full_like(estimate, float("nan")), estimate)


def send_sensitivity(embeddings: torch.Tensor) -> torch.Tensor:
    """SeND sensitivity per neuron from C + 1 consecutive checkpoints of embeddings (C+1, …, D).

    ``V_i = Var_t(e_i) · Σ_t |Δe_i^t|``: the (population) variance over the last C checkpoints
    times the summed absolute change over the C transitions ending at the last one (the first
    needs the checkpoint before the window). Middle dims (tracking examples) are averaged after
    computing V per example, giving a (D,) vector.
    """
    if embeddings.shape[0] < 3:
        raise ValueError(f"SeND sensitivity needs C + 1 >= 3 checkpoints, got {embeddings.shape[0]}")
    e = embeddings.to(torch.float64)
    window = e[1:]
    variance = window.var(dim=0, unbiased=False)
    change = (e[1:] - e[:-1]).abs().sum(0)
    v = variance * change
    return v.reshape(-1, v.shape[-1]).mean(0)


def top_fraction_indices(values: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices (ascending, int64) of the ``max(1, round(fraction · D))`` largest values; ties go to
    the lower index (stable sort), so every rank and every rerun picks the same set."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"top fraction must be in (0, 1], got {fraction}")
    k = max(1, round(fraction * values.numel()))
    order = torch.sort(values.reshape(-1), descending=True, stable=True).indices
    return order[:k].sort().values.to(torch.int64)


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """Jaccard overlap |a ∩ b| / |a ∪ b| of two index sets (1.0 when both are empty)."""
    left, right = set(a.reshape(-1).tolist()), set(b.reshape(-1).tolist())
    union = left | right
    return len(left & right) / len(union) if union else 1.0
