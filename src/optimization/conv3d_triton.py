"""The VAE's causal 3x3x3 convolution as a Triton implicit GEMM, in bf16/fp16 and in fp8 (e4m3).

:func:`conv3d_causal` computes exactly ``F.conv3d(x, weight, bias, stride=1, padding=(0, 1, 1))`` for a
channels-last ``x`` (B, C, T+2, H, W) whose first two frames are the causal look-back, as one GEMM without an
im2col matrix: M = the output pixels, N = the output channels, K = 27·C; A is read straight from ``x`` (masked
loads give the spatial zero padding), B is the weight rearranged once by :func:`weight_matrix`.  The fp8 form
is what the VAE's ``fp8_e4m3fn`` quantization runs on (:mod:`.vae_fp8`); products in e4m3, scales and bias
applied to float32 sums.  Tile shapes are autotuned on CUDA; CPU tensors run under Triton's interpreter
(``TRITON_INTERPRET=1``, for tests) with explicit ``tiles``.  Design and measurements: docs/performance.md.
"""
from __future__ import annotations

import inspect
import os
from contextlib import nullcontext
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import vae_fp8
from .vae_fp8 import FP8_DTYPE, FP8_MAX, MIN_SCALE

TAPS = 27  # 3 x 3 x 3
TIME_LOOK_BACK = 2  # frames of x before the first output frame
HALF_DTYPES = (torch.bfloat16, torch.float16)
INPUT_DTYPES = HALF_DTYPES + (torch.float32, FP8_DTYPE)
OUTPUT_DTYPES = HALF_DTYPES + (torch.float32,)
# Pixel indices are int32, with room for the lanes of the last tile past the end.
MAX_PIXELS = 2**31 - 1024


class ConvTiles(NamedTuple):
    """One launch configuration: output tile (pixels x channels), K step, pixel layout, warps, stages."""

    block_m: int  # output pixels per program
    block_n: int  # output channels per program
    block_k: int  # input channels per K step (divides C)
    patch_width: int  # 0: BLOCK_M consecutive pixels; else a (block_m / patch_width) x patch_width patch
    num_warps: int
    num_stages: int


# Candidates for autotuning: mostly 128 bytes of channels per A row and K step (64 bf16, 128 fp8 values; one
# 64-byte step each, which also serves C = 32 in bf16, 64 in fp8), float32 accumulators of <= 128 registers per thread,
# pipelines that fit shared memory (<= 144 KiB).  All compile for sm_90 without spills in bf16; the float32
# partial sums of fp8 (below) spill a little in tiles of 128 rows per warp group.
HALF_TILES = (
    ConvTiles(128, 128, 64, 0, 4, 4),
    ConvTiles(128, 128, 64, 0, 8, 4),
    ConvTiles(256, 128, 64, 0, 8, 3),
    ConvTiles(128, 256, 64, 0, 8, 3),
    ConvTiles(64, 128, 32, 0, 4, 4),
    ConvTiles(256, 128, 64, 32, 8, 3),  # 8 rows x 32 columns
    ConvTiles(128, 256, 64, 64, 8, 3),  # 2 rows x 64 columns
)
# fp8: the tiles autotuning chose for the VAE's shapes on an H100 (docs/results/2026-11-21_h100_conv3d_triton.log),
# 4-warp ones for 128 outputs; few candidates keep the first run's autotuning short.
FP8_TILES = (
    ConvTiles(256, 128, 128, 32, 8, 3),  # 8 rows x 32 columns
    ConvTiles(128, 256, 128, 64, 8, 3),  # 2 rows x 64 columns
    ConvTiles(128, 256, 128, 0, 8, 3),
    ConvTiles(128, 128, 128, 0, 4, 4),
    ConvTiles(128, 128, 64, 0, 4, 4),
    # Narrow outputs (conv_out: 3 RGB channels, 32 moment channels): a 128-wide tile would compute 40x the
    # columns needed for 3 (88 ms against cuDNN's 66 ms in bf16 at 1080p on an H100).
    ConvTiles(128, 32, 128, 0, 4, 4),
    ConvTiles(128, 16, 128, 0, 4, 4),
)
WIDE_TILE = 128  # output tiles at least this wide serve any number of output channels


class Conv3dTritonError(ValueError):
    """Arguments :func:`conv3d_causal` cannot take."""


@triton.jit
def _conv_kernel(
    x_ptr, w_ptr, bias_ptr, x_scale_ptr, w_scale_ptr, out_ptr,
    out_channels, pixels, frames, height, width,
    x_stride_b, x_stride_t, x_stride_h, x_stride_w,
    out_stride_b, out_stride_c, out_stride_t, out_stride_h, out_stride_w,
    CHANNELS: tl.constexpr, HAS_BIAS: tl.constexpr, FP8: tl.constexpr, FP8_FAST_ACCUMULATION: tl.constexpr,
    IEEE_FLOAT32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PATCH_WIDTH: tl.constexpr,
):
    """One BLOCK_M x BLOCK_N tile of ``out`` (pixels x output channels) = sum over the 27 taps of shifted
    input pixels (M, C) times the tap's weights (C, N)."""
    program = tl.program_id(0)
    channel_tiles = tl.cdiv(out_channels, BLOCK_N)
    tile_m, tile_n = program // channel_tiles, program % channel_tiles  # neighbours share input pixels
    lanes = tl.arange(0, BLOCK_M)
    if PATCH_WIDTH == 0:
        pixel = tile_m * BLOCK_M + lanes  # over (B, T, H, W), rows wrapping
        image = pixel // (height * width)  # batch * frames + frame
        h = pixel % (height * width) // width
        w = pixel % width
        valid = pixel < pixels
    else:
        patches_across = tl.cdiv(width, PATCH_WIDTH)
        patches = tl.cdiv(height, BLOCK_M // PATCH_WIDTH) * patches_across
        image = tile_m // patches
        patch = tile_m % patches
        h = patch // patches_across * (BLOCK_M // PATCH_WIDTH) + lanes // PATCH_WIDTH
        w = patch % patches_across * PATCH_WIDTH + lanes % PATCH_WIDTH
        valid = (h < height) & (w < width)
    # int64 offsets: a few frames of a 1080p activation exceed 2**31 elements.
    batch = (image // frames).to(tl.int64)
    frame = (image % frames).to(tl.int64)
    # Output frame t reads input frames t, t+1, t+2: its first tap sits at x's frame t.
    x_rows = x_ptr + (batch * x_stride_b + frame * x_stride_t + h.to(tl.int64) * x_stride_h
                      + w.to(tl.int64) * x_stride_w)
    k_lanes = tl.arange(0, BLOCK_K)
    columns = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Columns past Cout read the last weight row instead of loading under a mask; they are never stored.
    safe_columns = tl.minimum(columns, out_channels - 1)
    w_columns = w_ptr + safe_columns * (27 * CHANNELS)  # rows of the (Cout, 27·C) weight matrix

    accumulator = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(27 * CHANNELS // BLOCK_K):  # 27 taps x C / BLOCK_K channel blocks
        tap = step // (CHANNELS // BLOCK_K)  # (dt * 3 + kh) * 3 + kw
        channel = step % (CHANNELS // BLOCK_K) * BLOCK_K
        dh = tap // 3 % 3 - 1
        dw = tap % 3 - 1
        shift = (tl.cast(tap // 9, tl.int64) * x_stride_t + tl.cast(dh, tl.int64) * x_stride_h
                 + tl.cast(dw, tl.int64) * x_stride_w + channel)
        inside = valid & (h + dh >= 0) & (h + dh < height) & (w + dw >= 0) & (w + dw < width)
        a = tl.load(x_rows[:, None] + shift + k_lanes[None, :], mask=inside[:, None], other=0.0)
        b = tl.load(w_columns[None, :] + (step * BLOCK_K + k_lanes)[:, None])  # (BLOCK_K, BLOCK_N), K-major
        if FP8_FAST_ACCUMULATION:
            accumulator = tl.dot(a, b, accumulator)
        elif FP8:
            # Add each step's partial sum into float32 (Hopper accumulates fp8 products in fewer bits).
            accumulator = tl.dot(a, b, accumulator, max_num_imprecise_acc=BLOCK_K)
        elif IEEE_FLOAT32:
            accumulator = tl.dot(a, b, accumulator, input_precision="ieee")
        else:
            accumulator = tl.dot(a, b, accumulator)

    if FP8:
        scale = tl.load(x_scale_ptr) * tl.load(w_scale_ptr + safe_columns)
        accumulator = accumulator * scale[None, :]
    if HAS_BIAS:
        accumulator = accumulator + tl.load(bias_ptr + safe_columns).to(tl.float32)[None, :]
    out_rows = (batch * out_stride_b + frame * out_stride_t + h.to(tl.int64) * out_stride_h
                + w.to(tl.int64) * out_stride_w)
    out_at = out_ptr + out_rows[:, None] + (columns.to(tl.int64) * out_stride_c)[None, :]
    stored = valid[:, None] & (columns < out_channels)[None, :]
    tl.store(out_at, accumulator.to(out_ptr.dtype.element_ty), mask=stored)


def _config(tiles: ConvTiles) -> triton.Config:
    meta = {"BLOCK_M": tiles.block_m, "BLOCK_N": tiles.block_n, "BLOCK_K": tiles.block_k,
            "PATCH_WIDTH": tiles.patch_width}
    return triton.Config(meta, num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def _tiles(config: triton.Config) -> ConvTiles:
    meta = config.kwargs
    return ConvTiles(meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"], meta["PATCH_WIDTH"], config.num_warps,
                     config.num_stages)


def usable_tiles(channels: int, out_channels: int, fp8: bool) -> list[ConvTiles]:
    """The autotuning candidates for C input and Cout output channels: K steps that divide C, and output
    tiles no wider than Cout; tiles narrower than 128 only for outputs at most twice as wide (they exist for
    the few channels of conv_out); the narrowest when Cout is smaller than all."""
    candidates = [t for t in (FP8_TILES if fp8 else HALF_TILES) if channels % t.block_k == 0]
    fitting = [t for t in candidates
               if t.block_n <= out_channels and (t.block_n >= WIDE_TILE or 2 * t.block_n >= out_channels)]
    if fitting or not candidates:
        return fitting
    narrowest = min(t.block_n for t in candidates)
    return [t for t in candidates if t.block_n == narrowest]


def _prune(configs: list, named_args: dict, **kwargs) -> list:
    usable = usable_tiles(kwargs["CHANNELS"], named_args["out_channels"], kwargs["FP8"])
    return [config for config in configs if _tiles(config) in usable]


def _quick_bench(kernel_call, quantiles):
    # Triton's default (25 ms warm-up, 100 ms of runs per candidate) would take most of a benchmark's time.
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


# Newer Tritons can keep autotuning results on disk with its compiled kernels: later processes skip the timing.
_CACHE_RESULTS = ({"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters
                  else {})

_tuned_conv_kernel = triton.autotune(
    configs=[_config(tiles) for tiles in dict.fromkeys(HALF_TILES + FP8_TILES)],
    key=["CHANNELS", "out_channels", "FP8_FAST_ACCUMULATION"],  # Triton adds the tensors' dtypes
    prune_configs_by={"early_config_prune": _prune},
    do_bench=_quick_bench,
    **_CACHE_RESULTS,
)(_conv_kernel)


def tuned_tiles() -> Optional[ConvTiles]:
    """The tiles autotuning chose for the most recent autotuned :func:`conv3d_causal` call (None before)."""
    config = getattr(_tuned_conv_kernel, "best_config", None)
    return None if config is None else _tiles(config)


# ---------------------------------------------------------------------------------------------------
# Weights and fp8 quantization
# ---------------------------------------------------------------------------------------------------


def weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A (Cout, C, 3, 3, 3) convolution weight as the kernel's contiguous (Cout, 27·C) matrix (column
    ``((kt·3 + kh)·3 + kw)·C + c`` holds ``weight[:, c, kt, kh, kw]``: :func:`.vae_fp8.weight_matrix`), checked."""
    if weight.dim() != 5 or tuple(weight.shape[2:]) != (3, 3, 3):
        raise Conv3dTritonError(f"weight must be (Cout, C, 3, 3, 3); got shape {tuple(weight.shape)}")
    return vae_fp8.weight_matrix(weight)


def quantize_input_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (B, C, T, H, W) in e4m3 per tensor, layout kept: (x_fp8, scale (1,) float32) with
    ``x ≈ x_fp8 · scale`` and scale = amax / 448."""
    low, high = torch.aminmax(x)
    scale = (torch.maximum(-low, high).float() / FP8_MAX).clamp_min(MIN_SCALE)
    x_fp8 = torch.empty_like(x, dtype=FP8_DTYPE)
    # A frame at a time through float32: x / scale rounded once (a half-precision quotient would round twice),
    # with a float32 copy of one frame at most.  |x| / scale <= 448 up to float32 rounding: 448 at most.
    for frame in range(x.shape[2]):
        x_fp8[:, :, frame].copy_(x[:, :, frame].float() / scale)
    return x_fp8, scale.reshape(1)


# ---------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check_arguments(x, matrix, bias, out, fp8_scales, tiles) -> None:
    """Raise :class:`Conv3dTritonError` with what to change when the arguments are outside the kernel's."""
    if x.dim() != 5 or x.shape[2] < 1 + TIME_LOOK_BACK:
        raise Conv3dTritonError(f"x must be (B, C, T + {TIME_LOOK_BACK}, H, W) with T >= 1 (the causal look-back "
                                f"frames first); got shape {tuple(x.shape)}")
    if x.stride(1) != 1 and x.shape[1] > 1:
        raise Conv3dTritonError("x must be channels-last: pass x.contiguous(memory_format=torch.channels_last_3d)")
    channels = x.shape[1]
    if matrix.dim() != 2 or matrix.shape[1] != TAPS * channels or not matrix.is_contiguous():
        raise Conv3dTritonError(f"weight_matrix must be weight_matrix(weight) of a (Cout, {channels}, 3, 3, 3) "
                                f"weight: contiguous (Cout, {TAPS * channels}); got {tuple(matrix.shape)}")
    out_channels = matrix.shape[0]
    if x.dtype not in INPUT_DTYPES or matrix.dtype != x.dtype:
        raise Conv3dTritonError(f"x and weight_matrix must share one dtype of {INPUT_DTYPES}; got {x.dtype} and "
                                f"{matrix.dtype}")
    if (x.dtype == FP8_DTYPE) != (fp8_scales is not None):
        raise Conv3dTritonError("fp8_scales=(x_scale, weight_scale) goes with float8_e4m3fn x and weights "
                                "(quantize_input_fp8, vae_fp8.quantize_weight_fp8), and only with them")
    if fp8_scales is not None:
        x_scale, weight_scale = fp8_scales
        if x_scale.numel() != 1 or weight_scale.shape != (out_channels,) or {
                x_scale.dtype, weight_scale.dtype} != {torch.float32}:
            raise Conv3dTritonError(f"fp8_scales must be float32 tensors of 1 and {out_channels} elements; got "
                                    f"{tuple(x_scale.shape)}, {tuple(weight_scale.shape)}")
    if bias is not None and bias.shape != (out_channels,):
        raise Conv3dTritonError(f"bias must have {out_channels} elements; got shape {tuple(bias.shape)}")
    expected = (x.shape[0], out_channels, x.shape[2] - TIME_LOOK_BACK, x.shape[3], x.shape[4])
    if out is not None and (tuple(out.shape) != expected or out.dtype not in OUTPUT_DTYPES):
        raise Conv3dTritonError(f"out must be {expected} of a dtype in {OUTPUT_DTYPES}; got "
                                f"{tuple(out.shape)} {out.dtype}")
    tensors = [x, matrix] + [t for t in (bias, out) if t is not None] + list(fp8_scales or ())
    if any(t.device != x.device for t in tensors):
        raise Conv3dTritonError("all tensors must be on x's device")
    if x.shape[0] * expected[2] * x.shape[3] * x.shape[4] > MAX_PIXELS:
        raise Conv3dTritonError(f"more than {MAX_PIXELS} output pixels: split the batch or the frames")
    if tiles is not None and (channels % tiles.block_k or (tiles.patch_width and tiles.block_m % tiles.patch_width)):
        raise Conv3dTritonError(f"tiles {tiles}: block_k must divide C ({channels}) and patch_width block_m")
    if tiles is None and x.is_cuda and not usable_tiles(channels, out_channels, x.dtype == FP8_DTYPE):
        steps = sorted({t.block_k for t in (FP8_TILES if x.dtype == FP8_DTYPE else HALF_TILES)})
        raise Conv3dTritonError(f"{channels} input channels: the kernel needs a multiple of one of {steps} "
                                "(pad the channels with zeros, or use F.conv3d)")
    if not x.is_cuda and not _interpreted():
        raise Conv3dTritonError("conv3d_causal runs on CUDA tensors (CPU tensors only under Triton's "
                                "interpreter, TRITON_INTERPRET=1)")
    if not x.is_cuda and tiles is None:
        raise Conv3dTritonError("pass tiles= under Triton's interpreter: autotuning times CUDA launches")


def conv3d_causal(
    x: torch.Tensor, weight_matrix: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None, fp8_scales: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    fp8_fast_accumulation: bool = False, tiles: Optional[ConvTiles] = None,
) -> torch.Tensor:
    """``F.conv3d(x, weight, bias, padding=(0, 1, 1))`` of channels-last ``x`` (B, C, T+2, H, W), with
    ``weight_matrix`` from :func:`weight_matrix`, into ``out`` (B, Cout, T, H, W), any strides; a new
    channels-last tensor (bf16 for fp8 input, else x's dtype) when None.  fp8: x and weight_matrix from
    :func:`quantize_input_fp8` / :func:`.vae_fp8.quantize_weight_fp8` and ``fp8_scales`` = their scales.
    ``tiles``: a fixed launch configuration instead of autotuning.  Returns ``out``."""
    _check_arguments(x, weight_matrix, bias, out, fp8_scales, tiles)
    batches, channels, padded_frames, height, width = x.shape
    out_channels, frames = weight_matrix.shape[0], padded_frames - TIME_LOOK_BACK
    fp8 = x.dtype == FP8_DTYPE
    if out is None:
        out = torch.empty((batches, out_channels, frames, height, width), device=x.device,
                          dtype=torch.bfloat16 if fp8 else x.dtype, memory_format=torch.channels_last_3d)
    pixels = batches * frames * height * width
    if pixels == 0 or out_channels == 0:
        return out
    x_scale, weight_scale = fp8_scales if fp8 else (weight_matrix, weight_matrix)  # unread stand-ins
    arguments = (
        x, weight_matrix, weight_matrix if bias is None else bias, x_scale, weight_scale, out,
        out_channels, pixels, frames, height, width,
        x.stride(0), x.stride(2), x.stride(3), x.stride(4),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3), out.stride(4),
    )
    flags = dict(CHANNELS=channels, HAS_BIAS=bias is not None, FP8=fp8,
                 FP8_FAST_ACCUMULATION=fp8 and fp8_fast_accumulation, IEEE_FLOAT32=x.dtype == torch.float32)

    def grid(meta):
        if meta["PATCH_WIDTH"]:
            rows = meta["BLOCK_M"] // meta["PATCH_WIDTH"]
            tiles_m = batches * frames * triton.cdiv(height, rows) * triton.cdiv(width, meta["PATCH_WIDTH"])
        else:
            tiles_m = triton.cdiv(pixels, meta["BLOCK_M"])
        return (tiles_m * triton.cdiv(out_channels, meta["BLOCK_N"]),)

    with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
        if tiles is None:
            _tuned_conv_kernel[grid](*arguments, **flags)
        else:
            _conv_kernel[grid](*arguments, **flags, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
                               BLOCK_K=tiles.block_k, PATCH_WIDTH=tiles.patch_width, num_warps=tiles.num_warps,
                               num_stages=tiles.num_stages)
    return out
