"""Reading SeedVR2 weight files and loading them strictly into our modules.

Supported files: ``.safetensors`` (fp32 / fp16 / bf16 / float8_e4m3fn, mixed files included, and
ComfyUI's per-layer quantized files), ``.gguf`` (:mod:`.gguf_reader`) and plain-tensor ``.pth`` / ``.pt``
pickles, which are only ever opened with ``torch.load(weights_only=True)``.  Every reader's keys pass
through one normalisation step (:mod:`.formats`) that maps the file's layout to our module names.

Loading never needs two copies of a model: the module tree is built on the ``meta`` device, each tensor is
read from the file, converted and moved to its device one at a time, and assigned into the tree.  The
architecture (3B, 7B or another size) comes from the tensors themselves, never from the file name.
"""
from __future__ import annotations

import json
import math
import os
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch

from . import formats, quant_formats
from .errors import CheckpointError
from .file_types import GGUF, SAFETENSORS, file_format, is_gguf
from .quant_formats import LayerQuant, TensorMeta

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e8m0fnu"):  # MXFP8 block scales
    SAFETENSORS_DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
# Safetensors metadata key that may carry constructor arguments that are not visible in the tensors
# (the DiT's per-layer windows); written by our own tools, honoured when present.
CONFIG_METADATA_KEY = "seedvr2.config"


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class CheckpointIndex:
    """What a weight file holds, read without loading the tensor data (see :mod:`.formats`).

    ``tensors`` are the model's keys; a quantized layer's weight is listed with the logical shape its
    storage holds and its storage dtype, and described in ``quantized``.  ``extras`` are tensors that are
    not weights (ComfyUI's conditioning buffers).
    """

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    quantized: dict[str, LayerQuant] = field(default_factory=dict)   # model key of the weight -> layer
    extras: dict[str, TensorInfo] = field(default_factory=dict)
    layouts: tuple[str, ...] = ()

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

    def shapes_for(self, expected: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """The file's shapes for a strict comparison with ``expected``: a quantized weight whose storage is
        the expected (out, in) weight in its format (padding included) counts as that shape."""
        shapes = self.shapes
        for key, quant in self.quantized.items():
            want = expected.get(key)
            if want is not None and quant_formats.logical_shape_matches(quant.config, quant.stored.shape, want):
                shapes[key] = tuple(want)
        return shapes


def _strip_prefix(key: str) -> str:
    """A raw key without a converter's prefix (the first layout of :mod:`.formats`; the staged reader of
    plain files uses it directly)."""
    return formats.strip_key_prefix(key)


def _checked_format(path: Path) -> str:
    """The file's format (:mod:`.file_types`), after checking that it is a non-empty file."""
    found = file_format(path)
    if found is None:
        raise CheckpointError(
            f"{path}: unsupported weight file type {path.suffix.lower() or '(none)'!r}. Use a .safetensors file "
            f"(recommended), a .gguf file, or a plain-tensor .pth/.pt file."
        )
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a folder, not a weight file. Remove or rename the folder and put the file itself there."
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (an interrupted download?). Delete it and download it again.")
    return found


# --------------------------------------------------------------------------------------------- safetensors
def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Parse and validate the JSON header; returns (header, data start offset).

    Every tensor must have a known dtype, a shape of non-negative integers and a byte range of exactly the
    size that shape needs, inside the file and overlapping no other tensor's range.
    """
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
    ranges = []
    for name, entry in header.items():
        if name == "__metadata__":
            if entry is not None and not isinstance(entry, dict):
                raise CheckpointError(corrupt)
            continue
        try:
            offsets, dtype, shape = entry["data_offsets"], entry["dtype"], entry["shape"]
            begin, end = offsets
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(corrupt) from None
        if not (_is_count(begin) and _is_count(end)) or begin > end:
            raise CheckpointError(f"{path}: tensor {name!r} has an invalid byte range {offsets!r}; the file is damaged.")
        if end > data_size:
            raise CheckpointError(
                f"{path}: tensor {name!r} lies beyond the end of the file: the file is truncated "
                f"({size:,} bytes). Delete it and download it again."
            )
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}.")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise CheckpointError(
                f"{path}: tensor {name!r} has an invalid shape {shape!r} (dimensions must be non-negative "
                f"integers); the file is damaged."
            )
        needed = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
        if end - begin != needed:
            raise CheckpointError(
                f"{path}: tensor {name!r} ({dtype} {shape}) needs {needed:,} bytes but its byte range holds "
                f"{end - begin:,}; the file is damaged. Delete it and download it again."
            )
        ranges.append((begin, end, name))
    ranges.sort()
    for (_, end, first), (begin, _, second) in zip(ranges, ranges[1:]):
        if begin < end:
            raise CheckpointError(
                f"{path}: tensors {first!r} and {second!r} share bytes (overlapping ranges); the file is "
                f"damaged or was written by a broken tool."
            )
    return header, data_start


class _SafetensorsFile:
    def __init__(self, path: Path):
        header, _ = _read_safetensors_header(path)
        self.path = path
        self.metadata = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
        self.raw = {name: TensorMeta(tuple(e["shape"]), SAFETENSORS_DTYPES[e["dtype"]]) for name, e in header.items()}
        self._handle = None

    def read(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        try:
            if self._handle is None:
                self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            return self._handle.get_tensor(key)
        except Exception as exc:  # safetensors raises its own error types for broken data
            raise CheckpointError(
                f"{self.path}: could not read tensor {key!r} ({exc}). The file is corrupt; delete it and "
                f"download it again."
            ) from exc


# --------------------------------------------------------------------------------------------- pickles
def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    # The zip format (torch >= 1.6) can be memory-mapped; the legacy format cannot, and is read whole.
    mmap = zipfile.is_zipfile(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
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
    return obj


class _TensorDictFile:
    """A reader over tensors already in memory (pickles) or memory-mapped (GGUF)."""

    def __init__(self, path: Path, tensors: Mapping[str, object]):
        self.path = path
        self.metadata: dict[str, str] = {}
        self.tensors = dict(tensors)
        self.raw = {k: TensorMeta(tuple(v.shape), v.dtype) for k, v in self.tensors.items()}

    def read(self, key: str):
        return self.tensors[key]


def _open(path: Path):
    found = _checked_format(path)
    if found == SAFETENSORS:
        return _SafetensorsFile(path)
    if found == GGUF:
        from .gguf_reader import load_gguf_state_dict

        return _TensorDictFile(path, load_gguf_state_dict(path))
    return _TensorDictFile(path, _load_pickle(path))


def _normalise(source) -> formats.Normalised:
    try:
        return formats.normalise(source.raw, source.read)
    except formats.LayoutError as exc:
        raise CheckpointError(f"{source.path.name}: {exc}") from None


# --------------------------------------------------------------------------------------------- public
def read_index(path: str | os.PathLike) -> CheckpointIndex:
    """Names, shapes and dtypes of a weight file's tensors (only pickles are loaded to learn them)."""
    path = Path(path)
    source = _open(path)
    table = _normalise(source)
    return CheckpointIndex(
        path,
        {k: TensorInfo(tuple(e.meta.shape), e.meta.dtype) for k, e in table.entries.items()},
        source.metadata,
        {k: e.quant for k, e in table.entries.items() if e.quant is not None},
        {k: TensorInfo(tuple(e.meta.shape), e.meta.dtype) for k, e in table.extras.items()},
        tuple(table.layouts),
    )


def iter_tensors(path: str | os.PathLike, shapes: Mapping[str, tuple[int, ...]] | None = None
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` one at a time on the CPU (memory-mapped where the format allows).

    A quantized layer's weight comes as a :class:`~.quant_formats.QuantizedWeight` (``shapes`` gives its
    logical shape when the storage is padded), a GGUF one as a ``GGUFWeight``.
    """
    source = _open(Path(path))
    table = _normalise(source)
    for key, entry in table.entries.items():
        if entry.quant is not None:
            yield key, formats.quantized_weight(entry, source.read, (shapes or {}).get(key))
        else:
            yield key, source.read(entry.raw_key)


def read_extras(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The file's non-weight tensors by role (``positive`` / ``negative`` conditioning)."""
    source = _open(Path(path))
    table = _normalise(source)
    return {name: source.read(entry.raw_key) for name, entry in table.extras.items()}


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


def check_dtypes(index: CheckpointIndex, expected: Mapping[str, torch.Tensor]) -> None:
    """Every tensor the model keeps in a floating dtype comes as floating values (or as a quantized layer's
    packed weight); an integer or boolean tensor in its place is refused, naming it."""
    wrong = [
        f"{key} ({index.tensors[key].dtype})" for key, param in expected.items()
        if key in index.tensors and key not in index.quantized and param.is_floating_point()
        and not index.tensors[key].dtype.is_floating_point and not _packed_gguf(index, key)
    ]
    if wrong:
        more = f" (+{len(wrong) - 3} more)" if len(wrong) > 3 else ""
        raise CheckpointError(
            f"{index.path.name}: {len(wrong)} tensors hold integer or boolean values where the model needs "
            f"floating-point weights: {', '.join(wrong[:3])}{more}. The file is damaged or not a SeedVR2 checkpoint."
        )


def _packed_gguf(index: CheckpointIndex, key: str) -> bool:
    """A GGUF quantized weight is listed as uint8 blocks."""
    return is_gguf(index.path) and index.tensors[key].dtype == torch.uint8


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
    ``overrides`` replace or supply tensors (recomputed constants such as rope frequencies).  A quantized
    layer weight that ``dtype_for`` does not keep packed (it returns a dtype for it) is dequantized on
    ``device`` to that dtype.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    for key, tensor in iter_tensors(path, shapes=expected):
        if key not in expected or key in overrides:
            continue  # unexpected keys were already reported by check_strict; overrides win
        target = dtype_for(key, tensor)
        if isinstance(tensor, quant_formats.QuantizedWeight) and target is not None:
            state[key] = tensor.to(device).dequantize(target)
            continue
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
