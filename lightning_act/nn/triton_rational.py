"""Triton kernels for the group-rational (GR-KAN) activation: forward, backward, coefficient-gradient finish.

Only imported by :mod:`lightning_act.nn.group_rational` when a Triton launch is needed, so the package works
without Triton. Under ``TRITON_INTERPRET=1`` (set before Triton is first imported) the same kernels run on
CPU tensors, which is how they are tested without a GPU. Design and measurements: ``docs/kat_kernel.md``.

Layout: the input is viewed as ``(rows, groups, width)`` (contiguous), so every group is a strided
``rows x width`` matrix (channels-last ``(..., C)``: rows = prod(leading dims), width = C / groups;
``(B, C, H, W)``: rows = B, width = C / groups * H * W). Each program handles ``BLOCK_R x BLOCK_K`` tiles of
one group, so its 10 coefficients are scalars held in registers; the 1-D grid numbers programs group-fastest
(``INTERLEAVE_GROUPS``) so that the programs in flight sweep memory in order.

Backward (FlashKAT, arXiv 2505.13813, explains why the coefficient reduction matters): each program walks
``ROW_TILES`` row tiles, accumulating the 10 coefficient-gradient terms elementwise in registers, and reduces
them once at the end (one cross-thread reduction per coefficient per program instead of per tile), writing one
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

PARTIALS_PER_GROUP = 10
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
def _tile(row, col, rows, width, row_stride, group):
    mask = (row[:, None] < rows) & (col[None, :] < width)
    offsets = row[:, None].to(tl.int64) * row_stride + group.to(tl.int64) * width + col[None, :]
    return offsets, mask


@triton.jit
def _group_rational_forward_kernel(
    x_ptr,
    y_ptr,
    numerator_ptr,
    denominator_ptr,
    rows,
    width,
    row_stride,
    k_blocks,
    tiles,
    groups,
    numerator_stride,
    denominator_stride,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN: tl.constexpr,
    INTERLEAVE_GROUPS: tl.constexpr,
):
    tile, group = _program_coordinates(tiles, groups, INTERLEAVE_GROUPS)
    row = (tile // k_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    col = (tile % k_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
    offsets, mask = _tile(row, col, rows, width, row_stride, group)
    a0, a1, a2, a3, a4, a5, b0, b1, b2, b3 = _load_coefficients(
        numerator_ptr + group * numerator_stride, denominator_ptr + group * denominator_stride
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
    width,
    row_stride,
    k_blocks,
    programs,
    groups,
    numerator_stride,
    denominator_stride,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ROW_TILES: tl.constexpr,
    EVEN: tl.constexpr,
    INTERLEAVE_GROUPS: tl.constexpr,
):
    program, group = _program_coordinates(programs, groups, INTERLEAVE_GROUPS)
    first_row = (program // k_blocks) * (BLOCK_R * ROW_TILES)
    col = (program % k_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
    a0, a1, a2, a3, a4, a5, b0, b1, b2, b3 = _load_coefficients(
        numerator_ptr + group * numerator_stride, denominator_ptr + group * denominator_stride
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
    for step in range(ROW_TILES):
        row = first_row + step * BLOCK_R + tl.arange(0, BLOCK_R)
        offsets, mask = _tile(row, col, rows, width, row_stride, group)
        if EVEN:
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
    base = partial_ptr + (program.to(tl.int64) * groups + group) * 10
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
    groups,
    numerator_sets,
    denominator_sets,
    BLOCK_P: tl.constexpr,
):
    """Program ``i`` sums the partials of numerator set ``i`` (``i < numerator_sets``) or denominator set
    ``i - numerator_sets`` over every program and every group of the set, in a fixed order; denominators get
    ``d|b|/db`` (+1 at 0)."""
    index = tl.program_id(0)
    is_denominator = (index >= numerator_sets).to(tl.int32)
    set_index = index - is_denominator * numerator_sets
    sets = numerator_sets + is_denominator * (denominator_sets - numerator_sets)
    terms = 6 - 2 * is_denominator
    groups_per_set = groups // sets
    term = tl.arange(0, 8)
    term_mask = term < terms
    total = tl.zeros((BLOCK_P, 8), dtype=tl.float32)
    for group in range(set_index * groups_per_set, (set_index + 1) * groups_per_set):
        for start in range(0, programs, BLOCK_P):
            program = start + tl.arange(0, BLOCK_P)
            offsets = (program[:, None].to(tl.int64) * groups + group) * 10 + 6 * is_denominator + term[None, :]
            mask = (program[:, None] < programs) & term_mask[None, :]
            total += tl.load(partial_ptr + offsets, mask=mask, other=0.0)
    gradient = tl.sum(total, axis=0)
    coefficient = tl.load(denominator_ptr + set_index * 4 + term, mask=term_mask & (is_denominator == 1), other=0.0)
    if is_denominator == 1:
        signed = tl.where(coefficient < 0.0, -gradient, gradient)
        tl.store(grad_denominator_ptr + set_index * 4 + term, signed.to(grad_denominator_ptr.dtype.element_ty), mask=term_mask)
    else:
        tl.store(grad_numerator_ptr + set_index * 6 + term, gradient.to(grad_numerator_ptr.dtype.element_ty), mask=term_mask)


class LaunchPlan(NamedTuple):
    """Everything a forward and backward launch needs for one input geometry and kernel configuration."""

    block_k: int
    k_blocks: int
    forward_block_r: int
    forward_tiles: int
    forward_even: bool
    backward_block_r: int
    row_tiles: int
    backward_programs: int
    backward_even: bool
    num_warps: int
    interleave_groups: bool


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
def launch_plan(rows: int, groups: int, width: int, config: tuple[int, ...]) -> LaunchPlan:
    """Tile sizes and grids for a ``(rows, groups, width)`` input; ``config`` is ``KernelConfig.as_tuple()``.

    Cached: the per-call host work is one dictionary lookup (Triton's ``cdiv`` / ``next_power_of_2`` are
    JIT functions costing microseconds each when called from Python).
    """
    block_k, forward_tile, backward_tile, row_tiles, num_warps, interleave_groups = config
    block_k = block_k or widest_block(width)
    k_blocks = _ceil_div(width, block_k)
    forward_block_r = max(1, min(_next_power_of_2(rows), forward_tile // block_k))
    backward_block_r = max(1, min(_next_power_of_2(rows), backward_tile // block_k))
    row_tiles = max(1, min(row_tiles, _ceil_div(rows, backward_block_r)))
    row_blocks = _ceil_div(rows, backward_block_r * row_tiles)
    even_width = width % block_k == 0
    return LaunchPlan(
        block_k=block_k,
        k_blocks=k_blocks,
        forward_block_r=forward_block_r,
        forward_tiles=_ceil_div(rows, forward_block_r) * k_blocks,
        forward_even=even_width and rows % forward_block_r == 0,
        backward_block_r=backward_block_r,
        row_tiles=row_tiles,
        backward_programs=row_blocks * k_blocks,
        backward_even=even_width and rows % (backward_block_r * row_tiles) == 0,
        num_warps=num_warps,
        interleave_groups=bool(interleave_groups),
    )


def _set_stride(coefficients: torch.Tensor) -> int:
    """Elements between the coefficient sets of consecutive groups: 0 for one shared set."""
    return coefficients.shape[1] if coefficients.shape[0] > 1 else 0


def group_rational_forward(
    x3: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, config: tuple[int, ...]
) -> torch.Tensor:
    """``y = P(x) / Q(x)`` for contiguous ``x3`` of shape ``(rows, groups, width)``; coefficient sets ``(1 or groups, k)``."""
    rows, groups, width = x3.shape
    plan = launch_plan(rows, groups, width, config)
    y = torch.empty_like(x3)
    if rows and width:
        _group_rational_forward_kernel[(plan.forward_tiles * groups,)](
            x3, y, numerator, denominator, rows, width, groups * width, plan.k_blocks, plan.forward_tiles, groups,
            _set_stride(numerator), _set_stride(denominator),
            BLOCK_R=plan.forward_block_r, BLOCK_K=plan.block_k, EVEN=plan.forward_even,
            INTERLEAVE_GROUPS=plan.interleave_groups, num_warps=plan.num_warps,
        )
    return y


def group_rational_backward(
    x3: torch.Tensor,
    grad_y: torch.Tensor,
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    config: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_numerator, grad_denominator)``; coefficient gradients have the coefficients' shapes."""
    rows, groups, width = x3.shape
    plan = launch_plan(rows, groups, width, config)
    grad_x = torch.empty_like(x3)
    numerator_sets, denominator_sets = numerator.shape[0], denominator.shape[0]
    launch = bool(rows and width)
    allocate = torch.empty_like if launch else torch.zeros_like  # the finish kernel writes every entry
    grad_numerator, grad_denominator = allocate(numerator), allocate(denominator)
    if launch:
        partials = torch.empty((plan.backward_programs, groups, PARTIALS_PER_GROUP), device=x3.device, dtype=torch.float32)
        _group_rational_backward_kernel[(plan.backward_programs * groups,)](
            x3, grad_y, grad_x, partials, numerator, denominator, rows, width, groups * width, plan.k_blocks,
            plan.backward_programs, groups, _set_stride(numerator), _set_stride(denominator),
            BLOCK_R=plan.backward_block_r, BLOCK_K=plan.block_k, ROW_TILES=plan.row_tiles, EVEN=plan.backward_even,
            INTERLEAVE_GROUPS=plan.interleave_groups, num_warps=plan.num_warps,
        )
        _coefficient_gradient_kernel[(numerator_sets + denominator_sets,)](
            partials, grad_numerator, grad_denominator, denominator, plan.backward_programs, groups, numerator_sets, denominator_sets,
            BLOCK_P=FINISH_BLOCK,
        )
    return grad_x, grad_numerator, grad_denominator
