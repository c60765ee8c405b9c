"""Build the DiT or the VAE from a weight file: detect the architecture, build on ``meta``, load strictly."""
from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import torch

from . import checkpoint, staged_read
from .checkpoint import CONFIG_METADATA_KEY, CheckpointError, CheckpointIndex, check_strict, float_dtype_rule, read_index, require_kind
from .dit import NaDiT, NaDiTConfig
from .video_vae_v3 import VAEConfig, VideoAutoencoder

log = logging.getLogger("seedvr2")

WINDOW_HINT_KEYS = ("window", "window_method")
STAGED_LOAD_ENV = "SEEDVR2_STAGED_LOAD"  # 0: read tensors one at a time through safetensors (to compare)


def staged(path, device) -> bool:
    """Whether ``path`` goes to ``device`` through the chunked pinned reader: safetensors files bound for a GPU.
    For the CPU, safetensors' memory map is already zero-copy where the dtype is kept."""
    return (Path(path).suffix.lower() == ".safetensors" and torch.device(device).type == "cuda"
            and os.environ.get(STAGED_LOAD_ENV, "1") != "0")


def materialize(model: torch.nn.Module, path, *, device, dtype_for, overrides={}) -> torch.nn.Module:
    """Fill the meta ``model`` from ``path`` (see :func:`staged`), else tensor by tensor."""
    if staged(path, device):
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


def load_dit(
    path: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    quantization: str = "disabled",
) -> NaDiT:
    """Load a DiT checkpoint strictly; floating weights are stored in ``dtype``.

    float8 weights stay in float8 when ``quantization`` asks for fp8 compute or storage; otherwise they are
    upcast to ``dtype``.
    """
    index, config = inspect_dit(path)
    with torch.device("meta"):
        model = NaDiT(config)
    rope = model.rope_frequency_buffers()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_strict(index.path, expected, index.shapes, optional=set(rope))
    keep_packed = _prepare_quantized_layers(model, index, quantization, dtype, torch.device(device))
    materialize(model, index.path, device=device, dtype_for=float_dtype_rule(dtype, keep_packed), overrides=rope)
    return model.eval().requires_grad_(False)


def _prepare_quantized_layers(model: torch.nn.Module, index: CheckpointIndex, quantization: str,
                              dtype: torch.dtype, device: torch.device):
    """Swap Linear layers for quantized ones on the meta model before loading (GGUF files, fp8 weights,
    or a quantization mode); returns the rule saying which tensors must keep the file's dtype."""
    from ..optimization import fp4_quantization

    if index.path.suffix.lower() == ".gguf":
        from ..optimization import gguf

        report = gguf.prepare_model_for_gguf(model, gguf.load_gguf_state_dict(index.path), compute_dtype=dtype)
    else:
        fp8_file = any(v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for v in index.tensors.values())
        if quantization in ("disabled", "gguf") and not fp8_file:
            return lambda key, tensor: False
        mode = "disabled" if quantization == "gguf" else quantization
        report = fp4_quantization.prepare_model_for_weights(
            model, {k: v.dtype for k, v in index.tensors.items()}, mode, dtype, device=device
        )
    if report.layers:
        # An fp8 file read with quantization "disabled" keeps its fp8 storage: how the file is stored, not a
        # quantization the user asked for, so it is only told when debugging.
        asked = quantization != "disabled" or index.path.suffix.lower() == ".gguf"
        log.log(logging.INFO if asked else logging.DEBUG, "SeedVR2: %s", report.summary())
    return lambda key, tensor: key in report


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
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_strict(index.path, expected, index.shapes)
    materialize(model, index.path, device=device, dtype_for=float_dtype_rule(dtype))
    return model.eval().requires_grad_(False)
