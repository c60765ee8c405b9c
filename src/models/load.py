"""Build the DiT or the VAE from a weight file: detect the architecture, build on ``meta``, load strictly."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from . import checkpoint, staged_read
from .checkpoint import (
    CONFIG_METADATA_KEY, CheckpointError, CheckpointIndex, check_dtypes, check_strict, float_dtype_rule, read_extras,
    read_index, require_kind,
)
from .file_types import SAFETENSORS, file_format, is_gguf
from .quant_formats import QuantFormatError, QuantizedWeight, check_against_model
from .dit import NaDiT, NaDiTConfig
from .video_vae_v3 import VAEConfig, VideoAutoencoder

WINDOW_HINT_KEYS = ("window", "window_method")
STAGED_LOAD_ENV = "SEEDVR2_STAGED_LOAD"  # 0: read tensors one at a time through safetensors (to compare)


def staged(path, device) -> bool:
    """Whether ``path`` goes to ``device`` through the chunked pinned reader: safetensors files bound for a GPU.
    For the CPU, safetensors' memory map is already zero-copy where the dtype is kept."""
    return (file_format(path) == SAFETENSORS and torch.device(device).type == "cuda"
            and os.environ.get(STAGED_LOAD_ENV, "1") != "0")


def materialize(model: torch.nn.Module, path, *, device, dtype_for, overrides={},
                plain_tensors: bool = True) -> torch.nn.Module:
    """Fill the meta ``model`` from ``path`` (see :func:`staged`), else tensor by tensor.  A file with
    quantized layers (``plain_tensors`` False) goes through the format seam (``checkpoint.materialize``)."""
    if plain_tensors and staged(path, device):
        return staged_read.materialize(model, Path(path), device=device, dtype_for=dtype_for, overrides=overrides)
    return checkpoint.materialize(model, Path(path), device=device, dtype_for=dtype_for, overrides=overrides)


def _detect(index: CheckpointIndex, config_cls, what: str):
    try:
        config = config_cls.from_state_dict_shapes(index.shapes)
    except ValueError as exc:
        raise CheckpointError(f"{index.path.name}: not a usable {what} checkpoint: {exc}") from exc
    # Per-layer windows cannot be seen in tensors; a file may record them in its metadata.
    hint = {k: v for k, v in index.config_hint().items() if k in WINDOW_HINT_KEYS}
    if hint and what == "DiT":
        window = tuple(tuple(int(n) for n in w) for w in hint.get("window", config.window))
        try:
            config = replace(config, window=window, window_method=tuple(hint.get("window_method", config.window_method)))
        except ValueError as exc:
            raise CheckpointError(f"{index.path.name}: metadata {CONFIG_METADATA_KEY!r} is invalid: {exc}") from exc
    return config


def inspect_dit(path: str | os.PathLike) -> tuple[CheckpointIndex, NaDiTConfig]:
    """Read a DiT file's index and detect its architecture (no tensor data is loaded)."""
    index = read_index(path)
    require_kind(index, "dit")
    return index, _detect(index, NaDiTConfig, "DiT")


def inspect_vae(path: str | os.PathLike) -> tuple[CheckpointIndex, VAEConfig]:
    index = read_index(path)
    require_kind(index, "vae")
    return index, _detect(index, VAEConfig, "VAE")


def validate_dit(path: str | os.PathLike) -> CheckpointIndex:
    """Every check :func:`load_dit` makes before it reads tensor data (kind, architecture, strict keys and
    shapes, dtypes, quantized layers), on a ``meta`` model: cheap enough for a loader node."""
    index, config = inspect_dit(path)
    with torch.device("meta"):
        model = NaDiT(config)
    _check_file(index, model, optional=set(model.rope_frequency_buffers()))
    return index


def validate_vae(path: str | os.PathLike) -> CheckpointIndex:
    """The VAE counterpart of :func:`validate_dit`."""
    index, config = inspect_vae(path)
    with torch.device("meta"):
        model = VideoAutoencoder(config)
    _check_file(index, model)
    return index


# (meta model, file index, dtype, device) -> which tensors keep the file's dtype (key, tensor) -> bool
PrepareLayers = Callable[[NaDiT, CheckpointIndex, torch.dtype, torch.device], Callable[[str, object], bool]]


def load_dit(
    path: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    prepare_layers: PrepareLayers | None = None,
) -> NaDiT:
    """Load a DiT checkpoint strictly; floating weights are stored in ``dtype``.

    ``prepare_layers`` swaps layers of the ``meta`` model (e.g. quantized Linears) before any weight is
    read, and says which tensors keep the file's dtype; without it the model keeps its ``nn.Linear`` layers
    (float8 weights are upcast to ``dtype``) and packed quantized files are refused.
    """
    index, config = inspect_dit(path)
    with torch.device("meta"):
        model = NaDiT(config)
    rope = model.rope_frequency_buffers()
    _check_file(index, model, optional=set(rope))
    if prepare_layers is None:
        keep_packed = _plain_layers(index)
    else:
        keep_packed = prepare_layers(model, index, dtype, torch.device(device))
    materialize(model, index.path, device=device, dtype_for=_dtype_rule(dtype, keep_packed), overrides=rope,
                plain_tensors=not index.quantized)
    model.file_conditioning = _conditioning(index)
    return model.eval().requires_grad_(False)


def _check_file(index: CheckpointIndex, model: torch.nn.Module, optional: set[str] = frozenset()) -> None:
    """Strict keys and shapes (quantized layers by their storage), floating dtypes, per-layer scale shapes."""
    params = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in params.items()}
    check_strict(index.path, expected, index.shapes_for(expected), optional=optional)
    check_dtypes(index, params)
    try:
        for key, quant in index.quantized.items():
            check_against_model(quant, expected[key])
    except QuantFormatError as exc:
        raise CheckpointError(f"{index.path.name}: {exc}") from None


def _dtype_rule(dtype: torch.dtype, keep_packed):
    """Floating tensors to ``dtype``; quantized layer weights stay packed where a layer keeps them so, and
    are dequantized to ``dtype`` otherwise."""
    rule = float_dtype_rule(dtype, keep_packed)

    def dtype_for(key: str, tensor) -> torch.dtype | None:
        if isinstance(tensor, QuantizedWeight):
            return None if keep_packed(key, tensor) else dtype
        return rule(key, tensor)

    return dtype_for


def _conditioning(index: CheckpointIndex) -> dict[str, torch.Tensor] | None:
    """The text conditioning a ComfyUI file carries (CPU tensors), or None."""
    if not index.extras:
        return None
    extras = read_extras(index.path)
    return {name: extras[name] for name in ("positive", "negative") if name in extras} or None


def _plain_layers(index: CheckpointIndex) -> Callable[[str, object], bool]:
    """The tensors-to-keep rule of a model with its own ``nn.Linear`` layers: none kept; floating weights
    (fp8 ones included) become the load dtype.  Packed layers (GGUF, ComfyUI quantized) have no plain form."""
    if is_gguf(index.path) or index.quantized:
        kind = "GGUF" if is_gguf(index.path) else "quantized"
        raise CheckpointError(
            f"{index.path.name} is a {kind} file: load it with layers that read its packed weights "
            f"(prepare_layers, e.g. optimization.quantized_load.load_dit).")
    return lambda key, tensor: False


def load_vae(
    path: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> VideoAutoencoder:
    """Load the VAE checkpoint strictly with floating weights in ``dtype``."""
    index, config = inspect_vae(path)
    with torch.device("meta"):
        model = VideoAutoencoder(config)
    _check_file(index, model)
    materialize(model, index.path, device=device, dtype_for=_dtype_rule(dtype, lambda key, tensor: False))
    return model.eval().requires_grad_(False)
