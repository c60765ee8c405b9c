"""Quantized Linear layers for the DiT (FP8 and NVFP4) and the switch behind the loader's ``quantization`` input.

The DiT is plain ``nn.Linear`` modules; :func:`quantize_linears` (on a loaded model) and
:func:`prepare_model_for_weights` (on a ``meta`` model, before ``load_state_dict(assign=True)``) replace
them by the layers below without touching the model code.  State-dict keys stay ``<name>.weight`` /
``<name>.bias``, and each layer quantizes whatever weight it is loaded with, so the released checkpoints
load into the quantized model as they are.

Modes (GGUF files are handled by :mod:`.gguf`):

* ``disabled``: weights as stored.  An fp8 file stays fp8 in memory and each layer upcasts its weight to
  the compute dtype when called (memory saving only).
* ``fp8_e4m3fn``: float8_e4m3fn weights with one float32 scale per output channel (a plain fp8 cast from
  the file keeps scale 1); activations are quantized per token on the fly and each layer is one
  ``torch._scaled_mm`` (CUDA, compute capability >= 8.9).
* ``fp4_experimental``: NVFP4 weights dequantized to the compute dtype when called; runs everywhere
  (4.5 bits per weight, no speed-up).
* ``fp4_scaled``: NVFP4 weights and activations; an activation gets a dynamic per-tensor scale and e4m3
  block scales; each layer is one block-scaled ``torch._scaled_mm`` (CUDA, compute capability >= 10.0).
* ``fp4_scaled_fast``: as ``fp4_scaled``, but activations get block scales only (tensor scale 1), one
  reduction over the activation less per call.  The e4m3 block scales must then cover the activations'
  absolute range on their own: a block whose largest magnitude is below 6·2⁻¹⁰ ≈ 0.006 flushes to zero.

NVFP4: every 16 consecutive inputs of a row share one float8_e4m3fn scale and the tensor has one float32
scale; the values are e2m1 (0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6), two per byte, the even-indexed value in
the low nibble.

Where a mode's matmul is unavailable, FP8 layers upcast their weight per call (weight-only), NVFP4 layers
dequantize theirs, and ``fp4_scaled*`` become ``fp8_e4m3fn`` at quantization time (:func:`resolve_mode`);
each fallback is logged once per process.

Measured errors of each mode: docs/performance.md ("Notes moved from module docstrings").
"""
from __future__ import annotations

import enum
import functools
import importlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from fnmatch import fnmatch
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..options import check_implemented
from . import fused_kernels

log = logging.getLogger("seedvr2")

COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP8_FILE_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# Time embedding and the input/output projections: small, and their errors reach every token.
DEFAULT_SKIP = ("vid_in.*", "txt_in", "emb_in.*", "vid_out.*")

FP8_MAX = 448.0        # largest finite float8_e4m3fn
FP4_MAX = 6.0          # largest e2m1
NVFP4_BLOCK = 16       # inputs sharing one e4m3 scale
_AMAX_FLOOR = 1e-12    # keeps the scales of all-zero rows and blocks finite

# The DiT loader's quantization modes, in the order the node and the command line offer them; "gguf" means
# the weights come quantized from a .gguf file (:mod:`.gguf`).  A literal, read without importing this
# module (src.options).
QUANTIZATION_MODES = ("disabled", "fp8_e4m3fn", "fp4_experimental", "fp4_scaled", "fp4_scaled_fast", "gguf")
# Per quantization mode: how NVFP4Linear scales its activations ("none": they stay in the compute dtype).
_FP4_ACTIVATION_SCALING = {
    "fp4_experimental": "none",
    "fp4_scaled": "tensor_and_block",
    "fp4_scaled_fast": "block",
}
check_implemented(__name__, QUANTIZATION_MODES, ("disabled", "fp8_e4m3fn", "gguf", *_FP4_ACTIVATION_SCALING))


class QuantizationError(ValueError):
    """A quantization setting or weight cannot be used; the message says what to change."""


_already_logged: set[str] = set()


def _log_once(message: str, level: int = logging.WARNING) -> None:
    """Log ``message`` the first time this process sees it (fallbacks would otherwise repeat per layer)."""
    if message not in _already_logged:
        _already_logged.add(message)
        log.log(level, message)


# ------------------------------------------------------------------------------------------ capabilities
@dataclass(frozen=True)
class DeviceCapabilities:
    """What a device and this torch build offer for low-precision matmuls."""

    device_type: str
    cuda_capability: tuple[int, int] | None = None
    is_rocm: bool = False
    has_scaled_mm: bool = hasattr(torch, "_scaled_mm")
    has_float4: bool = hasattr(torch, "float4_e2m1fn_x2")

    @classmethod
    def of(cls, device: torch.device | str) -> DeviceCapabilities:
        """Query the real device."""
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            return cls(device.type)
        return cls("cuda", tuple(torch.cuda.get_device_capability(device)), is_rocm=torch.version.hip is not None)


def _tensor_core_support(caps: DeviceCapabilities, minimum: tuple[int, int], what: str) -> tuple[bool, str]:
    if caps.device_type != "cuda":
        return False, f"the device is {caps.device_type}, and {what} runs on NVIDIA GPUs only"
    if caps.is_rocm:
        return False, f"this is a ROCm build; {what} is only enabled for NVIDIA GPUs"
    if not caps.has_scaled_mm:
        return False, f"torch {torch.__version__} has no torch._scaled_mm (update torch)"
    if caps.cuda_capability is None or caps.cuda_capability < minimum:
        found = "unknown" if caps.cuda_capability is None else "%d.%d" % caps.cuda_capability
        return False, f"{what} needs compute capability >= {minimum[0]}.{minimum[1]}, this GPU has {found}"
    return True, f"{what} available"


def fp8_matmul_support(caps: DeviceCapabilities) -> tuple[bool, str]:
    """Whether FP8 tensor-core matmuls (Ada/Hopper and newer) can run, and why not."""
    return _tensor_core_support(caps, (8, 9), "FP8 matmul")


def nvfp4_matmul_support(caps: DeviceCapabilities) -> tuple[bool, str]:
    """Whether block-scaled NVFP4 matmuls (Blackwell) can run, and why not."""
    if not caps.has_float4:
        return False, f"torch {torch.__version__} has no float4_e2m1fn_x2 dtype (NVFP4 needs torch >= 2.8)"
    return _tensor_core_support(caps, (10, 0), "NVFP4 matmul")


def default_device() -> torch.device:
    """The device the DiT will run on when none is named: the current CUDA device, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


# ---------------------------------------------------------------------------------------------- FP8 codec
def _scaling_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to divide a tensor by its scales in: its own when it holds any reciprocal scale, so a bf16
    activation is not first copied to float32; float16 (largest value 65504) is upcast."""
    return torch.float32 if dtype == torch.float16 else dtype


def quantize_fp8(x: torch.Tensor, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """float8_e4m3fn values and float32 scales with ``x ≈ values · scale``; one scale per slice along
    ``dim`` (kept as a size-1 dim), or one for the whole tensor when ``dim`` is None."""
    magnitude = x.abs()
    amax = magnitude.amax() if dim is None else magnitude.amax(dim=dim, keepdim=True)
    scale = amax.float().clamp(min=_AMAX_FLOOR) / FP8_MAX
    work = _scaling_dtype(x.dtype)
    # The clamp absorbs the rounding of a bf16 product just above 448 (a cast would make it NaN).
    values = (x.to(work) * scale.reciprocal().to(work)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return values, scale


def quantize_fp8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel float8_e4m3fn weight ``(out, in)`` and its float32 scales ``(out,)``."""
    values, scale = quantize_fp8(weight.float(), dim=1)
    return values, scale.squeeze(1)


class _RowQuantizer:
    """Per-row FP8 quantization of 2-D activations: the one-pass Triton kernel of :mod:`.fp8_triton` on CUDA
    (unless the DiT's Triton kernels are switched off, see :func:`.fused_kernels.triton_kernels_wanted`, or while
    torch.compile traces, which fuses the PyTorch ops itself), else :func:`quantize_fp8`.  A kernel that fails to import, compile or launch logs one line
    and leaves the work to PyTorch for good."""

    def __init__(self) -> None:
        self.failure: str | None = None

    def _wanted(self, x: torch.Tensor) -> bool:
        return (self.failure is None and x.is_cuda and not torch.compiler.is_compiling()
                and not (torch.is_grad_enabled() and x.requires_grad)
                and fused_kernels.triton_kernels_wanted() and fused_kernels.triton_installed())

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._wanted(x):
            try:
                kernels = importlib.import_module(".fp8_triton", __package__)
                if kernels.quantize_rows_supported(x):
                    return kernels.quantize_rows(x)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as error:  # Triton/toolchain failure: PyTorch computes the same
                lines = str(error).strip().splitlines()
                self.failure = f"{type(error).__name__}: {lines[0][:200] if lines else ''}"
                log.warning("SeedVR2: the Triton FP8 quantization kernel failed (%s); quantizing activations with "
                            "PyTorch ops from now on", self.failure)
        return quantize_fp8(x, dim=1)


quantize_rows_fp8 = _RowQuantizer()


def _scaled_mm(a, b, scale_a, scale_b, bias=None, out_dtype=None) -> torch.Tensor:
    result = torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=out_dtype)
    return result[0] if isinstance(result, tuple) else result  # torch < 2.4 also returned amax


class Fp8Matmul(enum.Enum):
    """How an FP8Linear multiplies on a given device."""

    ROWWISE = "fp8 activations, per-token scales"
    TENSORWISE = "fp8 activations, one scale per tensor"
    WEIGHT_ONLY = "weight upcast to the compute dtype"


def fp8_scaled_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    rowwise: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``x Wᵀ + b`` for 2-D ``x`` with ``x`` quantized to fp8 on the fly and one ``torch._scaled_mm``.

    ``weight`` is row-major ``(out, in)``, so ``weight.t()`` is the column-major second operand the
    kernel requires; ``weight_scale`` holds one scale per output channel.
    """
    if rowwise:
        x_fp8, x_scale = quantize_rows_fp8(x)                        # scale_a (M, 1), scale_b (1, N)
        return _scaled_mm(x_fp8, weight.t(), x_scale, weight_scale.view(1, -1), bias, out_dtype)
    # Tensor-wise kernels take scalar scales only: the per-channel weight scale is applied afterwards.
    x_fp8, x_scale = quantize_fp8(x)
    one = torch.ones((), device=x.device)
    out = _scaled_mm(x_fp8, weight.t(), x_scale, one, out_dtype=out_dtype) * weight_scale.to(out_dtype)
    return out if bias is None else out + bias


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp(min=1e-30)).item()


def _fp8_self_test(device: torch.device, out_dtype: torch.dtype, rowwise: bool) -> bool:
    """Run the kernel once on a small problem and check it against the dequantized product."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 64, generator=generator).to(device, out_dtype)
    weight, scale = quantize_fp8_weight(torch.randn(48, 64, generator=generator).to(device))
    bias = torch.randn(48, generator=generator).to(device, out_dtype)
    try:
        out = fp8_scaled_linear(x, weight, scale, bias, rowwise=rowwise, out_dtype=out_dtype)
    except (RuntimeError, NotImplementedError) as error:
        log.debug("fp8 %s _scaled_mm unavailable on %s: %s", "rowwise" if rowwise else "tensorwise", device, error)
        return False
    expected = F.linear(x.float(), weight.float() * scale[:, None], bias.float())
    return _relative_error(out, expected) < 0.1


_fp8_matmul_by_device: dict[tuple[str, torch.dtype], Fp8Matmul] = {}


def fp8_matmul_for(device: torch.device, out_dtype: torch.dtype) -> Fp8Matmul:
    """The FP8 matmul to use on ``device`` (decided once per device and dtype, fallbacks logged once)."""
    key = (str(device), out_dtype)
    if key not in _fp8_matmul_by_device:
        supported, reason = fp8_matmul_support(DeviceCapabilities.of(device))
        choice = Fp8Matmul.WEIGHT_ONLY
        if supported:
            if _fp8_self_test(device, out_dtype, rowwise=True):
                choice = Fp8Matmul.ROWWISE
            elif _fp8_self_test(device, out_dtype, rowwise=False):
                choice = Fp8Matmul.TENSORWISE
                _log_once(f"FP8 matmul on {device}: per-token scaling is not supported by this torch/GPU for "
                          f"{out_dtype} output; using one activation scale per tensor (slightly less accurate).",
                          logging.INFO)
            else:
                reason = "torch._scaled_mm failed its self-test on this device"
        if choice is Fp8Matmul.WEIGHT_ONLY:
            _log_once(f"FP8 matmul is not used on {device}: {reason}. FP8 weights are upcast to {out_dtype} "
                      f"layer by layer instead (memory saving only, no speed-up).")
        _fp8_matmul_by_device[key] = choice
    return _fp8_matmul_by_device[key]


class FP8Linear(nn.Module):
    """``nn.Linear`` with a float8_e4m3fn weight and one float32 scale per output channel.

    Loading a float8_e4m3fn weight keeps it as is (scale 1: the released fp8 files are plain casts);
    any other floating weight is quantized per output channel (scale = channel amax / 448).  With
    ``fp8_activations`` the forward runs on FP8 tensor cores where available (:func:`fp8_matmul_for`),
    else it upcasts the weight to ``compute_dtype`` for one ``F.linear``.  The scales are not part of the
    state dict (its keys stay those of ``nn.Linear``); :meth:`dequantized_weight` gives the real weight.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        compute_dtype: torch.dtype = torch.bfloat16,
        fp8_activations: bool = True,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if fp8_activations and (in_features % 16 or out_features % 16):
            raise QuantizationError(
                f"FP8 matmuls need in/out features that are multiples of 16, got {in_features}x{out_features}; "
                f"use fp8_activations=False for this layer."
            )
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.fp8_activations = fp8_activations
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn, device=device), requires_grad=False
        )
        self.register_buffer("weight_scale", torch.ones(out_features, device=device), persistent=False)
        self.has_channel_scales = False  # False: every scale is 1 and the upcast skips the multiply
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device), requires_grad=False)
            if bias else None
        )
        self._matmul: Fp8Matmul | None = None
        self._matmul_device: torch.device | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, compute_dtype: torch.dtype, fp8_activations: bool) -> FP8Linear:
        """Quantize ``linear`` (a ``meta`` one gives an empty layer that quantizes when loaded)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype=compute_dtype,
                    fp8_activations=fp8_activations, device=linear.weight.device)
        if not linear.weight.is_meta:
            layer.load_state_dict(linear.state_dict(), assign=True)
        return layer

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight in ``dtype`` (default: the compute dtype)."""
        dtype = dtype or self.compute_dtype
        weight = self.weight.to(dtype, copy=True)  # a fresh tensor: the in-place scaling never touches the parameter
        return weight.mul_(self.weight_scale.to(dtype)[:, None]) if self.has_channel_scales else weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._matmul_device != x.device:
            use_fp8 = self.fp8_activations
            self._matmul = fp8_matmul_for(x.device, self.compute_dtype) if use_fp8 else Fp8Matmul.WEIGHT_ONLY
            self._matmul_device = x.device
        x = x.to(self.compute_dtype)
        if self._matmul is Fp8Matmul.WEIGHT_ONLY:
            return F.linear(x, self.dequantized_weight(), self.bias)
        out = fp8_scaled_linear(
            x.reshape(-1, self.in_features), self.weight, self.weight_scale, self.bias,
            rowwise=self._matmul is Fp8Matmul.ROWWISE, out_dtype=self.compute_dtype,
        )
        return out.reshape(*x.shape[:-1], self.out_features)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        weight = state_dict.get(prefix + "weight")
        if isinstance(weight, torch.Tensor) and tuple(weight.shape) == (self.out_features, self.in_features):
            assign = local_metadata.get("assign_to_params_buffers", False)
            device = weight.device if assign or self.weight.is_meta else self.weight.device
            if weight.dtype == torch.float8_e4m3fn:
                scale, self.has_channel_scales = torch.ones(self.out_features, device=device), False
            else:
                weight, scale = quantize_fp8_weight(weight)
                self.has_channel_scales = True
            state_dict[prefix + "weight"] = weight
            self.weight_scale = scale.to(device)
        bias = state_dict.get(prefix + "bias")
        if isinstance(bias, torch.Tensor):
            state_dict[prefix + "bias"] = bias.to(self.compute_dtype)
        self._matmul_device = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"compute_dtype={self.compute_dtype}, fp8_activations={self.fp8_activations}")


# -------------------------------------------------------------------------------------------- NVFP4 codec
# Rounding |v| to the e2m1 grid 0, .5, 1, 1.5, 2, 3, 4, 6: the magnitude code (0-7) is the number of
# midpoints that |v| lies above.  A value exactly on a midpoint goes to the neighbour with the even code
# (round half to even), hence ">=" where the upper neighbour's code is even.  Above 6 it saturates.
_E2M1_MIDPOINTS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def e2m1_codes(v: torch.Tensor) -> torch.Tensor:
    """4-bit e2m1 codes (uint8, sign in bit 3) of ``v`` rounded to nearest, ties to even, saturating at ±6."""
    magnitude = v.abs()
    codes = torch.zeros(v.shape, dtype=torch.uint8, device=v.device)
    for midpoint, tie_goes_up in _E2M1_MIDPOINTS:
        codes += magnitude >= midpoint if tie_goes_up else magnitude > midpoint
    return codes | torch.signbit(v).to(torch.uint8) << 3


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte along the last dim: element 2i in the low nibble, 2i+1 in the high one."""
    return codes[..., 0::2] | codes[..., 1::2] << 4


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_fp4`."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


@functools.lru_cache(maxsize=None)
def _fp4_byte_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(256, 2): the two e2m1 values of every packed byte, so one gather decodes a byte."""
    values = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES))
    byte = torch.arange(256)
    return torch.stack((values[byte & 0x0F], values[byte >> 4]), dim=1).to(device, dtype)


def nvfp4_tensor_scale(x: torch.Tensor) -> torch.Tensor:
    """The per-tensor float32 scale that lets the e4m3 block scales use their full range: amax / (6·448)."""
    return x.abs().amax().float().clamp(min=_AMAX_FLOOR) / (FP4_MAX * FP8_MAX)


def quantize_nvfp4(x: torch.Tensor, tensor_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed e2m1 codes ``(..., K/2)`` (uint8) and e4m3 block scales ``(..., K/16)`` of ``x`` ``(..., K)``,
    with ``x ≈ e2m1 · block_scale · tensor_scale``; scales in ``x``'s dtype (pass float32 weights)."""
    if x.shape[-1] % NVFP4_BLOCK:
        raise QuantizationError(f"NVFP4 needs a last dimension divisible by {NVFP4_BLOCK}, got {tuple(x.shape)}.")
    blocks = x.unflatten(-1, (-1, NVFP4_BLOCK))
    block_amax = blocks.abs().amax(dim=-1).float()
    block_scale = (block_amax / (FP4_MAX * tensor_scale)).clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
    decode = block_scale.float() * tensor_scale
    encode = torch.where(decode > 0, decode.reciprocal(), torch.zeros_like(decode))  # a zero scale zeroes the block
    work = _scaling_dtype(x.dtype)
    codes = e2m1_codes(blocks.to(work) * encode.unsqueeze(-1).to(work))
    return pack_fp4(codes.flatten(-2)), block_scale


def dequantize_nvfp4(packed: torch.Tensor, block_scale: torch.Tensor, tensor_scale: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_nvfp4`, computed in ``dtype`` (e2m1 values are exact in every float dtype)."""
    values = _fp4_byte_table(packed.device, dtype)[packed.int()].flatten(-2)
    decode = (block_scale.float() * tensor_scale).to(dtype)
    return (values.unflatten(-1, (-1, NVFP4_BLOCK)) * decode.unsqueeze(-1)).flatten(-2)


def swizzle_block_scales(block_scale: torch.Tensor) -> torch.Tensor:
    """Rearrange ``(rows, K/16)`` e4m3 scales into the tiled layout block-scaled cuBLAS kernels read.

    Rows are padded to a multiple of 128 and scale columns to a multiple of 4; each 128x4 tile is stored
    contiguously (tiles row-major), and inside a tile the scale of (row r, column c) sits at offset
    ``(r % 32)·16 + (r // 32)·4 + c`` (cuBLAS "block scaling factors layout").  Returns a flat tensor.
    """
    rows, cols = block_scale.shape
    row_tiles, col_tiles = -(-rows // 128), -(-cols // 4)
    padded = torch.zeros(row_tiles * 128, col_tiles * 4, dtype=torch.uint8, device=block_scale.device)
    padded[:rows, :cols] = block_scale.view(torch.uint8)
    # row = tile_r·128 + (r // 32)·32 + r % 32 and column = tile_c·4 + c, stored in the order
    # (tile_r, tile_c, r % 32, r // 32, c)
    tiles = padded.view(row_tiles, 4, 32, col_tiles, 4).permute(0, 3, 2, 1, 4)
    return tiles.contiguous().flatten().view(torch.float8_e4m3fn)


def nvfp4_scaled_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale_swizzled: torch.Tensor,
    weight_tensor_scale: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    activation_tensor_scale: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``x Wᵀ + b`` for 2-D ``x`` on FP4 tensor cores: ``x`` is quantized to NVFP4 on the fly and both
    operands go through one block-scaled ``torch._scaled_mm``; the tensor scales multiply the result."""
    x_tensor_scale = nvfp4_tensor_scale(x) if activation_tensor_scale else torch.ones((), device=x.device)
    x_packed, x_block_scale = quantize_nvfp4(x, x_tensor_scale)
    fp4 = torch.float4_e2m1fn_x2
    out = _scaled_mm(x_packed.view(fp4), weight.view(fp4).t(), swizzle_block_scales(x_block_scale),
                     weight_scale_swizzled, out_dtype=out_dtype)
    out = out * (x_tensor_scale * weight_tensor_scale).to(out_dtype)
    return out if bias is None else out + bias


def _nvfp4_self_test(device: torch.device, out_dtype: torch.dtype) -> bool:
    """Run the block-scaled kernel once and compare it with the product of the dequantized operands.

    The scale layout rules are easy to get wrong and could not be exercised on the development machines,
    so a wrong layout must show up as a logged fallback, never as a garbage image.
    """
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(128, 64, generator=generator).to(device, out_dtype)
    weight = torch.randn(128, 64, generator=generator).to(device)
    w_tensor_scale = nvfp4_tensor_scale(weight)
    w_packed, w_block_scale = quantize_nvfp4(weight, w_tensor_scale)
    try:
        out = nvfp4_scaled_linear(x, w_packed, swizzle_block_scales(w_block_scale), w_tensor_scale, None,
                                  activation_tensor_scale=True, out_dtype=out_dtype)
    except (RuntimeError, NotImplementedError, TypeError) as error:
        log.debug("block-scaled NVFP4 _scaled_mm unavailable on %s: %s", device, error)
        return False
    x_tensor_scale = nvfp4_tensor_scale(x)
    x_restored = dequantize_nvfp4(*quantize_nvfp4(x, x_tensor_scale), x_tensor_scale)
    expected = x_restored @ dequantize_nvfp4(w_packed, w_block_scale, w_tensor_scale).t()
    return _relative_error(out, expected) < 0.02


_nvfp4_matmul_by_device: dict[tuple[str, torch.dtype], bool] = {}


def nvfp4_matmul_for(device: torch.device, out_dtype: torch.dtype) -> bool:
    """Whether NVFP4Linear layers on ``device`` use FP4 tensor cores (decided once, fallbacks logged once)."""
    key = (str(device), out_dtype)
    if key not in _nvfp4_matmul_by_device:
        usable, reason = nvfp4_matmul_support(DeviceCapabilities.of(device))
        if usable and not _nvfp4_self_test(device, out_dtype):
            usable, reason = False, "the block-scaled torch._scaled_mm failed its self-test on this device"
        if not usable:
            _log_once(f"NVFP4 matmul is not used on {device}: {reason}. FP4 weights are dequantized to {out_dtype} "
                      f"layer by layer instead (memory saving only, as fp4_experimental).")
        _nvfp4_matmul_by_device[key] = usable
    return _nvfp4_matmul_by_device[key]


class NVFP4Linear(nn.Module):
    """``nn.Linear`` with an NVFP4 weight: packed e2m1 ``(out, in/2)``, e4m3 scales ``(out, in/16)``, one
    float32 tensor scale.

    ``activation_scaling`` selects the mode: ``"none"`` dequantizes the weight for each call
    (fp4_experimental); ``"tensor_and_block"`` (fp4_scaled) and ``"block"`` (fp4_scaled_fast) quantize the
    activations to NVFP4 as well and run on FP4 tensor cores where available (:func:`nvfp4_matmul_for`),
    else they dequantize like ``"none"``.  Any floating weight it is loaded with is quantized; the scales are
    not part of the state dict.
    """

    ACTIVATION_SCALINGS = ("none", "tensor_and_block", "block")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        compute_dtype: torch.dtype = torch.bfloat16,
        activation_scaling: str = "tensor_and_block",
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if activation_scaling not in self.ACTIVATION_SCALINGS:
            raise QuantizationError(
                f"activation_scaling must be one of {', '.join(self.ACTIVATION_SCALINGS)}, "
                f"got {activation_scaling!r}."
            )
        if in_features % 32 or out_features % 16:
            raise QuantizationError(
                f"NVFP4 layers need in_features divisible by 32 and out_features by 16, got "
                f"{in_features}x{out_features}; leave this layer unquantized."
            )
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.activation_scaling = activation_scaling
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device), requires_grad=False
        )
        self.register_buffer(
            "weight_block_scale",
            torch.ones(out_features, in_features // NVFP4_BLOCK, device=device).to(torch.float8_e4m3fn),
            persistent=False,
        )
        self.register_buffer("weight_tensor_scale", torch.ones((), device=device), persistent=False)
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device), requires_grad=False)
            if bias else None
        )
        self._fp4_matmul = False
        self._matmul_device: torch.device | None = None
        self._weight_scale_swizzled: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, compute_dtype: torch.dtype, activation_scaling: str) -> NVFP4Linear:
        """Quantize ``linear`` (a ``meta`` one gives an empty layer that quantizes when loaded)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype=compute_dtype,
                    activation_scaling=activation_scaling, device=linear.weight.device)
        if not linear.weight.is_meta:
            layer.load_state_dict(linear.state_dict(), assign=True)
        return layer

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight in ``dtype`` (default: the compute dtype)."""
        return dequantize_nvfp4(self.weight, self.weight_block_scale, self.weight_tensor_scale,
                                dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._matmul_device != x.device:
            self._fp4_matmul = self.activation_scaling != "none" and nvfp4_matmul_for(x.device, self.compute_dtype)
            self._weight_scale_swizzled = swizzle_block_scales(self.weight_block_scale) if self._fp4_matmul else None
            self._matmul_device = x.device
        x = x.to(self.compute_dtype)
        if not self._fp4_matmul:
            return F.linear(x, self.dequantized_weight(), self.bias)
        out = nvfp4_scaled_linear(
            x.reshape(-1, self.in_features), self.weight, self._weight_scale_swizzled, self.weight_tensor_scale,
            self.bias, activation_tensor_scale=self.activation_scaling == "tensor_and_block",
            out_dtype=self.compute_dtype,
        )
        return out.reshape(*x.shape[:-1], self.out_features)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        weight = state_dict.get(prefix + "weight")
        if isinstance(weight, torch.Tensor) and tuple(weight.shape) == (self.out_features, self.in_features):
            if not weight.is_floating_point():
                raise QuantizationError(
                    f"{prefix}weight: NVFP4 layers quantize floating-point weights themselves; got {weight.dtype}."
                )
            assign = local_metadata.get("assign_to_params_buffers", False)
            device = weight.device if assign or self.weight.is_meta else self.weight.device
            weight = weight.float()
            tensor_scale = nvfp4_tensor_scale(weight)
            packed, block_scale = quantize_nvfp4(weight, tensor_scale)
            state_dict[prefix + "weight"] = packed
            self.weight_block_scale = block_scale.to(device)
            self.weight_tensor_scale = tensor_scale.to(device)
        bias = state_dict.get(prefix + "bias")
        if isinstance(bias, torch.Tensor):
            state_dict[prefix + "bias"] = bias.to(self.compute_dtype)
        self._matmul_device = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"compute_dtype={self.compute_dtype}, activation_scaling={self.activation_scaling!r}")


# ------------------------------------------------------------------------------------------- mode switch
@dataclass
class QuantizationReport:
    """What :func:`quantize_linears` / :func:`prepare_model_for_weights` did to a model.

    ``key in report`` tells a loader whether a state-dict key must reach the model in its file dtype (a
    quantized layer's weight, which the layer converts itself) rather than converted to the compute dtype.
    """

    mode: str
    effective_mode: str                      # differs from ``mode`` after a fallback
    fallback_reason: str | None = None
    layers: dict[str, str] = field(default_factory=dict)     # module name -> layer kind
    skipped: dict[str, str] = field(default_factory=dict)    # module name -> why it stays nn.Linear
    keep_file_dtype: set[str] = field(default_factory=set)
    bytes_before: int = 0                    # replaced layers' weights and biases in the compute dtype
    bytes_after: int = 0                     # the same layers as stored now

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after

    @property
    def counts(self) -> Counter:
        """Number of layers of each kind."""
        return Counter(self.layers.values())

    def __contains__(self, key: object) -> bool:
        return key in self.keep_file_dtype

    def add(self, name: str, old: nn.Linear, new: nn.Module, kind: str, compute_dtype: torch.dtype) -> None:
        """Record that ``old`` (module ``name``) was replaced by ``new``."""
        self.layers[name] = kind
        self.keep_file_dtype.add(f"{name}.weight")
        self.bytes_before += sum(p.numel() for p in old.parameters()) * compute_dtype.itemsize
        self.bytes_after += sum(t.numel() * t.element_size() for t in (*new.parameters(), *new.buffers()))

    def summary(self) -> str:
        """One line for the log."""
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.counts.items())) or "no layers changed"
        fallback = f" (fell back from {self.mode})" if self.effective_mode != self.mode else ""
        return (f"quantization {self.effective_mode}{fallback}: {kinds}; {len(self.skipped)} kept as nn.Linear; "
                f"{self.bytes_saved / 2**20:.1f} MiB saved")


def _check_settings(mode: str, compute_dtype: torch.dtype) -> None:
    if mode not in QUANTIZATION_MODES:
        raise QuantizationError(f"quantization must be one of {', '.join(QUANTIZATION_MODES)}, got {mode!r}.")
    if mode == "gguf":
        raise QuantizationError(
            "quantization 'gguf' means the weights come quantized from a .gguf file: select a .gguf model "
            "(they are loaded through src.optimization.gguf), or pick another quantization mode."
        )
    if compute_dtype not in COMPUTE_DTYPES:
        raise QuantizationError(
            f"compute_dtype must be one of {', '.join(map(str, COMPUTE_DTYPES))}, got {compute_dtype}."
        )


def resolve_mode(mode: str, device: torch.device | str | None = None) -> tuple[str, str | None]:
    """The mode the layers will implement on ``device`` and, after a fallback, the logged reason.

    ``fp4_scaled*`` need FP4 tensor cores; elsewhere they become ``fp8_e4m3fn``, which keeps the 8-bit
    memory footprint and runs FP8 matmuls where those exist.
    """
    if mode not in ("fp4_scaled", "fp4_scaled_fast"):
        return mode, None
    caps = DeviceCapabilities.of(device if device is not None else default_device())
    usable, reason = nvfp4_matmul_support(caps)
    if usable:
        return mode, None
    fp8_usable, _ = fp8_matmul_support(caps)
    message = (
        f"quantization {mode!r} needs NVFP4 tensor cores (NVIDIA Blackwell, compute capability >= 10.0, torch "
        f"with float4_e2m1fn_x2): {reason}. Using 'fp8_e4m3fn' instead "
        f"({'FP8 matmuls' if fp8_usable else 'fp8 weights, upcast per layer'}); choose 'fp4_experimental' for "
        f"4-bit weights without FP4 matmuls."
    )
    _log_once(message)
    return "fp8_e4m3fn", message


def _linear_modules(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, module) for name, module in model.named_modules() if name and isinstance(module, nn.Linear)]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def _why_not_quantized(name: str, linear: nn.Linear, layer_mode: str, skip: Iterable[str]) -> str | None:
    pattern = next((p for p in skip if fnmatch(name, p)), None)
    if pattern is not None:
        return f"matches skip pattern {pattern!r}"
    in_multiple = 16 if layer_mode == "fp8_e4m3fn" else 32
    if linear.in_features % in_multiple or linear.out_features % 16:
        return (f"{linear.in_features}x{linear.out_features} is not a multiple of {in_multiple}x16 "
                f"as the {layer_mode} kernels need")
    return None


def _quantized_layer(layer_mode: str, linear: nn.Linear, compute_dtype: torch.dtype) -> tuple[nn.Module, str]:
    if layer_mode == "fp8_e4m3fn":
        return FP8Linear.from_linear(linear, compute_dtype=compute_dtype, fp8_activations=True), "fp8"
    scaling = _FP4_ACTIVATION_SCALING[layer_mode]
    layer = NVFP4Linear.from_linear(linear, compute_dtype=compute_dtype, activation_scaling=scaling)
    return layer, "nvfp4 weight-only" if scaling == "none" else f"nvfp4 ({scaling} activation scales)"


def _fp8_storage_layer(linear: nn.Linear, compute_dtype: torch.dtype) -> tuple[nn.Module, str]:
    layer = FP8Linear.from_linear(linear, compute_dtype=compute_dtype, fp8_activations=False)
    return layer, "fp8 weight-only"


def quantize_linears(
    model: nn.Module,
    mode: str,
    *,
    compute_dtype: torch.dtype,
    device: torch.device | str | None = None,
    skip: Iterable[str] = DEFAULT_SKIP,
) -> QuantizationReport:
    """Replace the eligible ``nn.Linear`` modules of ``model`` in place by quantized layers for ``mode``.

    Eligible: the name matches no ``skip`` pattern (fnmatch) and the dimensions suit the mode's kernels.
    ``device`` is where the model will run (default: :func:`default_device`), used for the FP4 fallback.
    On a ``meta`` model the layers quantize the weights when the checkpoint is loaded.
    """
    _check_settings(mode, compute_dtype)
    skip = tuple(skip)
    layer_mode, fallback = resolve_mode(mode, device)
    report = QuantizationReport(mode, layer_mode, fallback)
    if layer_mode == "disabled":
        return report
    for name, linear in _linear_modules(model):
        reason = _why_not_quantized(name, linear, layer_mode, skip)
        if reason is not None:
            report.skipped[name] = reason
            continue
        new, kind = _quantized_layer(layer_mode, linear, compute_dtype)
        _replace(model, name, new)
        report.add(name, linear, new, kind, compute_dtype)
    return report


def prepare_model_for_weights(
    model: nn.Module,
    state_dict_dtypes: Mapping[str, torch.dtype],
    mode: str,
    compute_dtype: torch.dtype,
    *,
    device: torch.device | str | None = None,
    skip: Iterable[str] = DEFAULT_SKIP,
) -> QuantizationReport:
    """Swap the ``nn.Linear`` modules of a (``meta``) model for the layers the file and ``mode`` call for,
    before ``load_state_dict(..., assign=True)``; hand the keys in the report over in their file dtype.

    * float8 weights always get an :class:`FP8Linear`, so an fp8 file never needs a full-precision copy:
      weight-only for ``disabled`` and for skipped layers, FP8 matmuls for ``fp8_e4m3fn``, re-quantized to
      NVFP4 for the fp4 modes.
    * A file without float8 weights is quantized on load as :func:`quantize_linears` would.
    * In a file with float8 weights, full-precision Linear weights stay so: the file kept them on purpose
      (the 7B "mixed_block35_fp16" files keep block 35 in fp16 because fp8 breaks it).
    """
    _check_settings(mode, compute_dtype)
    skip = tuple(skip)
    layer_mode, fallback = resolve_mode(mode, device)
    report = QuantizationReport(mode, layer_mode, fallback)
    file_has_fp8 = any(dtype in FP8_FILE_DTYPES for dtype in state_dict_dtypes.values())
    for name, linear in _linear_modules(model):
        file_dtype = state_dict_dtypes.get(f"{name}.weight")
        if file_dtype is None:
            continue  # a missing key is the strict loader's to report
        stored_fp8 = file_dtype in FP8_FILE_DTYPES
        if file_has_fp8 and not stored_fp8:
            reason = "kept in full precision by the file"
        elif layer_mode == "disabled":
            reason = "quantization disabled"
        else:
            reason = _why_not_quantized(name, linear, layer_mode, skip)
        if reason is None:
            new, kind = _quantized_layer(layer_mode, linear, compute_dtype)
        elif stored_fp8:
            new, kind = _fp8_storage_layer(linear, compute_dtype)
        else:
            report.skipped[name] = reason
            continue
        _replace(model, name, new)
        report.add(name, linear, new, kind, compute_dtype)
    return report
