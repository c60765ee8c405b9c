"""fp8 (e4m3) convolutions for the optimized VAE: its ``fp8_e4m3fn`` quantization.

What is quantized: every 3x3x3 convolution whose input is ``SiLU(GroupNorm(.))`` — the two of each resnet
block and the encoder's and decoder's conv_out, ~70 % of the VAE's FLOPs at 1080p.  The runtime's GroupNorm
kernel writes that input into the convolution's padded input, so quantizing it costs no pass of its own:
the GroupNorm stores e4m3 instead of bf16.  conv_in, the resamplers (whose input comes from a strided copy
or the upsampling GEMMs) and the shortcuts stay in the compute dtype.

Scales.  A GroupNorm output channel is ``gamma_c·z + beta_c`` with ``z`` normalised, so every input channel
gets a static scale ``s_c = (|gamma_c|·INPUT_RANGE + |beta_c|) / 448``: a value ``INPUT_RANGE`` standard
deviations out still fits e4m3 (448 is its largest value; beyond it the GroupNorm saturates), and values
of about one deviation land near 448 / INPUT_RANGE, far above e4m3's smallest normal number.  The GroupNorm
stores ``SiLU(.) / s_c``; ``s_c`` is folded into the weights, which are then quantized per output channel:
``Wq = e4m3(W·s_c / w_o)``, ``w_o = amax_o(W·s_c) / 448``.  A convolution is ``w_o · Σ Wq·xq``.  Each
operand's rounding errs by up to 2^-4 relative, so a convolution's output differs from bf16's by ~4e-2
relative (measured: docs/performance.md); the look-back frames kept between pieces and the padded inputs
take half the memory.

Compute.  With Triton on a GPU that has fp8 tensor cores (compute capability 8.9+), the implicit-GEMM
kernel of :mod:`.conv3d_triton` multiplies the e4m3 operands (1.3-1.6x cuDNN's bf16 on an H100).  Elsewhere
(CPU, older GPUs, no Triton, ``SEEDVR2_VAE_TRITON=0``, or after a kernel failure: one log line) the same e4m3
values are widened to the compute dtype and convolved by PyTorch: the same numbers, without the speed.
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
FP8_CAPABILITY = (8, 9)  # Ada and Hopper: the first with fp8 tensor cores
MIN_INTERLEAVED_CHANNELS = 8  # outputs with fewer channels are written channel-planar
MODE = "fp8_e4m3fn"
MODES = ("disabled", MODE)


class VAEQuantizationError(ValueError):
    """An unknown VAE quantization mode."""


def check_mode(mode: str) -> bool:
    """Whether ``mode`` (one of :data:`MODES`) asks for fp8 convolutions; a clear error for anything else."""
    if mode not in MODES:
        raise VAEQuantizationError(f"VAE quantization must be one of {MODES}, got {mode!r}.")
    return mode == MODE


@dataclass
class Fp8Conv:
    """One resnet convolution in e4m3: what its input's producer multiplies by, and the quantized weights."""

    input_multiplier: torch.Tensor  # (C,) float32, 1 / s_c: the GroupNorm stores SiLU(.) · this, saturated
    matrix: torch.Tensor            # (Cout, 27·C) e4m3, conv3d_triton.weight_matrix layout
    weight_scale: torch.Tensor      # (Cout,) float32: the convolution's output is w_o · Σ matrix·input

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The (Cout, C, 3, 3, 3) weight that convolves the stored e4m3 input values to the same result."""
        out_channels, columns = self.matrix.shape
        weight = self.matrix.float() * self.weight_scale[:, None]
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


def prepare(conv: nn.Conv3d, norm: nn.GroupNorm) -> Fp8Conv:
    """The e4m3 form of ``conv`` (a 3x3x3 convolution) fed by ``SiLU(norm(.))``."""
    if tuple(conv.kernel_size) != (3, 3, 3) or tuple(conv.stride) != (1, 1, 1) or tuple(conv.padding) != (0, 1, 1):
        raise ValueError("fp8 VAE convolutions are the causal 3x3x3 ones: stride 1, spatial padding 1.")
    scales = input_scales(norm)
    scaled = conv.weight.detach().float() * scales.view(1, -1, 1, 1, 1)  # s_c folded into the weights
    matrix, weight_scale = quantize_weight_fp8(weight_matrix(scaled))
    return Fp8Conv((1.0 / scales).contiguous(), matrix, weight_scale)


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
        self._unit_scale = torch.ones(1, dtype=torch.float32, device=self.device)  # the input's: s_c is in W

    @classmethod
    def for_model(cls, model: nn.Module, *, triton_wanted: bool) -> "Fp8Convolutions":
        """Every convolution of a VideoAutoencoder that follows a GroupNorm and SiLU, quantized."""
        from ..models.video_vae_v3.resnet import ResnetBlock3D

        convs: dict[nn.Module, Fp8Conv] = {}
        for block in model.modules():
            if isinstance(block, ResnetBlock3D):
                convs[block.conv1] = prepare(block.conv1, block.norm1)
                convs[block.conv2] = prepare(block.conv2, block.norm2)
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
        """What the producer of ``conv``'s input multiplies by before storing e4m3 (None: not quantized)."""
        prepared = self.convs.get(conv)
        return None if prepared is None else prepared.input_multiplier

    def convolve(self, x: torch.Tensor, conv: nn.Module, bias: Optional[torch.Tensor], out_dtype: torch.dtype,
                 fallback: Convolve) -> torch.Tensor:
        """``conv`` of the e4m3 padded input ``x`` (B, C, 2 + T, H, W), plus ``bias``, in ``out_dtype``.
        ``fallback(x, weight, bias, stride, padding)``: the runtime's convolution, for widened operands."""
        prepared = self.convs[conv]
        if self.kernel_failure is None:
            out = self._triton(x, prepared, bias, out_dtype)
            if out is not None:
                return out
        weight = prepared.dequantized_weight(out_dtype)
        return fallback(x.to(out_dtype), weight, bias, conv.stride, conv.padding)

    def _triton(self, x: torch.Tensor, prepared: Fp8Conv, bias: Optional[torch.Tensor],
                out_dtype: torch.dtype) -> Optional[torch.Tensor]:
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
                fp8_scales=(self._unit_scale, prepared.weight_scale))
        except torch.cuda.OutOfMemoryError:
            raise  # not a kernel problem: the caller must shrink the work
        except Exception as error:  # Triton/toolchain failure: the widened operands give the same numbers
            lines = str(error).strip().splitlines()
            self.kernel_failure = f"the Triton kernel failed: {type(error).__name__}: {lines[0] if lines else ''}"
            logger.warning("fp8 VAE convolutions: %s; widening the e4m3 values for PyTorch's convolution from now on",
                           self.kernel_failure)
            return None
