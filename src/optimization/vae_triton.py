"""Hand-written Triton kernels for the optimized VAE: per-frame GroupNorm(+SiLU), residual sum, and three copies.

They work on the optimized path's channels-last layout (every frame of a (B, C, T, H, W) tensor a contiguous
(H·W, C) matrix, frames at any strides, so ``out`` can be the new frames of a padded convolution input) and
take sizes and strides as arguments, so they compile once per dtype and channel count and one launch covers
all frames of a piece.  :func:`normalize_into` and :func:`add_residual` compute what their namesakes in
vae_optimizer compute, in float32 up to summation order, rounded once to the output's dtype (the GroupNorm can
also store its last frames a second time, a convolution's look-back); :func:`copy_rows`, :func:`copy_pixels`
and :func:`store_e4m3_rows` are copies between differently laid out tensors that PyTorch's strided kernels
run slowly.  This module imports Triton; vae_optimizer imports it only when it is about to use the kernels.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
import triton
import triton.language as tl

from .vae_fp8 import FP8_DTYPE, FP8_MAX

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# The GroupNorm may also write e4m3, the input of a convolution quantized by vae_fp8.
NORM_OUT_DTYPES = SUPPORTED_DTYPES + (FP8_DTYPE,)
# Elements of one GroupNorm tile ([pixels, all channels]): a few thousand, 32 values per thread with 4 warps,
# held in registers between the statistics' two passes.
NORM_TILE_ELEMENTS = 16384
NORM_WARPS = 4
# Tile statistics the combining step reads per iteration.
COMBINE_BLOCK = 1024
# Elements of one residual-sum tile ([pixels, all channels]).
RESIDUAL_TILE_ELEMENTS = 4096
RESIDUAL_WARPS = 4
# Elements of one block of an image row in the row copy.
COPY_BLOCK = 4096
COPY_WARPS = 4


@triton.jit
def _tile_stats_kernel(
    x_ptr, shift_ptr, mean_ptr, m2_ptr, pixels, frames_per_batch, x_batch_stride, x_frame_stride,
    CHANNELS: tl.constexpr, GROUPS: tl.constexpr, BLOCK_P: tl.constexpr, HAS_SHIFT: tl.constexpr,
):
    """Mean and M2 (sum of squared deviations) of every group of one [BLOCK_P, CHANNELS] tile of one frame."""
    tile, frame = tl.program_id(0), tl.program_id(1)
    tiles = tl.num_programs(0)
    # int64 before multiplying: a few frames of a 1080p activation exceed 2**31 elements.
    batch, time = (frame // frames_per_batch).to(tl.int64), (frame % frames_per_batch).to(tl.int64)
    base = batch * x_batch_stride + time * x_frame_stride + tile.to(tl.int64) * (BLOCK_P * CHANNELS)
    rows, columns = tl.arange(0, BLOCK_P), tl.arange(0, CHANNELS)
    count = tl.minimum(pixels - tile * BLOCK_P, BLOCK_P)  # the last tile may be partly outside the frame
    valid = (rows < count)[:, None]
    values = tl.load(x_ptr + base + rows[:, None] * CHANNELS + columns[None, :], mask=valid, other=0.0)
    values = values.to(tl.float32)
    if HAS_SHIFT:
        values += tl.load(shift_ptr + columns).to(tl.float32)[None, :]
    values = tl.where(valid, values, 0.0)
    # Two passes over the registers per channel (mean, then squared deviations from it): no cancellation
    # however large the mean is against the spread.
    channel_mean = tl.sum(values, axis=0) / count
    deviation = tl.where(valid, values - channel_mean[None, :], 0.0)
    channel_m2 = tl.sum(deviation * deviation, axis=0)
    # Channels into groups by the law of total variance (every channel holds ``count`` values of the tile).
    channel_mean = tl.reshape(channel_mean, (GROUPS, CHANNELS // GROUPS))
    group_mean = tl.sum(channel_mean, axis=1) / (CHANNELS // GROUPS)
    spread = channel_mean - group_mean[:, None]
    group_m2 = tl.sum(tl.reshape(channel_m2, (GROUPS, CHANNELS // GROUPS)), axis=1)
    group_m2 += count * tl.sum(spread * spread, axis=1)
    # Layout (frame, group, tile): the combining step reads each group's tiles contiguously.
    slots = (frame * GROUPS + tl.arange(0, GROUPS)).to(tl.int64) * tiles + tile
    tl.store(mean_ptr + slots, group_mean)
    tl.store(m2_ptr + slots, group_m2)


@triton.jit
def _combine_stats_kernel(
    tile_mean_ptr, tile_m2_ptr, mean_ptr, rstd_ptr, pixels, tiles, eps,
    GROUP_CHANNELS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK: tl.constexpr,
):
    """Mean and 1/sqrt(var + eps) of one (frame, group) from its tiles' statistics: the law of total
    variance, with the deviations taken from the final mean in a second pass (again no cancellation)."""
    row = tl.program_id(0)  # frame * groups + group
    first = tl.arange(0, BLOCK)
    # ``while`` rather than ``for ... in range(tiles)``: Triton 3.5's interpreter (the tests) cannot take a
    # runtime loop bound with numpy >= 2.4; compiled, both are the same loop.
    weighted = tl.zeros([BLOCK], dtype=tl.float32)
    start = 0
    while start < tiles:
        index = start + first
        inside = index < tiles
        count = tl.minimum(pixels - index * BLOCK_P, BLOCK_P).to(tl.float32)
        weighted += tl.where(inside, count * tl.load(tile_mean_ptr + row * tiles + index, mask=inside, other=0.0), 0.0)
        start += BLOCK
    mean = tl.sum(weighted, axis=0) / pixels
    m2 = tl.zeros([BLOCK], dtype=tl.float32)
    start = 0
    while start < tiles:
        index = start + first
        inside = index < tiles
        count = tl.minimum(pixels - index * BLOCK_P, BLOCK_P).to(tl.float32) * GROUP_CHANNELS
        offset = tl.load(tile_mean_ptr + row * tiles + index, mask=inside, other=0.0) - mean
        tile_m2 = tl.load(tile_m2_ptr + row * tiles + index, mask=inside, other=0.0)
        m2 += tl.where(inside, tile_m2 + count * offset * offset, 0.0)
        start += BLOCK
    variance = tl.sum(m2, axis=0) / (pixels * GROUP_CHANNELS)  # population variance, as F.group_norm
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, tl.rsqrt(variance + eps))


@triton.jit
def _frame_tile(pixels, frames_per_batch, CHANNELS: tl.constexpr, BLOCK_P: tl.constexpr):
    """The [BLOCK_P pixels, CHANNELS] tile of a pointwise kernel's program (grid: tiles, batch·frames):
    (frame index, batch, time, offset of the tile in its frame, channel lanes, pixel mask, offsets in the tile)."""
    tile, frame = tl.program_id(0), tl.program_id(1)
    # int64 before multiplying: a few frames of a 1080p activation exceed 2**31 elements.
    batch, time = (frame // frames_per_batch).to(tl.int64), (frame % frames_per_batch).to(tl.int64)
    offset = tile.to(tl.int64) * (BLOCK_P * CHANNELS)
    rows, columns = tl.arange(0, BLOCK_P), tl.arange(0, CHANNELS)
    valid = (rows < pixels - tile * BLOCK_P)[:, None]
    within = rows[:, None] * CHANNELS + columns[None, :]
    return frame, batch, time, offset, columns, valid, within


@triton.jit
def _normalize_kernel(
    x_ptr, shift_ptr, weight_ptr, bias_ptr, mean_ptr, rstd_ptr, out_ptr, pixels, frames_per_batch,
    x_batch_stride, x_frame_stride, out_batch_stride, out_frame_stride,
    tail_ptr, tail_start, tail_batch_stride, tail_frame_stride, out_scale_ptr,
    CHANNELS: tl.constexpr, GROUPS: tl.constexpr, BLOCK_P: tl.constexpr, HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr, HAS_TAIL: tl.constexpr, HAS_OUT_SCALE: tl.constexpr, SATURATE: tl.constexpr,
):
    """``(x + shift - mean) * rstd * weight + bias`` (then SiLU, then times ``out_scale``, then clamped to
    +-SATURATE when it is not 0) of one tile, stored in ``out``'s dtype, and for frames from ``tail_start`` on
    also in ``tail`` (a causal convolution's look-back for its next call)."""
    frame, batch, time, offset, columns, valid, within = _frame_tile(pixels, frames_per_batch, CHANNELS, BLOCK_P)
    x_base = batch * x_batch_stride + time * x_frame_stride + offset
    values = tl.load(x_ptr + x_base + within, mask=valid, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        values += tl.load(shift_ptr + columns).to(tl.float32)[None, :]
    group = frame * GROUPS + columns // (CHANNELS // GROUPS)
    mean = tl.load(mean_ptr + group)
    scale = tl.load(rstd_ptr + group) * tl.load(weight_ptr + columns).to(tl.float32)
    values = (values - mean[None, :]) * scale[None, :] + tl.load(bias_ptr + columns).to(tl.float32)[None, :]
    if SILU:
        values = values / (1.0 + tl.exp(-values))
    if HAS_OUT_SCALE:
        values = values * tl.load(out_scale_ptr + columns)[None, :]
    if SATURATE != 0:  # e4m3 has no infinity: out-of-range values would become NaN
        values = tl.minimum(tl.maximum(values, -SATURATE), SATURATE)
    out_base = batch * out_batch_stride + time * out_frame_stride + offset
    stored = values.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + out_base + within, stored, mask=valid)
    if HAS_TAIL:
        if time >= tail_start:
            tail_base = batch * tail_batch_stride + (time - tail_start) * tail_frame_stride + offset
            tl.store(tail_ptr + tail_base + within, stored, mask=valid)


@triton.jit
def _residual_kernel(
    out_ptr, residual_ptr, bias_ptr, pixels, frames_per_batch, out_batch_stride, out_frame_stride,
    residual_batch_stride, residual_frame_stride,
    CHANNELS: tl.constexpr, BLOCK_P: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """``out += residual + bias`` over one [BLOCK_P, CHANNELS] tile of one frame, in float32."""
    _, batch, time, offset, columns, valid, within = _frame_tile(pixels, frames_per_batch, CHANNELS, BLOCK_P)
    out_at = out_ptr + batch * out_batch_stride + time * out_frame_stride + offset + within
    residual_at = residual_ptr + batch * residual_batch_stride + time * residual_frame_stride + offset + within
    total = tl.load(out_at, mask=valid, other=0.0).to(tl.float32)
    total += tl.load(residual_at, mask=valid, other=0.0).to(tl.float32)
    if HAS_BIAS:
        total += tl.load(bias_ptr + columns).to(tl.float32)[None, :]
    tl.store(out_at, total.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _copy_rows_kernel(
    x_ptr, out_ptr, row_elements, rows_per_frame, frames_per_batch, x_batch_stride, x_frame_stride, x_row_stride,
    out_batch_stride, out_frame_stride, out_row_stride, BLOCK: tl.constexpr,
):
    """One block of one image row ([W, C], contiguous in both tensors; the rows themselves may sit at other
    strides in ``out``, e.g. inside a frame one pixel wider and taller)."""
    row, block = tl.program_id(0), tl.program_id(1)
    image, height = row // rows_per_frame, (row % rows_per_frame).to(tl.int64)
    batch, time = (image // frames_per_batch).to(tl.int64), (image % frames_per_batch).to(tl.int64)
    columns = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = columns < row_elements
    values = tl.load(x_ptr + batch * x_batch_stride + time * x_frame_stride + height * x_row_stride + columns,
                     mask=inside)
    tl.store(out_ptr + batch * out_batch_stride + time * out_frame_stride + height * out_row_stride + columns,
             values, mask=inside)


@triton.jit
def _store_e4m3_rows_kernel(x_ptr, out_ptr, row_elements, x_row_stride, out_row_stride, LIMIT: tl.constexpr,
                            BLOCK: tl.constexpr):
    """One block of one row of ``x`` stored into ``out`` as e4m3, rounded to nearest and saturated at +-LIMIT."""
    row, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    columns = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = columns < row_elements
    values = tl.load(x_ptr + row * x_row_stride + columns, mask=inside).to(tl.float32)
    values = tl.minimum(tl.maximum(values, -LIMIT), LIMIT)  # e4m3 has no infinity: beyond it lies NaN
    tl.store(out_ptr + row * out_row_stride + columns, values.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _copy_pixels_kernel(x_ptr, out_ptr, pixels, channels, x_pixel_stride, out_pixel_stride,
                        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """One [BLOCK_P, channels] block of pixels whose channels are contiguous in both tensors."""
    pixel = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    channel = tl.arange(0, BLOCK_C)
    inside = (pixel < pixels)[:, None] & (channel < channels)[None, :]
    values = tl.load(x_ptr + pixel[:, None] * x_pixel_stride + channel[None, :], mask=inside)
    tl.store(out_ptr + pixel[:, None] * out_pixel_stride + channel[None, :], values, mask=inside)


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------


def _frame_layout(tensor: torch.Tensor) -> bool:
    """Whether every (batch, frame) of a (B, C, T, H, W) tensor is a contiguous (H·W, C) matrix."""
    channels, width = tensor.shape[1], tensor.shape[4]
    wanted = {1: 1, 3: width * channels, 4: channels}  # dimension: stride
    # A dimension of size 1 may carry any stride.
    return all(tensor.shape[dim] == 1 or tensor.stride(dim) == stride for dim, stride in wanted.items())


def _fits(*tensors: torch.Tensor, dtypes: tuple = SUPPORTED_DTYPES) -> bool:
    """Same-shaped tensors in the frame layout, of a supported dtype, with a power-of-two channel count (the
    kernels' tiles span all channels)."""
    first = tensors[0]
    channels = first.shape[1] if first.dim() == 5 else 0
    return channels > 0 and channels & (channels - 1) == 0 and all(
        t.dim() == 5 and t.shape == first.shape and t.device == first.device and t.dtype in dtypes
        and _frame_layout(t) for t in tensors
    )


def normalize_into_supported(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out: torch.Tensor, groups: int, eps: float,
    silu: bool, shift: Optional[torch.Tensor] = None, tail: Optional[torch.Tensor] = None,
    out_scale: Optional[torch.Tensor] = None,
) -> bool:
    """Whether :func:`normalize_into` can take these arguments on the GPU (CUDA tensors in the frame layout,
    a power-of-two channel count divisible by ``groups``; ``out`` may be e4m3 with an ``out_scale``); same
    signature as :func:`normalize_into`."""
    return (
        x.is_cuda and _fits(x) and _fits(x, out, dtypes=NORM_OUT_DTYPES) and x.shape[1] % groups == 0
        and all(t.device == x.device for t in (weight, bias) + tuple(t for t in (shift, out_scale) if t is not None))
        and (out_scale is None or (out_scale.shape == (x.shape[1],) and out_scale.dtype == torch.float32))
        and (tail is None or _tail_fits(tail, out))
    )


def _tail_fits(tail: torch.Tensor, out: torch.Tensor) -> bool:
    """``tail`` can hold ``out``'s last frames: same batch, channels and frame size, at most as many frames,
    the same dtype and device, in the frame layout."""
    return (tail.dim() == 5 and tail.shape[:2] == out.shape[:2] and tail.shape[3:] == out.shape[3:]
            and 0 < tail.shape[2] <= out.shape[2] and tail.dtype == out.dtype and tail.device == out.device
            and _frame_layout(tail))


def add_residual_supported(out: torch.Tensor, residual: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether :func:`add_residual` can take these arguments on the GPU; same signature."""
    return out.is_cuda and _fits(out, residual) and (bias is None or bias.device == out.device)


def _on_device(tensor: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else nullcontext()


def normalize_into(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out: torch.Tensor, groups: int, eps: float,
    silu: bool, shift: Optional[torch.Tensor] = None, tail: Optional[torch.Tensor] = None,
    out_scale: Optional[torch.Tensor] = None, *, tile_elements: int = NORM_TILE_ELEMENTS,
) -> None:
    """GroupNorm of every frame of ``x`` (B, C, T, H, W) plus ``shift`` (C,) (then SiLU, then times
    ``out_scale`` (C,)) into ``out``, as ``vae_optimizer.normalize_into``; three launches (tile statistics,
    their combination, the normalisation) over all frames; an e4m3 ``out`` is saturated at +-448.
    ``tail`` (B, C, k, H, W), if given, receives a second copy of ``out``'s last k frames from
    the same stores.  Arguments as :func:`normalize_into_supported` accepts them, except that CPU tensors run
    under Triton's interpreter (``TRITON_INTERPRET=1``, for tests).  ``tile_elements``: pixels x channels of
    one tile."""
    batches, channels, frames, height, width = x.shape
    pixels, images = height * width, batches * frames
    if images == 0 or pixels == 0:
        return
    block_p = max(1, tile_elements // channels)
    tiles = triton.cdiv(pixels, block_p)
    tile_mean = torch.empty((images, groups, tiles), dtype=torch.float32, device=x.device)
    tile_m2 = torch.empty_like(tile_mean)
    mean = torch.empty((images, groups), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    has_shift = shift is not None
    shift = shift.contiguous() if has_shift else weight  # any pointer: the kernels do not read it
    has_tail = tail is not None
    tail_start = frames - tail.shape[2] if has_tail else frames
    tail_strides = (tail.stride(0), tail.stride(2)) if has_tail else (0, 0)
    grid = (tiles, images)
    with _on_device(x):
        _tile_stats_kernel[grid](
            x, shift, tile_mean, tile_m2, pixels, frames, x.stride(0), x.stride(2),
            CHANNELS=channels, GROUPS=groups, BLOCK_P=block_p, HAS_SHIFT=has_shift, num_warps=NORM_WARPS,
        )
        _combine_stats_kernel[(images * groups,)](
            tile_mean, tile_m2, mean, rstd, pixels, tiles, eps,
            GROUP_CHANNELS=channels // groups, BLOCK_P=block_p, BLOCK=COMBINE_BLOCK,
        )
        _normalize_kernel[grid](
            x, shift, weight.contiguous(), bias.contiguous(), mean, rstd, out, pixels, frames,
            x.stride(0), x.stride(2), out.stride(0), out.stride(2),
            tail if has_tail else out, tail_start, *tail_strides, out_scale if out_scale is not None else mean,
            CHANNELS=channels, GROUPS=groups, BLOCK_P=block_p, HAS_SHIFT=has_shift, SILU=silu, HAS_TAIL=has_tail,
            HAS_OUT_SCALE=out_scale is not None, SATURATE=FP8_MAX if out.dtype == FP8_DTYPE else 0.0,
            num_warps=NORM_WARPS,
        )


def add_residual(
    out: torch.Tensor, residual: torch.Tensor, bias: Optional[torch.Tensor], *,
    tile_elements: int = RESIDUAL_TILE_ELEMENTS,
) -> None:
    """``out += residual + bias`` (bias (C,) per channel, or None) over all frames in one launch, summed in
    float32 and rounded once, as ``vae_optimizer.add_residual``.  Arguments as :func:`add_residual_supported`
    accepts them, except that CPU tensors run under Triton's interpreter (for tests)."""
    batches, channels, frames, height, width = out.shape
    pixels, images = height * width, batches * frames
    if images == 0 or pixels == 0:
        return
    block_p = max(1, tile_elements // channels)
    has_bias = bias is not None
    bias = bias.contiguous() if has_bias else out  # any pointer: the kernel does not read it
    with _on_device(out):
        _residual_kernel[(triton.cdiv(pixels, block_p), images)](
            out, residual, bias, pixels, frames, out.stride(0), out.stride(2), residual.stride(0), residual.stride(2),
            CHANNELS=channels, BLOCK_P=block_p, HAS_BIAS=has_bias, num_warps=RESIDUAL_WARPS,
        )


def _row_layout(tensor: torch.Tensor) -> bool:
    """Whether every image row of a (B, C, T, H, W) tensor is a contiguous [W, C] stretch."""
    channels = tensor.shape[1]
    return (tensor.shape[1] == 1 or tensor.stride(1) == 1) and (tensor.shape[4] == 1 or tensor.stride(4) == channels)


def copy_rows_supported(x: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether :func:`copy_rows` can take these arguments on the GPU: same-shaped CUDA tensors of one dtype
    whose image rows are contiguous [W, C] stretches (channels-last frames, or windows of them)."""
    return (x.is_cuda and x.dim() == 5 and x.shape == out.shape and x.dtype == out.dtype and x.device == out.device
            and _row_layout(x) and _row_layout(out))


def copy_rows(x: torch.Tensor, out: torch.Tensor, *, block: int = COPY_BLOCK) -> None:
    """``out.copy_(x)`` row by row, for channels-last tensors whose rows sit at different strides (e.g. ``out``
    the top-left window of a frame one pixel wider and taller: the downsamplers' padded input).  PyTorch's
    strided copy kernel moves these at a fraction of memory speed.  Arguments as :func:`copy_rows_supported`
    accepts them, except that CPU tensors run under Triton's interpreter (for tests)."""
    batches, channels, frames, height, width = x.shape
    row_elements, rows = width * channels, batches * frames * height
    if rows == 0 or row_elements == 0:
        return
    with _on_device(x):
        _copy_rows_kernel[(rows, triton.cdiv(row_elements, block))](
            x, out, row_elements, height, frames, x.stride(0), x.stride(2), x.stride(3),
            out.stride(0), out.stride(2), out.stride(3), BLOCK=block, num_warps=COPY_WARPS,
        )


def _contiguous_rows(t: torch.Tensor) -> bool:
    """Whether every index of the first dimension of ``t`` is one contiguous stretch (rows at any stride)."""
    return t.dim() >= 2 and t[0].is_contiguous()


def store_e4m3_rows_supported(x: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether :func:`store_e4m3_rows` can take these arguments on the GPU: same-shaped CUDA tensors, ``out``
    e4m3 and ``x`` of a supported dtype, each row (index of the first dimension) contiguous."""
    return (x.is_cuda and x.shape == out.shape and x.device == out.device and x.dtype in SUPPORTED_DTYPES
            and out.dtype == FP8_DTYPE and _contiguous_rows(x) and _contiguous_rows(out))


def store_e4m3_rows(x: torch.Tensor, out: torch.Tensor, *, block: int = COPY_BLOCK) -> None:
    """``out.copy_(x)`` into e4m3, saturated at +-448 (PyTorch's cast gives NaN beyond e4m3's range), for
    tensors whose rows (first dimension) are contiguous stretches at any row stride: the upsampling GEMM's
    staging band into every second row of an upsampler conv's input.  Arguments as
    :func:`store_e4m3_rows_supported` accepts them (CPU tensors run under Triton's interpreter)."""
    rows, row_elements = x.shape[0], x[0].numel() if x.shape[0] else 0
    if rows == 0 or row_elements == 0:
        return
    with _on_device(x):
        _store_e4m3_rows_kernel[(rows, triton.cdiv(row_elements, block))](
            x, out, row_elements, x.stride(0), out.stride(0), LIMIT=FP8_MAX, BLOCK=block, num_warps=COPY_WARPS,
        )


def copy_pixels_supported(x: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether :func:`copy_pixels` can take these arguments on the GPU: same-shaped (..., C) CUDA tensors of one
    dtype whose pixels are evenly spaced (any spacing) and whose channels are contiguous."""
    return (x.is_cuda and x.shape == out.shape and x.dtype == out.dtype and x.device == out.device and x.dim() >= 2
            and _evenly_spaced_pixels(x) is not None and _evenly_spaced_pixels(out) is not None)


def _evenly_spaced_pixels(t: torch.Tensor) -> Optional[int]:
    """The distance between consecutive pixels of ``t`` (..., C) if every pixel's channels are contiguous and
    the pixels sit at one common spacing in memory order, else None."""
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        return None
    spacing, expected = None, None
    for size, stride in reversed(list(zip(t.shape[:-1], t.stride()[:-1]))):
        if size == 1:
            continue
        if spacing is None:
            spacing, expected = stride, stride * size
        elif stride != expected:
            return None
        else:
            expected = stride * size
    return spacing if spacing is not None else t.shape[-1]


def copy_pixels(x: torch.Tensor, out: torch.Tensor) -> None:
    """``out.copy_(x)`` for (..., C) tensors whose pixels' channels are contiguous but whose pixels are spaced
    differently (e.g. ``out`` a channel slice of a wider buffer: the upsampler's GEMM input with its bias
    column), which PyTorch's strided copy runs at a fraction of memory speed.  Arguments as
    :func:`copy_pixels_supported` accepts them, except that CPU tensors run under Triton's interpreter."""
    channels = x.shape[-1]
    pixels = x.numel() // channels if channels else 0
    if pixels == 0:
        return
    block_c = triton.next_power_of_2(channels)
    block_p = max(1, COPY_BLOCK // block_c)
    with _on_device(x):
        _copy_pixels_kernel[(triton.cdiv(pixels, block_p),)](
            x, out, pixels, channels, _evenly_spaced_pixels(x), _evenly_spaced_pixels(out),
            BLOCK_P=block_p, BLOCK_C=block_c, num_warps=COPY_WARPS,
        )
