"""Triton kernels for the group-rational (GR-KAN) activation, forward and backward.

Only imported by :mod:`lightning_act.nn.group_rational` when Triton is importable, so the package works
without Triton. Under ``TRITON_INTERPRET=1`` (set before Triton is first imported) the same kernels run on
CPU tensors, which is how they are tested without a GPU.

Layout: the input is viewed as ``(rows, groups, width)`` (contiguous), so every group is a strided
``rows x width`` matrix (channels-last ``(..., C)``: rows = prod(leading dims), width = C / groups;
``(B, C, H, W)``: rows = B, width = C / groups * H * W). Program ``(tile, group)`` handles one
``BLOCK_R x BLOCK_K`` tile of one group, so its 10 coefficients are scalars held in registers.

Backward (FlashKAT, arXiv 2505.13813, explains why this matters): each program reduces its tile's
contributions to the 6 numerator and 4 denominator gradients with ``tl.sum`` in registers and writes one
partial per coefficient per tile to a ``(tiles, groups, 10)`` buffer, summed afterwards by ``torch.sum``.
No atomics at all, so the coefficient gradients are deterministic. Edge tiles are masked; masked lanes load
``x = 0, grad_y = 0`` and contribute exactly zero.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lightning_act.errors import LightningActError

TILE_ELEMENTS = 4096
MAX_BLOCK_K = 1024
PARTIALS_PER_GROUP = 10


@triton.jit
def _load_coefficients(numerator_ptr, denominator_ptr, group):
    a0 = tl.load(numerator_ptr + group * 6 + 0)
    a1 = tl.load(numerator_ptr + group * 6 + 1)
    a2 = tl.load(numerator_ptr + group * 6 + 2)
    a3 = tl.load(numerator_ptr + group * 6 + 3)
    a4 = tl.load(numerator_ptr + group * 6 + 4)
    a5 = tl.load(numerator_ptr + group * 6 + 5)
    b0 = tl.abs(tl.load(denominator_ptr + group * 4 + 0))
    b1 = tl.abs(tl.load(denominator_ptr + group * 4 + 1))
    b2 = tl.abs(tl.load(denominator_ptr + group * 4 + 2))
    b3 = tl.abs(tl.load(denominator_ptr + group * 4 + 3))
    return a0, a1, a2, a3, a4, a5, b0, b1, b2, b3


@triton.jit
def _tile_offsets(rows, width, row_stride, k_blocks, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    tile = tl.program_id(0)
    group = tl.program_id(1)
    row = (tile // k_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    col = (tile % k_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (row[:, None] < rows) & (col[None, :] < width)
    offsets = row[:, None].to(tl.int64) * row_stride + group.to(tl.int64) * width + col[None, :]
    return tile, group, offsets, mask


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
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    _, group, offsets, mask = _tile_offsets(rows, width, row_stride, k_blocks, BLOCK_R, BLOCK_K)
    a0, a1, a2, a3, a4, a5, b0, b1, b2, b3 = _load_coefficients(numerator_ptr, denominator_ptr, group)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    ax = tl.abs(x)
    p = ((((a5 * x + a4) * x + a3) * x + a2) * x + a1) * x + a0
    q = 1.0 + ax * (b0 + ax * (b1 + ax * (b2 + ax * b3)))
    tl.store(y_ptr + offsets, (p / q).to(y_ptr.dtype.element_ty), mask=mask)


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
    groups,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tile, group, offsets, mask = _tile_offsets(rows, width, row_stride, k_blocks, BLOCK_R, BLOCK_K)
    a0, a1, a2, a3, a4, a5, b0, b1, b2, b3 = _load_coefficients(numerator_ptr, denominator_ptr, group)
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
    tl.store(grad_x_ptr + offsets, (grad_y * (dp - y * dq) * inv_q).to(grad_x_ptr.dtype.element_ty), mask=mask)

    grad_p = grad_y * inv_q  # dL/dP; dL/da_j = sum grad_p * x^j
    grad_q = -grad_p * y  # dL/dQ; dL/d|b_k| = sum grad_q * |x|^(k+1)
    x2 = x * x
    ax2 = ax * ax
    base = partial_ptr + (tile.to(tl.int64) * groups + group) * 10
    tl.store(base + 0, tl.sum(grad_p))
    tl.store(base + 1, tl.sum(grad_p * x))
    tl.store(base + 2, tl.sum(grad_p * x2))
    tl.store(base + 3, tl.sum(grad_p * x2 * x))
    tl.store(base + 4, tl.sum(grad_p * x2 * x2))
    tl.store(base + 5, tl.sum(grad_p * x2 * x2 * x))
    tl.store(base + 6, tl.sum(grad_q * ax))
    tl.store(base + 7, tl.sum(grad_q * ax2))
    tl.store(base + 8, tl.sum(grad_q * ax2 * ax))
    tl.store(base + 9, tl.sum(grad_q * ax2 * ax2))


def tile_shape(rows: int, width: int) -> tuple[int, int]:
    """Default ``(BLOCK_R, BLOCK_K)``: about ``TILE_ELEMENTS`` elements, contiguous along ``width``.

    ``BLOCK_K`` is the power of two (at least a warp's 32 lanes, at most ``MAX_BLOCK_K``) that pads ``width``
    least, the larger on ties: width 384 (ViT-B hidden / 8 groups) gets 128, three unmasked column tiles,
    instead of 512 with a quarter of the lanes masked off.
    """
    widest = min(triton.next_power_of_2(width), MAX_BLOCK_K)
    narrowest = min(32, widest)
    candidates = [narrowest << shift for shift in range((widest // narrowest).bit_length())]
    block_k = min(candidates, key=lambda size: (triton.cdiv(width, size) * size, -size))
    block_r = max(1, min(triton.next_power_of_2(rows), TILE_ELEMENTS // block_k))
    return block_r, block_k


def _launch_geometry(x3: torch.Tensor, tile: tuple[int, int] | None) -> tuple[int, int, int, int, int, int, int]:
    """``(rows, groups, width, BLOCK_R, BLOCK_K, k_blocks, tiles)`` for a ``(rows, groups, width)`` input."""
    rows, groups, width = x3.shape
    block_r, block_k = tile if tile is not None else tile_shape(rows, width)
    k_blocks = triton.cdiv(width, block_k)
    return rows, groups, width, block_r, block_k, k_blocks, triton.cdiv(rows, block_r) * k_blocks


class GroupRationalFunction(torch.autograd.Function):
    """Autograd wrapper: ``x3`` is ``(rows, groups, width)`` contiguous, coefficients ``(groups, 6)``, ``(groups, 4)``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x3: torch.Tensor,
        numerator: torch.Tensor,
        denominator: torch.Tensor,
        tile: tuple[int, int] | None,
    ) -> torch.Tensor:
        numerator32 = numerator.detach().to(torch.float32).contiguous()
        denominator32 = denominator.detach().to(torch.float32).contiguous()
        rows, groups, width, block_r, block_k, k_blocks, tiles = _launch_geometry(x3, tile)
        y = torch.empty_like(x3)
        if tiles:
            _group_rational_forward_kernel[(tiles, groups)](
                x3, y, numerator32, denominator32, rows, width, groups * width, k_blocks,
                BLOCK_R=block_r, BLOCK_K=block_k,
            )
        ctx.save_for_backward(x3, numerator, denominator)
        ctx.tile = tile
        return y

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        x3, numerator, denominator = ctx.saved_tensors
        numerator32 = numerator.detach().to(torch.float32).contiguous()
        denominator32 = denominator.detach().to(torch.float32).contiguous()
        grad_y = grad_y.contiguous()
        rows, groups, width, block_r, block_k, k_blocks, tiles = _launch_geometry(x3, ctx.tile)
        grad_x = torch.empty_like(x3)
        partials = torch.empty((tiles, groups, PARTIALS_PER_GROUP), device=x3.device, dtype=torch.float32)
        if tiles:
            _group_rational_backward_kernel[(tiles, groups)](
                x3, grad_y, grad_x, partials, numerator32, denominator32, rows, width, groups * width, k_blocks,
                groups, BLOCK_R=block_r, BLOCK_K=block_k,
            )
        sums = partials.sum(dim=0)
        grad_numerator = sums[:, :6].to(numerator.dtype)
        abs_derivative = torch.where(denominator32 >= 0, 1.0, -1.0)  # d|b|/db, +1 at b = 0 (as the reference)
        grad_denominator = (sums[:, 6:] * abs_derivative).to(denominator.dtype)
        return grad_x, grad_numerator, grad_denominator, None


def group_rational_triton(
    x3: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, tile: tuple[int, int] | None = None
) -> torch.Tensor:
    """Apply the rational to ``x3`` of shape ``(rows, groups, width)``; ``tile`` overrides ``(BLOCK_R, BLOCK_K)``."""
    if tile is not None and any(size < 1 or size & (size - 1) for size in tile):
        raise LightningActError(f"Triton tile {tile} is not two powers of two; pass e.g. tile=(16, 64) or tile=None")
    return GroupRationalFunction.apply(x3.contiguous(), numerator, denominator, tile)
