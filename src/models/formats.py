"""The checkpoint-format seam: every reader's raw tensors pass through :data:`LAYOUTS` on the way in.

A reader (safetensors, GGUF, pickle; see :mod:`.checkpoint`) gives the raw key -> (shape, dtype) table and
reads one raw tensor on request.  :func:`normalise` turns that table into the model's view of the file:

* model keys (as our modules name them), each backed by a raw tensor or by a quantized layer record;
* extras: tensors that are not weights but belong to the file (ComfyUI's conditioning buffers).

Each entry of :data:`LAYOUTS` is one key layout or storage convention.  Supporting a new one means adding
an entry here; the readers, the strict loader and the nodes stay as they are.  A layout that claims a
tensor must account for it: whatever is left over is reported by the strict loader as unexpected.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from . import quant_formats as qf
from .quant_formats import LayerQuant, QuantFormatError, TensorMeta

# The conditioning ComfyUI bakes into its SeedVR2 DiT files (comfy/ldm/seedvr/model.py registers them as
# buffers): the positive and negative prompt embeddings, used instead of ours when present.
CONDITIONING_KEYS = {"positive_conditioning": "positive", "negative_conditioning": "negative"}


@dataclass
class Entry:
    """One model-visible tensor: the raw tensor behind it, or the quantized layer it is the weight of."""

    raw_key: str
    meta: TensorMeta
    quant: LayerQuant | None = None


@dataclass
class Normalised:
    """A file as the model sees it."""

    entries: dict[str, Entry] = field(default_factory=dict)
    extras: dict[str, Entry] = field(default_factory=dict)
    layouts: list[str] = field(default_factory=list)      # names of the layouts that applied


Reader = Callable[[str], torch.Tensor]   # raw key -> tensor (only used for small tensors while indexing)


class LayoutError(ValueError):
    """A layout's rules are broken; the message names the tensor or layer."""


# ------------------------------------------------------------------------------------------- layouts
KEY_PREFIXES = ("model.diffusion_model.", "module.")


def strip_key_prefix(key: str) -> str:
    """``key`` without a converter's prefix (see :func:`strip_prefixes`)."""
    return next((key[len(p):] for p in KEY_PREFIXES if key.startswith(p)), key)


def strip_prefixes(table: Normalised, read: Reader) -> bool:
    """Prefixes converters put in front of every key: ComfyUI's ``model.diffusion_model.`` (GGUF and
    ComfyUI checkpoints) and DataParallel's ``module.``."""
    changed = False
    for key in list(table.entries):
        for prefix in KEY_PREFIXES:
            if key.startswith(prefix):
                short = key[len(prefix):]
                if short in table.entries:
                    raise LayoutError(f"tensor {short!r} is stored twice (with and without the {prefix!r} prefix).")
                table.entries[short] = table.entries.pop(key)
                changed = True
                break
    return changed


def comfy_conditioning(table: Normalised, read: Reader) -> bool:
    """ComfyUI's ``positive_conditioning`` [58, 5120] / ``negative_conditioning`` [64, 5120] buffers."""
    found = [key for key in CONDITIONING_KEYS if key in table.entries]
    for key in found:
        entry = table.entries.pop(key)
        if len(entry.meta.shape) != 2 or not entry.meta.dtype.is_floating_point or 0 in entry.meta.shape:
            raise LayoutError(
                f"{key} must be a 2-D floating tensor (text tokens x 5120), found {entry.meta.dtype} "
                f"{list(entry.meta.shape)}."
            )
        table.extras[CONDITIONING_KEYS[key]] = entry
    if len(found) == 1:
        raise LayoutError(f"the file has {found[0]} but not its counterpart; both conditioning buffers are needed.")
    return bool(found)


def comfy_quant_layers(table: Normalised, read: Reader) -> bool:
    """Per-layer quantized weights marked by ``<layer>.comfy_quant`` (see :mod:`.quant_formats`).

    The marker and the scale tensors are consumed; ``<layer>.weight`` becomes a quantized entry whose
    shape is what its storage holds in logical (out, in) terms.
    """
    markers = [key for key in table.entries if key.endswith(qf.MARKER_SUFFIX)]
    for marker in markers:
        layer = marker[: -len(qf.MARKER_SUFFIX)]
        entry = table.entries.pop(marker)
        try:
            config = qf.parse_marker(layer, read(entry.raw_key))
            weight = table.entries.get(f"{layer}.weight")
            if weight is None:
                raise QuantFormatError(f"layer {layer}: has a {marker} marker but no {layer}.weight.")
            scales = {name: table.entries[f"{layer}.{name}"] for name in qf.SCALE_NAMES if f"{layer}.{name}" in table.entries}
            qf.check_layer(layer, config, weight.meta, {name: e.meta for name, e in scales.items()})
        except QuantFormatError as exc:
            raise LayoutError(str(exc)) from None
        for name in scales:
            del table.entries[f"{layer}.{name}"]
        quant = LayerQuant(layer, config, weight.raw_key, {name: e.raw_key for name, e in scales.items()}, weight.meta,
                           {name: e.meta for name, e in scales.items()})
        rows, cols = weight.meta.shape
        logical = (rows, cols * 2) if config["format"] == "nvfp4" else (rows, cols)
        bias = table.entries.get(f"{layer}.bias")
        if bias is not None and len(bias.meta.shape) == 1 and bias.meta.shape[0] <= rows:
            logical = (bias.meta.shape[0], logical[1])  # padded rows: the bias knows the real count
        table.entries[f"{layer}.weight"] = Entry(weight.raw_key, TensorMeta(logical, weight.meta.dtype), quant)
    # Scales of a layer whose marker is missing would silently be dropped by other loaders; name them.
    orphans = [key for key, entry in table.entries.items() if entry.quant is None
               and key.rsplit(".", 1)[-1] in ("weight_scale", "weight_scale_2")]
    if orphans:
        raise LayoutError(
            f"tensor {orphans[0]!r} is a quantization scale but its layer has no "
            f"{orphans[0].rsplit('.', 1)[0]}{qf.MARKER_SUFFIX} marker saying how to use it. The file is damaged."
        )
    return bool(markers)


@dataclass(frozen=True)
class Layout:
    name: str
    apply: Callable[[Normalised, Reader], bool]


LAYOUTS: tuple[Layout, ...] = (
    Layout("key prefixes", strip_prefixes),
    Layout("ComfyUI conditioning buffers", comfy_conditioning),
    Layout("ComfyUI per-layer quantization", comfy_quant_layers),
)


def normalise(raw: Mapping[str, TensorMeta], read: Reader) -> Normalised:
    """Apply every layout, in order, to a reader's raw table."""
    table = Normalised({key: Entry(key, meta) for key, meta in raw.items()})
    for layout in LAYOUTS:
        if layout.apply(table, read):
            table.layouts.append(layout.name)
    return table


def quantized_weight(entry: Entry, read: Reader, shape: tuple[int, ...] | None = None) -> qf.QuantizedWeight:
    """The :class:`~.quant_formats.QuantizedWeight` of a quantized entry, its tensors read now."""
    quant = entry.quant
    data = read(quant.weight_key)
    if data.dtype == torch.uint8 and quant.format in ("float8_e4m3fn", "mxfp8"):
        data = data.view(torch.float8_e4m3fn)   # raw fp8 bytes stored as uint8 by older tools
    scales = {name: read(key) for name, key in quant.scale_keys.items()}
    return qf.QuantizedWeight(quant.layer, quant.format, quant.config, data, scales,
                              torch.Size(shape or entry.meta.shape))
