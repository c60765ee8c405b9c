"""Fast, memory-lean execution of the causal video VAE: the plain path's math, behind a per-model switch.

``optimize_vae(model)`` attaches a :class:`~.vae_executor.VAEExecutor` over a :class:`VAERuntime` (layout,
kernels, piece size); the model's encode/decode then run their causal chunks through it: the same result,
faster and in less memory.  The runtime holds the kernel entry points the executor calls: per-frame
GroupNorm(+SiLU) written into padded convolution inputs, the residual sum, channel padding for cuDNN's
channels-last kernels, the upsampler's 1x1 conv + pixel shuffle, the convolution route around PyTorch
2.9's conv3d regression.  :func:`estimate_peak_bytes` and :func:`choose_tile_size` bound the memory of the
streamed path and pick the tile size for "auto" tiling.  Design notes and measurements: docs/performance.md.
"""
from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import vae_fp8, vae_upsample
from .attention_dispatch import AUTO
from .switches import env_switch
from .vae_executor import VAEExecutor

if TYPE_CHECKING:
    from ..models.video_vae_v3 import VAEConfig, VideoAutoencoder

logger = logging.getLogger(__name__)

HALF_DTYPES = (torch.float16, torch.bfloat16)
# cuDNN's NDHWC tensor-core kernels want channel counts that are multiples of 8.  Inputs with fewer channels
# (the encoder's RGB) are padded to 16: its conv_in then runs 6.3 instead of 8.7 ms per 4 frames at 1080p on
# an H100 (docs/results/2026-11-21_h100_vae_pieces_kernels.log); padding outputs (conv_out's 3) beyond 8 gains
# nothing there.
CHANNEL_ALIGNMENT = 8
INPUT_CHANNEL_ALIGNMENT = 16
# Rows of the upsampler's 1x1 conv are computed in bands whose output (input, for the GEMM route) stays
# below this size.
UPSCALE_BAND_BYTES = 128 << 20
# For an e4m3 output (the VAE's fp8 quantization) the GEMM writes compute-dtype bands of at most this size,
# then stores them as e4m3: small enough to stay in the H100's 50 MB L2 between the two.
UPSCALE_STAGE_BYTES = 32 << 20
# Streamed pieces hold as many frames as keep a stage's widest activation below this size.  Every piece
# costs copies of its convolutions' look-back (2 frames in, 2 out), so larger pieces run faster and smaller
# ones use less memory; 2 GiB gives 2 frames per piece at 1080p full resolution (1 GiB would give 1 frame,
# ~3 GB less peak and ~0.25 s more per 33-frame decode on an H100 by the copy traffic).
DEFAULT_PIECE_BYTES = 2 << 30


class VAEOptimizationError(ValueError):
    """optimize_vae was given something it cannot optimize, or an invalid option."""


class TileSizeError(RuntimeError):
    """Not even the smallest VAE tile fits in the memory that is free."""


# ---------------------------------------------------------------------------------------------------
# The cuDNN conv3d regression of PyTorch 2.9+
# ---------------------------------------------------------------------------------------------------

CUDNN_BROKEN_FROM = 90800     # cuDNN 9.8: PyTorch 2.9.0 stops using cuDNN for half-precision conv3d
CUDNN_FIXED_FROM = 91500      # cuDNN 9.15: PyTorch 2.9.1+ uses it again


def _release(version: str) -> tuple[int, int, int]:
    """(major, minor, patch) of a PyTorch version string such as ``2.9.1+cu128`` or ``2.10.0a0+git1234``."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if match is None:
        raise ValueError(f"cannot read a PyTorch version from {version!r}")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def cudnn_bypass_decision(
    torch_version: str, cudnn_version: Optional[int], *, cuda: bool, rocm: bool = False
) -> tuple[bool, str]:
    """Whether half-precision conv3d must call cuDNN directly on this PyTorch/cuDNN pair, and why.

    PyTorch 2.9.0 skips cuDNN for fp16/bf16 3-D convolutions with cuDNN >= 9.8 (pytorch#163581, a cuDNN
    bug); 2.9.1 narrowed the rule to cuDNN 9.8-9.14 (pytorch#166480).  Skipped, conv3d falls back to a
    vol2col path that is several times slower and needs ~3x the memory (pytorch#166643).
    """
    if not cuda or rocm:
        return False, "not an NVIDIA CUDA device"
    if cudnn_version is None:
        return False, "cuDNN is not available"
    release = _release(torch_version)
    if release < (2, 9, 0):
        return False, f"PyTorch {torch_version} predates the conv3d regression (2.9+)"
    if cudnn_version < CUDNN_BROKEN_FROM:
        return False, f"cuDNN {cudnn_version} predates the affected versions (9.8+)"
    if release == (2, 9, 0):
        return True, f"PyTorch 2.9.0 skips cuDNN for half-precision conv3d with cuDNN {cudnn_version} (>= 9.8)"
    if cudnn_version < CUDNN_FIXED_FROM:
        return True, (
            f"PyTorch {torch_version} skips cuDNN for half-precision conv3d with cuDNN {cudnn_version} (9.8-9.14)"
        )
    return False, f"cuDNN {cudnn_version} is fixed (9.15+) and PyTorch {torch_version} uses it"


# ---------------------------------------------------------------------------------------------------
# GroupNorm per frame
# ---------------------------------------------------------------------------------------------------


def frame_group_stats(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 mean and (population) variance of every (batch, group, frame) of ``x`` (B, C, T, H, W).

    Two exact stages: statistics of every row over W, then their combination over the group's channels
    and H by the law of total variance (all rows hold W values: the variance is the mean of the row
    variances plus the variance of the row means).  The first stage is one pass over ``x`` whose output
    (B·C·T·H values) is large enough to keep every SM busy and, in channels-last memory, reads whole
    channel vectors; a single-stage reduction has only B·G·T outputs and, compiled with dynamic shapes,
    left the GPU ~15x below its memory bandwidth at 1080p.
    """
    row_var, row_mean = torch.var_mean(x.float(), dim=4, correction=0)  # (B, C, T, H)
    row_mean, row_var = row_mean.unflatten(1, (groups, -1)), row_var.unflatten(1, (groups, -1))
    mean = row_mean.mean(dim=(2, 4))  # (B, G, T)
    spread = (row_mean - mean[:, :, None, :, None]).square().mean(dim=(2, 4))
    return mean, row_var.mean(dim=(2, 4)) + spread


def normalize_into(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out: torch.Tensor, groups: int, eps: float, silu: bool,
    shift: Optional[torch.Tensor] = None, out_scale: Optional[torch.Tensor] = None,
) -> None:
    """Write GroupNorm of every frame of ``x`` (B, C, T, H, W) (+ SiLU) into ``out``: statistics over each
    (batch, frame, group) in float32, as ``F.group_norm`` computes them frame by frame.  ``shift`` (C,) is
    added to ``x`` first: the bias of the convolution that produced ``x``, folded in here instead of costing
    a pass of its own.  ``out_scale`` (C,) float32 multiplies the result before it is stored (an e4m3 ``out``,
    see :mod:`.vae_fp8`, is saturated at its largest value)."""
    channels = x.shape[1]
    if shift is not None:
        x = x + shift.view(1, channels, 1, 1, 1)
    mean, var = frame_group_stats(x, groups)  # (B, G, T)
    # Statistics per channel, broadcast over H, W: the full-size tensor is never reshaped, so a compiled
    # kernel can read x once for the statistics and once to write ``out``, with nothing in between.
    mean = mean.repeat_interleave(channels // groups, dim=1)[..., None, None]
    scale = torch.rsqrt(var + eps).repeat_interleave(channels // groups, dim=1)[..., None, None]
    values = x - mean  # float32 by type promotion; the only full-size temporary when eager
    values.mul_(scale * weight.float().view(1, channels, 1, 1, 1)).add_(bias.float().view(1, channels, 1, 1, 1))
    if silu:
        F.silu(values, inplace=True)
    if out_scale is not None:
        values.mul_(out_scale.view(1, channels, 1, 1, 1))
    if out.dtype == vae_fp8.FP8_DTYPE:
        values.clamp_(-vae_fp8.FP8_MAX, vae_fp8.FP8_MAX)
    out.copy_(values)


def add_residual(out: torch.Tensor, residual: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """``out += residual + bias`` (bias (C,) per channel, or None): a resnet's second convolution, whose bias
    is folded in here, joins the block's input in one pass."""
    out.add_(residual)
    if bias is not None:
        out.add_(bias.view(1, -1, 1, 1, 1))


class CompiledKernel:
    """``fn`` compiled on first use into fused kernels for static shapes; if compiling or running the
    compiled code fails, the eager ``fn`` (the same math) is used from then on, after one log line.

    Static shapes because Inductor's kernels for symbolic sizes spend their time on index arithmetic: at
    1080p the dynamic GroupNorm ran at 550 GB/s, the static one at 1950 GB/s (H100).  The runtime calls it
    once per frame, so the shapes are the few (channels, height, width) of a resolution, not every piece
    length: about 17 graphs for encoder and decoder at 1080p, compiled once and kept in the persistent
    compile cache."""

    # Graphs (shapes) one kernel may hold before Dynamo falls back to eager for new ones: ~17 per resolution,
    # so a long ComfyUI session can see a dozen resolutions before new ones run on the eager kernels.
    GRAPH_LIMIT = 256

    def __init__(self, fn, label: str):
        self.fn, self.label = fn, label
        self.compiled = None
        self.failure: Optional[str] = None

    def __call__(self, *args) -> None:
        if self.failure is None and not torch.compiler.is_compiling():
            try:
                if self.compiled is None:
                    from .torch_compile import configure_compile_cache, raise_recompile_limit

                    configure_compile_cache()
                    raise_recompile_limit(self.GRAPH_LIMIT)
                    self.compiled = torch.compile(self.fn, dynamic=False, fullgraph=True)
                self.compiled(*args)
                return
            except torch.cuda.OutOfMemoryError:
                raise  # not a compiler problem: the caller must shrink the work
            except Exception as error:  # any compiler/toolchain failure: the eager kernel computes the same
                lines = str(error).strip().splitlines()
                self.failure = f"{type(error).__name__}: {lines[0] if lines else ''}"
                logger.warning("compiling the VAE %s kernel failed (%s); using the eager kernel", self.label,
                               self.failure)
        self.fn(*args)


def _frames(*tensors: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """The matching frames of same-shaped (B, C, T, H, W) tensors, each as a (1, C, 1, H, W) view whose
    strides do not depend on the tensor's frame count (a compiled kernel guards on strides)."""
    batches, _, frames = tensors[0].shape[:3]
    for batch in range(batches):
        for frame in range(frames):
            yield tuple(t[batch, :, frame].unsqueeze(0).unsqueeze(2) for t in tensors)


def _identity_gemm_fits(source: torch.Tensor, frames_last: torch.Tensor) -> bool:
    """Whether a channel copy can run as an identity GEMM: a CUDA half-precision ``source`` without autograd
    (``mm`` with ``out=`` has no backward) and channels-last frames (``frames_last``: a (B, T, H, W, C) view)."""
    return (source.is_cuda and source.dtype in HALF_DTYPES and frames_last[0].is_contiguous()
            and not source.requires_grad)


# Process-wide compiled kernels (code only, no model state), shared by every optimized VAE.
compiled_normalize = CompiledKernel(normalize_into, "GroupNorm")
compiled_add_residual = CompiledKernel(add_residual, "residual")


def _load_vae_triton():
    """The Triton kernel module; importing it imports Triton, so only the runtime's first use does."""
    return importlib.import_module(".vae_triton", __package__)


class TritonKernel:
    """One of the hand-written Triton kernels of :mod:`.vae_triton` (``name``: its launcher), called with
    its launcher's arguments; returns whether it ran.  It declines arguments outside its preconditions
    (CUDA tensors whose frames are contiguous (H·W, C) matrices, see ``<name>_supported``), and, once
    importing, compiling or launching it has failed, everything, after one log line: the caller's compiled
    or eager kernel computes the same."""

    def __init__(self, name: str, label: str):
        self.name, self.label = name, label
        self.failure: Optional[str] = None

    def __call__(self, *args) -> bool:
        if self.failure is not None:
            return False
        try:
            kernels = _load_vae_triton()
            if not getattr(kernels, f"{self.name}_supported")(*args):
                return False
            getattr(kernels, self.name)(*args)
            return True
        except torch.cuda.OutOfMemoryError:
            raise  # not a kernel problem: the caller must shrink the work
        except Exception as error:  # Triton/toolchain failure: the torch kernels compute the same
            lines = str(error).strip().splitlines()
            self.failure = f"{type(error).__name__}: {lines[0] if lines else ''}"
            logger.warning("the Triton VAE %s kernel failed (%s); using the torch kernels from now on", self.label,
                           self.failure)
            return False


# Process-wide like the compiled kernels: one failure switches every optimized VAE to those.
triton_normalize = TritonKernel("normalize_into", "GroupNorm")
triton_add_residual = TritonKernel("add_residual", "residual")
triton_copy_rows = TritonKernel("copy_rows", "row copy")
triton_copy_pixels = TritonKernel("copy_pixels", "pixel copy")
triton_store_e4m3_rows = TritonKernel("store_e4m3_rows", "e4m3 store")


CUDNN_BENCHMARK_ENV = "SEEDVR2_CUDNN_BENCHMARK"


def _cudnn_benchmark_wanted() -> bool:
    """cuDNN autotuning only when ``SEEDVR2_CUDNN_BENCHMARK`` is 1/true/yes/on.  It times every algorithm once
    per new convolution shape: 44 s more for the first 33-frame 1080p encode on an H100, for 1-3 % faster
    convolutions afterwards (cuDNN's heuristics already pick the same kernels for most shapes)."""
    return env_switch(CUDNN_BENCHMARK_ENV, default=False)


TRITON_KERNELS_ENV = "SEEDVR2_VAE_TRITON"


def _triton_kernels_wanted() -> bool:
    """The Triton GroupNorm and residual kernels unless ``SEEDVR2_VAE_TRITON`` is 0/false/no/off (to compare
    them with the compiled ones)."""
    return env_switch(TRITON_KERNELS_ENV, default=True)


def _triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except Exception:  # missing or broken (e.g. Windows without triton-windows)
        return False
    return True


# ---------------------------------------------------------------------------------------------------
# The runtime: kernel entry points of one optimized model
# ---------------------------------------------------------------------------------------------------


@dataclass
class VAERuntime:
    """How one optimized VAE runs: layout, kernels and piece size, shared by all of its blocks."""

    QUANTIZED_DTYPE = vae_fp8.FP8_DTYPE  # the inputs of the convolutions that ``fp8`` holds

    channels_last: bool
    pad_channels: bool
    compile_norm: bool
    cudnn_direct: bool
    cudnn_benchmark: bool
    piece_bytes: int
    # GroupNorm and residual sum by the Triton kernels where they apply (before compile_norm's kernels).
    triton_kernels: bool = False
    # The upsamplers' 1x1 conv + pixel shuffle as GEMMs writing in place (channels-last frames only).
    shuffle_gemm: bool = False
    # The GroupNorm-fed and upsampler convolutions in e4m3 (the VAE's fp8_e4m3fn quantization), None for the
    # compute dtype.
    fp8: Optional[vae_fp8.Fp8Convolutions] = None
    # The mid-block attention's backend: "auto" picks, on CUDA, the Triton flash-attention kernel for the
    # 512-wide head, which SDPA's fused kernels do not take (see attention_dispatch).
    attention_backend: str = AUTO

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last_3d if self.channels_last else torch.contiguous_format

    def empty(self, shape: tuple[int, ...], like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """An uninitialised activation of ``shape`` in the runtime's layout on ``like``'s device, in ``dtype``
        (default ``like``'s)."""
        return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=self.memory_format)

    def input_multiplier(self, conv: nn.Module) -> Optional[torch.Tensor]:
        """For a convolution that runs in e4m3: what its input's producer multiplies by before storing e4m3
        values (see :mod:`.vae_fp8`); None for convolutions in the compute dtype."""
        return None if self.fp8 is None else self.fp8.input_multiplier(conv)

    def upsampler_input_scale(self, conv: nn.Module, inputs: list[torch.Tensor]) -> Optional[torch.Tensor]:
        """For an upsampler ``conv`` that runs in e4m3: the scale (1,) of its input in a call that upsamples
        ``inputs``; None when it runs in the compute dtype."""
        return None if self.fp8 is None else self.fp8.upsampler_input_scale(conv, inputs)

    def input_channels(self, channels: int) -> int:
        """Channels of a convolution input buffer holding ``channels`` real ones (zero-padded to 16 when on)."""
        return self._aligned(channels, INPUT_CHANNEL_ALIGNMENT)

    def _aligned(self, channels: int, alignment: int) -> int:
        if not self.pad_channels:
            return channels
        return -(-channels // alignment) * alignment

    def normalize(
        self, x: torch.Tensor, norm: nn.GroupNorm, *, silu: bool, out: Optional[torch.Tensor] = None,
        shift: Optional[torch.Tensor] = None, tail: Optional[torch.Tensor] = None,
        out_scale: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Per-frame ``norm(x + shift)`` (then SiLU), written into ``out`` (e.g. the new frames of a padded conv
        input); ``shift`` is the bias of a convolution run ``with_bias=False``.  ``tail`` (k frames) receives a
        copy of the result's last k frames (a convolution's look-back): the Triton kernel stores them twice,
        instead of a clone reading them back afterwards.  ``out_scale``: the :meth:`input_multiplier` of an
        e4m3 ``out``."""
        if out is None:
            out = torch.empty_like(x)
        if (out.dtype == vae_fp8.FP8_DTYPE) != (out_scale is not None):
            raise ValueError("an e4m3 GroupNorm output needs its convolution's out_scale, and only it takes one.")
        if self.triton_kernels and triton_normalize(
            x, norm.weight, norm.bias, out, norm.num_groups, norm.eps, silu, shift, tail, out_scale
        ):
            return out
        if not self.compile_norm:
            normalize_into(x, norm.weight, norm.bias, out, norm.num_groups, norm.eps, silu, shift, out_scale)
        else:
            kernel = compiled_normalize if x.is_cuda else normalize_into
            for x_frame, out_frame in _frames(x, out):  # statistics are per frame anyway
                kernel(x_frame, norm.weight, norm.bias, out_frame, norm.num_groups, norm.eps, silu, shift, out_scale)
        if tail is not None:
            tail.copy_(out[:, :, out.shape[2] - tail.shape[2]:])
        return out

    def add_residual(self, out: torch.Tensor, residual: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """``out + residual + bias`` computed in place in ``out``."""
        if self.triton_kernels and triton_add_residual(out, residual, bias):
            return out
        if not self.compile_norm:
            add_residual(out, residual, bias)
            return out
        kernel = compiled_add_residual if out.is_cuda else add_residual
        for out_frame, residual_frame in _frames(out, residual):
            kernel(out_frame, residual_frame, bias)
        return out

    def copy_channels_into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """``out[:, :C] = x`` and the rest of ``out``'s channels zero, for ``x`` (B, C, T, H, W) and ``out``
        (B, C', T, H, W) with C' >= C (a convolution input padded with zero channels, e.g. the RGB video).

        Into channels-last half-precision frames this is a GEMM per batch: ``out`` viewed as (T·H·W, C') is
        ``xᵀ`` times a (C, C') identity padded with zero columns, which cuBLAS reads and writes at memory speed
        (exact: every output is one input times 1 plus zeros).  A strided copy into the interleaved channels
        ran at a fraction of that (~40 ms of a 33-frame 1080p encode on an H100)."""
        channels = x.shape[1]
        rows = x[0, 0].numel()
        frames_last = out.permute(0, 2, 3, 4, 1)
        # Each channel's frames must be one contiguous stretch (a piece split off a longer clip is; the channel
        # stride may be anything): x[b] is then a (C, T·H·W) matrix.
        if out.dtype == x.dtype and x[0, 0].is_contiguous() and _identity_gemm_fits(x, frames_last):
            selection = torch.eye(channels, out.shape[1], dtype=x.dtype, device=x.device)
            for batch in range(x.shape[0]):
                torch.mm(x[batch].flatten(1).t(), selection, out=frames_last[batch].view(rows, -1))
            return
        out[:, :channels].copy_(x)
        out[:, channels:].zero_()

    def copy_into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """``out.copy_(x)`` between channels-last tensors laid out differently, by a Triton copy where one fits:
        rows of frames at other strides (a window of the downsamplers' padded buffer, ~40 ms of a 33-frame
        1080p encode on an H100 by PyTorch's strided copy), or pixels spaced differently (the upsamplers' GEMM
        input next to its bias column, ~30 ms of the decode)."""
        if not (self.triton_kernels and (triton_copy_rows(x, out) or triton_copy_pixels(x, out))):
            out.copy_(x)

    def store_e4m3(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """``out.copy_(x)`` into an e4m3 ``out`` from values already in its range (the upsampling GEMM's
        scaled output), by the Triton casting copy where it fits."""
        if not (self.triton_kernels and triton_store_e4m3_rows(x, out)):
            out.copy_(x)

    def conv3d(self, x: torch.Tensor, conv: nn.Conv3d, *, with_bias: bool = True,
               input_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``conv(x)``, without the bias when ``with_bias`` is False (the caller folds it into the next pass);
        ``x`` may carry zero channels beyond ``conv.in_channels``.  ``input_scale``: the per-call scale of an
        e4m3 ``x`` written by an upsampler (:meth:`upsampler_input_scale`)."""
        weight, bias = conv.weight, conv.bias if with_bias else None
        if x.dtype == vae_fp8.FP8_DTYPE:
            return self.fp8.convolve(x, conv, bias, weight.dtype, self._convolve, input_scale)
        extra_in = x.shape[1] - weight.shape[1]
        extra_out = self._aligned(weight.shape[0], CHANNEL_ALIGNMENT) - weight.shape[0]
        if extra_in or extra_out:
            # Zero weights for the zero input channels and for the padding output channels.
            weight = F.pad(weight, (0, 0, 0, 0, 0, 0, 0, extra_in, 0, extra_out))
            bias = F.pad(bias, (0, extra_out)) if bias is not None else None
        out = self._convolve(x, weight, bias, conv.stride, conv.padding)
        return self._leading_channels(out, conv.out_channels) if extra_out else out

    @staticmethod
    def _leading_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
        """``x[:, :channels]`` (dropping padding channels, e.g. of the decoder's RGB output).  From channels-last
        half-precision frames as a contiguous tensor, by a GEMM per batch with a (channels, C) identity: the
        slice itself is strided, and every later copy of it (joining pieces, casting) ran at a fraction of
        memory speed.  Exact: every output is one input times 1 plus zeros."""
        frames_last = x.permute(0, 2, 3, 4, 1)
        if not _identity_gemm_fits(x, frames_last):
            return x[:, :channels]
        rows = x[0].numel() // x.shape[1]
        selection = torch.eye(channels, x.shape[1], dtype=x.dtype, device=x.device)
        out = x.new_empty((x.shape[0], channels, *x.shape[2:]))
        for batch in range(x.shape[0]):
            torch.mm(selection, frames_last[batch].view(rows, -1).t(), out=out[batch].view(channels, rows))
        return out

    def _convolve(
        self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: tuple, padding: tuple
    ) -> torch.Tensor:
        if self.cudnn_direct and x.is_cuda and x.dtype in HALF_DTYPES and max(weight.shape[2:]) > 1:
            try:
                out = torch.cudnn_convolution(
                    x, weight, list(padding), list(stride), [1, 1, 1], 1, torch.backends.cudnn.benchmark,
                    torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32,
                )
                return out if bias is None else out.add_(bias.view(1, -1, 1, 1, 1))
            except RuntimeError as error:
                self.cudnn_direct = False
                lines = str(error).strip().splitlines()
                logger.warning("torch.cudnn_convolution failed (%s); VAE 3-D convolutions use F.conv3d from now on",
                               lines[0] if lines else type(error).__name__)
        return F.conv3d(x, weight, bias, stride, padding)

    def upscale_shuffle_into(
        self, x: torch.Tensor, conv: nn.Conv3d, time_factor: int, out: torch.Tensor, *, drop_first_copy: bool,
        out_scale: Optional[torch.Tensor] = None,
    ) -> None:
        """Write ``pixel_shuffle_3d(conv(x), time_factor)`` into ``out``, without the second copy of frame 0
        when ``drop_first_copy``; for an e4m3 ``out``, times ``out_scale`` (1,) (one over the
        :meth:`upsampler_input_scale`).  In channels-last memory batched GEMMs write the shuffled frames in
        place (:mod:`.vae_upsample`); otherwise the 1x1x1 conv runs on bands of rows, so its 4x/8x-wide output
        never exists whole, and its bias is added by the shuffling copy instead of a pass of its own."""
        if (out.dtype == vae_fp8.FP8_DTYPE) != (out_scale is not None):
            raise ValueError("an e4m3 upsampler output needs its out_scale, and only it takes one.")
        b, c, frames, height, width = x.shape
        if self.shuffle_gemm and vae_upsample.supports(x, out):
            matrices = vae_upsample.shuffle_matrices(conv.weight, conv.bias, time_factor)
            rows = UPSCALE_BAND_BYTES // (width * matrices.shape[2] * x.element_size())
            if out_scale is not None:
                # Scaled weights: the GEMM's output is already in e4m3's range; it is staged in bands small
                # enough to stay in L2 on their way to the e4m3 store.
                matrices = (matrices.float() * out_scale).to(matrices.dtype)
                rows = min(rows, UPSCALE_STAGE_BYTES // (width * matrices.shape[3] * x.element_size()))
            vae_upsample.upscale_shuffle_gemm_into(
                x, matrices, out, band_rows=rows, drop_first_copy=drop_first_copy, copy=self.copy_into,
                store=self.store_e4m3)
            return
        # Bias of output channel ((dx·2 + dy)·z_r + dz)·C + c, laid out like ``source`` below.
        bias = None if conv.bias is None else conv.bias.view(2, 2, time_factor, c).permute(3, 2, 0, 1)[
            None, :, :, None, :, None, :]
        band_bytes = b * conv.out_channels * width * x.element_size()
        rows = max(1, min(height, UPSCALE_BAND_BYTES // band_bytes))
        for frame in range(frames):
            # This input frame becomes time_factor output frames; frame 0 keeps only its first copy if asked.
            copies = 1 if drop_first_copy and frame == 0 else time_factor
            start = frame * time_factor - (1 if drop_first_copy and frame > 0 else 0)
            for top in range(0, height, rows):
                band = self.conv3d(x[:, :, frame:frame + 1, top:top + rows], conv, with_bias=False)
                band_rows = band.shape[3]
                # Channel ((dx·2 + dy)·z_r + dz)·C + c -> frame dz, row 2i + dx, column 2k + dy (pixel_shuffle_3d).
                source = band[:, :, 0].unflatten(1, (2, 2, time_factor, c)).permute(0, 4, 3, 5, 1, 6, 2)
                target = out[:, :, start:start + copies, 2 * top:2 * (top + band_rows)]
                target = target.unflatten(3, (band_rows, 2)).unflatten(5, (width, 2))
                if out_scale is not None:
                    shuffled = source[:, :, :copies] if bias is None else source[:, :, :copies] + bias[:, :, :copies]
                    target.copy_(shuffled.float() * out_scale)
                elif bias is None:
                    target.copy_(source[:, :, :copies])
                else:
                    torch.add(source[:, :, :copies], bias[:, :, :copies], out=target)
                del band, source

    @contextmanager
    def kernel_settings(self) -> Iterator[None]:
        """cuDNN autotuning for the VAE's convolutions inside the block (the previous setting is restored)."""
        if not self.cudnn_benchmark:
            yield
            return
        previous = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            yield
        finally:
            torch.backends.cudnn.benchmark = previous


# ---------------------------------------------------------------------------------------------------
# The switch
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VAEOptimizationReport:
    """What ``optimize_vae`` switched on for one model (``enabled=False``: the plain path is back)."""

    enabled: bool
    device: str
    dtype: str
    piece_bytes: int = 0
    channels_last: bool = False
    pad_channels: bool = False
    norm_kernel: str = "plain"     # "triton", "compiled" (fused on first use), "eager" or "plain"
    conv_route: str = "plain"      # "cudnn_convolution", "F.conv3d" or "plain"
    conv_route_reason: str = ""
    cudnn_benchmark: bool = False
    quantization: str = "disabled"
    fp8_route: str = ""            # how the fp8 convolutions run (quantization fp8_e4m3fn)

    def summary(self) -> str:
        """One line for the log."""
        if not self.enabled:
            return f"VAE optimizations off (plain path) on {self.device} {self.dtype}"
        return (
            f"VAE optimizations on {self.device} {self.dtype}: streamed in pieces of <= {_size(self.piece_bytes)}, "
            f"{'channels_last_3d' if self.channels_last else 'contiguous'} layout"
            f"{', channel padding' if self.pad_channels else ''}, {self.norm_kernel} GroupNorm, "
            f"convolutions via {self.conv_route} ({self.conv_route_reason})"
            f"{', cudnn.benchmark' if self.cudnn_benchmark else ''}"
            f"{f', convolutions in fp8 e4m3 ({self.fp8_route})' if self.fp8_route else ''}"
        )


def _size(count: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if count >= scale:
            return f"{count / scale:g} {unit}"
    return f"{count} bytes"


def optimize_vae(
    model: "VideoAutoencoder",
    *,
    enabled: bool = True,
    piece_bytes: int = DEFAULT_PIECE_BYTES,
    channels_last: Optional[bool] = None,
    pad_channels: Optional[bool] = None,
    compile_norm: Optional[bool] = None,
    cudnn_benchmark: Optional[bool] = None,
    quantization: str = "disabled",
) -> VAEOptimizationReport:
    """Switch ``model`` to the optimized path (``enabled=False``: back to the plain one); call it with the
    model on its device and dtype.  Options left at None take the best choice for that device.
    ``quantization="fp8_e4m3fn"`` runs the GroupNorm-fed and upsampler convolutions in e4m3 (:mod:`.vae_fp8`;
    not exact: ~4e-2 relative per convolution, for speed and memory)."""
    from ..models.video_vae_v3 import VideoAutoencoder
    from .torch_compile import compile_enabled

    if not isinstance(model, VideoAutoencoder):
        raise VAEOptimizationError(
            f"optimize_vae expects the SeedVR2 VideoAutoencoder, got {type(model).__name__}; pass the VAE model "
            f"itself (e.g. the model returned by load_vae), not a wrapper or the DiT."
        )
    if not isinstance(piece_bytes, int) or isinstance(piece_bytes, bool) or piece_bytes < 1:
        raise VAEOptimizationError(
            f"piece_bytes must be a positive number of bytes (e.g. {DEFAULT_PIECE_BYTES}; smaller uses less memory, "
            f"larger runs faster), got {piece_bytes!r}."
        )
    fp8 = vae_fp8.check_mode(quantization)
    device, dtype = model.device, model.dtype
    dtype_name = str(dtype).removeprefix("torch.")
    previous = runtime_of(model)
    if not enabled:
        model.executor = None
        model.to(memory_format=torch.contiguous_format)
        return VAEOptimizationReport(False, str(device), dtype_name)

    on_cuda = device.type == "cuda"
    cudnn_version = torch.backends.cudnn.version() if on_cuda and torch.backends.cudnn.is_available() else None
    bypass, reason = cudnn_bypass_decision(
        torch.__version__, cudnn_version, cuda=on_cuda, rocm=torch.version.hip is not None
    )
    channels_last = on_cuda if channels_last is None else channels_last
    runtime = VAERuntime(
        channels_last=channels_last,
        pad_channels=on_cuda if pad_channels is None else pad_channels,
        compile_norm=(on_cuda and _triton_available() and compile_enabled()) if compile_norm is None else compile_norm,
        cudnn_direct=bypass,
        cudnn_benchmark=(on_cuda and _cudnn_benchmark_wanted()) if cudnn_benchmark is None else cudnn_benchmark,
        piece_bytes=piece_bytes,
        # The Triton kernels take channels-last frames only.
        triton_kernels=on_cuda and channels_last and _triton_available() and _triton_kernels_wanted(),
        shuffle_gemm=channels_last,
    )
    if fp8:
        # Quantized once per model: a repeated call (the benchmark's runs) keeps the prepared weights.
        same = previous is not None and previous.fp8 is not None and previous.fp8.device == device
        runtime.fp8 = previous.fp8 if same else vae_fp8.Fp8Convolutions.for_model(
            model, triton_wanted=runtime.triton_kernels)
    model.to(memory_format=runtime.memory_format)
    model.executor = VAEExecutor(runtime)
    report = VAEOptimizationReport(
        enabled=True,
        device=str(device),
        dtype=dtype_name,
        piece_bytes=piece_bytes,
        channels_last=runtime.channels_last,
        pad_channels=runtime.pad_channels,
        norm_kernel=(
            "triton" if runtime.triton_kernels else "compiled" if runtime.compile_norm and on_cuda else "eager"
        ),
        conv_route="cudnn_convolution" if bypass else "F.conv3d",
        conv_route_reason=reason,
        cudnn_benchmark=runtime.cudnn_benchmark,
        quantization=quantization,
        fp8_route=runtime.fp8.route if runtime.fp8 is not None else "",
    )
    logger.info(report.summary())
    return report


def runtime_of(model: object) -> Optional[VAERuntime]:
    """The :class:`VAERuntime` ``optimize_vae`` gave ``model`` (None: the plain path, or not a VAE)."""
    return getattr(getattr(model, "executor", None), "runtime", None)


# ---------------------------------------------------------------------------------------------------
# Memory estimate and automatic tile size
# ---------------------------------------------------------------------------------------------------

DIRECTIONS = ("encode", "decode")
MAX_TILE_SIZE = 8192


def estimate_peak_bytes(
    config: "VAEConfig",
    direction: str,
    height: int,
    width: int,
    *,
    frames: int,
    dtype: torch.dtype,
    piece_bytes: int = DEFAULT_PIECE_BYTES,
    fused_norm: bool = True,
) -> int:
    """Estimated peak bytes of the optimized path's activations for ``frames`` video frames of
    ``height`` x ``width`` pixels (temporal slicing on, weights not counted).

    Three terms, each from the architecture in ``config``:

    * look-back (clips of more than one frame): every causal convolution keeps its last 2 input frames
      between calls until the clip's last chunk (its input channels
      at its resolution; the upsampler convolutions keep the pre-upscale input frames instead: 2 frames
      without time upsampling, 1 with);
    * one piece at full resolution, the widest point of the path: the input of the first full-resolution
      resnet convolution (``C_in`` = the last upsampler's width when decoding, ``block_out_channels[0]``
      when encoding), its padded input (2 more frames), its output (``C_out`` channels) and the 2-frame
      look-back copy: ``(2f + 4)·C_in + f·C_out`` frames of pixels, ``f`` the frames of a piece (streamed
      pieces of ``piece_bytes``, at most one causal chunk of 5 frames); plus ``f·C_in`` float32 values
      when the GroupNorm runs eagerly (``fused_norm=False``: CPU, or no compiler);
    * the float32 result (video when decoding, posterior moments when encoding).

    Measured against live-tensor tracking on CPU this is an upper bound within ~35 % (see the tests).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}.")
    if min(height, width, frames) < 1:
        raise ValueError(f"height, width and frames must be positive, got {height}x{width}, {frames} frames.")
    widths, levels, per_level = config.block_out_channels, config.num_levels, config.layers_per_block
    pixels = height * width

    def at_level(level: int) -> float:  # pixels at the resolution of encoder level ``level``
        return pixels / 4**level

    # Σ kept frames x input channels x pixels over every causal convolution.
    if direction == "encode":
        kept = 2 * config.in_channels * pixels  # conv_in
        for level, channels in enumerate(widths):
            inputs = widths[max(level - 1, 0)] + (2 * per_level - 1) * channels
            kept += 2 * inputs * at_level(level)
            if levels - 1 - config.temporal_scale_num <= level < levels - 1:
                kept += 2 * channels * at_level(level)  # the strided temporal downsampler
        kept += 2 * 5 * widths[-1] * at_level(levels - 1)  # mid block (4 convolutions) and conv_out
        wide_in = wide_out = widths[0]
        latent_frames = (frames - 1) // config.temporal_downsample_factor + 1
        result = latent_frames * 2 * config.latent_channels * at_level(levels - 1)
    else:
        reversed_widths = widths[::-1]
        bottom = levels - 1
        kept = 2 * (config.latent_channels + 4 * reversed_widths[0]) * at_level(bottom)  # conv_in, mid block
        for index, channels in enumerate(reversed_widths):
            level = bottom - index
            inputs = reversed_widths[max(index - 1, 0)] + (2 * (per_level + 1) - 1) * channels
            kept += 2 * inputs * at_level(level)
            if index < bottom:
                time_factor = 2 if index < config.temporal_scale_num else 1
                kept += (2 // time_factor) * channels * at_level(level)  # upsampler: its input frames
        kept += 2 * widths[0] * pixels  # conv_out
        wide_in, wide_out = widths[min(1, levels - 1)], widths[0]
        result = frames * config.out_channels * pixels
    if frames == 1:
        kept = 0  # one frame is one chunk, its last: no convolution keeps look-back (CausalMemory.closing)
    element = torch.empty((), dtype=dtype).element_size()
    chunk = min(frames, config.slicing_sample_min_size + 1)
    piece = max(1, min(chunk, piece_bytes // (wide_in * pixels * element)))
    working = ((2 * piece + 4) * wide_in + piece * wide_out) * pixels * element
    if not fused_norm:
        working += piece * wide_in * pixels * 4
    return int(kept * element + working + result * 4)


def choose_tile_size(
    free_bytes: int,
    *,
    config: "VAEConfig",
    direction: str,
    frames: int,
    dtype: torch.dtype,
    piece_bytes: int = DEFAULT_PIECE_BYTES,
    fused_norm: bool = True,
) -> int:
    """The largest square tile (video pixels, a multiple of 32, at most 8192) whose estimated peak
    (:func:`estimate_peak_bytes`) fits in ``free_bytes``: the ``tile_size`` for "auto" tiling."""
    from ..models.video_vae_v3.tiling import TILE_MULTIPLE

    multiple = max(TILE_MULTIPLE, config.spatial_downsample_factor)
    estimate = lambda size: estimate_peak_bytes(  # noqa: E731
        config, direction, size, size, frames=frames, dtype=dtype, piece_bytes=piece_bytes, fused_norm=fused_norm
    )
    # The estimate is not monotone in the size (a larger tile can mean fewer frames per piece): try all.
    fitting = [size for size in range(multiple, MAX_TILE_SIZE + 1, multiple) if estimate(size) <= free_bytes]
    if not fitting:
        raise TileSizeError(
            f"VAE {direction}: even a {multiple}x{multiple} px tile needs about {estimate(multiple) / 2**20:.0f} MiB, "
            f"but only {free_bytes / 2**20:.0f} MiB are free. Free GPU memory (offload the DiT, close other "
            f"models) or process fewer frames per batch."
        )
    return fitting[-1]
