"""ComfyUI's per-layer quantized weights (``<layer>.comfy_quant``): parsing, validation, dequantization.

A quantized Linear layer ``L`` of a ComfyUI file stores ``L.weight`` in a storage dtype, its scales as
``L.weight_scale`` (and ``L.weight_scale_2``), optionally ``L.input_scale`` / ``L.pre_quant_scale``, and a
marker ``L.comfy_quant``: a uint8 tensor holding UTF-8 JSON such as ``{"format": "nvfp4"}``.  The
formats, as ComfyUI and comfy-kitchen define them, are described with their sources in
``docs/model-files.md``; :data:`FORMATS` below holds one entry per format.

Nothing here runs a quantized matmul: it yields :class:`QuantizedWeight` records and dequantizes them.
The layers that keep a format packed on the GPU live in ``src/optimization``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

MARKER_SUFFIX = ".comfy_quant"
SCALE_NAMES = ("weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale")
FP8_MAX = 448.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
NVFP4_BLOCK = 16
MXFP8_BLOCK = 32


class QuantFormatError(ValueError):
    """A layer's quantization data cannot be used; the message names the layer."""


def _ceil(a: int, b: int) -> int:
    return -(-a // b) * b


def tiled_scale_shape(rows: int, scale_cols: int) -> tuple[int, int]:
    """Shape of block scales in the cuBLAS 128x4 tiled layout: rows padded to 128, columns to 4."""
    return _ceil(rows, 128), _ceil(scale_cols, 4)


def untile_scales(tiled: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Block scales ``(rows, cols)`` from the cuBLAS "block scaling factors" layout.

    The padded ``(R, C)`` matrix is cut into 128x4 tiles stored one after the other (tile rows first);
    inside a tile, the scale of row ``r`` (0-127) and column ``c`` (0-3) sits at ``(r % 32)·16 + (r // 32)·4 + c``.
    """
    padded_rows, padded_cols = tiled_scale_shape(rows, cols)
    tiles = tiled.reshape(padded_rows // 128, padded_cols // 4, 32, 4, 4)   # (tile_r, tile_c, r%32, r//32, c)
    matrix = tiles.permute(0, 3, 2, 1, 4).reshape(padded_rows, padded_cols)
    return matrix[:rows, :cols]


def e2m1_table(dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 e2m1 values by code (bit 3 is the sign)."""
    values = E2M1_VALUES + tuple(-v for v in E2M1_VALUES)
    return torch.tensor(values, dtype=dtype, device=device)


def hadamard(size: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """ConvRot's normalized "regular" Hadamard matrix: Kronecker powers of the symmetric 4x4 matrix with
    -1 on the anti-diagonal, divided by sqrt(size).  Symmetric and orthogonal, so it is its own inverse."""
    if size < 4 or 4 ** round(math.log(size, 4)) != size:
        raise ValueError(f"a ConvRot group size must be a power of 4 (4, 16, 64, 256, ...), got {size}")
    h4 = torch.ones(4, 4, dtype=torch.float64) - 2 * torch.eye(4, dtype=torch.float64).flip(1)
    h = h4
    while h.shape[0] < size:
        h = torch.kron(h, h4)
    return (h / math.sqrt(size)).to(dtype=dtype, device=device)


def rotate_groups(matrix: torch.Tensor, group: int) -> torch.Tensor:
    """``matrix`` ``(..., K)`` with every ``group`` consecutive columns multiplied by the Hadamard matrix."""
    h = hadamard(group, matrix.dtype, matrix.device)
    return (matrix.unflatten(-1, (-1, group)) @ h).flatten(-2)


# ------------------------------------------------------------------------------------------- the record
@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """One layer's weight as a ComfyUI file stores it, with everything needed to rebuild its values.

    ``shape`` is the logical ``(out, in)`` shape the model expects; ``data`` is the stored weight (possibly
    padded), ``scales`` the named scale tensors, ``config`` the parsed marker.
    """

    layer: str
    format: str
    config: dict
    data: torch.Tensor
    scales: dict[str, torch.Tensor]
    shape: torch.Size

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of the packed data (a loader keeps it to hand the weight over untouched)."""
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    def is_floating_point(self) -> bool:
        return False

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> QuantizedWeight:
        if dtype not in (None, self.data.dtype):
            raise QuantFormatError(f"{self.layer}: a {self.format} weight stays packed; use dequantize({dtype}).")
        return QuantizedWeight(self.layer, self.format, self.config,
                               self.data.to(device, non_blocking=non_blocking),
                               {k: v.to(device, non_blocking=non_blocking) for k, v in self.scales.items()},
                               self.shape)

    @property
    def spec(self) -> QuantFormat:
        return FORMATS[self.format]

    @property
    def label(self) -> str:
        """The format as users know it from the file names (int8_convrot, nvfp4, ...)."""
        return "int8_convrot" if self.config.get("convrot") else self.format

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The layer's weight ``(out, in)`` in ``dtype``, computed in float32 on the weight's device."""
        values = self.spec.dequantize(self)[: self.shape[0], : self.shape[1]]
        pre = self.scales.get("pre_quant_scale")
        if pre is not None:  # AWQ-style smoothing multiplies the inputs; fold it into the columns
            values = values * pre.float().reshape(1, -1)
        return values.to(dtype).contiguous()


# ----------------------------------------------------------------------------------------- the formats
@dataclass(frozen=True)
class QuantFormat:
    """One entry of :data:`FORMATS`: the storage it expects and how to decode it."""

    name: str
    storage: tuple[torch.dtype, ...]          # accepted dtypes of ``weight`` (uint8 = raw bytes of the real one)
    required: tuple[str, ...]                 # scale tensors that must be present
    storage_shape: Callable[[int, int], tuple[int, int]]     # logical (N, K) -> stored weight shape
    check: Callable[[str, dict, torch.Size, Mapping[str, "TensorMeta"]], None]
    dequantize: Callable[[QuantizedWeight], torch.Tensor]
    optional: tuple[str, ...] = ("input_scale",)


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype


def _numel(shape) -> int:
    return int(math.prod(shape))


def _require_float(layer: str, name: str, meta: TensorMeta) -> None:
    if not meta.dtype.is_floating_point or meta.dtype.itemsize < 2:
        raise QuantFormatError(f"layer {layer}: {name} must be a float16/bfloat16/float32 tensor, not {meta.dtype}.")


def _per_tensor_or_row(layer: str, name: str, meta: TensorMeta, rows: int) -> None:
    _require_float(layer, name, meta)
    if _numel(meta.shape) not in (1, rows) or len(meta.shape) > 2 or (len(meta.shape) == 2 and meta.shape[1] != 1):
        raise QuantFormatError(
            f"layer {layer}: {name} has shape {list(meta.shape)}; expected one value ([] or [1]) or one per "
            f"output row ([{rows}] or [{rows}, 1])."
        )


def _scalar(layer: str, name: str, meta: TensorMeta) -> None:
    _require_float(layer, name, meta)
    if _numel(meta.shape) != 1:
        raise QuantFormatError(f"layer {layer}: {name} has shape {list(meta.shape)}; expected one value ([] or [1]).")


def _tiled(layer: str, name: str, meta: TensorMeta, rows: int, scale_cols: int, dtypes) -> None:
    expected = tiled_scale_shape(rows, scale_cols)
    if meta.dtype not in dtypes:
        raise QuantFormatError(
            f"layer {layer}: {name} has dtype {meta.dtype}; expected {' or '.join(map(str, dtypes))}."
        )
    if tuple(meta.shape) != expected and tuple(meta.shape) != (_numel(expected),):
        raise QuantFormatError(
            f"layer {layer}: {name} has shape {list(meta.shape)}; the weight's {rows} rows and {scale_cols} "
            f"scale columns need {list(expected)} (cuBLAS 128x4 tiles)."
        )


def _check_pre_quant(layer: str, metas: Mapping[str, TensorMeta], in_features: int) -> None:
    meta = metas.get("pre_quant_scale")
    if meta is not None:
        _require_float(layer, "pre_quant_scale", meta)
        if _numel(meta.shape) != in_features:
            raise QuantFormatError(
                f"layer {layer}: pre_quant_scale has shape {list(meta.shape)}; expected [{in_features}]."
            )


# float8_e4m3fn: W = weight · weight_scale (one scale; per-row accepted too)
def _fp8_check(layer, config, stored, metas):
    _per_tensor_or_row(layer, "weight_scale", metas["weight_scale"], stored[0])


def _fp8_dequantize(q: QuantizedWeight) -> torch.Tensor:
    scale = q.scales["weight_scale"].float()
    return q.data.view(torch.float8_e4m3fn).float() * (scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(()))


# int8_tensorwise: W = (weight · weight_scale), then un-rotated per group when "convrot"
def _int8_group(layer: str, config: dict) -> int | None:
    params = config.get("params") if isinstance(config.get("params"), dict) else {}
    if not config.get("convrot", params.get("convrot", False)):
        return None
    group = config.get("convrot_groupsize", params.get("convrot_groupsize", 256))
    if not isinstance(group, int) or isinstance(group, bool) or group < 4 or 4 ** round(math.log(group, 4)) != group:
        raise QuantFormatError(f"layer {layer}: convrot_groupsize {group!r} is not a power of 4.")
    return group


def _int8_check(layer, config, stored, metas):
    _per_tensor_or_row(layer, "weight_scale", metas["weight_scale"], stored[0])
    group = _int8_group(layer, config)
    if group is not None and stored[1] % group:
        raise QuantFormatError(
            f"layer {layer}: convrot_groupsize {group} does not divide the weight's {stored[1]} input features."
        )


def _int8_dequantize(q: QuantizedWeight) -> torch.Tensor:
    scale = q.scales["weight_scale"].float()
    values = q.data.float() * (scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(()))
    group = _int8_group(q.layer, q.config)
    return values if group is None else rotate_groups(values, group)


# nvfp4: weight uint8 (N, K/2), two e2m1 codes per byte, the even-indexed one in the HIGH nibble;
# weight_scale e4m3 per 16 inputs in 128x4 tiles; weight_scale_2 one float32
def _nvfp4_check(layer, config, stored, metas):
    rows, cols = stored[0], stored[1] * 2
    if cols % NVFP4_BLOCK:
        raise QuantFormatError(f"layer {layer}: nvfp4 weight has {cols} inputs, not a multiple of {NVFP4_BLOCK}.")
    _tiled(layer, "weight_scale", metas["weight_scale"], rows, cols // NVFP4_BLOCK, (torch.float8_e4m3fn, torch.uint8))
    _scalar(layer, "weight_scale_2", metas["weight_scale_2"])


def nvfp4_codes(packed: torch.Tensor) -> torch.Tensor:
    """``(N, K/2)`` bytes -> ``(N, K)`` e2m1 codes, the high nibble first (comfy-kitchen's default order)."""
    return torch.stack((packed >> 4, packed & 0x0F), dim=-1).flatten(-2)


def _nvfp4_dequantize(q: QuantizedWeight) -> torch.Tensor:
    rows, cols = q.data.shape[0], q.data.shape[1] * 2
    values = e2m1_table(torch.float32, q.data.device)[nvfp4_codes(q.data).long()]
    block = untile_scales(q.scales["weight_scale"].view(torch.float8_e4m3fn).reshape(-1), rows, cols // NVFP4_BLOCK)
    scale = block.float() * q.scales["weight_scale_2"].float().reshape(())
    return (values.unflatten(-1, (-1, NVFP4_BLOCK)) * scale.unsqueeze(-1)).flatten(-2)


# mxfp8: weight e4m3 (N, K) padded to 32x32; weight_scale e8m0 (2^(byte-127)) per 32 inputs in 128x4 tiles
def _mxfp8_check(layer, config, stored, metas):
    if stored[1] % MXFP8_BLOCK:
        raise QuantFormatError(f"layer {layer}: mxfp8 weight has {stored[1]} inputs, not a multiple of {MXFP8_BLOCK}.")
    e8m0 = getattr(torch, "float8_e8m0fnu", torch.uint8)
    _tiled(layer, "weight_scale", metas["weight_scale"], stored[0], stored[1] // MXFP8_BLOCK, (e8m0, torch.uint8))


def e8m0_values(codes: torch.Tensor) -> torch.Tensor:
    """Float32 values of E8M0 scale bytes: 2^(byte - 127); byte 0 is read as 0 (comfy-kitchen does too),
    byte 255 (NaN in the OCP spec) as NaN."""
    exponent = codes.to(torch.int32)
    values = torch.exp2(exponent.float() - 127.0)
    values = torch.where(exponent == 0, torch.zeros_like(values), values)
    return torch.where(exponent == 255, torch.full_like(values, float("nan")), values)


def _mxfp8_dequantize(q: QuantizedWeight) -> torch.Tensor:
    rows, cols = q.data.shape
    codes = untile_scales(q.scales["weight_scale"].view(torch.uint8).reshape(-1), rows, cols // MXFP8_BLOCK)
    values = q.data.view(torch.float8_e4m3fn).float().unflatten(-1, (-1, MXFP8_BLOCK))
    return (values * e8m0_values(codes).unsqueeze(-1)).flatten(-2)


FORMATS: dict[str, QuantFormat] = {
    "float8_e4m3fn": QuantFormat("float8_e4m3fn", (torch.float8_e4m3fn, torch.uint8), ("weight_scale",),
                                 lambda n, k: (n, k), _fp8_check, _fp8_dequantize),
    "int8_tensorwise": QuantFormat("int8_tensorwise", (torch.int8,), ("weight_scale",),
                                   lambda n, k: (n, k), _int8_check, _int8_dequantize, optional=()),
    "nvfp4": QuantFormat("nvfp4", (torch.uint8,), ("weight_scale", "weight_scale_2"),
                         lambda n, k: (_ceil(n, 16), _ceil(k, 16) // 2), _nvfp4_check, _nvfp4_dequantize,
                         optional=("input_scale", "pre_quant_scale")),
    "mxfp8": QuantFormat("mxfp8", (torch.float8_e4m3fn, torch.uint8), ("weight_scale",),
                         lambda n, k: (_ceil(n, 32), _ceil(k, 32)), _mxfp8_check, _mxfp8_dequantize),
}


# ------------------------------------------------------------------------------------------- markers
def parse_marker(layer: str, raw: torch.Tensor) -> dict:
    """The JSON object of a ``<layer>.comfy_quant`` tensor, checked to name a known format."""
    if raw.dtype not in (torch.uint8, torch.int8) or raw.dim() != 1:
        raise QuantFormatError(
            f"layer {layer}: {layer}{MARKER_SUFFIX} must be a 1-D uint8 tensor of JSON text, found "
            f"{raw.dtype} {list(raw.shape)}. The file is damaged or was written by an unknown tool."
        )
    try:
        config = json.loads(bytes(raw.view(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise QuantFormatError(
            f"layer {layer}: {layer}{MARKER_SUFFIX} does not hold valid JSON ({exc}). The file is damaged; "
            f"download it again."
        ) from None
    if not isinstance(config, dict) or not isinstance(config.get("format"), str):
        raise QuantFormatError(
            f"layer {layer}: {layer}{MARKER_SUFFIX} must be a JSON object with a \"format\" string, got {config!r}."
        )
    if config["format"] not in FORMATS:
        raise QuantFormatError(
            f"layer {layer}: quantization format {config['format']!r} is not supported (supported: "
            f"{', '.join(FORMATS)}). Use the fp16, fp8_e4m3fn, int8_convrot, mxfp8 or nvfp4 file instead."
        )
    return config


def check_layer(layer: str, config: dict, weight: TensorMeta, scales: Mapping[str, TensorMeta]) -> None:
    """Validate a marked layer's stored weight and scales (shapes and dtypes only, no data read)."""
    spec = FORMATS[config["format"]]
    if weight.dtype not in spec.storage:
        raise QuantFormatError(
            f"layer {layer}: a {spec.name} weight is stored as {' or '.join(map(str, spec.storage))}, found "
            f"{weight.dtype}."
        )
    if len(weight.shape) != 2:
        raise QuantFormatError(f"layer {layer}: a {spec.name} weight must be 2-D, found shape {list(weight.shape)}.")
    missing = [name for name in spec.required if name not in scales]
    if missing:
        raise QuantFormatError(
            f"layer {layer}: the {spec.name} weight has no {', '.join(f'{layer}.{m}' for m in missing)}. The file "
            f"is incomplete; download it again."
        )
    extra = [name for name in scales if name not in spec.required and name not in spec.optional]
    if extra:
        raise QuantFormatError(f"layer {layer}: {layer}.{extra[0]} does not belong to the {spec.name} format.")
    spec.check(layer, config, torch.Size(weight.shape), scales)
    meta = scales.get("input_scale")
    if meta is not None:
        _scalar(layer, "input_scale", meta)


def logical_shape_matches(config: dict, stored: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    """Whether a stored weight of ``stored`` shape is the ``expected`` (out, in) weight in this format."""
    return len(expected) == 2 and tuple(FORMATS[config["format"]].storage_shape(*expected)) == tuple(stored)


def check_against_model(quant: LayerQuant, expected: tuple[int, ...]) -> None:
    """Checks that need the model's (out, in) shape: ``pre_quant_scale`` has one value per input."""
    _check_pre_quant(quant.layer, quant.scale_meta, expected[1])


@dataclass
class LayerQuant:
    """What the index knows of one marked layer before any data is read."""

    layer: str
    config: dict
    weight_key: str                       # raw key of the stored weight
    scale_keys: dict[str, str] = field(default_factory=dict)   # scale name -> raw key
    stored: TensorMeta | None = None
    scale_meta: dict[str, TensorMeta] = field(default_factory=dict)

    @property
    def format(self) -> str:
        return self.config["format"]

    @property
    def label(self) -> str:
        return "int8_convrot" if self.config.get("convrot") else self.format
