"""The model folders in ComfyUI (``folder_paths``), with a plain-folder fallback outside it.

ComfyUI: ``<models_dir>/SEEDVR2`` is registered under the key "seedvr2"; ``extra_model_paths.yaml``
entries under any key that equals "seedvr2" ignoring case are honoured, and come first (downloads go to
the first folder).  ComfyUI's own ``diffusion_models`` (and its legacy name ``unet``) and ``vae`` folders,
with their ``extra_model_paths.yaml`` entries, are searched too, after ours: that is where ComfyUI's own
SeedVR2 files live.  From those folders only files that hold a SeedVR2 DiT (for the DiT list) or the
SeedVR2 VAE (for the VAE list) are listed, judged from the header.  Outside ComfyUI (tests, scripts) the
folder is ``./models/SEEDVR2``.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

from ..src.models.download import ensure_model
from ..src.models.locate import (
    DEFAULT_MODEL_DIR, describe_folders, find_model_file, list_model_files, model_choices, model_name_problem,
)
from ..src.models.file_types import MODEL_EXTENSIONS, checked_from_header, has_model_extension
from ..src.models.registry import known_model

FOLDER_KEY = "seedvr2"
# ComfyUI's standard folders that may hold SeedVR2 files, per kind ("unet" is the old name of
# "diffusion_models"; both are asked, the folder list is de-duplicated).
STANDARD_KEYS = {"dit": ("diffusion_models", "unet"), "vae": ("vae",)}

try:
    import folder_paths
except ImportError:  # not running inside ComfyUI
    folder_paths = None


def register_model_folder() -> None:
    """Add "seedvr2" to ComfyUI's model folders (no-op outside ComfyUI)."""
    if folder_paths is None:
        return
    user_paths = [p for key in _folder_keys() if key != FOLDER_KEY for p in folder_paths.get_folder_paths(key)]
    for path in [*user_paths, os.path.join(folder_paths.models_dir, "SEEDVR2")]:
        folder_paths.add_model_folder_path(FOLDER_KEY, path)
    paths = folder_paths.folder_names_and_paths[FOLDER_KEY][0]
    folder_paths.folder_names_and_paths[FOLDER_KEY] = (paths, set(MODEL_EXTENSIONS))


def _folder_keys() -> list[str]:
    """Our key first, then the other spellings of it in ComfyUI's folder table."""
    keys = [key for key in folder_paths.folder_names_and_paths if key.lower() == FOLDER_KEY]
    return sorted(keys, key=lambda key: key != FOLDER_KEY)


def _comfy_paths(key: str) -> list[str]:
    """ComfyUI's folders for ``key`` ([] when this ComfyUI has no such key)."""
    try:
        return list(folder_paths.get_folder_paths(key))
    except (KeyError, AttributeError, TypeError):
        return []


def _same_place(path: Path) -> Path:
    try:
        return path.resolve()
    except OSError:
        return path


def model_folders() -> list[Path]:
    """Folders searched for weight files, in priority order: ours, then ComfyUI's standard ones."""
    if folder_paths is None:
        return [DEFAULT_MODEL_DIR]
    folders: list[Path] = []
    seen: set[Path] = set()
    keys = [*_folder_keys(), *STANDARD_KEYS["dit"], *STANDARD_KEYS["vae"]]
    for key in keys:
        for path in map(Path, _comfy_paths(key)):
            if _same_place(path) not in seen:
                seen.add(_same_place(path))
                folders.append(path)
    return folders


def model_files() -> dict[str, Path]:
    """Weight files found in the model folders, ``{name: path}``."""
    if folder_paths is None:
        return list_model_files(model_folders())
    files: dict[str, Path] = {}
    for key in _folder_keys():
        for name in folder_paths.get_filename_list(key):
            path = folder_paths.get_full_path(key, name) if name not in files else None
            if path is not None and has_model_extension(name):
                files[name] = Path(path)
    return files


def standard_files(kind: str) -> dict[str, Path]:
    """SeedVR2 files of ``kind`` in ComfyUI's standard folders (``diffusion_models``/``unet`` or ``vae``)."""
    if folder_paths is None:
        return {}
    files: dict[str, Path] = {}
    for key in STANDARD_KEYS[kind]:
        try:
            names = folder_paths.get_filename_list(key)
        except (KeyError, AttributeError, TypeError):
            continue
        for name in names:
            if name in files or not has_model_extension(name):
                continue
            path = folder_paths.get_full_path(key, name)
            if path is not None and seedvr2_kind(path) == kind:
                files[name] = Path(path)
    return files


def seedvr2_kind(path: str | os.PathLike) -> str:
    """"dit" or "vae" when the file's header holds a SeedVR2 DiT / VAE we can build, else "unknown".

    ComfyUI's folders hold every other model too (an SD VAE also has ``encoder.*`` keys), so the
    architecture is detected, from the header only; cached per path, size and modification time."""
    try:
        stat = os.stat(path)
    except OSError:
        return "unknown"
    return _seedvr2_kind(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=512)
def _seedvr2_kind(path: str, size: int, mtime_ns: int) -> str:
    from ..src.models.checkpoint import CheckpointError
    from ..src.models.load import inspect_dit, inspect_vae

    if not checked_from_header(path):
        return "unknown"  # a pickle must be loaded whole to be judged: too costly for a listing
    for kind, inspect in (("dit", inspect_dit), ("vae", inspect_vae)):
        try:
            inspect(path)
            return kind
        except (CheckpointError, ValueError, OSError):
            continue
    return "unknown"


def _choices(kind: str) -> list[str]:
    files = model_files()
    seen = {_same_place(p) for p in files.values()}
    for name, path in standard_files(kind).items():
        if name not in files and _same_place(path) not in seen:  # the same file under two folders once
            files[name] = path
            seen.add(_same_place(path))
    return model_choices(kind, files)


def dit_choices() -> list[str]:
    """Options of the DiT loader's model combo."""
    return _choices("dit")


def vae_choices() -> list[str]:
    """Options of the VAE loader's model combo."""
    return _choices("vae")


def model_problem(name: str | None, kind: str) -> str | None:
    """Why the model combo value ``name`` cannot be used, or None (downloadable released files are fine).

    VALIDATE_INPUTS naming ``model`` makes ComfyUI skip its combo check, so this is the check: a file
    inside the model folders (never a path elsewhere), or a released name.
    """
    if name is None:
        return None
    problem = model_name_problem(name)
    if problem is not None:
        return problem[0].upper() + problem[1:]
    if known_model(name) is not None or find_model_file(name, model_folders()) is not None:
        return None
    what = "DiT" if kind == "dit" else "VAE"
    return (
        f"{what} model file {name!r} is in none of the SeedVR2 model folders ({describe_folders(model_folders())}) "
        f"and is not a released file that could be downloaded. Put the file into one of them and refresh "
        f"the page, or pick another model."
    )


def fetch_model(name: str) -> Path:
    """Path of ``name``, downloading a released file into the first model folder if needed."""
    return ensure_model(name, model_folders())
