"""Finding SeedVR2 weight files in model folders, without ComfyUI.

ComfyUI hands us its ``seedvr2`` folders (``nodes/model_folders.py``); the command line uses
``./models/SEEDVR2`` or ``--model_dir``.  Names are paths relative to a folder, with ``/`` separators,
like ComfyUI's file lists; when several folders hold the same name, the first folder wins.

A name can never leave its folder, on any OS: absolute paths, drive letters, UNC shares and ``..`` are
refused in both the POSIX and the Windows flavour (``..\\`` is a parent step on Windows), so a workflow or
an API client cannot load or probe files elsewhere.  Symbolic links *inside* a model folder are followed,
as ComfyUI does: they are the user's own (weights linked in from another disk).  Only the command line,
whose user names files on their own machine, may also give a path (``allow_paths``).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterable, Mapping, Sequence

from .file_types import GGUF, SAFETENSORS, file_format, has_model_extension
from .registry import KNOWN_MODELS, known_dit_models, known_vae_models

DEFAULT_MODEL_DIR = Path("models") / "SEEDVR2"


def is_hidden(name: str) -> bool:
    """Whether a listed name lies in (or is) a dot-folder/file, e.g. the download staging folder."""
    return any(part.startswith(".") for part in PurePosixPath(name).parts)


def list_model_files(folders: Sequence[str | os.PathLike]) -> dict[str, Path]:
    """Every weight file under ``folders`` (recursively, dot-folders skipped) as ``{name: path}``."""
    found: dict[str, Path] = {}
    for folder in map(Path, folders):
        if not folder.is_dir():
            continue
        for root, dirs, files in os.walk(folder, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for file in sorted(files):
                if file.startswith(".") or not has_model_extension(file):
                    continue
                path = Path(root) / file
                found.setdefault(path.relative_to(folder).as_posix(), path)
    return dict(sorted(found.items()))


def model_name_problem(name: object) -> str | None:
    """Why ``name`` is not a file name relative to a model folder (judged as a POSIX and as a Windows
    path, whatever the OS), or None."""
    if not isinstance(name, str) or not name.strip():
        return f"the model name {name!r} is empty; pick a file from the list."
    if "\0" in name:
        return f"the model name {name!r} contains a NUL character."
    windows, posix = PureWindowsPath(name), PurePosixPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or windows.root:
        return (f"{name!r} is a path outside the model folders (absolute, a drive or a network share); "
                f"give the name of a file inside a SeedVR2 model folder, as listed.")
    if ":" in name:  # a drive-relative name on Windows ("C:x"), or an NTFS alternate data stream
        return f"the model name {name!r} contains ':'; give the name of a file inside a SeedVR2 model folder."
    if ".." in windows.parts or ".." in posix.parts:
        return f"the model name {name!r} steps out of its folder ('..'); give a file inside a SeedVR2 model folder."
    return None


def model_name_parts(name: str) -> tuple[str, ...]:
    """The folder steps of a valid model name; ``/`` and ``\\`` both separate (Windows ComfyUI lists
    subfolder files with ``\\``)."""
    return tuple(part for part in PureWindowsPath(name).parts if part not in ("", "."))


def find_model_file(name: str, folders: Sequence[str | os.PathLike], allow_paths: bool = False) -> Path | None:
    """The file called ``name`` inside one of ``folders``, or None.  With ``allow_paths`` (the command
    line) ``name`` may also be a path of its own: absolute, or relative to the working directory."""
    if allow_paths:
        candidate = Path(name).expanduser()
        if candidate.is_absolute():
            return candidate if candidate.is_file() else None
    if model_name_problem(name) is None:
        parts = model_name_parts(name)
        for folder in folders:
            path = Path(folder).joinpath(*parts)
            if path.is_file():
                return path
    if allow_paths and Path(name).is_file():
        return Path(name)
    return None


def file_kind(path: str | os.PathLike) -> str:
    """"dit", "vae" or "unknown": from the tensor names of a safetensors header, else from the file name.

    GGUF files are only ever made of the DiT; pickles are too costly to open for a listing, so their
    name decides ("vae" in it).  Cached per path, size and modification time.
    """
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return "unknown"
    return _file_kind(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _file_kind(path: str, size: int, mtime_ns: int) -> str:
    from .checkpoint import CheckpointError, read_index  # imports torch: the CLI finds files without it

    found = file_format(path)
    if found == SAFETENSORS:
        try:
            return read_index(path).kind
        except CheckpointError:
            return "unknown"
    if found == GGUF:
        return "dit"
    return "vae" if "vae" in Path(path).name.lower() else "unknown"


def model_choices(kind: str, files: Mapping[str, Path]) -> list[str]:
    """Combo entries for a loader of ``kind``: the released files of that kind (downloadable even when
    missing) first, then the other files found, sorted.  The VAE list takes files that hold a VAE; the
    DiT list every other file, so that a DiT of unexpected layout can still be picked."""
    if kind not in ("dit", "vae"):
        raise ValueError(f"kind must be 'dit' or 'vae', not {kind!r}")
    known = known_dit_models() if kind == "dit" else known_vae_models()
    known_names = {info.filename for info in KNOWN_MODELS}
    extra = [
        name for name, path in files.items()
        if name not in known_names and not is_hidden(name) and (file_kind(path) == "vae") == (kind == "vae")
    ]
    return known + sorted(extra)


def describe_folders(folders: Iterable[str | os.PathLike]) -> str:
    """Folders for an error message: "'a', 'b'"."""
    return ", ".join(repr(str(f)) for f in folders) or "(no model folder configured)"
