"""The weight-file formats this pack reads, recognised by the file name's suffix.

The one place that decides what a file is: the model folders list these suffixes, the loaders and the
model manager ask :func:`is_gguf`, and the checkpoint reader picks its reader by :func:`file_format`.
Imports nothing heavy (the command line and the model folders use it before torch is imported).
"""
from __future__ import annotations

import os
from pathlib import PurePath

SAFETENSORS, GGUF, PICKLE = "safetensors", "gguf", "pickle"
# Suffix -> format; .safetensors first: the format we recommend, first in messages.
FORMATS = {".safetensors": SAFETENSORS, ".gguf": GGUF, ".pth": PICKLE, ".pt": PICKLE}
MODEL_EXTENSIONS = tuple(FORMATS)


def file_format(path: str | os.PathLike) -> str | None:
    """``"safetensors"``, ``"gguf"`` or ``"pickle"`` (plain-tensor .pth/.pt) by the name's suffix; None for
    any other file."""
    return FORMATS.get(PurePath(path).suffix.lower())


def has_model_extension(path: str | os.PathLike) -> bool:
    """Whether ``path`` ends with one of the weight-file suffixes we can load."""
    return file_format(path) is not None


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a GGUF file: its weights come quantized, so the DiT runs it as "gguf"."""
    return file_format(path) == GGUF


def checked_from_header(path: str | os.PathLike) -> bool:
    """Whether reading the file's index checks every tensor's byte range without reading the data
    (safetensors and GGUF), so a broken file is refused before a run; pickles must be loaded to know."""
    return file_format(path) in (SAFETENSORS, GGUF)
