"""GGUF block decoding (ggml's quantized tensor layouts) as torch kernels: raw blocks -> values.

Block layouts (ggml): a block of 32 (legacy types) or 256 (K-quants) values is stored as raw bytes.
Legacy blocks start with an fp16 scale ``d`` (and an fp16 offset ``m`` for the ``_1`` types); K-quant
super-blocks split 256 values into sub-blocks of 16 or 32 with small integer scales (and offsets) that
multiply the super-block's fp16 ``d`` (and ``dmin``).  The kernels run on the blocks' device, so a layer can
decode its weight where it computes (``optimization.gguf``).
"""
from __future__ import annotations

from typing import Callable

import gguf
import torch

from .errors import GGUFError

Q = gguf.GGMLQuantizationType
def plain_types() -> dict:
    """Unquantized GGUF tensor types and the torch dtype they load as."""
    Q = gguf.GGMLQuantizationType
    return {
        Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16, Q.F64: torch.float64,
        Q.I8: torch.int8, Q.I16: torch.int16, Q.I32: torch.int32, Q.I64: torch.int64,
    }


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
