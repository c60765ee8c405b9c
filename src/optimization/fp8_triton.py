"""Per-row FP8 quantization of activations in one Triton pass, for the FP8 linear layers' ``torch._scaled_mm``.

An FP8 linear multiplies float8_e4m3fn activations with one float32 scale per row (token).  In PyTorch ops the
quantization is five passes over the activation (abs, amax, scale, clamp, cast): at 1080p, 73,440 tokens of
width 2560-10240, it cost more than the FP8 GEMM saved, so the fp8 mode ran slower than bf16.  Here each
program loads a block of whole rows once, takes each row's absolute maximum, and writes the scaled, clamped,
rounded values and the row's scale: one read of the activation, one write of half its size.

Numerics: ``scale = max(amax, 1e-12) / 448`` in float32 as :func:`.linear_quantization.quantize_fp8`; the values
are ``x / scale`` computed in float32 and rounded once to e4m3 (the PyTorch path multiplies in the
activation's own dtype first, a rounding this path skips).

This module imports Triton; :mod:`.linear_quantization` imports it only when it is about to use the kernel.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FP8_MAX = 448.0
AMAX_FLOOR = 1e-12
# Elements of one tile: whole rows (width rounded up to a power of two), a few rows per program.
TILE_ELEMENTS = 16384
WARPS = 8


@triton.jit
def _quantize_rows_kernel(x_ptr, values_ptr, scale_ptr, rows, width, x_row_stride, amax_floor,
                          BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    block = tl.program_id(0)
    row = block * BLOCK_R + tl.arange(0, BLOCK_R)
    column = tl.arange(0, BLOCK_W)
    inside = (row < rows)[:, None] & (column < width)[None, :]
    row64 = row.to(tl.int64)[:, None]
    x = tl.load(x_ptr + row64 * x_row_stride + column[None, :], mask=inside, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    scale = tl.maximum(amax, amax_floor) / 448.0
    scaled = tl.clamp(x / scale[:, None], -448.0, 448.0)
    tl.store(values_ptr + row64 * width + column[None, :], scaled.to(tl.float8e4nv), mask=inside)
    tl.store(scale_ptr + row, scale, mask=row < rows)


def quantize_rows_supported(x: torch.Tensor) -> bool:
    """Whether :func:`quantize_rows` takes ``x``: a 2-D tensor of a supported dtype with unit column stride
    and rows short enough to sit in one tile."""
    return (x.dim() == 2 and x.dtype in SUPPORTED_DTYPES and x.stride(1) == 1 and x.shape[1] > 0
            and triton.next_power_of_2(x.shape[1]) <= TILE_ELEMENTS)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8_e4m3fn values (rows, width), contiguous, and float32 scales (rows, 1) with ``x ≈ values·scale``,
    one scale per row (see the module docstring).  CPU tensors run under Triton's interpreter (tests)."""
    rows, width = x.shape
    values = torch.empty((rows, width), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        block_w = triton.next_power_of_2(width)
        block_r = max(1, TILE_ELEMENTS // block_w)
        with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
            _quantize_rows_kernel[(triton.cdiv(rows, block_r),)](
                x, values, scale, rows, width, x.stride(0), AMAX_FLOOR, BLOCK_R=block_r, BLOCK_W=block_w,
                num_warps=WARPS,
            )
    return values, scale

