"""Reading GGUF DiT files (ComfyUI-GGUF layout) into tensors and packed :class:`GGUFWeight` records.

Files are read with the PyPI ``gguf`` package.  Keys may carry ComfyUI-GGUF's ``model.diffusion_model.``
prefix; a tensor the converter flattened for block alignment has its real shape in the metadata entry
``comfy.gguf.orig_shape.<name>``.  Quantized tensors stay as raw ggml blocks; the dequantization kernels are
in :mod:`.gguf_codecs`, the Linear layer that runs them in :mod:`src.optimization.gguf`.

Everything a file claims is checked here, before any layer is built: tensor data inside the file and of the
size its type and shape need, shapes positive, types supported.  A damaged file is refused at load with
its name and the problem, never at the first matmul.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import GGUFError

COMFY_PREFIX = "model.diffusion_model."
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."


def _gguf():
    import gguf

    return gguf


def plain_types() -> dict:
    """Unquantized GGUF tensor types and the torch dtype they load as."""
    from .gguf_codecs import plain_types as types  # imports the optional gguf package

    return types()


def _dequantizable() -> tuple:
    from .gguf_codecs import DEQUANTIZERS

    return tuple(DEQUANTIZERS)


def supported_list() -> str:
    return ", ".join(t.name for t in (*plain_types(), *_dequantizable()))


@dataclass(frozen=True, eq=False)
class GGUFWeight:
    """A quantized tensor as stored in the file: raw ggml blocks, their type and the tensor's shape."""

    data: torch.Tensor                       # uint8, 1-D
    qtype: "gguf.GGMLQuantizationType"
    shape: torch.Size

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the packed bytes (what a loader must keep to hand the weight over untouched)."""
        return torch.uint8

    @property
    def device(self) -> torch.device:
        return self.data.device

    def is_floating_point(self) -> bool:
        return False

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
           non_blocking: bool = False) -> GGUFWeight:
        """The same packed weight on ``device``; ``dtype`` may only name the packed dtype (uint8)."""
        if dtype not in (None, torch.uint8):
            raise GGUFError(f"a {self.qtype.name} weight stays packed; use dequantize({dtype}) for a {dtype} copy.")
        return GGUFWeight(self.data.to(device, non_blocking=non_blocking), self.qtype, self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor's values in ``dtype``, computed on the weight's device."""
        from .gguf_codecs import dequantize

        return dequantize(self.data, self.qtype, tuple(self.shape), dtype)



# ---------------------------------------------------------------------------------------------- reading
def _orig_shape(reader, name: str) -> tuple[int, ...] | None:
    field = reader.get_field(ORIG_SHAPE_KEY + name)
    if field is None:
        return None
    try:
        return tuple(int(field.parts[index][0]) for index in field.data)
    except (IndexError, TypeError, ValueError, OverflowError):
        raise GGUFError(f"metadata {ORIG_SHAPE_KEY + name!r} is not a list of integers") from None


def _damaged(path: Path, problem: str) -> GGUFError:
    return GGUFError(
        f"{path.name} is not a readable GGUF file ({problem}). It is damaged or incomplete (download it "
        f"again), or newer than the installed gguf package (pip install -U gguf)."
    )


def load_gguf_state_dict(path: str | Path) -> dict[str, torch.Tensor | GGUFWeight]:
    """Read a GGUF file: plain tensors for F32/F16/BF16 (and integer) entries, :class:`GGUFWeight` for
    quantized ones; keys without the ``model.diffusion_model.`` prefix, shapes as the model expects.

    The data stays memory-mapped (copy-on-write) until a tensor is moved or converted.
    """
    gguf = _gguf()
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"GGUF file {path} does not exist." if not path.exists() else f"{path} is not a file.")
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path, "c")
    except Exception as error:  # the gguf package raises many types for broken headers; all mean "damaged"
        raise _damaged(path, f"{type(error).__name__}: {error}") from error
    if reader.byte_order != "I":
        raise GGUFError(f"{path.name} is a big-endian GGUF file; only little-endian files are supported.")

    plain, quantized = plain_types(), _dequantizable()
    state: dict[str, torch.Tensor | GGUFWeight] = {}
    for tensor in reader.tensors:
        name = tensor.name.removeprefix(COMFY_PREFIX)
        qtype = tensor.tensor_type
        try:
            shape = _orig_shape(reader, tensor.name) or tuple(reversed([int(d) for d in tensor.shape]))
        except GGUFError as error:
            raise _damaged(path, str(error)) from None
        if not shape or any(d <= 0 for d in shape):
            raise _damaged(path, f"tensor {tensor.name!r} has shape {list(shape)}")
        if name in state:
            raise _damaged(path, f"tensor {name!r} appears twice")
        if int(np.prod(shape)) != tensor.n_elements:
            raise GGUFError(
                f"{path.name}: tensor {tensor.name!r} has {tensor.n_elements} values but its shape metadata says "
                f"{shape}. The file is damaged or was converted incorrectly."
            )
        if qtype not in plain and qtype not in quantized:
            raise GGUFError(
                f"{path.name}: tensor {tensor.name!r} uses GGUF type {qtype.name}, which is not supported; "
                f"supported: {supported_list()}. Use a file quantized to one of these (e.g. Q8_0 or Q4_K_M)."
            )
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        if tensor.n_elements % block_size:
            raise _damaged(path, f"tensor {tensor.name!r}: {tensor.n_elements} values are not whole "
                                 f"{qtype.name} blocks of {block_size}")
        needed = tensor.n_elements // block_size * type_size
        if tensor.data_offset + needed > size or tensor.data.nbytes != needed:
            raise _damaged(path, f"tensor {tensor.name!r} needs {needed:,} bytes at offset {tensor.data_offset:,} "
                                 f"but the file has {size:,} bytes: it is truncated")
        data = torch.from_numpy(tensor.data)  # shares the copy-on-write map: writes never reach the file
        if qtype in plain:
            if qtype == gguf.GGMLQuantizationType.BF16:  # stored as raw bytes
                data = data.view(torch.bfloat16)
            state[name] = data.reshape(shape)
        else:
            state[name] = GGUFWeight(data.reshape(-1), qtype, torch.Size(shape))
    if not state:
        raise _damaged(path, "it holds no tensors")
    return state
