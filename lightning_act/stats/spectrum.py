"""Spectra of activations and of parameter trajectories (pure tensor functions, no Lightning).

Activations. The effective rank of Roy & Vetterli (2007) is ``exp(H(p))`` with
``p_k = σ_k / Σ_j σ_j`` over the singular values of the *centred* N×d activation matrix; the
participation ratio of Gao et al. (2017) is ``(Σ λ)² / Σ λ²`` over covariance eigenvalues. Both
need only the centred scatter matrix ``S = Σ x xᵀ − (Σ x)(Σ x)ᵀ / N``, whose eigenvalues are
``λ_k = σ_k²``, and ``N``, ``Σ x``, ``Σ x xᵀ`` add up across micro-batches and data-parallel ranks.
So each rank sums these over a bounded sample of rows (:func:`covariance_partials`) and the
spectrum is taken once, on the reduced sums, in float64 (:func:`covariance_spectrum`).

Parameter trajectories. The execution-manifold analysis (Xu 2026, arXiv 2602.10496) flattens
snapshots ``w_t − w_0`` of weight matrices, centres them across snapshots and runs a PCA;
``r90`` is the number of components explaining 90% of the variance. With K snapshots of P
numbers the PCA variances are the eigenvalues of the K×K Gram matrix of the centred snapshots,
so memory is K·P (:func:`trajectory_r90`), and P can itself be bounded with a seeded
count-sketch random projection (:func:`sketch_vector`), which preserves inner products in
expectation and is linear, so a trajectory confined to a subspace stays confined after it.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence

import torch

from lightning_act._triton import triton_requirement, triton_usable, warn_triton_unusable


def feature_rows(x: torch.Tensor) -> torch.Tensor:
    """View an activation as rows × features: features are the channel dim 1 of a (B, C, *spatial) conv map of 4
    or more dims and the last dim otherwise; every other dim is flattened into rows."""
    if x.dim() >= 4:
        x = x.movedim(1, -1)
    if x.dim() == 0:
        x = x.reshape(1)
    return x.reshape(-1, x.shape[-1])


def covariance_partials(rows: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    """``[N, Σy (d), Σyyᵀ (d·d)]`` of the rows ``y = x − reference`` of an (N, d) matrix, float64, as one flat
    SUM-reducible vector; of a stack ``(..., N, d)`` of such matrices (with a stack ``(..., d)`` of references), a
    stack ``(..., 1 + d + d²)`` of them (one batched product for many taps).

    Why the reference (a float64 row near the rows, e.g. their mean): the centred scatter ``Σyyᵀ − (Σy)(Σy)ᵀ / N`` is the
    same for any shift, but the sums' round-off is ``eps`` times their own size, and a large mean (an LLM's
    massive features, ~1e4 times the typical value) makes the unshifted ``Σxxᵀ`` so large that its round-off
    buried the spectrum's tail (round 20: erank 15.2 for 75.5 at an offset of 1e6). Sums over several parts add up
    only when the parts share the reference (:func:`shift_covariance_partials` moves them to another one)."""
    # float64 rows, shifted in the same pass (the subtraction promotes float32 rows)
    rows = rows.to(torch.float64) if reference is None else rows - reference.to(torch.float64)[..., None, :]
    count = torch.full((*rows.shape[:-2], 1), rows.shape[-2], dtype=torch.float64, device=rows.device)
    return torch.cat([count, rows.sum(-2), (rows.mT @ rows).flatten(-2)], -1)


def shift_covariance_partials(partials: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """:func:`covariance_partials` of rows ``y`` made the partials of ``y + shift`` (``shift = old reference − new
    reference``), exactly: ``Σ(y+δ) = Σy + Nδ`` and ``Σ(y+δ)(y+δ)ᵀ = Σyyᵀ + (Σy)δᵀ + δ(Σy)ᵀ + Nδδᵀ``."""
    d = shift.shape[-1]
    count, total = partials[:1], partials[1 : 1 + d]
    scatter = partials[1 + d :].reshape(d, d)
    moved = scatter + torch.outer(total, shift) + torch.outer(shift, total) + count * torch.outer(shift, shift)
    return torch.cat([count, total + count * shift, moved.reshape(-1)])


EIGENSOLVERS = ("auto", "torch", "triton")
# Why "auto" stopped choosing Triton in this process (its kernels failed once), or empty.
_AUTO_TRITON_FAILURE: list[str] = []


# H100 float64 timings (ms) of the two eigensolvers, ``docs/performance.md``, round 11 (GPU run of 2026-11-27): the
# Triton solver for one wave of 13 matrices (every matrix on its own multiprocessor, all at once; one matrix took
# about as long), and cuSOLVER per matrix of one batched call (it solves a batch one matrix after another).
_TRITON_WAVE_MS = ((384, 15.8), (768, 142.3), (1536, 633.4))
_CUSOLVER_MATRIX_MS = ((384, 3.31), (768, 7.49), (1536, 17.9))


def _log_log_interpolation(points: tuple[tuple[int, float], ...], width: int) -> float:
    """The timing at ``width`` on the straight lines through ``points`` in log-log space (beyond the measured
    widths, the nearest segment's line)."""
    segment = next((i for i in range(len(points) - 2) if width <= points[i + 1][0]), len(points) - 2)
    (w0, t0), (w1, t1) = points[segment], points[segment + 1]
    return t0 * (width / w0) ** (math.log(t1 / t0) / math.log(w1 / w0))


def auto_eigensolver(device_type: str, count: int, width: int, multiprocessors: int) -> str:
    """The eigensolver ``"auto"`` stands for: ``"triton"`` when the matrices are on a CUDA device, triton imports,
    its kernels have not failed in this process, and it is expected to solve ``count`` (``width``, ``width``)
    matrices sooner than cuSOLVER on a GPU of ``multiprocessors`` streaming multiprocessors; else ``"torch"``.

    The expectation comes from H100 timings of float64 spectra at widths 384, 768 and 1536, interpolated in log-log
    space (``docs/performance.md``, round 11). cuSOLVER's ``syevd`` solves a batch one matrix after another: 3.3,
    7.5 and 17.9 ms per matrix. The Triton solver gives each matrix one multiprocessor, all at once, and each of
    its ``width`` steps streams the trailing block through that one multiprocessor: 15.8, 142 and 633 ms per wave
    of matrices, however many the wave holds. So Triton pays off only for many matrices of a narrow width: from 5
    matrices at width 384 (a ViT-S's 13 taps: 15.8 against 43 ms), from 19 at 768, from 36 at 1536. Narrower and
    wider than measured, the nearest segment's line is extrapolated.
    """
    if device_type != "cuda" or _AUTO_TRITON_FAILURE:
        return "torch"
    if not triton_usable():
        warn_triton_unusable()
        return "torch"
    waves = -(-count // max(1, multiprocessors))
    triton_ms = _log_log_interpolation(_TRITON_WAVE_MS, width) * waves
    cusolver_ms = _log_log_interpolation(_CUSOLVER_MATRIX_MS, width) * count
    return "triton" if triton_ms < cusolver_ms else "torch"


def eigensolver_problem(eigensolver: str, device: torch.device) -> str | None:
    """Why ``eigensolver`` cannot solve spectra on ``device`` (one line naming the fix), or None when it can."""
    if eigensolver not in EIGENSOLVERS:
        return f"eigensolver={eigensolver!r}; pass one of {EIGENSOLVERS}"
    if eigensolver == "triton":
        if not triton_usable():
            return f"eigensolver='triton' needs {triton_requirement()}; pass eigensolver='auto' or 'torch'"
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return (
                f"eigensolver='triton' needs a CUDA device, the model is on {device}; "
                "pass eigensolver='auto' or 'torch'"
            )
    return None


def symmetric_eigenvalues(matrices: torch.Tensor, eigensolver: str = "auto") -> torch.Tensor:
    """Ascending eigenvalues of symmetric float64 matrices ``(..., d, d)`` by ``eigensolver`` (see
    :func:`covariance_spectrum`); ``"triton"`` hands matrices wider than its kernels take
    (``triton_eigen.MAX_WIDTH``) to ``torch.linalg.eigvalsh``, which gives the same eigenvalues."""
    problem = eigensolver_problem(eigensolver, matrices.device)
    if problem is not None:
        raise ValueError(problem)
    solver = eigensolver
    if eigensolver == "auto":
        device = matrices.device
        multiprocessors = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0
        solver = auto_eigensolver(device.type, math.prod(matrices.shape[:-2]), matrices.shape[-1], multiprocessors)
    if solver == "triton":
        from lightning_act.stats import triton_eigen

        if matrices.shape[-1] <= triton_eigen.MAX_WIDTH:
            try:
                return triton_eigen.tridiagonal_bisection_eigenvalues(matrices)
            except Exception as error:  # noqa: BLE001
                if eigensolver == "triton":
                    raise
                # nobody asked "auto" for Triton: a GPU its kernels cannot run on must not stop the fit
                _AUTO_TRITON_FAILURE.append(f"{type(error).__name__}: {error}")
                warnings.warn(
                    f"eigensolver='auto': the Triton eigensolver failed on {matrices.device} "
                    f"({_AUTO_TRITON_FAILURE[0]}); torch.linalg.eigvalsh solves every spectrum from now on "
                    "(pass eigensolver='torch' to skip the try)",
                    stacklevel=2,
                )
    return torch.linalg.eigvalsh(matrices)


def covariance_dim(numel: int) -> int:
    """Feature dimension d of a :func:`covariance_partials` vector of ``numel = 1 + d + d²`` entries."""
    d = (math.isqrt(4 * numel - 3) - 1) // 2
    if 1 + d + d * d != numel:
        raise ValueError(f"{numel} is not 1 + d + d² for any d; pass a vector made by covariance_partials")
    return d


def covariance_spectrum(partials: torch.Tensor, eigensolver: str = "auto") -> torch.Tensor:
    """Eigenvalues (ascending, float64, >= 0) of the centred scatter matrix from summed partials.

    ``partials`` is one :func:`covariance_partials` vector or a stack of them (``(..., 1 + d + d²)``, e.g. every
    tap of a layer width at once: one batched eigensolver call instead of one per tap). Eigenvalues below
    ``16 · eps · Σ‖y‖²`` are not signal and are set to 0, as numpy's ``matrix_rank`` does with its tolerance: the
    centring's error is about ``eps · Σ‖y‖²`` in Frobenius norm (each row adds ``‖y‖²`` to it), and a rank-deficient
    layer's float32 activations, whose rounding is no direction of the layer, add eigenvalues up to ~10 of it
    (measured at d = 16, round 20: counted, they lifted a rank-3 layer's erank in its sixth digit); a cut-off ``d``
    times larger zeroed half of the spectrum (round 17). So the sums must be of rows shifted by a reference near
    them (:func:`covariance_partials`): of unshifted rows, a mean far above the spread puts the cut-off above the
    spectrum's tail. Non-finite sums (NaN/inf activations) give NaN eigenvalues
    instead of an eigensolver error. ``eigensolver``: ``"torch"`` (``torch.linalg.eigvalsh``), ``"triton"``
    (:func:`lightning_act.stats.triton_eigen.tridiagonal_bisection_eigenvalues`: two launches per batch and no
    host sync; CUDA tensors, or CPU ones under ``TRITON_INTERPRET=1``) or ``"auto"`` (the one expected to be
    faster on the tensors' device: :func:`auto_eigensolver`).
    """
    partials = partials.to(torch.float64)
    d = covariance_dim(partials.shape[-1])
    count, total = partials[..., :1, None], partials[..., 1 : 1 + d]
    raw = partials[..., 1 + d :].reshape(*partials.shape[:-1], d, d)
    scatter = raw - total[..., :, None] * total[..., None, :] / count.clamp_min(1.0)
    finite = torch.isfinite(scatter).flatten(-2).all(-1)[..., None, None]
    scatter = torch.where(finite, 0.5 * (scatter + scatter.transpose(-1, -2)), torch.zeros_like(scatter))
    eigenvalues = symmetric_eigenvalues(scatter, eigensolver)
    tolerance = 16 * torch.finfo(torch.float64).eps * torch.diagonal(raw, dim1=-2, dim2=-1).sum(-1, keepdim=True)
    eigenvalues = torch.where(eigenvalues > tolerance, eigenvalues, torch.zeros_like(eigenvalues))
    return torch.where(finite[..., 0], eigenvalues, torch.full_like(eigenvalues, float("nan")))


def effective_rank(eigenvalues: torch.Tensor) -> torch.Tensor:
    """Roy–Vetterli effective rank from scatter eigenvalues ``λ = σ²``: ``exp(−Σ p log p)``,
    ``p_k = σ_k / Σ σ``; in [1, rank], and 0 for an all-zero spectrum (constant activations).
    Over the last dim: a stack of spectra ``(..., d)`` gives one rank per spectrum."""
    sigma = eigenvalues.to(torch.float64).clamp_min(0.0).sqrt()
    total = sigma.sum(-1, keepdim=True)
    p = sigma / total.clamp_min(torch.finfo(torch.float64).tiny)
    entropy = -torch.where(p == 0, torch.zeros_like(p), p * p.log()).sum(-1)
    total = total.squeeze(-1)
    return torch.where(total == 0, torch.zeros_like(total), entropy.exp())


def participation_ratio(eigenvalues: torch.Tensor) -> torch.Tensor:
    """Participation ratio ``(Σλ)² / Σλ²`` (Gao et al. 2017); in [1, rank], 0 for an all-zero spectrum.
    Over the last dim, like :func:`effective_rank`."""
    lam = eigenvalues.to(torch.float64).clamp_min(0.0)
    square_sum = lam.square().sum(-1)
    ratio = lam.sum(-1).square() / square_sum.clamp_min(torch.finfo(torch.float64).tiny)
    return torch.where(square_sum == 0, torch.zeros_like(ratio), ratio)


def rank_statistics(eigenvalues: torch.Tensor, d: int) -> torch.Tensor:
    """``(erank, pr, erank / d, pr / d)`` along a new last dim, for one spectrum ``(k,)`` or a stack ``(..., k)``
    of them (all the taps of one width at once: a few operations instead of a few dozen per tap)."""
    ranks = torch.stack([effective_rank(eigenvalues), participation_ratio(eigenvalues)], -1)
    return torch.cat([ranks, ranks / d], -1)


#: Entries converted to float64 at a time when a count sketch adds a weight (:func:`sketch_with_draws`): 2 MiB.
SKETCH_BLOCK = 1 << 18


def count_sketch_draws(
    numel: int, dim: int, seed: int, offset: int = 0, chunk: int = 1 << 20, device: torch.device | str | None = None
) -> torch.Tensor:
    """The seeded count-sketch hash of the positions ``offset .. offset + numel`` as one int32 draw in ``[0, 2 dim)``
    per position: bucket ``draw mod dim``, sign ``+1`` when ``draw >= dim`` and ``-1`` below. The draw of a position
    depends only on ``seed`` and the position's chunk, so any split of a vector sketches the same way."""
    draws = []
    generator = torch.Generator(device=device)
    start = 0
    while start < numel:
        position = offset + start
        stop = min(numel, start + chunk - position % chunk)
        generator.manual_seed(seed * 1_000_003 + position // chunk)
        chunk_draws = torch.randint(0, 2 * dim, (chunk,), generator=generator, device=device)
        draws.append(chunk_draws[position % chunk : position % chunk + (stop - start)].to(torch.int32))
        start = stop
    return torch.cat(draws) if draws else torch.zeros(0, dtype=torch.int32, device=device)


def sketch_vector(x: torch.Tensor, dim: int, seed: int, offset: int = 0, chunk: int = 1 << 20) -> torch.Tensor:
    """Seeded count-sketch of a flat vector into ``dim`` buckets (float64).

    Entry ``j`` of ``x`` (global position ``offset + j``) is added, with a random sign, to a
    random bucket (:func:`count_sketch_draws`), so equal seeds give the same linear map on every call and
    every rank. ``E[⟨Sx, Sy⟩] = ⟨x, y⟩``. The hash is drawn and added one chunk at a time: a 67M-entry ``x`` (the
    path of every snapshot of a trajectory beyond ``CACHED_HASH_POSITIONS``) then needs a few MiB, not 12 bytes
    per entry for the whole hash and a float64 copy (round 29); the sums are added in the same order.
    """
    x = x.reshape(-1)
    total = torch.zeros(2 * dim, dtype=torch.float64, device=x.device)
    start = 0
    while start < x.numel():
        stop = min(x.numel(), start + chunk - (offset + start) % chunk)
        draws = count_sketch_draws(stop - start, dim, seed, offset + start, chunk, x.device)
        total.index_add_(0, draws, x[start:stop].to(torch.float64))
        start = stop
    return total[dim:] - total[:dim]


def sketch_with_draws(parts: Sequence[torch.Tensor], draws: torch.Tensor, dim: int) -> torch.Tensor:
    """:func:`sketch_vector` of the concatenation of ``parts`` (flattened) from its :func:`count_sketch_draws`.

    Each entry is added to bucket ``draw`` of ``2 dim`` (one ``index_add_``, no sign product and no
    concatenated copy), and the sketch is the upper half minus the lower half: 2.7M float32 weights take
    ~10 ms on one CPU core instead of 63 ms for the signed product and the copy (issue 17). Each part goes to
    float64 through one reused buffer of ``SKETCH_BLOCK`` entries, not as a whole copy (8 bytes per weight,
    page-faulted in anew at every snapshot of an embedding table: round 29); the entries are added in the same
    order, so the sums are the same to the bit.
    """
    entries = sum(part.numel() for part in parts)
    if entries != draws.numel():
        raise ValueError(f"the parts hold {entries} entries but the hash has {draws.numel()}; draw it for these parts")
    total = torch.zeros(2 * dim, dtype=torch.float64, device=draws.device)
    # An accelerator takes larger blocks (32 MiB): fewer launches per snapshot for the same bounded memory.
    block = max(1, min(entries, SKETCH_BLOCK if draws.device.type == "cpu" else SKETCH_BLOCK << 4))
    buffer = torch.empty(block, dtype=torch.float64, device=draws.device)
    offset = 0
    for part in parts:
        flat = part.reshape(-1)
        for start in range(0, flat.numel(), block):
            values = buffer[: min(block, flat.numel() - start)].copy_(flat[start : start + block])
            total.index_add_(0, draws[offset + start : offset + start + values.numel()], values)
        offset += flat.numel()
    return total[dim:] - total[:dim]


def trajectory_spectrum(snapshots: torch.Tensor, eigensolver: str = "torch", pad_to: int | None = None) -> torch.Tensor:
    """PCA variances (descending, float64) of K snapshots (K, P) centred across snapshots, via the
    K×K Gram matrix ``Xc Xcᵀ`` (same non-zero eigenvalues as ``Xcᵀ Xc``, up to the 1/(K−1) scale).

    ``eigensolver`` as in :func:`symmetric_eigenvalues`. ``pad_to``: solve the Gram matrix bordered with zeros to
    this size (its spectrum gains only zeros, which change no explained-variance rank), so that a trajectory that
    grows one snapshot per logging step compiles the Triton eigensolver once, not once per length."""
    x = snapshots.to(torch.float64)
    centred = x - x.mean(0, keepdim=True)
    gram = centred @ centred.T
    # Non-finite weights (a diverged run) give NaN variances instead of an eigensolver error.
    finite = torch.isfinite(gram).all()
    gram = torch.where(finite, 0.5 * (gram + gram.T), torch.zeros_like(gram))
    if pad_to is not None and pad_to > gram.shape[0]:
        gram = torch.nn.functional.pad(gram, (0, pad_to - gram.shape[0], 0, pad_to - gram.shape[0]))
    eigenvalues = symmetric_eigenvalues(gram, eigensolver).flip(0).clamp_min(0.0)
    return torch.where(finite, eigenvalues, torch.full_like(eigenvalues, float("nan")))


def explained_variance_rank(eigenvalues: torch.Tensor, fraction: float = 0.90) -> torch.Tensor:
    """``min{k : Σ_{i≤k} λ_i / Σ λ_i >= fraction}`` for descending eigenvalues; NaN ("unknown") when all are 0, where
    every fraction of the variance is 0/0 (a trajectory whose weights have not moved), or when one is NaN."""
    lam = eigenvalues.to(torch.float64).clamp_min(0.0)
    total = lam.sum()
    cumulative = lam.cumsum(0) / total.clamp_min(torch.finfo(torch.float64).tiny)
    # A relative slack keeps an exactly-reached 90% from being missed by round-off.
    reached = cumulative >= fraction - 1e-12
    k = (~reached).sum() + 1
    return torch.where(total > 0, k.to(torch.float64), torch.full((), math.nan, dtype=torch.float64, device=lam.device))


def trajectory_r90(
    snapshots: torch.Tensor, fraction: float = 0.90, eigensolver: str = "torch", pad_to: int | None = None
) -> torch.Tensor:
    """``r90`` of a parameter trajectory: snapshots (K, P) of ``w_t − w_0`` (Xu 2026); ``eigensolver`` and
    ``pad_to`` as in :func:`trajectory_spectrum`."""
    return explained_variance_rank(trajectory_spectrum(snapshots, eigensolver, pad_to), fraction)
