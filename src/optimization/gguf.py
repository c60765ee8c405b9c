"""GGUF DiT weights: keep quantized weights packed, dequantize per layer.

Files are read by :mod:`src.models.gguf_reader` (with the other checkpoint readers).  Quantized tensors
stay as raw ggml blocks (:class:`GGUFWeight`) and a :class:`GGUFLinear` dequantizes its weight with the torch kernels below just before each matmul, on the
weight's device, so the model is never dequantized as a whole.

Block layouts (ggml): a block of 32 (legacy types) or 256 (K-quants) values is stored as raw bytes.
Legacy blocks start with an fp16 scale ``d`` (and an fp16 offset ``m`` for the ``_1`` types); K-quant
super-blocks split 256 values into sub-blocks of 16 or 32 with small integer scales (and offsets) that
multiply the super-block's fp16 ``d`` (and ``dmin``).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Mapping
import weakref

import gguf
import torch
import torch.nn.functional as F
from torch import nn

from .fp4_quantization import COMPUTE_DTYPES, QuantizationReport

Q = gguf.GGMLQuantizationType
# Reading GGUF files lives with the other checkpoint readers; these names stay importable from here.
from ..models.gguf_reader import (  # noqa: E402
    COMFY_PREFIX, ORIG_SHAPE_KEY, GGUFError, GGUFWeight, load_gguf_state_dict, plain_types,
)

PLAIN_TYPES = plain_types()


# ------------------------------------------------------------------------------------------ block helpers
def _fp16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 field at byte ``offset`` of every block, as float32 ``(n, 1)``."""
    return blocks[:, offset:offset + 2].contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """``(..., B)`` bytes -> ``(..., 2, B)``: all low nibbles, then all high nibbles."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-2)


def _crumbs(packed: torch.Tensor) -> torch.Tensor:
    """``(..., B)`` bytes -> ``(..., 4, B)``: 2-bit fields at bits 0-1, 2-3, 4-5, 6-7."""
    return torch.stack([(packed >> shift) & 0x03 for shift in (0, 2, 4, 6)], dim=-2)


def _bits(packed: torch.Tensor) -> torch.Tensor:
    """``(..., B)`` bytes -> ``(..., 8, B)``: bit 0 of every byte, then bit 1, ..."""
    return torch.stack([(packed >> bit) & 0x01 for bit in range(8)], dim=-2)


def _k_quant_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit (scale, min) pairs of a Q4_K/Q5_K super-block from its 12 scale bytes.

    Sub-blocks 0-3 keep scale and min in the low 6 bits of bytes 0-3 and 4-7; sub-blocks 4-7 take their
    low 4 bits from the nibbles of bytes 8-11 and their top 2 bits from the top of bytes 0-3 / 4-7.
    """
    first, second, third = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scale = torch.cat((first & 0x3F, (third & 0x0F) | (first >> 6) << 4), dim=1)
    minimum = torch.cat((second & 0x3F, (third >> 4) | (second >> 6) << 4), dim=1)
    return scale.float(), minimum.float()


# ----------------------------------------------------------------------------- dequantization, per type
# Each kernel maps raw blocks (n, type_size) uint8 to values (n, block_size) float32.
def _q8_0(blocks):   # d, 32 x int8
    return _fp16(blocks, 0) * blocks[:, 2:].contiguous().view(torch.int8).float()


def _q4_0(blocks):   # d, 16 bytes: value i in the low nibble of byte i, value 16+i in its high nibble
    q = _nibbles(blocks[:, 2:]).flatten(1).float()
    return _fp16(blocks, 0) * (q - 8)


def _q4_1(blocks):   # d, m, 16 bytes of nibbles
    q = _nibbles(blocks[:, 4:]).flatten(1).float()
    return _fp16(blocks, 0) * q + _fp16(blocks, 2)


def _q5_0(blocks):   # d, 4 bytes holding bit 4 of each value (little-endian), 16 bytes of nibbles
    high = _bits(blocks[:, 2:6]).transpose(1, 2).flatten(1)      # value j: byte j // 8, bit j % 8
    q = (_nibbles(blocks[:, 6:]).flatten(1) | high << 4).float()
    return _fp16(blocks, 0) * (q - 16)


def _q5_1(blocks):   # d, m, 4 bytes of high bits, 16 bytes of nibbles
    high = _bits(blocks[:, 4:8]).transpose(1, 2).flatten(1)
    q = (_nibbles(blocks[:, 8:]).flatten(1) | high << 4).float()
    return _fp16(blocks, 0) * q + _fp16(blocks, 2)


def _q2_k(blocks):   # 16 scale bytes (scale | min << 4), 64 bytes of 2-bit values, d, dmin
    n = blocks.shape[0]
    scales = blocks[:, :16]
    # Each half of 128 values uses 32 bytes; their 2-bit fields at shift 0, 2, 4, 6 give values 0-31, 32-63, ...
    q = _crumbs(blocks[:, 16:80].view(n, 2, 32)).view(n, 16, 16).float()
    scale = _fp16(blocks, 80) * (scales & 0x0F).float()
    offset = _fp16(blocks, 82) * (scales >> 4).float()
    return (scale.unsqueeze(-1) * q - offset.unsqueeze(-1)).flatten(1)


def _q3_k(blocks):   # 32 bytes of high bits, 64 bytes of 2-bit values, 12 bytes of 6-bit scales, d
    n = blocks.shape[0]
    high = _bits(blocks[:, :32]).flatten(1)                           # value b·32 + j: byte j, bit b
    low = _crumbs(blocks[:, 32:96].view(n, 2, 32)).flatten(1)
    q = low.float() - 4 * (1 - high.float())                          # a clear high bit means "minus 4"
    packed = blocks[:, 96:108]
    # Scale s: low 4 bits from nibble s // 8 of byte s % 8, top 2 bits from bits 2·(s // 4) of byte 8 + s % 4.
    low_bits = _nibbles(packed[:, :8]).flatten(1)
    high_bits = _crumbs(packed[:, 8:12]).flatten(1)
    scale = (low_bits | high_bits << 4).float() - 32
    return ((_fp16(blocks, 108) * scale).unsqueeze(-1) * q.view(n, 16, 16)).flatten(1)


def _q4_k(blocks):   # d, dmin, 12 scale bytes, 128 bytes of nibbles
    n = blocks.shape[0]
    scale, minimum = _k_quant_scales(blocks[:, 4:16])
    q = _nibbles(blocks[:, 16:].view(n, 4, 32)).view(n, 8, 32).float()   # 32 bytes -> 64 values
    return ((_fp16(blocks, 0) * scale).unsqueeze(-1) * q - (_fp16(blocks, 2) * minimum).unsqueeze(-1)).flatten(1)


def _q5_k(blocks):   # d, dmin, 12 scale bytes, 32 bytes of high bits, 128 bytes of nibbles
    n = blocks.shape[0]
    scale, minimum = _k_quant_scales(blocks[:, 4:16])
    high = _bits(blocks[:, 16:48])                                    # sub-block b: bit b of the 32 bytes
    q = (_nibbles(blocks[:, 48:].view(n, 4, 32)).view(n, 8, 32) | high << 4).float()
    return ((_fp16(blocks, 0) * scale).unsqueeze(-1) * q - (_fp16(blocks, 2) * minimum).unsqueeze(-1)).flatten(1)


def _q6_k(blocks):   # 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales, d
    n = blocks.shape[0]
    low = _nibbles(blocks[:, :128].view(n, 2, 64)).flatten(1)
    high = _crumbs(blocks[:, 128:192].view(n, 2, 32)).flatten(1)
    q = (low | high << 4).float() - 32
    scale = _fp16(blocks, 208) * blocks[:, 192:208].contiguous().view(torch.int8).float()
    return (scale.unsqueeze(-1) * q.view(n, 16, 16)).flatten(1)


DEQUANTIZERS: dict[gguf.GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    Q.Q8_0: _q8_0, Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0, Q.Q5_1: _q5_1,
    Q.Q2_K: _q2_k, Q.Q3_K: _q3_k, Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k,
}


def _supported_list() -> str:
    return ", ".join(t.name for t in (*PLAIN_TYPES, *DEQUANTIZERS))


def packed_size(qtype: gguf.GGMLQuantizationType, numel: int) -> int:
    """Bytes that ``numel`` values take in ``qtype``."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if numel % block_size:
        raise GGUFError(f"{numel} values are not a whole number of {qtype.name} blocks of {block_size}.")
    return numel // block_size * type_size


def dequantize(data: torch.Tensor, qtype: gguf.GGMLQuantizationType, shape: tuple[int, ...],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Raw ggml blocks (uint8, on any device) -> a ``shape`` tensor in ``dtype`` on the same device."""
    kernel = DEQUANTIZERS.get(qtype)
    if kernel is None:
        raise GGUFError(
            f"GGUF tensor type {getattr(qtype, 'name', qtype)} is not supported; supported: {_supported_list()}. "
            f"Use a file quantized to one of these (e.g. Q8_0 or Q4_K_M)."
        )
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return kernel(data.reshape(-1, type_size)).reshape(shape).to(dtype)


# ------------------------------------------------------------------------------------------- the layer
class DequantizedWeightCache:
    """The most recently dequantized weights, up to ``max_bytes``, least recently used dropped first.

    Meant to stay small: it helps when one layer runs several times in a row (the 3B's shared ``all``
    blocks apply the same Linear to the video and then the text tokens); a model-sized cache would
    defeat the point of GGUF.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, tuple[weakref.ref, tuple, torch.Tensor]] = OrderedDict()
        self._bytes = 0

    def get(self, layer: GGUFLinear, dtype: torch.dtype) -> torch.Tensor:
        """``layer``'s weight in ``dtype``, dequantized now or reused."""
        # The storage pointer and device change when the layer is reloaded or moved: a stale entry never matches.
        version = (layer.weight.data_ptr(), layer.weight.device, dtype)
        entry = self._entries.get(id(layer))
        if entry is not None and entry[0]() is layer and entry[1] == version:
            self._entries.move_to_end(id(layer))
            return entry[2]
        weight = dequantize(layer.weight, layer.qtype, (layer.out_features, layer.in_features), dtype)
        self._drop(id(layer))
        if weight.nbytes <= self.max_bytes:
            self._entries[id(layer)] = (weakref.ref(layer), version, weight)
            self._bytes += weight.nbytes
            while self._bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))
        return weight

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry[2].nbytes

    def clear(self) -> None:
        """Forget every cached weight."""
        self._entries.clear()
        self._bytes = 0


class GGUFLinear(nn.Module):
    """``nn.Linear`` whose weight stays in ggml blocks (``weight``: flat uint8) and is dequantized to
    ``compute_dtype`` just before each matmul; load it with a :class:`GGUFWeight` of its ``qtype``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        qtype: gguf.GGMLQuantizationType,
        *,
        compute_dtype: torch.dtype = torch.bfloat16,
        cache: DequantizedWeightCache | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if qtype not in DEQUANTIZERS:
            raise GGUFError(f"GGUF type {getattr(qtype, 'name', qtype)} is not supported; supported: "
                            f"{_supported_list()}.")
        self.in_features, self.out_features = in_features, out_features
        self.qtype = qtype
        self.compute_dtype = compute_dtype
        self.cache = cache
        self.weight = nn.Parameter(
            torch.empty(packed_size(qtype, in_features * out_features), dtype=torch.uint8, device=device),
            requires_grad=False,
        )
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device), requires_grad=False)
            if bias else None
        )

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The ``(out, in)`` weight in ``dtype`` (default: the compute dtype)."""
        dtype = dtype or self.compute_dtype
        if self.cache is not None:
            return self.cache.get(self, dtype)
        return dequantize(self.weight, self.qtype, (self.out_features, self.in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.compute_dtype), self.dequantized_weight(), self.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        weight = state_dict.get(prefix + "weight")
        if weight is not None:
            if not isinstance(weight, GGUFWeight):
                raise GGUFError(f"{prefix}weight: a GGUF layer loads the packed weight from a .gguf file, "
                                f"got a plain {getattr(weight, 'dtype', type(weight).__name__)} tensor.")
            if weight.qtype != self.qtype or tuple(weight.shape) != (self.out_features, self.in_features):
                raise GGUFError(
                    f"{prefix}weight: the layer expects {self.qtype.name} {(self.out_features, self.in_features)}, "
                    f"the file holds {weight.qtype.name} {tuple(weight.shape)}."
                )
            state_dict[prefix + "weight"] = weight.data
        bias = state_dict.get(prefix + "bias")
        if isinstance(bias, torch.Tensor):
            state_dict[prefix + "bias"] = bias.to(self.compute_dtype)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"qtype={self.qtype.name}, compute_dtype={self.compute_dtype}")


def prepare_model_for_gguf(
    model: nn.Module,
    gguf_state: Mapping[str, torch.Tensor | GGUFWeight],
    *,
    compute_dtype: torch.dtype = torch.bfloat16,
    cache_bytes: int = 0,
) -> QuantizationReport:
    """Swap every ``nn.Linear`` whose weight is quantized in ``gguf_state`` for a :class:`GGUFLinear`
    (call on the ``meta`` model before ``load_state_dict(gguf_state, assign=True)``).

    ``cache_bytes`` > 0 shares one :class:`DequantizedWeightCache` of that size between the layers.
    ``key in report`` is True for the packed weights, which must reach the model untouched.
    """
    if compute_dtype not in COMPUTE_DTYPES:
        raise GGUFError(f"compute_dtype must be one of {', '.join(map(str, COMPUTE_DTYPES))}, got {compute_dtype}.")
    cache = DequantizedWeightCache(cache_bytes) if cache_bytes > 0 else None
    report = QuantizationReport("gguf", "gguf")
    for name, module in list(model.named_modules()):
        weight = gguf_state.get(f"{name}.weight")
        if not name or not isinstance(module, nn.Linear) or not isinstance(weight, GGUFWeight):
            continue
        if tuple(weight.shape) != (module.out_features, module.in_features):
            raise GGUFError(
                f"{name}.weight has shape {tuple(weight.shape)} in the GGUF file but the model expects "
                f"{(module.out_features, module.in_features)}: the file belongs to another model."
            )
        layer = GGUFLinear(module.in_features, module.out_features, module.bias is not None, weight.qtype,
                           compute_dtype=compute_dtype, cache=cache, device=module.weight.device)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
        report.add(name, module, layer, f"gguf {weight.qtype.name}", compute_dtype)
    leftover = [key for key, value in gguf_state.items() if isinstance(value, GGUFWeight) and key not in report]
    if leftover:
        raise GGUFError(
            f"{len(leftover)} quantized GGUF tensors belong to no Linear layer of the model (first: {leftover[0]}); "
            f"only Linear weights may be quantized. Re-convert the file keeping other tensors in F16/F32."
        )
    return report
