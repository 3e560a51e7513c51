"""Eigenvalues of a batch of small symmetric float64 matrices in two Triton launches and no host sync.

``DimensionalCollapse`` needs the whole spectrum of one ``d x d`` scatter matrix per tap at every logging step.
On an H100, cuSOLVER's ``syevd`` takes ~3.3 ms per (384, 384) matrix whether called per matrix or batched
(``docs/performance.md``, "H100, round 3": a batch is solved one matrix at a time at this size), and
``torch.linalg.eigvalsh`` checks its status with a host sync. Here the same eigenvalues come from the textbook
two-phase method (Golub & Van Loan, *Matrix Computations*, 4th ed., §8.3.1 and §8.4.1), one program per matrix,
so a batch of taps runs side by side on as many streaming multiprocessors:

1. ``_tridiagonalize_kernel``: Householder reduction to a symmetric tridiagonal matrix with the same
   eigenvalues. Step ``k`` reflects row ``k`` right of the diagonal (the matrix is symmetric, and a row is one
   contiguous read) onto its first entry and updates the trailing block as ``A <- A - v w^T - w v^T`` with
   ``p = A v`` and ``w = 2 p - 2 (v^T p) v`` (``|v| = 1``). Row ``k + 1`` is updated first, so step ``k + 1``'s
   ``v`` is known while step ``k``'s update is written, and the same sweep computes step ``k + 1``'s ``p``: the
   trailing block is read and written once per step. The vectors pass between the program's threads through
   a small per-matrix workspace, with a barrier between the phases of a step, and between the reads and writes of
   each tile: Triton may hold a narrow tile in several warps at once, and gives no order between warps otherwise.
2. ``_sturm_bisection_kernel``: the ``i``-th smallest eigenvalue of the tridiagonal matrix by bisection on
   Sturm counts (the number of negative pivots of ``T - x I``, LAPACK ``dstebz``'s recurrence with its pivot
   guard), starting from the Gershgorin interval; each lane of a program bisects for one index.

Both are backward stable, so each eigenvalue is exact up to a small multiple of ``eps * |A|``, like ``eigvalsh``
(the tests compare with numpy's float64 solver). Only imported when Triton is importable; under
``TRITON_INTERPRET=1`` the kernels run on CPU tensors, which is how they are tested without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Bisection steps: the Gershgorin interval is at most ``2 |T|`` wide, and 64 halvings take it below float64
#: round-off of ``|T|``.
BISECTION_STEPS = 64
#: Eigenvalue indices bisected by one program (one per lane).
INDICES_PER_PROGRAM = 64
#: Entries of the trailing block held by one program at once (a tile of ``rows x BLOCK``), and the warps holding
#: them: 16 x 512 float64 in 16 warps uses 98 registers a thread and no spills on sm_90 (``ptxas -v``; the test
#: checks it), and halves the tiles a sweep of a 384-wide matrix waits for against 8 x 512 in 8 warps.
TILE_ENTRIES = 8192
TRIDIAGONAL_WARPS = 16
#: The widest matrix the kernels take: a program holds a few ``BLOCK``-long float64 vectors in registers, checked
#: spill-free up to here (``DimensionalCollapse``'s exact path stops at ``wide_dim=2048`` by default).
MAX_WIDTH = 2048


@triton.jit
def _reflector(x, cols, k):
    """Unit ``v`` and ``alpha`` with ``(I - 2 v v^T) x = alpha e_(k+1)``, for ``x`` zero outside ``cols > k``."""
    first = tl.sum(tl.where(cols == k + 1, x, 0.0), axis=0)
    norm = tl.sqrt(tl.sum(x * x, axis=0))
    alpha = tl.where(first > 0, -norm, norm)  # the sign that avoids cancellation in v's first entry
    v = tl.where(cols == k + 1, x - alpha, x)
    v_norm = tl.sqrt(tl.sum(v * v, axis=0))
    return tl.where(v_norm > 0, v / v_norm, 0.0), alpha  # a zero row needs no reflection


@triton.jit
def _tridiagonalize_kernel(a_ptr, diag_ptr, off_ptr, work_ptr, D: tl.constexpr, BLOCK: tl.constexpr,
                           ROWS: tl.constexpr):
    matrix = tl.program_id(0)
    a = a_ptr + matrix * D * D
    v_ptr = work_ptr + matrix * 3 * BLOCK
    w_ptr = v_ptr + BLOCK
    p_ptr = w_ptr + BLOCK
    cols = tl.arange(0, BLOCK)
    tile_rows = tl.arange(0, ROWS)
    if D >= 3:
        # step 0's reflector (from row 0: A is symmetric, and a row is one contiguous read) and p = A v
        v, alpha = _reflector(tl.load(a + cols, mask=(cols > 0) & (cols < D), other=0.0), cols, 0)
        tl.store(diag_ptr + matrix * D, tl.load(a))
        tl.store(off_ptr + matrix * D, alpha)
        tl.store(v_ptr + cols, v)
        tl.debug_barrier()
        for start in range(1, D, ROWS):
            rows = start + tile_rows
            inside = (rows[:, None] < D) & (cols[None, :] > 0) & (cols[None, :] < D)
            tile = tl.load(a + rows[:, None] * D + cols[None, :], mask=inside, other=0.0)
            tl.store(p_ptr + rows, tl.sum(tile * v[None, :], axis=1), mask=rows < D)
        tl.debug_barrier()
        for k in range(0, D - 2):
            # step k: the trailing block (rows and columns > k) becomes A - v w^T - w v^T. Row k + 1 after that
            # update is computed first, so its reflector (step k + 1's v) is known during the sweep, and the
            # sweep that writes the update also computes step k + 1's p = A v: one pass per step.
            later = (cols > k) & (cols < D)
            p = tl.load(p_ptr + cols, mask=later, other=0.0)
            w = 2.0 * p - 2.0 * tl.sum(v * p, axis=0) * v
            v_at = tl.sum(tl.where(cols == k + 1, v, 0.0), axis=0)
            w_at = tl.sum(tl.where(cols == k + 1, w, 0.0), axis=0)
            row = tl.load(a + (k + 1) * D + cols, mask=(cols > k + 1) & (cols < D), other=0.0)
            row = tl.where(cols > k + 1, row - v_at * w - w_at * v, 0.0)  # the sweep writes these same values
            v_next, alpha_next = _reflector(row, cols, k + 1)
            tl.store(w_ptr + cols, w)
            tl.debug_barrier()  # w is visible, and every thread has read p
            for start in range(k + 1, D, ROWS):
                rows = start + tile_rows
                inside = (rows[:, None] < D) & later[None, :]
                offsets = rows[:, None] * D + cols[None, :]
                tile = tl.load(a + offsets, mask=inside, other=0.0)
                v_rows = tl.load(v_ptr + rows, mask=rows < D, other=0.0)
                w_rows = tl.load(w_ptr + rows, mask=rows < D, other=0.0)
                tile = tile - v_rows[:, None] * w[None, :] - w_rows[:, None] * v[None, :]
                # A narrow tile is held by several warps at once (d = 8: 8 copies); a copy read after another warp
                # stored its update would be updated twice. Every copy is read before any thread writes.
                tl.debug_barrier()
                tl.store(a + offsets, tile, mask=inside)
                tl.store(p_ptr + rows, tl.sum(tile * v_next[None, :], axis=1), mask=rows < D)
            tl.debug_barrier()  # the update and the next p are visible, and every thread has read v
            tl.store(diag_ptr + matrix * D + k + 1, tl.load(a + (k + 1) * D + k + 1))
            tl.store(off_ptr + matrix * D + k + 1, alpha_next)  # the last one is rewritten below
            tl.store(v_ptr + cols, v_next)
            tl.debug_barrier()
            v = v_next
    if D >= 2:  # the last 2 x 2 block is already tridiagonal
        tl.store(diag_ptr + matrix * D + D - 2, tl.load(a + (D - 2) * D + D - 2))
        tl.store(off_ptr + matrix * D + D - 2, tl.load(a + (D - 1) * D + D - 2))
    tl.store(diag_ptr + matrix * D + D - 1, tl.load(a + (D - 1) * D + D - 1))


@triton.jit
def _sturm_bisection_kernel(diag_ptr, off_ptr, out_ptr, D: tl.constexpr, BLOCK: tl.constexpr, LANES: tl.constexpr,
                            STEPS: tl.constexpr):
    matrix = tl.program_id(0)
    index = tl.program_id(1) * LANES + tl.arange(0, LANES)  # the eigenvalue (ascending) each lane looks for
    diag = diag_ptr + matrix * D
    off = off_ptr + matrix * D  # off[j] = T[j + 1, j], j < D - 1
    j = tl.arange(0, BLOCK)
    inside = j < D
    d = tl.load(diag + j, mask=inside, other=0.0)
    e = tl.load(off + j, mask=j < D - 1, other=0.0)
    e_before = tl.load(off + j - 1, mask=(j >= 1) & inside, other=0.0)
    radius = tl.abs(e) + tl.abs(e_before)
    low = tl.min(tl.where(inside, d - radius, float("inf")), axis=0)  # Gershgorin: every eigenvalue is inside
    high = tl.max(tl.where(inside, d + radius, -float("inf")), axis=0)
    margin = 4.5e-16 * tl.maximum(tl.abs(low), tl.abs(high)) + 1e-300
    # LAPACK dstebz's pivot guard: a pivot smaller than this is replaced by -pivmin (no division by zero)
    pivmin = 2.3e-308 * tl.maximum(tl.max(e * e, axis=0), 1.0)
    lo = tl.zeros([LANES], dtype=tl.float64) + (low - margin)
    hi = tl.zeros([LANES], dtype=tl.float64) + (high + margin)
    for _ in range(STEPS):
        mid = 0.5 * (lo + hi)
        pivot = tl.load(diag) - mid
        pivot = tl.where(tl.abs(pivot) < pivmin, -pivmin, pivot)
        count = (pivot < 0).to(tl.int32)
        for i in range(1, D):
            coupling = tl.load(off + i - 1)
            pivot = tl.load(diag + i) - mid - coupling * coupling / pivot
            pivot = tl.where(tl.abs(pivot) < pivmin, -pivmin, pivot)
            count += (pivot < 0).to(tl.int32)
        smaller = count > index  # more than `index` eigenvalues below mid: the one sought is below it
        hi = tl.where(smaller, mid, hi)
        lo = tl.where(smaller, lo, mid)
    tl.store(out_ptr + matrix * D + index, 0.5 * (lo + hi), mask=index < D)


def launch_geometry(d: int) -> dict[str, int]:
    """Compile-time sizes of both kernels for ``d x d`` matrices."""
    block = triton.next_power_of_2(d)
    rows = max(1, min(block, TILE_ENTRIES // block))
    return {"BLOCK": block, "ROWS": rows, "LANES": min(INDICES_PER_PROGRAM, block)}


def tridiagonal_bisection_eigenvalues(matrices: torch.Tensor) -> torch.Tensor:
    """Eigenvalues, ascending, of each symmetric ``(d, d)`` matrix of ``matrices`` (``(..., d, d)``, float64, finite),
    as ``torch.linalg.eigvalsh`` gives them, from two kernel launches for the whole batch and no host sync."""
    if matrices.dtype != torch.float64 or matrices.ndim < 2 or matrices.shape[-1] != matrices.shape[-2]:
        raise ValueError(f"tridiagonal_bisection_eigenvalues needs (..., d, d) float64 matrices, got "
                         f"{tuple(matrices.shape)} {matrices.dtype}")
    d = matrices.shape[-1]
    if d > MAX_WIDTH:
        raise ValueError(
            f"tridiagonal_bisection_eigenvalues takes d <= {MAX_WIDTH}, got {d}; use torch.linalg.eigvalsh"
        )
    batch = matrices.shape[:-2]
    if d == 0 or matrices.numel() == 0:
        return matrices.new_zeros(*batch, d)
    work_matrices = matrices.reshape(-1, d, d).clone(memory_format=torch.contiguous_format)
    count = work_matrices.shape[0]
    geometry = launch_geometry(d)
    diag = torch.empty(count, d, dtype=torch.float64, device=matrices.device)
    off = torch.zeros(count, d, dtype=torch.float64, device=matrices.device)
    workspace = torch.empty(count, 3 * geometry["BLOCK"], dtype=torch.float64, device=matrices.device)
    _tridiagonalize_kernel[(count,)](work_matrices, diag, off, workspace, D=d, BLOCK=geometry["BLOCK"],
                                     ROWS=geometry["ROWS"], num_warps=TRIDIAGONAL_WARPS)
    eigenvalues = torch.empty(count, d, dtype=torch.float64, device=matrices.device)
    grid = (count, triton.cdiv(d, geometry["LANES"]))
    _sturm_bisection_kernel[grid](diag, off, eigenvalues, D=d, BLOCK=geometry["BLOCK"], LANES=geometry["LANES"],
                                  STEPS=BISECTION_STEPS, num_warps=2)
    return eigenvalues.reshape(*batch, d)
