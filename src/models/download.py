"""Making sure a weight file is on disk: find it, or download a released one and verify it.

A download goes through ``huggingface_hub`` (proxies, ``HF_ENDPOINT`` mirrors, tokens and resuming come
with it) into a hidden staging folder inside the target folder.  Only after its SHA-256 matches the
registry is the file renamed to its final name, in one atomic step on the same file system, so a file
under a final name is always complete.  An interrupted download stays in the staging folder and the next
attempt resumes it.

Files already present are not hashed again on every run (tens of GB for the 7B files): a safetensors
or GGUF file gets a structural check of its header (every tensor's bytes inside the file), and the loader
checks every tensor name and shape.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Sequence

from .checkpoint import CheckpointError, read_index
from .locate import describe_folders, find_model_file
from .registry import ModelInfo, known_model, place_yourself_hint, placed_model

log = logging.getLogger("seedvr2")

STAGING_DIR = ".seedvr2_download"
_HASH_CHUNK = 8 * 1024 * 1024


class ModelFileError(RuntimeError):
    """A weight file is missing or unusable and cannot be fetched; the message says what to do."""


def ensure_model(name: str, folders: Sequence[str | os.PathLike]) -> Path:
    """Path of the weight file ``name``, downloading and verifying a released file into ``folders[0]``
    when it is in none of ``folders``; raises :class:`ModelFileError` when that is impossible."""
    if not folders and not Path(name).is_absolute():
        raise ModelFileError(f"No model folder is configured to look for {name!r} in.")
    path = find_model_file(name, folders)
    info = known_model(name)
    blocked = next((Path(f) / name for f in folders if (Path(f) / name).is_dir()), None)
    if path is None and blocked is not None:
        raise ModelFileError(
            f"{blocked} is a folder, not the weight file {Path(name).name!r}. Remove or rename that folder "
            f"and put the file itself there (or let it download)."
        )
    if path is not None:
        problem = _structural_problem(path)
        if problem is None:
            return path
        if info is None:
            raise ModelFileError(problem)
        log.warning("%s Downloading it again.", problem)
        return _download(info, path.parent)
    if info is None and placed_model(name) is not None:
        raise ModelFileError(place_yourself_hint(placed_model(name)))
    if info is None:
        raise ModelFileError(
            f"Model file {name!r} was not found in {describe_folders(folders)}, and it is not a released "
            f"SeedVR2 file that could be downloaded. Put the file into one of these folders, or pick another model."
        )
    return _download(info, Path(folders[0]))


def sha256_of(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _structural_problem(path: Path) -> str | None:
    """Why an existing file cannot be a complete weight file, or None (header-only; no hashing)."""
    if path.stat().st_size == 0:
        return f"{path} is empty (an interrupted download?)."
    if path.suffix.lower() in (".safetensors", ".gguf"):  # both readers check every tensor's bytes
        try:
            read_index(path)
        except CheckpointError as exc:
            return str(exc)
    return None


def _download(info: ModelInfo, folder: Path) -> Path:
    """Fetch ``info`` into ``folder`` through the staging folder; verify; rename atomically."""
    final = folder / info.filename
    staging = folder / STAGING_DIR
    manual = (
        f"Download it yourself from {info.url} and put it into the folder {str(folder)!r} "
        f"(keep the name {info.filename!r})."
    )
    log.info("Downloading %s from %s into %s", info.filename, info.url, folder)
    try:
        from huggingface_hub import hf_hub_download

        folder.mkdir(parents=True, exist_ok=True)
        staged = Path(hf_hub_download(repo_id=info.repo, filename=info.filename, local_dir=staging))
    except Exception as exc:  # network, HTTP, disk and offline-mode errors all end the same way for the user
        raise ModelFileError(
            f"Could not download the model file {info.filename!r} ({type(exc).__name__}: {exc}). {manual}"
        ) from exc
    digest = sha256_of(staged)
    if digest != info.sha256:
        _remove_staged(staging, info.filename)
        raise ModelFileError(
            f"The downloaded {info.filename!r} is damaged: its SHA-256 is {digest}, expected {info.sha256}. "
            f"The download was deleted; try again, or: {manual}"
        )
    os.replace(staged, final)
    _remove_staged(staging, info.filename)
    log.info("Verified and saved %s", final)
    return final


def _remove_staged(staging: Path, filename: str) -> None:
    """Delete what the staging folder holds for ``filename`` (the file and the hub's resume records, so a
    rejected file is not offered again); drop the folder when no other partial download waits there."""
    if not staging.is_dir():
        return
    for leftover in staging.rglob(f"{filename}*"):
        if leftover.is_file():
            leftover.unlink()
    if not any(p.suffix == ".incomplete" for p in staging.rglob("*")):
        shutil.rmtree(staging, ignore_errors=True)
