"""fp8 (e4m3) convolutions for the optimized VAE: its ``fp8_e4m3fn`` quantization.

Quantized: every 3x3x3 convolution whose input is ``SiLU(GroupNorm(.))`` (the resnets' and conv_out) and each
decoder upsampler's 3x3x3 convolution.  The producer of such an input (the GroupNorm, the upsampling GEMM's
store) writes e4m3 into the padded input, so quantizing costs no pass of its own.  GroupNorm-fed inputs take
a static per-channel scale folded into the weights (:func:`prepare`); upsampler inputs a per-call scale from
a bound on the 1x1 conv's outputs (:class:`ShuffleBound`); weights are quantized per output channel.  The
products run on fp8 tensor cores through :mod:`.conv3d_triton` where it can, else widened by PyTorch (the
same numbers).  Not exact; the definitions and measurements are in docs/performance.md.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3's largest finite value
# Standard deviations of a normalised activation that still fit e4m3 before the GroupNorm saturates them.
INPUT_RANGE = 64.0
# The smallest scale: an all-zero row or channel (gamma = beta = 0) quantizes to zeros, no division by zero.
MIN_SCALE = 1e-12
# An upsampler input's bound maps to 448 / SHUFFLE_HEADROOM: the rounding of the scaled compute-dtype GEMM
# (its weights and output, < 1 %) must not carry a value past 464, from where e4m3 rounding gives NaN.
SHUFFLE_HEADROOM = 1.02
FP8_CAPABILITY = (8, 9)  # Ada and Hopper: the first with fp8 tensor cores
MIN_INTERLEAVED_CHANNELS = 8  # outputs with fewer channels are written channel-planar
# The VAE loader's quantization modes: exact, or fp8 convolutions.  A literal, read without importing this
# module (src.options).
MODES = ("disabled", "fp8_e4m3fn")
MODE = MODES[1]


class VAEQuantizationError(ValueError):
    """An unknown VAE quantization mode."""


def check_mode(mode: str) -> bool:
    """Whether ``mode`` (one of :data:`MODES`) asks for fp8 convolutions; a clear error for anything else."""
    if mode not in MODES:
        raise VAEQuantizationError(f"VAE quantization must be one of {MODES}, got {mode!r}.")
    return mode == MODE


@dataclass
class ShuffleBound:
    """What bounds an upsampler's 1x1 conv outputs from the largest magnitude of each input channel."""

    abs_weight: torch.Tensor  # (N, C) float32: |W| of the 1x1 conv
    abs_bias: torch.Tensor    # (N,) float32: |b| (zeros without a bias)

    @classmethod
    def of(cls, upscale_conv: nn.Conv3d) -> "ShuffleBound":
        weight = upscale_conv.weight.detach().float().flatten(1).abs()
        bias = upscale_conv.bias
        return cls(weight, weight.new_zeros(weight.shape[0]) if bias is None else bias.detach().float().abs())

    def input_scale(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """``s`` (1,) float32 for the 1x1 conv outputs of ``inputs`` (each (B, C, T, H, W)): every output
        divided by ``s`` lies within 448 / SHUFFLE_HEADROOM."""
        largest = None
        for x in inputs:
            dims = (0, 2, 3, 4)
            # Two reductions instead of x.abs(): no temporary the size of x.
            magnitude = torch.maximum(x.amax(dim=dims), -x.amin(dim=dims)).float()
            largest = magnitude if largest is None else torch.maximum(largest, magnitude)
        bound = (self.abs_weight @ largest + self.abs_bias).amax()
        return (bound * (SHUFFLE_HEADROOM / FP8_MAX)).clamp_min(MIN_SCALE).reshape(1)


@dataclass
class Fp8Conv:
    """One convolution in e4m3: the quantized weights, and how its input gets into the e4m3 range."""

    matrix: torch.Tensor            # (Cout, 27·C) e4m3, conv3d_triton.weight_matrix layout
    weight_scale: torch.Tensor      # (Cout,) float32: the convolution's output is w_o · Σ matrix·input
    # GroupNorm-fed: (C,) float32, 1 / s_c, what the GroupNorm multiplies SiLU(.) by before storing (s_c is
    # folded into the weights).  None for an upsampler's conv, whose scale is chosen per call (``bound``).
    input_multiplier: Optional[torch.Tensor] = None
    bound: Optional[ShuffleBound] = None

    def dequantized_weight(self, dtype: torch.dtype, input_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The (Cout, C, 3, 3, 3) weight that convolves the stored e4m3 input values to the same result
        (``input_scale``: the per-call scale of an upsampler conv's input)."""
        out_channels, columns = self.matrix.shape
        weight = self.matrix.float() * self.weight_scale[:, None]
        if input_scale is not None:
            weight = weight * input_scale
        return weight.view(out_channels, 3, 3, 3, columns // 27).permute(0, 4, 1, 2, 3).to(dtype)


def input_scales(norm: nn.GroupNorm) -> torch.Tensor:
    """``s_c`` (C,) float32 for the input channels that ``norm`` (then SiLU) produces; |SiLU(y)| <= |y|."""
    gamma, beta = norm.weight.detach().float().abs(), norm.bias.detach().float().abs()
    return ((gamma * INPUT_RANGE + beta) / FP8_MAX).clamp_min(MIN_SCALE)


def weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A (Cout, C, 3, 3, 3) convolution weight as conv3d_triton's contiguous (Cout, 27·C) matrix: column
    ``((kt·3 + kh)·3 + kw)·C + c`` holds ``weight[:, c, kt, kh, kw]``."""
    return weight.permute(0, 2, 3, 4, 1).reshape(weight.shape[0], -1).contiguous()


def quantize_weight_fp8(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A :func:`weight_matrix` in e4m3 per output channel: (matrix_fp8, scale (Cout,) float32), with
    ``matrix ≈ matrix_fp8 · scale[:, None]`` and scale = row amax / 448."""
    rows = matrix.float()
    scale = (rows.abs().amax(dim=1) / FP8_MAX).clamp_min(MIN_SCALE)
    return (rows / scale[:, None]).to(FP8_DTYPE), scale


def _check_shape(conv: nn.Conv3d) -> None:
    if tuple(conv.kernel_size) != (3, 3, 3) or tuple(conv.stride) != (1, 1, 1) or tuple(conv.padding) != (0, 1, 1):
        raise ValueError("fp8 VAE convolutions are the causal 3x3x3 ones: stride 1, spatial padding 1.")


def prepare(conv: nn.Conv3d, norm: nn.GroupNorm) -> Fp8Conv:
    """The e4m3 form of ``conv`` (a 3x3x3 convolution) fed by ``SiLU(norm(.))``."""
    _check_shape(conv)
    scales = input_scales(norm)
    scaled = conv.weight.detach().float() * scales.view(1, -1, 1, 1, 1)  # s_c folded into the weights
    matrix, weight_scale = quantize_weight_fp8(weight_matrix(scaled))
    return Fp8Conv(matrix, weight_scale, input_multiplier=(1.0 / scales).contiguous())


def prepare_upsampler(upsampler: nn.Module) -> Fp8Conv:
    """The e4m3 form of a decoder upsampler's 3x3x3 ``conv``, fed by its ``upscale_conv`` and pixel shuffle."""
    _check_shape(upsampler.conv)
    matrix, weight_scale = quantize_weight_fp8(weight_matrix(upsampler.conv.weight.detach().float()))
    return Fp8Conv(matrix, weight_scale, bound=ShuffleBound.of(upsampler.upscale_conv))


def kernel_unavailable(device: torch.device, triton_wanted: bool) -> Optional[str]:
    """Why the Triton fp8 kernel cannot run on ``device`` (None: it can)."""
    if device.type != "cuda":
        return f"{device.type} has no fp8 tensor cores"
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_CAPABILITY:
        return f"compute capability {capability[0]}.{capability[1]} has no fp8 tensor cores (8.9+ does)"
    if not triton_wanted:
        return "the Triton kernels are switched off or Triton is missing"
    return None


Convolve = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor], tuple, tuple], torch.Tensor]


class Fp8Convolutions:
    """The e4m3 form of every GroupNorm-fed convolution of one VAE, and how to run them."""

    def __init__(self, convs: dict[nn.Module, Fp8Conv], device: torch.device, *, triton_wanted: bool) -> None:
        self.convs, self.device = convs, device
        self.kernel_failure = kernel_unavailable(device, triton_wanted)
        self._unit_scale = torch.ones(1, dtype=torch.float32, device=self.device)  # GroupNorm-fed: s_c is in W

    @classmethod
    def for_model(cls, model: nn.Module, *, triton_wanted: bool) -> "Fp8Convolutions":
        """Every convolution of a VideoAutoencoder that follows a GroupNorm and SiLU, and every upsampler's
        3x3x3 convolution, quantized."""
        from ..models.video_vae_v3.resampling import Upsampler3D
        from ..models.video_vae_v3.resnet import ResnetBlock3D

        convs: dict[nn.Module, Fp8Conv] = {}
        for block in model.modules():
            if isinstance(block, ResnetBlock3D):
                convs[block.conv1] = prepare(block.conv1, block.norm1)
                convs[block.conv2] = prepare(block.conv2, block.norm2)
            elif isinstance(block, Upsampler3D):
                convs[block.conv] = prepare_upsampler(block)
        for coder in (model.encoder, model.decoder):
            convs[coder.conv_out] = prepare(coder.conv_out, coder.conv_norm_out)
        return cls(convs, next(model.parameters()).device, triton_wanted=triton_wanted)

    @property
    def route(self) -> str:
        """How the convolutions run, for the log."""
        if self.kernel_failure is None:
            return "Triton fp8 implicit GEMM"
        return f"e4m3 values widened for PyTorch's convolution ({self.kernel_failure})"

    def input_multiplier(self, conv: nn.Module) -> Optional[torch.Tensor]:
        """What the GroupNorm before ``conv`` multiplies by before storing e4m3 (None: ``conv`` is not quantized
        or not GroupNorm-fed)."""
        prepared = self.convs.get(conv)
        return None if prepared is None else prepared.input_multiplier

    def upsampler_input_scale(self, conv: nn.Module, inputs: list[torch.Tensor]) -> Optional[torch.Tensor]:
        """The scale (1,) of an upsampler ``conv``'s e4m3 input for one call that shuffles ``inputs``
        (None: ``conv`` is not a quantized upsampler conv)."""
        prepared = self.convs.get(conv)
        return None if prepared is None or prepared.bound is None else prepared.bound.input_scale(inputs)

    def convolve(self, x: torch.Tensor, conv: nn.Module, bias: Optional[torch.Tensor], out_dtype: torch.dtype,
                 fallback: Convolve, input_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``conv`` of the e4m3 padded input ``x`` (B, C, 2 + T, H, W), plus ``bias``, in ``out_dtype``;
        ``input_scale`` (1,): what the stored values stand for per unit (an upsampler input's per-call scale).
        ``fallback(x, weight, bias, stride, padding)``: the runtime's convolution, for widened operands."""
        prepared = self.convs[conv]
        if (prepared.bound is not None) != (input_scale is not None):
            raise ValueError("an upsampler's e4m3 input carries its per-call scale, and only it does.")
        if self.kernel_failure is None:
            out = self._triton(x, prepared, bias, out_dtype, input_scale)
            if out is not None:
                return out
        weight = prepared.dequantized_weight(out_dtype, input_scale)
        return fallback(x.to(out_dtype), weight, bias, conv.stride, conv.padding)

    def _triton(self, x: torch.Tensor, prepared: Fp8Conv, bias: Optional[torch.Tensor],
                out_dtype: torch.dtype, input_scale: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        try:
            kernels = importlib.import_module(".conv3d_triton", __package__)
            if not kernels.usable_tiles(x.shape[1], prepared.matrix.shape[0], True):
                return None  # a channel count the kernel's K steps do not divide
            out_channels = prepared.matrix.shape[0]
            # A few output channels (the decoder's RGB) go to planes of their own: later copies of an interleaved
            # 3-channel tensor run at a fraction of memory speed.
            layout = torch.channels_last_3d if out_channels >= MIN_INTERLEAVED_CHANNELS else torch.contiguous_format
            out = torch.empty((x.shape[0], out_channels, x.shape[2] - 2, *x.shape[3:]), dtype=out_dtype,
                              device=x.device, memory_format=layout)
            return kernels.conv3d_causal(
                x, prepared.matrix, bias=bias, out=out, fp8_fast_accumulation=True,
                fp8_scales=(self._unit_scale if input_scale is None else input_scale, prepared.weight_scale))
        except torch.cuda.OutOfMemoryError:
            raise  # not a kernel problem: the caller must shrink the work
        except Exception as error:  # Triton/toolchain failure: the widened operands give the same numbers
            lines = str(error).strip().splitlines()
            self.kernel_failure = f"the Triton kernel failed: {type(error).__name__}: {lines[0] if lines else ''}"
            logger.warning("fp8 VAE convolutions: %s; widening the e4m3 values for PyTorch's convolution from now on",
                           self.kernel_failure)
            return None
