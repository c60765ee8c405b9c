"""Running the quantized layers of ComfyUI's SeedVR2 files (``*_fp8_e4m3fn``, ``*_int8_convrot``, ``*_mxfp8``,
``*_nvfp4``): which layer each marked weight becomes on the device at hand.

============  =============================================  ==============================================
format        kept packed (the arithmetic exists)            elsewhere
============  =============================================  ==============================================
fp8 e4m3      :class:`ScaledFP8Linear` (the fp8 path, with    (always packed: weight-only upcast per call)
              the file's ``weight_scale``); FP8 matmuls with
              ``quantization=fp8_e4m3fn`` on Ada/Hopper+
int8 convrot  :class:`Int8Linear`: rotated, per-row int8      dequantized once at load to the compute dtype
              activations, ``torch._int_mm``; CUDA, behind
              ``SEEDVR2_INT8_MATMUL=1`` until measured faster
nvfp4         :class:`ComfyNVFP4Linear` (FP4 matmuls):        dequantized once at load
              Blackwell only
mxfp8         (no MX matmul in this pack)                     dequantized once at load
============  =============================================  ==============================================

One log line says what was dequantized and why.  The codecs themselves are in
:mod:`src.models.quant_formats`.
"""
from __future__ import annotations

import logging
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from ..models import quant_formats as qf
from . import linear_quantization as fp4
from .switches import env_switch

log = logging.getLogger("seedvr2")

INT8_SWITCH = "SEEDVR2_INT8_MATMUL"
_INT8_MIN_CAPABILITY = (7, 5)      # int8 tensor cores (Turing)


# ------------------------------------------------------------------------------------------------ int8
def int8_matmul_support(device: torch.device | str) -> tuple[bool, str]:
    """Whether :class:`Int8Linear` should run int8 matmuls on ``device``, and why not."""
    device = torch.device(device)
    if not env_switch(INT8_SWITCH, False):
        return False, f"int8 matmuls are off ({INT8_SWITCH}=1 turns them on)"
    if not hasattr(torch, "_int_mm"):
        return False, "this torch build has no torch._int_mm"
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, f"int8 matmuls are only used on CUDA GPUs, not {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if capability < _INT8_MIN_CAPABILITY:
        return False, f"compute capability {capability[0]}.{capability[1]} has no int8 tensor cores"
    return True, ""


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 codes of ``x`` ``(M, K)`` and their float32 scales ``(M, 1)``."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-30) / 127.0
    codes = (x.float() / scale).round_().clamp_(-128, 127).to(torch.int8)
    return codes, scale


class Int8Linear(nn.Module):
    """A ConvRot int8 layer run as an int8 matmul: ``y = (rot(x) quantized per row) · Wq^T · s_x · s_w``.

    ``weight`` holds the file's int8 codes of W·H (H: the block Hadamard of ``group`` inputs, its own
    inverse), ``weight_scale`` one float32 per output row.  Rotating the activation by the same H makes
    x·W^T = rot(x)·(W·H)^T, so the codes are used as stored.  ``torch._int_mm`` accumulates in int32.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, group: int | None, *,
                 compute_dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features, device=device), persistent=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device), requires_grad=False)
                     if bias else None)
        self._int_mm_failed = False

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        values = self.weight.float() * self.weight_scale.reshape(-1, 1)
        if self.group is not None:
            values = qf.rotate_groups(values, self.group)
        return values.to(dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features).to(self.compute_dtype)
        if self._int_mm_failed:
            return F.linear(x, self.dequantized_weight(), self.bias).reshape(*shape[:-1], self.out_features)
        rotated = qf.rotate_groups(x, self.group) if self.group is not None else x
        codes, scale = quantize_rows_int8(rotated)
        rows = codes.shape[0]
        if rows <= 16:  # cuBLASLt's int8 GEMM needs more than 16 rows
            codes = F.pad(codes, (0, 0, 0, 32 - rows))
        try:
            acc = torch._int_mm(codes, self.weight.t())[:rows]
        except RuntimeError as exc:  # a torch build or GPU without this int8 GEMM: stay correct, say so once
            fp4._log_once(f"SeedVR2: int8 matmul failed ({exc}); int8 layers dequantize their weights per call "
                          f"instead.")
            self._int_mm_failed = True
            return self.forward(x.reshape(shape))
        out = (acc.float() * scale * self.weight_scale.reshape(1, -1)).to(self.compute_dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        weight = state_dict.get(prefix + "weight")
        if isinstance(weight, qf.QuantizedWeight):
            scale = weight.scales["weight_scale"].float().reshape(-1)
            self.weight_scale = scale.expand(self.out_features).contiguous().to(weight.device)
            state_dict[prefix + "weight"] = weight.data
        bias = state_dict.get(prefix + "bias")
        if isinstance(bias, torch.Tensor):
            state_dict[prefix + "bias"] = bias.to(self.compute_dtype)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"convrot_group={self.group}, compute_dtype={self.compute_dtype}")


# ------------------------------------------------------------------------------------------------- fp8
class ScaledFP8Linear(fp4.FP8Linear):
    """:class:`~.linear_quantization.FP8Linear` loaded from a marked fp8 weight: the file's ``weight_scale``
    (one value, or one per row) becomes the layer's per-row scale."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        weight = state_dict.get(prefix + "weight")
        scale = None
        if isinstance(weight, qf.QuantizedWeight):
            scale = weight.scales["weight_scale"].float().reshape(-1).expand(self.out_features).contiguous()
            state_dict[prefix + "weight"] = weight.data.view(torch.float8_e4m3fn)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if scale is not None:
            self.weight_scale = scale.to(self.weight.device)
            self.has_channel_scales = bool((scale != 1).any())


# ------------------------------------------------------------------------------------------------ nvfp4
class ComfyNVFP4Linear(fp4.NVFP4Linear):
    """:class:`~.linear_quantization.NVFP4Linear` loaded from a ComfyUI nvfp4 weight without re-quantizing:
    the nibbles are swapped into this pack's order (even element low) and the block scales untiled."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        weight = state_dict.get(prefix + "weight")
        if isinstance(weight, qf.QuantizedWeight):
            rows, cols = self.out_features, self.in_features
            self.weight_block_scale = qf.untile_scales(
                weight.scales["weight_scale"].view(torch.float8_e4m3fn).reshape(-1), rows, cols // qf.NVFP4_BLOCK
            ).contiguous()
            self.weight_tensor_scale = weight.scales["weight_scale_2"].float().reshape(())
            state_dict[prefix + "weight"] = ((weight.data << 4) | (weight.data >> 4)).contiguous()
        bias = state_dict.get(prefix + "bias")
        if isinstance(bias, torch.Tensor):
            state_dict[prefix + "bias"] = bias.to(self.compute_dtype)
        self._matmul_device = None
        nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                        unexpected_keys, error_msgs)


# ------------------------------------------------------------------------------------------- the switch
def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def prepare_model_for_comfy_quant(model: nn.Module, quantized: dict, mode: str, compute_dtype: torch.dtype,
                                  device: torch.device | str, *, file_name: str = "",
                                  nvfp4_matmul: bool | None = None) -> fp4.QuantizationReport:
    """Swap the Linear layers whose weights are marked in ``quantized`` (model key -> LayerQuant) on the
    ``meta`` model for the layers that keep them packed on ``device``; the others stay ``nn.Linear`` and are
    dequantized by the loader.  ``key in report`` is True for the weights to hand over packed.

    ``mode`` is the loader's ``quantization`` input: ``fp8_e4m3fn`` runs fp8 layers as FP8 matmuls; the
    file's own format decides everything else (other modes are ignored for marked layers, with a log line).
    ``nvfp4_matmul`` overrides the Blackwell check (tests).
    """
    device = torch.device(device)
    report = fp4.QuantizationReport(mode, "comfy_quant")
    int8_ok, int8_why = int8_matmul_support(device)
    if nvfp4_matmul is None:
        nvfp4_matmul, nvfp4_why = fp4.nvfp4_matmul_support(fp4.DeviceCapabilities.of(device))
    else:
        nvfp4_why = "disabled by the caller"
    dequantized: Counter = Counter()
    reasons: dict[str, str] = {}
    for key, quant in quantized.items():
        name = key.removesuffix(".weight")
        linear = model.get_submodule(name) if key.endswith(".weight") else None
        if not isinstance(linear, nn.Linear):
            raise qf.QuantFormatError(f"layer {quant.layer}: only Linear layers may be quantized in this model.")
        n, k = linear.out_features, linear.in_features
        unpadded = tuple(quant.stored.shape) == (n, k // 2)     # nvfp4 storage without padding
        if quant.format == "float8_e4m3fn":
            fp8_matmul = mode == "fp8_e4m3fn" and n % 16 == 0 and k % 16 == 0
            new = ScaledFP8Linear(k, n, linear.bias is not None, compute_dtype=compute_dtype,
                                  fp8_activations=fp8_matmul, device=linear.weight.device)
            kind = "fp8 (file scales)" + ("" if fp8_matmul else ", weight-only")
        elif quant.format == "int8_tensorwise" and int8_ok and k % 8 == 0 and n % 8 == 0:
            new = Int8Linear(k, n, linear.bias is not None, qf._int8_group(quant.layer, quant.config),
                             compute_dtype=compute_dtype, device=linear.weight.device)
            kind = f"{quant.label} int8 matmul"
        elif quant.format == "nvfp4" and nvfp4_matmul and unpadded and k % 32 == 0 and n % 16 == 0 \
                and "pre_quant_scale" not in quant.scale_keys:
            new = ComfyNVFP4Linear(k, n, linear.bias is not None, compute_dtype=compute_dtype,
                                   activation_scaling="tensor_and_block", device=linear.weight.device)
            kind = "nvfp4 FP4 matmul"
        else:
            dequantized[quant.label] += 1
            reasons[quant.label] = {
                "int8_convrot": int8_why, "int8_tensorwise": int8_why,
                "nvfp4": nvfp4_why or "a padded or pre-scaled layer",
                "mxfp8": "this pack has no MXFP8 matmul",
            }.get(quant.label, "")
            continue
        _replace(model, name, new)
        report.add(name, linear, new, kind, compute_dtype)
    if mode not in ("disabled", "fp8_e4m3fn") and quantized:
        log.warning("SeedVR2: quantization %r does not apply to %s, whose layers are already quantized (%s); "
                    "they run in the file's format.", mode, file_name or "this file",
                    ", ".join(sorted({q.label for q in quantized.values()})))
    if dequantized:
        parts = "; ".join(f"{n} {label} layers ({reasons[label]})" for label, n in sorted(dequantized.items()))
        log.info("SeedVR2: %s: dequantized once at load to %s: %s.", file_name or "the file",
                 str(compute_dtype).replace("torch.", ""), parts)
    report.dequantized = dict(dequantized)
    return report
