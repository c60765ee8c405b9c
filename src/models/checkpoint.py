"""Reading SeedVR2 weight files and loading them strictly into our modules.

Supported files: ``.safetensors`` (fp32 / fp16 / bf16 / float8_e4m3fn, mixed files included), ``.gguf``
(through :mod:`src.optimization.gguf`) and plain-tensor ``.pth`` / ``.pt`` pickles, which are only ever
opened with ``torch.load(weights_only=True)``.

Loading never needs two copies of a model: the module tree is built on the ``meta`` device, each tensor is
read from the file, converted and moved to its device one at a time, and assigned into the tree.  The
architecture (3B, 7B or another size) comes from the tensors themselves, never from the file name.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
# Prefixes some converters put in front of every key (ComfyUI-GGUF, DataParallel wrappers).
KEY_PREFIXES = ("model.diffusion_model.", "module.")
# Safetensors metadata key that may carry constructor arguments that are not visible in the tensors
# (the DiT's per-layer windows); written by our own tools, honoured when present.
CONFIG_METADATA_KEY = "seedvr2.config"
SUPPORTED_SUFFIXES = (".safetensors", ".gguf", ".pth", ".pt")


class CheckpointError(ValueError):
    """A weight file cannot be used; the message names the file and says what to do."""


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class CheckpointIndex:
    """What a weight file holds, read without loading the tensor data."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self.tensors.items()}

    @property
    def kind(self) -> str:
        return model_kind(self.tensors.keys())

    def config_hint(self) -> dict:
        raw = self.metadata.get(CONFIG_METADATA_KEY)
        if not raw:
            return {}
        try:
            return dict(json.loads(raw))
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{self.path}: metadata {CONFIG_METADATA_KEY!r} is not valid JSON ({exc}).")


def _strip_prefix(key: str) -> str:
    for prefix in KEY_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _check_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise CheckpointError(
            f"{path}: unsupported weight file type {suffix or '(none)'!r}. Use a .safetensors file "
            f"(recommended), a .gguf file, or a plain-tensor .pth/.pt file."
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (an interrupted download?). Delete it and download it again.")
    return suffix


# --------------------------------------------------------------------------------------------- safetensors
def _read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Parse and validate the JSON header; returns (header, data start offset)."""
    size = path.stat().st_size
    corrupt = f"{path}: not a valid safetensors file (corrupt or truncated). Delete it and download it again."
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(corrupt)
        (header_len,) = struct.unpack("<Q", head)
        if header_len <= 1 or header_len > min(size - 8, 512 * 1024 * 1024):
            raise CheckpointError(corrupt)
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, ValueError):
            raise CheckpointError(corrupt) from None
    if not isinstance(header, dict):
        raise CheckpointError(corrupt)
    data_start = 8 + header_len
    data_size = size - data_start
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = entry["data_offsets"]
            dtype = entry["dtype"]
            shape = entry["shape"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(corrupt) from None
        if end > data_size or begin > end:
            raise CheckpointError(
                f"{path}: tensor {name!r} lies beyond the end of the file: the file is truncated "
                f"({size:,} bytes). Delete it and download it again."
            )
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}.")
        if not isinstance(shape, list):
            raise CheckpointError(corrupt)
    return header, data_start


def _safetensors_index(path: Path) -> CheckpointIndex:
    header, _ = _read_safetensors_header(path)
    metadata = header.pop("__metadata__", None) or {}
    tensors = {
        _strip_prefix(name): TensorInfo(tuple(entry["shape"]), SAFETENSORS_DTYPES[entry["dtype"]])
        for name, entry in header.items()
    }
    return CheckpointIndex(path, tensors, {str(k): str(v) for k, v in metadata.items()})


def _iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield _strip_prefix(name), f.get_tensor(name)
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises its own error types for broken data
        raise CheckpointError(
            f"{path}: could not read tensors ({exc}). The file is corrupt; delete it and download it again."
        ) from exc


# --------------------------------------------------------------------------------------------- pickles
def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: refused to load: a .pth/.pt file must contain only plain tensors (it is opened with "
            f"torch.load(weights_only=True) for safety). Convert it to .safetensors. Details: {exc}"
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(
            f"{path}: expected a dict of named tensors (a state dict), found {type(obj).__name__}. "
            f"Convert it to .safetensors."
        )
    return {_strip_prefix(k): v for k, v in obj.items()}


# --------------------------------------------------------------------------------------------- public
def read_index(path: str | os.PathLike) -> CheckpointIndex:
    """Names, shapes and dtypes of a weight file's tensors (only pickles are loaded to learn them)."""
    path = Path(path)
    suffix = _check_suffix(path)
    if suffix == ".safetensors":
        return _safetensors_index(path)
    if suffix == ".gguf":
        from ..optimization import gguf

        state = gguf.load_gguf_state_dict(path)
        return CheckpointIndex(
            path, {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in state.items()}, {}
        )
    state = _load_pickle(path)
    return CheckpointIndex(path, {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in state.items()}, {})


def iter_tensors(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` one at a time on the CPU (memory-mapped where the format allows)."""
    path = Path(path)
    suffix = _check_suffix(path)
    if suffix == ".safetensors":
        _read_safetensors_header(path)
        yield from _iter_safetensors(path)
    elif suffix == ".gguf":
        from ..optimization import gguf

        yield from gguf.load_gguf_state_dict(path).items()
    else:
        yield from _load_pickle(path).items()


def model_kind(keys) -> str:
    """"dit" or "vae" from a state dict's key names, or "unknown"."""
    keys = list(keys)
    if any(k.startswith(("encoder.", "decoder.")) for k in keys):
        return "vae"
    if any(k.startswith("blocks.") for k in keys) and any(k.startswith("vid_in.") for k in keys):
        return "dit"
    return "unknown"


_KIND_NAMES = {"dit": "a SeedVR2 DiT (seedvr2_ema_*.safetensors)", "vae": "the SeedVR2 VAE (ema_vae_fp16.safetensors)"}


def require_kind(index: CheckpointIndex, expected: str) -> None:
    """Raise a clear error when a file holds another kind of model than the one it was selected for."""
    found = index.kind
    if found == expected:
        return
    what = _KIND_NAMES.get(found, "no SeedVR2 model we know")
    sample = ", ".join(list(index.tensors)[:3]) or "no tensors"
    raise CheckpointError(
        f"{index.path.name} was selected as {_KIND_NAMES[expected].split(' (')[0]}, but it holds {what} "
        f"(first keys: {sample}). Select {_KIND_NAMES[expected]} instead."
    )


def check_strict(path: Path, expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]],
                 optional: set[str] = frozenset()) -> None:
    """Every expected key present with its shape, nothing unexpected; name the first offenders."""
    missing = [k for k in expected if k not in found and k not in optional]
    unexpected = [k for k in found if k not in expected]
    mismatched = [
        f"{k}: file {tuple(found[k])} vs model {tuple(expected[k])}"
        for k in expected if k in found and tuple(found[k]) != tuple(expected[k])
    ]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:5])}{more}")
    raise CheckpointError(
        f"{path.name} does not match the model built from its own tensors: {'; '.join(parts)}. "
        f"The file is damaged or not a SeedVR2 checkpoint."
    )


def materialize(
    model: torch.nn.Module,
    path: Path,
    *,
    device: torch.device | str,
    dtype_for: Callable[[str, torch.Tensor], torch.dtype | None],
    overrides: Mapping[str, torch.Tensor] = {},
) -> torch.nn.Module:
    """Fill a meta-device ``model`` from ``path`` one tensor at a time, assigning (never copying twice).

    ``dtype_for(key, tensor)`` gives the dtype to store each tensor in (None keeps the file's dtype);
    ``overrides`` replace or supply tensors (recomputed constants such as rope frequencies).
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    for key, tensor in iter_tensors(path):
        if key not in expected or key in overrides:
            continue  # unexpected keys were already reported by check_strict; overrides win
        target = dtype_for(key, tensor)
        state[key] = tensor.to(device=device, dtype=target or tensor.dtype, non_blocking=False)
    for key, tensor in overrides.items():
        state[key] = tensor.to(device)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def float_dtype_rule(compute_dtype: torch.dtype, keep: Callable[[str, torch.Tensor], bool] = lambda k, t: False):
    """Floating tensors are converted to ``compute_dtype`` unless ``keep(key, tensor)`` says otherwise."""

    def rule(key: str, tensor: torch.Tensor) -> torch.dtype | None:
        if not tensor.is_floating_point() or keep(key, tensor):
            return None
        return compute_dtype

    return rule
