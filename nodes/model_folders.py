"""The ``seedvr2`` model folder in ComfyUI (``folder_paths``), with a plain-folder fallback outside it.

ComfyUI: ``<models_dir>/SEEDVR2`` is registered under the key "seedvr2"; ``extra_model_paths.yaml``
entries under any key that equals "seedvr2" ignoring case are honoured, and come first (downloads go to
the first folder).  Outside ComfyUI (tests, scripts) the folder is ``./models/SEEDVR2``.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..src.models.download import ensure_model
from ..src.models.locate import (
    DEFAULT_MODEL_DIR, describe_folders, find_model_file, list_model_files, model_choices, model_name_problem,
)
from ..src.models.registry import MODEL_EXTENSIONS, known_model

FOLDER_KEY = "seedvr2"

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


def model_folders() -> list[Path]:
    """Folders searched for weight files, in priority order."""
    if folder_paths is None:
        return [DEFAULT_MODEL_DIR]
    folders: list[Path] = []
    for key in _folder_keys():
        for path in map(Path, folder_paths.get_folder_paths(key)):
            if path not in folders:
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
            if path is not None and Path(name).suffix.lower() in MODEL_EXTENSIONS:
                files[name] = Path(path)
    return files


def dit_choices() -> list[str]:
    """Options of the DiT loader's model combo."""
    return model_choices("dit", model_files())


def vae_choices() -> list[str]:
    """Options of the VAE loader's model combo."""
    return model_choices("vae", model_files())


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
