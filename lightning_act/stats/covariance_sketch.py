"""Spectra of wide activations from a sum-reducible row-space Nyström sketch (pure tensor functions).

Why. :mod:`lightning_act.stats.spectrum` sums the full ``d x d`` scatter matrix and takes its eigenvalues:
for an 8192-wide tap that is a 512 MiB float64 partial (plus its reduction buffer and the eigensolver's
copies, ~3 GiB) and an ``O(d^3)`` eigendecomposition (minutes on a 2-core CPU), for a matrix whose rank is at
most ``N - 1``, the number of sampled rows (1024 by default).

What. Rows ``X`` (``N x d``), shifted by a reference row (their mean: the sums' round-off, and the float32
rounding of ``Z``, are then of the spread's size, not of the mean's), are projected by a fixed seeded
Gaussian ``Ω`` (``d x k``): ``Z = X Ω``. Each
rank sums ``N``, ``Σ ||x||^2``, ``Σ x``, ``Σ z``, ``Xᵀ Z`` (``d x k``) and ``Zᵀ Z`` (``k x k``); all of them are
sums over rows, so they add up across micro-batches and ranks exactly as the full covariance does (stacking
the rows of every batch stacks their ``Z``), in ``d (k + 1) + k (k + 1) + 2`` numbers instead of
``d^2 + d + 1``. With ``J`` the centring projection over all ``N`` rows, the flush forms ``Y = Xᵀ J Z`` and
``W = Zᵀ J Z`` from the sums and takes the eigenvalues of the Nyström matrix ``Y W^+ Yᵀ`` as the squared
singular values of ``Y W^{-1/2}`` (those of ``R W^{-1/2}`` with ``Y = QR``; forming ``Yᵀ Y`` would square the
condition number and lose a collapsed layer's small eigenvalues), with ``W``'s pseudo-inverse square root
from its eigenvalues above ``k eps max diag(Zᵀ Z)`` and above ``1e-12`` of the largest: ``W`` is singular
(rank ``<= N - 1 < k``), and its null directions, computed only to round-off (the float32 rounding of ``Z``
puts them near ``1e-14`` of the largest), must be dropped, not damped (a ridge large enough to silence them
biases the small eigenvalues by percents; whitening by them made up eigenvalues: erank 1.24 for a rank-1
layer before round 15).

Error. ``Y W^+ Yᵀ = Xᵀ J P J X`` with ``P`` the projection onto ``range(J Z)``. When ``rank(J X) <= k``,
``range(J Z) = range(J X)`` for almost every ``Ω``, so ``P J X = J X`` and the Nyström matrix *is* the centred
scatter ``S = Xᵀ J X``: the nonzero eigenvalues, the effective rank and the participation ratio are exact
up to float64 round-off, except that on steep spectra the directions of ``W`` under the whitening floor (``1e-12``
of its largest eigenvalue) are lost. Their energy is not: the trace of ``S`` is known from ``Σ||y||²`` and ``Σy``,
and what the kept eigenvalues leave of it is spread evenly over the directions the floor dropped, as many as the
rows' rank still allows (spread over all of those, a floor partly under the whitening floor read +1.04%; dropped,
it cost erank 2.3% on a nearly collapsed layer at 3584 rows, -0.35% at ``σ_i ∝ i^-2``, ``N = k = 1024``, an
error growing with the rows). A flat tail is exact for an isotropic floor and overstates a spread one's ``Σ σ``:
erank within +0.6% measured (+0.15% on power laws, +0.37% and +0.55% on that collapsed layer;
``docs/monitors_collapse_sensitive.md``), the participation ratio exact. This holds for any full-rank ``Z``,
which is why ``Z`` may be computed in float32
(its rounding is just another ``Ω``); ``Xᵀ Z`` and everything after are float64 (a float32 ``Xᵀ Z`` breaks
the identity and costs tens of percent on steep spectra). ``rank(J X) <= N - 1``, so with ``k >= N - 1``
(the rows sampled in one due step, over micro-batches and ranks) the wide path is exact; the tests check
erank and PR against float64 numpy. With more rows than ``k + 1``, ``P`` is a randomized range finder's
projection: the leading spectrum is kept and tail energy lost, far beyond 2% (tests: PR -19%, erank -62%
at three times k rows), so ``k`` must be sized to the rows of one due step.

Cost at ``d = 8192, k = 1040, N = 1024`` (``scripts/bench_stat_kernels.py --collapse``): per forward one
float32 and one float64 ``N x d x k`` matmul, at flush one float64 ``d x k`` QR factorization, one ``k x k``
eigendecomposition and one ``k x k`` SVD; 194 MiB of extra peak memory measured (one round), independent of ``d^2``:
the flush holds one ``d x k`` float64 matrix (built in place and factored where it lies), one forward its rows and
one result.
"""

from __future__ import annotations

import torch

from lightning_act.stats.spectrum import effective_rank, participation_ratio


#: ``W``'s eigenvalues below this fraction of its largest are not whitened (see the module doc).
WHITENING_FLOOR = 1e-12
#: The largest ``|mean| / spread`` of a projected column ``z`` for which the sketch is exact: ``Z`` is float32, so its
#: rounding is ``2^-24 |z|``, and the centred ``z`` keeps it only while the mean does not dwarf the spread (a common
#: offset of 2e5 on a unit spread cost erank 1.6%, 3e5 cost 20%; round 17). Beyond, the spectrum is unknown. Rows
#: shifted by their mean have a mean of 0; under DDP, by the last step's mean, which the step's may leave behind.
MAX_PROJECTED_OFFSET = 1e-3 * 2.0**24


def gaussian_test_matrix(d: int, k: int, seed: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
    """The seeded ``d x k`` float32 Gaussian ``Ω`` (the same on every rank and every call for one seed)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(d, k, generator=generator, dtype=torch.float32).to(device)


def sketch_size(d: int, k: int) -> int:
    """Length of a :func:`sketch_partials` vector."""
    return 2 + d + k + d * k + k * k


def sketch_partials(
    rows: torch.Tensor, test_matrix: torch.Tensor, reference: torch.Tensor | None = None
) -> torch.Tensor:
    """``[N, Σ||y||², Σy (d), Σz (k), YᵀZ (d·k), ZᵀZ (k·k)]`` of the ``(N, d)`` rows ``y = x − reference`` with
    ``Z = Y Ω``, float64, one flat SUM-reducible vector. The reference (a float64 row near the rows, e.g. their mean) is
    subtracted before the float32 projection, so that ``Z``'s rounding is relative to the spread, not to the mean,
    and the sums' round-off (which sets the whitening floor and the cut-off) is too; parts add up only when they
    share it (:func:`shift_sketch_partials`)."""
    # float64 rows, shifted in the same pass (the subtraction promotes float32 rows)
    x = rows.to(torch.float64) if reference is None else rows - reference.to(torch.float64)
    projected = (x.to(torch.float32) @ test_matrix.to(device=rows.device, dtype=torch.float32)).to(torch.float64)
    d, k = x.shape[1], projected.shape[1]
    # each sum is written into its slice of the result: the d x k product, then concatenated, was a second
    # 8 d k bytes at peak
    partials = torch.empty(sketch_size(d, k), dtype=torch.float64, device=x.device)
    partials[0] = float(x.shape[0])
    partials[1] = x.square().sum()
    torch.sum(x, 0, out=partials[2 : 2 + d])
    torch.sum(projected, 0, out=partials[2 + d : 2 + d + k])
    torch.mm(x.T, projected, out=partials[2 + d + k : 2 + d + k + d * k].view(d, k))
    torch.mm(projected.T, projected, out=partials[2 + d + k + d * k :].view(k, k))
    return partials


def shift_sketch_partials(partials: torch.Tensor, shift: torch.Tensor, test_matrix: torch.Tensor) -> torch.Tensor:
    """:func:`sketch_partials` of rows ``y`` made those of ``y + δ`` (``δ = shift = old reference − new reference``,
    ``w = δΩ``), exactly: ``Σ||y+δ||² = Σ||y||² + 2δ·Σy + N||δ||²``, ``Σ(y+δ) = Σy + Nδ``, ``Σ(z+w) = Σz + Nw``,
    ``Σ(y+δ)(z+w)ᵀ = YᵀZ + (Σy)wᵀ + δ(Σz)ᵀ + Nδwᵀ`` and ``Σ(z+w)(z+w)ᵀ = ZᵀZ + (Σz)wᵀ + w(Σz)ᵀ + Nwwᵀ``."""
    d, k = test_matrix.shape
    shift = shift.to(torch.float64)
    moved = shift @ test_matrix.to(device=shift.device, dtype=torch.float64)
    count, square_total = partials[:1], partials[1:2]
    total, projected_total = partials[2 : 2 + d], partials[2 + d : 2 + d + k]
    cross = partials[2 + d + k : 2 + d + k + d * k].reshape(d, k)
    core = partials[2 + d + k + d * k :].reshape(k, k)
    return torch.cat([
        count,
        square_total + 2 * shift @ total + count * shift.square().sum(),
        total + count * shift,
        projected_total + count * moved,
        (cross + torch.outer(total, moved) + torch.outer(shift, projected_total + count * moved)).reshape(-1),
        (core + torch.outer(projected_total, moved) + torch.outer(moved, projected_total)
         + count * torch.outer(moved, moved)).reshape(-1),
    ])


def sketch_spectrum(partials: torch.Tensor, d: int, k: int) -> torch.Tensor:
    """Eigenvalues (ascending, float64, >= 0, length ``min(d, k)``) of the Nyström approximation of the centred
    scatter matrix of a ``d``-wide tap from reduced :func:`sketch_partials`; exact when ``rank <= k``, but for the
    directions under the whitening floor, whose energy is kept as a flat tail (:func:`_with_flat_tail`).

    As :func:`lightning_act.stats.spectrum.covariance_spectrum`: eigenvalues below ``16 eps Σ||y||²`` (of the
    shifted rows, as the whitening floor's ``diag(Zᵀ Z)``) are round-off and set to 0, and non-finite sums give
    NaN eigenvalues (no host sync, no solver error); so do sums
    whose mean is too large next to their spread for the float32 projection (:func:`sketch_resolved`).
    """
    partials = partials.to(torch.float64)
    if partials.numel() != sketch_size(d, k):
        raise ValueError(f"{partials.numel()} numbers are not the sketch of a {d}-wide tap with k={k}; pass the d and k it was built with")
    count, square_total = partials[0].clamp_min(1.0), partials[1]
    total, projected_total = partials[2 : 2 + d], partials[2 + d : 2 + d + k]
    # The k x k core first, while no d x k matrix is alive: its eigensolver needs about 4 k² numbers.
    raw_core = partials[2 + d + k + d * k :].reshape(k, k)
    core = raw_core - torch.outer(projected_total, projected_total) / count
    core_known = _all_finite(core) & sketch_resolved(partials, d, k)
    core = (core + core.T).mul_(0.5).masked_fill_(~core_known, 0.0)
    eps = torch.finfo(torch.float64).eps
    weights, basis = torch.linalg.eigh(core)
    del core
    core_round_off = k * eps * torch.diagonal(raw_core).amax()
    floor = torch.maximum(core_round_off, WHITENING_FLOOR * weights[-1]).clamp_min(torch.finfo(torch.float64).tiny)
    # the directions the whitening floor drops that hold more than round-off: where the flat tail goes
    dropped = ((weights > core_round_off) & (weights <= floor)).sum()
    zero = torch.zeros((), dtype=torch.float64, device=partials.device)
    scale = torch.where(weights > floor, weights.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), zero)
    whitening = basis.mul_(scale)
    # Y = Xᵀ J Z, the one d x k matrix of the flush, built in place and column-major, so that LAPACK factors it where
    # it lies: its copies (the centring's outer product and difference, the masking, torch.linalg.qr's own copy)
    # put several times 8 d k bytes on the flush's peak (a fit's extra peak 1467 MiB at d = 8192, k = 4096 in round
    # 24, 991 MiB since).
    cross = torch.empty((k, d), dtype=torch.float64, device=partials.device).mT
    cross.copy_(partials[2 + d + k : 2 + d + k + d * k].reshape(d, k))
    cross.addr_(total, projected_total / count, alpha=-1)
    finite = core_known & _all_finite(cross.mT)  # its contiguous view: a strided reduction copied it
    cross.masked_fill_(~finite, 0.0)
    # The Nyström eigenvalues are the squared singular values of Y W^{-1/2}, which are those of R W^{-1/2} with
    # Y = QR: forming Yᵀ Y instead squares the condition number and lost a collapsed layer's small eigenvalues
    # (erank 1.05 for 1.01), at the same O(d k²) cost. On the CPU geqrf, given Y as its output, writes R over Y's
    # upper rows: the R torch.linalg.qr computes on a copy of Y, to the bit. Elsewhere (an output aliasing its input
    # is not checked there: no GPU this round) torch.linalg.qr takes its copy.
    if cross.device.type == "cpu":
        torch.geqrf(cross, out=(cross, torch.empty(min(d, k), dtype=torch.float64, device=partials.device)))
        triangle = cross[: min(d, k)].triu()
    else:
        triangle = torch.linalg.qr(cross, mode="r").R
    del cross
    eigenvalues = torch.linalg.svdvals(triangle @ whitening).square().flip(0)
    round_off = 16 * eps * square_total
    eigenvalues = torch.where(eigenvalues > round_off, eigenvalues, zero)
    eigenvalues = _with_flat_tail(eigenvalues, square_total - total.square().sum() / count, count, d, round_off, dropped)
    return torch.where(finite, eigenvalues, torch.full_like(eigenvalues, float("nan")))


def _with_flat_tail(
    eigenvalues: torch.Tensor, trace: torch.Tensor, count: torch.Tensor, d: int, round_off: torch.Tensor,
    dropped: torch.Tensor,
) -> torch.Tensor:
    """``eigenvalues`` (ascending) with the energy the whitening floor dropped, ``trace(S) − Σ kept`` (the trace
    from the summed ``Σ||y||²`` and ``Σy``, hence exact under DDP too), spread evenly over the ``dropped``
    directions (the core's eigenvalues under the floor and above its round-off), as many as the zero slots the rows'
    rank ``min(N − 1, d)`` allows. Dropped, the directions under the floor each carry ~1e-6 of ``Σ σ``, which
    erank weighs by ``log(1/p) ~ 14``: a nearly collapsed layer (one direction and a faint isotropic floor) read
    erank 2.3% low at 3584 rows, an error growing with the rows; spread over every slot the rows allow, a floor
    partly under the whitening floor read +1.0% (review R3). A share at round-off level (``round_off``, as for one
    eigenvalue) is none."""
    kept = (eigenvalues > 0).sum()
    allowed = torch.clamp(count - 1, max=min(d, eigenvalues.numel()))
    room = torch.minimum((allowed - kept).clamp_min(0), dropped)
    share = (trace - eigenvalues.sum()).clamp_min(0.0) / room.clamp_min(1)
    slots = torch.arange(eigenvalues.numel(), device=eigenvalues.device)
    filled = (slots >= eigenvalues.numel() - kept - room) & (eigenvalues == 0) & (share > round_off)
    return torch.where(filled, share, eigenvalues).sort().values


def _all_finite(matrix: torch.Tensor) -> torch.Tensor:
    """Whether every entry is finite, a bool tensor (no host sync), from the extremes (``aminmax`` propagates NaN):
    ``torch.isfinite`` makes an absolute value and masks, 1.4 times a ``d x k`` float64 matrix's bytes."""
    low, high = torch.aminmax(matrix)
    return torch.isfinite(low) & torch.isfinite(high)


def sketch_resolved(partials: torch.Tensor, d: int, k: int) -> torch.Tensor:
    """Whether the float32 projection ``Z`` of reduced :func:`sketch_partials` resolves the centred rows: every
    column's ``|mean|`` at most :data:`MAX_PROJECTED_OFFSET` times its spread, or rows with no spread at all
    (their scatter's trace, from the float64 sums of ``x``, is round-off: every eigenvalue is 0, as it should be).
    A bool tensor, no host sync."""
    partials = partials.to(torch.float64)
    count, square_total, total = partials[0].clamp_min(1.0), partials[1], partials[2 : 2 + d]
    constant = square_total - total.square().sum() / count <= 4 * torch.finfo(torch.float64).eps * square_total
    mean = partials[2 + d : 2 + d + k] / count
    squares = torch.diagonal(partials[2 + d + k + d * k :].reshape(k, k)) / count
    spread = (squares - mean.square()).clamp_min(0.0).sqrt()
    return constant | (mean.abs() <= MAX_PROJECTED_OFFSET * spread).all()


def sketch_rank_statistics(partials: torch.Tensor, d: int, k: int) -> dict[str, torch.Tensor]:
    """``erank`` (Roy & Vetterli 2007) and ``pr`` (Gao et al. 2017) from reduced :func:`sketch_partials`."""
    eigenvalues = sketch_spectrum(partials, d, k)
    return {"erank": effective_rank(eigenvalues), "pr": participation_ratio(eigenvalues)}
