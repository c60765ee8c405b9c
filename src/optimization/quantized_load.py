"""The DiT's loading hook for quantized layers: which Linear layers of the ``meta`` model become quantized
ones before its weights are read (``models.load.load_dit``'s ``prepare_layers``).

GGUF files get :class:`.gguf.GGUFLinear` layers, ComfyUI quantized files the layers of :mod:`.comfy_quant`,
and float8 weights or a quantization mode the layers of :mod:`.linear_quantization`.  Swapping on the meta
model, before loading, means the full-precision weights never exist in memory.
"""
from __future__ import annotations

import functools
import logging
import os

import torch

from ..models.checkpoint import CheckpointError, CheckpointIndex
from ..models.dit import NaDiT
from ..models.file_types import is_gguf
from ..models.load import load_dit as _load_plain_layers
from ..models.quant_formats import QuantFormatError

log = logging.getLogger("seedvr2")


def prepare_layers(model: torch.nn.Module, index: CheckpointIndex, dtype: torch.dtype, device: torch.device,
                   quantization: str = "disabled"):
    """Swap Linear layers for quantized ones on the meta model before loading (GGUF files, fp8 weights,
    or a quantization mode); returns the rule saying which tensors must keep the file's dtype."""
    from . import linear_quantization

    if is_gguf(index.path):
        from . import gguf

        report = gguf.prepare_model_for_gguf(model, gguf.load_gguf_state_dict(index.path), compute_dtype=dtype)
    elif index.quantized:
        from . import comfy_quant

        try:
            report = comfy_quant.prepare_model_for_comfy_quant(
                model, index.quantized, quantization, dtype, device, file_name=index.path.name)
        except QuantFormatError as exc:
            raise CheckpointError(f"{index.path.name}: {exc}") from None
    else:
        fp8_file = any(v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for v in index.tensors.values())
        if quantization in ("disabled", "gguf") and not fp8_file:
            return lambda key, tensor: False
        mode = "disabled" if quantization == "gguf" else quantization
        report = linear_quantization.prepare_model_for_weights(
            model, {k: v.dtype for k, v in index.tensors.items()}, mode, dtype, device=device
        )
    if report.layers:
        # An fp8 file read with quantization "disabled" keeps its fp8 storage: how the file is stored, not a
        # quantization the user asked for, so it is only told when debugging.
        asked = quantization != "disabled" or is_gguf(index.path)
        log.log(logging.INFO if asked else logging.DEBUG, "SeedVR2: %s", report.summary())
    return lambda key, tensor: key in report


def quantized_layers(quantization: str):
    """The ``prepare_layers`` hook of ``models.load.load_dit`` for the loader's ``quantization`` input."""
    return functools.partial(prepare_layers, quantization=quantization)


def load_dit(path: str | os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             quantization: str = "disabled") -> NaDiT:
    """Load a DiT checkpoint strictly with the layers its file and ``quantization`` need; floating weights
    are stored in ``dtype``.

    float8 weights stay in float8 when ``quantization`` asks for fp8 compute or storage, or when the file
    stores them so; otherwise they are upcast to ``dtype``.
    """
    return _load_plain_layers(path, device=device, dtype=dtype, prepare_layers=quantized_layers(quantization))
