"""Triton kernels for the group-rational (GR-KAN) activation: forward, backward, coefficient-gradient finish.

Imported by :mod:`lightning_act.nn.group_rational` only when Triton is installed, so the package works without
Triton. Under ``TRITON_INTERPRET=1`` (set before this module is imported) the same kernels run on CPU tensors,
which is how they are tested without a GPU. The launch functions serve both the eager path (direct launches) and
the bodies of the ``triton_op`` registration (``traced=True``: launches through ``torch.library.wrap_triton``, so
a trace records them as kernel nodes). Design and measurements: ``docs/kat_kernel.md``.

Layout: the input is viewed as ``(rows, groups, width)`` (contiguous), so every group is a strided
``rows x width`` matrix (channels-last ``(..., C)``: rows = prod(leading dims), width = C / groups;
``(B, C, H, W)``: rows = B, width = C / groups * H * W). Each program handles ``BLOCK_R x BLOCK_K`` tiles of
one group, so its 10 coefficients are scalars held in registers; the 1-D grid numbers programs group by group,
or group-fastest (``INTERLEAVE_GROUPS``: the programs in flight then sweep memory in order, which measured
slower on an H100). Only ``rows`` is a run-time argument; the rest of the geometry is ``tl.constexpr`` (fewer
arguments for Triton's launcher per call), and offsets are 32-bit unless the tensor is huge (``WIDE_OFFSETS``).

Backward (FlashKAT, arXiv 2505.13813, explains why the coefficient reduction matters): each program walks
``ROW_TILES`` row tiles (with ``PREFETCH``, loading the next tile before computing the current one, so more
bytes are in flight per thread: the loop is otherwise load, wait, compute, store), accumulating the 10
coefficient-gradient terms elementwise in registers, and reduces them once at the end (one cross-thread reduction per coefficient per program instead of per tile), writing one
partial per coefficient to a ``(programs, groups, 10)`` buffer. A second, tiny kernel sums the partials in a
fixed order per coefficient set (so shared sets need no separate ``expand`` backward) and applies ``d|b|/db``.
No atomics, so the coefficient gradients are deterministic. Edge tiles are masked unless the shape divides
evenly (``EVEN``); masked lanes load ``x = 0, grad_y = 0`` and contribute exactly zero.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

PARTIALS_PER_GROUP = 10
NUMERATOR_TERMS = 6
DENOMINATOR_TERMS = 4
MAX_BLOCK_K = 1024
FINISH_BLOCK = 64


@triton.jit
def _load_coefficients(numerator_ptr, denominator_ptr):
    a0 = tl.load(numerator_ptr + 0).to(tl.float32)
    a1 = tl.load(numerator_ptr + 1).to(tl.float32)
    a2 = tl.load(numerator_ptr + 2).to(tl.float32)
    a3 = tl.load(numerator_ptr + 3).to(tl.float32)
    a4 = tl.load(numerator_ptr + 4).to(tl.float32)
    a5 = tl.load(numerator_ptr + 5).to(tl.float32)
    b0 = tl.abs(tl.load(denominator_ptr + 0).to(tl.float32))
    b1 = tl.abs(tl.load(denominator_ptr + 1).to(tl.float32))
    b2 = tl.abs(tl.load(denominator_ptr + 2).to(tl.float32))
    b3 = tl.abs(tl.load(denominator_ptr + 3).to(tl.float32))
    return a0, a1, a2, a3, a4, a5, b0, b1, b2, b3


@triton.jit
def _program_coordinates(tiles, groups, INTERLEAVE_GROUPS: tl.constexpr):
    """``(tile, group)`` of this program in the 1-D grid of ``tiles * groups`` programs."""
    program = tl.program_id(0)
    if INTERLEAVE_GROUPS:  # consecutive programs: the same rows of consecutive groups (memory order)
        tile = program // groups
        group = program % groups
    else:  # group by group: each group's column slice over all rows, then the next group
        tile = program % tiles
        group = program // tiles
    return tile, group


@triton.jit
def _tile(row, col, rows, WIDTH: tl.constexpr, GROUPS: tl.constexpr, group, WIDE_OFFSETS: tl.constexpr):
    mask = (row[:, None] < rows) & (col[None, :] < WIDTH)
    if WIDE_OFFSETS:  # 64-bit element offsets only for tensors of 2^31 elements or more
        offsets = row[:, None].to(tl.int64) * (GROUPS * WIDTH) + group.to(tl.int64) * WIDTH + col[None, :]
    else:
        offsets = row[:, None] * (GROUPS * WIDTH) + group * WIDTH + col[None, :]
    return offsets, mask


@triton.jit
def _group_rational_forward_kernel(
    x_ptr,
    y_ptr,
    numerator_ptr,
    denominator_ptr,
    rows,
    GROUPS: tl.constexpr,
    WIDTH: tl.constexpr,
    K_BLOCKS: tl.constexpr,
    NUMERATOR_STRIDE: tl.constexpr,
    DENOMINATOR_STRIDE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN: tl.constexpr,
    INTERLEAVE_GROUPS: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr,
):
    tiles = tl.cdiv(rows, BLOCK_R) * K_BLOCKS
    tile, group = _program_coordinates(tiles, GROUPS, INTERLEAVE_GROUPS)
    row = (tile // K_BLOCKS) * BLOCK_R + tl.arange(0, BLOCK_R)
    col = (tile % K_BLOCKS) * BLOCK_K + tl.arange(0, BLOCK_K)
    offsets, mask = _tile(row, col, rows, WIDTH, GROUPS, group, WIDE_OFFSETS)
    a0, a1, a2, a3, a4, a5, b0, b1, b2, b3 = _load_coefficients(
        numerator_ptr + group * NUMERATOR_STRIDE, denominator_ptr + group * DENOMINATOR_STRIDE
    )
    if EVEN:
        x = tl.load(x_ptr + offsets).to(tl.float32)
    else:
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    ax = tl.abs(x)
    p = ((((a5 * x + a4) * x + a3) * x + a2) * x + a1) * x + a0
    q = 1.0 + ax * (b0 + ax * (b1 + ax * (b2 + ax * b3)))
    y = (p / q).to(y_ptr.dtype.element_ty)
    if EVEN:
        tl.store(y_ptr + offsets, y)
    else:
        tl.store(y_ptr + offsets, y, mask=mask)


@triton.jit
def _group_rational_backward_kernel(
    x_ptr,
    grad_y_ptr,
    grad_x_ptr,
    partial_ptr,
    numerator_ptr,
    denominator_ptr,
    rows,
    GROUPS: tl.constexpr,
    WIDTH: tl.constexpr,
    K_BLOCKS: tl.constexpr,
    NUMERATOR_STRIDE: tl.constexpr,
    DENOMINATOR_STRIDE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ROW_TILES: tl.constexpr,
    EVEN: tl.constexpr,
    INTERLEAVE_GROUPS: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    programs = tl.cdiv(rows, BLOCK_R * ROW_TILES) * K_BLOCKS
    program, group = _program_coordinates(programs, GROUPS, INTERLEAVE_GROUPS)
    first_row = (program // K_BLOCKS) * (BLOCK_R * ROW_TILES)
    col = (program % K_BLOCKS) * BLOCK_K + tl.arange(0, BLOCK_K)
    a0, a1, a2, a3, a4, a5, b0, b1, b2, b3 = _load_coefficients(
        numerator_ptr + group * NUMERATOR_STRIDE, denominator_ptr + group * DENOMINATOR_STRIDE
    )
    s0 = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    s1 = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    s3 = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    s4 = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    s5 = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    t1 = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    t2 = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    t3 = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    t4 = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    if PREFETCH:  # software pipelining: the next row tile's loads are in flight while this one is computed
        offsets, mask = _tile(first_row + tl.arange(0, BLOCK_R), col, rows, WIDTH, GROUPS, group, WIDE_OFFSETS)
        x_next = tl.load(x_ptr + offsets, mask=mask, other=0.0)
        grad_y_next = tl.load(grad_y_ptr + offsets, mask=mask, other=0.0)
    for step in range(ROW_TILES):
        row = first_row + step * BLOCK_R + tl.arange(0, BLOCK_R)
        offsets, mask = _tile(row, col, rows, WIDTH, GROUPS, group, WIDE_OFFSETS)
        if PREFETCH:
            x = x_next.to(tl.float32)
            grad_y = grad_y_next.to(tl.float32)
            next_offsets, next_mask = _tile(row + BLOCK_R, col, rows, WIDTH, GROUPS, group, WIDE_OFFSETS)
            next_mask = next_mask & (step + 1 < ROW_TILES)
            x_next = tl.load(x_ptr + next_offsets, mask=next_mask, other=0.0)
            grad_y_next = tl.load(grad_y_ptr + next_offsets, mask=next_mask, other=0.0)
        elif EVEN:
            x = tl.load(x_ptr + offsets).to(tl.float32)
            grad_y = tl.load(grad_y_ptr + offsets).to(tl.float32)
        else:
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            grad_y = tl.load(grad_y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        ax = tl.abs(x)
        sign_x = tl.where(x > 0.0, 1.0, tl.where(x < 0.0, -1.0, 0.0))
        p = ((((a5 * x + a4) * x + a3) * x + a2) * x + a1) * x + a0
        dp = (((5.0 * a5 * x + 4.0 * a4) * x + 3.0 * a3) * x + 2.0 * a2) * x + a1
        q = 1.0 + ax * (b0 + ax * (b1 + ax * (b2 + ax * b3)))
        dq = sign_x * (b0 + ax * (2.0 * b1 + ax * (3.0 * b2 + ax * 4.0 * b3)))
        inv_q = 1.0 / q
        y = p * inv_q
        grad_x = (grad_y * (dp - y * dq) * inv_q).to(grad_x_ptr.dtype.element_ty)
        if EVEN:
            tl.store(grad_x_ptr + offsets, grad_x)
        else:
            tl.store(grad_x_ptr + offsets, grad_x, mask=mask)
        grad_p = grad_y * inv_q  # dL/dP; dL/da_j = sum grad_p x^j
        term = grad_p
        s0 += term
        term *= x
        s1 += term
        term *= x
        s2 += term
        term *= x
        s3 += term
        term *= x
        s4 += term
        term *= x
        s5 += term
        term = -grad_p * y * ax  # dL/dQ |x|; dL/d|b_k| = sum dL/dQ |x|^(k+1)
        t1 += term
        term *= ax
        t2 += term
        term *= ax
        t3 += term
        term *= ax
        t4 += term
    base = partial_ptr + (program.to(tl.int64) * GROUPS + group) * 10
    tl.store(base + 0, tl.sum(s0))
    tl.store(base + 1, tl.sum(s1))
    tl.store(base + 2, tl.sum(s2))
    tl.store(base + 3, tl.sum(s3))
    tl.store(base + 4, tl.sum(s4))
    tl.store(base + 5, tl.sum(s5))
    tl.store(base + 6, tl.sum(t1))
    tl.store(base + 7, tl.sum(t2))
    tl.store(base + 8, tl.sum(t3))
    tl.store(base + 9, tl.sum(t4))


@triton.jit
def _coefficient_gradient_kernel(
    partial_ptr,
    grad_numerator_ptr,
    grad_denominator_ptr,
    denominator_ptr,
    programs,
    GROUPS: tl.constexpr,
    NUMERATOR_SETS: tl.constexpr,
    DENOMINATOR_SETS: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Program ``i`` sums the partials of numerator set ``i`` (``i < numerator_sets``) or denominator set
    ``i - numerator_sets`` over every program and every group of the set, in a fixed order; denominators get
    ``d|b|/db`` (+1 at 0)."""
    index = tl.program_id(0)
    is_denominator = (index >= NUMERATOR_SETS).to(tl.int32)
    set_index = index - is_denominator * NUMERATOR_SETS
    sets = NUMERATOR_SETS + is_denominator * (DENOMINATOR_SETS - NUMERATOR_SETS)
    terms = 6 - 2 * is_denominator
    groups_per_set = GROUPS // sets
    term = tl.arange(0, 8)
    term_mask = term < terms
    total = tl.zeros((BLOCK_P, 8), dtype=tl.float32)
    for group in range(set_index * groups_per_set, (set_index + 1) * groups_per_set):
        for start in range(0, programs, BLOCK_P):
            program = start + tl.arange(0, BLOCK_P)
            offsets = (program[:, None].to(tl.int64) * GROUPS + group) * 10 + 6 * is_denominator + term[None, :]
            mask = (program[:, None] < programs) & term_mask[None, :]
            total += tl.load(partial_ptr + offsets, mask=mask, other=0.0)
    gradient = tl.sum(total, axis=0)
    if is_denominator == 1:
        coefficient = tl.load(denominator_ptr + set_index * 4 + term, mask=term_mask, other=0.0)
        signed = tl.where(coefficient < 0.0, -gradient, gradient)
        tl.store(grad_denominator_ptr + set_index * 4 + term, signed.to(grad_denominator_ptr.dtype.element_ty), mask=term_mask)
    else:
        tl.store(grad_numerator_ptr + set_index * 6 + term, gradient.to(grad_numerator_ptr.dtype.element_ty), mask=term_mask)


class LaunchPlan(NamedTuple):
    """Everything the launches need for one input geometry, coefficient sharing and kernel configuration: the
    grids and the compile-time arguments, built once (the per-call host work is one cached lookup)."""

    forward_grid: tuple[int]
    forward_meta: dict[str, int | bool]
    backward_grid: tuple[int]
    backward_meta: dict[str, int | bool]
    partials_shape: tuple[int, int, int]
    backward_programs: int
    finish_grid: tuple[int]
    finish_meta: dict[str, int]


def _next_power_of_2(value: int) -> int:
    return 1 << max(0, value - 1).bit_length()


def _ceil_div(value: int, divisor: int) -> int:
    return -(-value // divisor)


def widest_block(width: int) -> int:
    """``BLOCK_K``: the power of two (at least a warp's 32 lanes, at most ``MAX_BLOCK_K``) that pads ``width``
    least, the larger on ties: width 384 (ViT-B hidden / 8 groups) gets 128, three unmasked column tiles,
    instead of 512 with a quarter of the lanes masked off."""
    widest = min(_next_power_of_2(width), MAX_BLOCK_K)
    narrowest = min(32, widest)
    candidates = [narrowest << shift for shift in range((widest // narrowest).bit_length())]
    return min(candidates, key=lambda size: (_ceil_div(width, size) * size, -size))


@functools.lru_cache(maxsize=512)
def launch_plan(
    rows: int, groups: int, width: int, numerator_sets: int, denominator_sets: int, config: tuple[int, ...]
) -> LaunchPlan:
    """Tile sizes, grids and compile-time arguments for a ``(rows, groups, width)`` input with ``numerator_sets``
    / ``denominator_sets`` coefficient sets (1 or ``groups``); ``config`` is a ``KernelConfig`` as a tuple.

    Only ``rows`` is a run-time kernel argument (the grids depend on it, and a new batch size must not compile
    new kernels); the rest are ``tl.constexpr``: fewer arguments for Triton's launcher to bind and specialise
    per call, and masks the compiler can drop.
    """
    block_k, forward_tile, backward_tile, row_tiles, num_warps, interleave_groups, prefetch = config
    block_k = block_k or widest_block(width)
    k_blocks = _ceil_div(width, block_k)
    forward_block_r = max(1, min(_next_power_of_2(rows), forward_tile // block_k))
    backward_block_r = max(1, min(_next_power_of_2(rows), backward_tile // block_k))
    row_tiles = max(1, min(row_tiles, _ceil_div(rows, backward_block_r)))
    backward_programs = _ceil_div(rows, backward_block_r * row_tiles) * k_blocks
    even_width = width % block_k == 0
    # element offsets of every lane, masked overhang rows included (prefetch reaches one row tile further)
    overhang_rows = 2 * max(forward_block_r, backward_block_r * row_tiles)
    wide_offsets = (rows + overhang_rows) * groups * width >= 2**31
    shared = {
        "GROUPS": groups, "WIDTH": width, "K_BLOCKS": k_blocks, "BLOCK_K": block_k,
        "NUMERATOR_STRIDE": 0 if numerator_sets == 1 else NUMERATOR_TERMS,
        "DENOMINATOR_STRIDE": 0 if denominator_sets == 1 else DENOMINATOR_TERMS,
        "INTERLEAVE_GROUPS": bool(interleave_groups), "WIDE_OFFSETS": wide_offsets, "num_warps": num_warps,
    }
    return LaunchPlan(
        forward_grid=(_ceil_div(rows, forward_block_r) * k_blocks * groups,),
        forward_meta={**shared, "BLOCK_R": forward_block_r, "EVEN": even_width and rows % forward_block_r == 0},
        backward_grid=(backward_programs * groups,),
        backward_meta={
            **shared, "BLOCK_R": backward_block_r, "ROW_TILES": row_tiles, "PREFETCH": bool(prefetch),
            "EVEN": even_width and rows % (backward_block_r * row_tiles) == 0,
        },
        partials_shape=(backward_programs, groups, PARTIALS_PER_GROUP),
        backward_programs=backward_programs,
        finish_grid=(numerator_sets + denominator_sets,),
        finish_meta={
            "GROUPS": groups, "NUMERATOR_SETS": numerator_sets, "DENOMINATOR_SETS": denominator_sets,
            "BLOCK_P": FINISH_BLOCK,
        },
    )


def group_rational_forward(
    x3: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, config: tuple[int, ...],
    grouped: tuple[int, int, int] | None = None, traced: bool = False,
) -> torch.Tensor:
    """``y = P(x) / Q(x)`` for contiguous ``x3`` of shape ``(rows, groups, width)`` (or any shape whose memory is
    that, given as ``grouped``: ``y`` then has ``x3``'s shape, with no view in between); contiguous coefficient
    sets ``(1 or groups, k)``. ``traced``: launch through ``torch.library.wrap_triton`` (the body of a
    ``triton_op``: a trace records the launch as a kernel node; outside a trace it launches directly)."""
    rows, groups, width = grouped or x3.shape
    y = torch.empty_like(x3)
    if rows and width:
        plan = launch_plan(rows, groups, width, numerator.shape[0], denominator.shape[0], config)
        kernel = wrap_triton(_group_rational_forward_kernel) if traced else _group_rational_forward_kernel
        kernel[plan.forward_grid](x3, y, numerator, denominator, rows, **plan.forward_meta)
    return y


def group_rational_backward(
    x3: torch.Tensor,
    grad_y: torch.Tensor,
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    config: tuple[int, ...],
    grouped: tuple[int, int, int] | None = None,
    traced: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_numerator, grad_denominator)`` for contiguous inputs (``grouped`` and ``traced`` as in
    :func:`group_rational_forward`); coefficient gradients have the coefficients' shapes."""
    rows, groups, width = grouped or x3.shape
    grad_x = torch.empty_like(x3)
    if not (rows and width):
        return grad_x, torch.zeros_like(numerator), torch.zeros_like(denominator)
    plan = launch_plan(rows, groups, width, numerator.shape[0], denominator.shape[0], config)
    grad_numerator, grad_denominator = torch.empty_like(numerator), torch.empty_like(denominator)
    partials = x3.new_empty(plan.partials_shape, dtype=torch.float32)
    backward = wrap_triton(_group_rational_backward_kernel) if traced else _group_rational_backward_kernel
    finish = wrap_triton(_coefficient_gradient_kernel) if traced else _coefficient_gradient_kernel
    backward[plan.backward_grid](x3, grad_y, grad_x, partials, numerator, denominator, rows, **plan.backward_meta)
    finish[plan.finish_grid](
        partials, grad_numerator, grad_denominator, denominator, plan.backward_programs, **plan.finish_meta
    )
    return grad_x, grad_numerator, grad_denominator
