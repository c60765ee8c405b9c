"""Making sure a weight file is on disk: find it, or download a released one and verify it.

A download goes through ``huggingface_hub`` (proxies, ``HF_ENDPOINT`` mirrors, tokens and resuming come
with it) into a hidden staging folder inside the target folder.  Only after its SHA-256 matches the
registry is the file renamed to its final name, in one atomic step on the same file system, so a file
under a final name is always complete.  An interrupted download stays in the staging folder and the next
attempt resumes it.

The files a run needs are looked up together (:func:`find_models`): whatever stands in the way is reported
in one error, and when the hub cannot be reached that error names each file's address and destination at
once instead of after the hub's retries.

Files already present are not hashed again on every run (tens of GB for the 7B files): a safetensors
or GGUF file gets a structural check of its header (every tensor's bytes inside the file), and the loader
checks every tensor name and shape.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence
from urllib.parse import urlsplit

from .file_types import checked_from_header
from .locate import describe_folders, find_model_file, model_name_problem
from .registry import ModelInfo, known_model, place_yourself_hint, placed_model

log = logging.getLogger("seedvr2")

STAGING_DIR = ".seedvr2_download"
_HASH_CHUNK = 8 * 1024 * 1024
# One request to the hub answers whether downloading can work at all; without it, huggingface_hub retries
# each file for about 25 s before giving up.  The deadline also bounds a name lookup that hangs.
PROBE_SECONDS = 3.0
_OFFLINE_VALUES = ("1", "on", "yes", "true")


class ModelFileError(RuntimeError):
    """A weight file is missing or unusable and cannot be fetched; the message says what to do."""


@dataclass
class ModelPlan:
    """What :func:`find_models` found: a path per requested name, or the released file to download there."""

    paths: list[Path | None]
    downloads: dict[int, tuple[ModelInfo, Path]] = field(default_factory=dict)  # request index -> (file, folder)

    def fetch(self) -> list[Path]:
        """Download what is missing (verified, renamed into place) and return every path in request order."""
        done: dict[tuple[str, Path], Path] = {}
        paths = list(self.paths)
        for i, (info, folder) in self.downloads.items():
            key = (info.filename, folder)
            if key not in done:  # the same file asked for twice is fetched once
                done[key] = _download(info, folder)
            paths[i] = done[key]
        return paths


def ensure_model(name: str, folders: Sequence[str | os.PathLike], allow_paths: bool = False) -> Path:
    """Path of the weight file ``name``, downloading and verifying a released file into ``folders[0]``
    when it is in none of ``folders``; raises :class:`ModelFileError` when that is impossible.  ``name``
    must lie inside the folders unless ``allow_paths`` (a path of the user's own, from the command line)."""
    return find_models([(name, folders)], allow_paths=allow_paths).fetch()[0]


def find_models(requests: Sequence[tuple[str, Sequence[str | os.PathLike]]], allow_paths: bool = False) -> ModelPlan:
    """Look up each ``(name, folders)``; plan the download of released files that are missing or broken.

    Everything that stands in the way is reported at once, in one :class:`ModelFileError`: files that are
    neither present nor downloadable, and, when the hub cannot be reached (or ``HF_HUB_OFFLINE`` is set),
    each file to download with its address and the absolute path to put it at.  Folders are made absolute.
    """
    plan = ModelPlan(paths=[])
    problems: list[str] = []
    for i, (name, folders) in enumerate(requests):
        folders = [Path(os.path.abspath(os.path.expanduser(f))) for f in folders]
        plan.paths.append(None)
        if not allow_paths and (problem := model_name_problem(name)) is not None:
            problems.append(problem)
            continue
        if not folders and not (allow_paths and Path(name).expanduser().is_absolute()):
            problems.append(f"no model folder is configured to look for {name!r} in")
            continue
        path = find_model_file(name, folders, allow_paths=allow_paths)
        info = known_model(name)
        blocked = next((f / name for f in folders if (f / name).is_dir()), None)
        if path is None and blocked is not None:
            problems.append(f"{blocked} is a folder, not the weight file {Path(name).name!r}: remove or rename "
                            f"that folder and put the file itself there (or let it download)")
            continue
        if path is not None:
            problem = _structural_problem(path)
            if problem is None:
                plan.paths[i] = path
            elif info is None:
                problems.append(problem.rstrip("."))
            else:
                log.warning("%s It will be downloaded again.", problem)
                plan.downloads[i] = (info, path.parent)
        elif info is None and placed_model(name) is not None:
            problems.append(place_yourself_hint(placed_model(name)).rstrip("."))
        elif info is None:
            problems.append(
                f"model file {name!r} was not found in {describe_folders(folders)}, and it is not a released "
                f"SeedVR2 file that could be downloaded: put the file into "
                f"{'one of these folders' if len(folders) > 1 else 'that folder'}, or pick another model"
            )
        else:
            plan.downloads[i] = (info, folders[0])
    unreachable = offline_reason(next(iter(plan.downloads.values()))[0]) if plan.downloads else None
    if problems or unreachable:
        raise ModelFileError(_missing_message(problems, plan, unreachable))
    return plan


def _missing_message(problems: list[str], plan: ModelPlan, unreachable: str | None) -> str:
    """One message (one line) for everything :func:`find_models` cannot resolve."""
    parts = list(problems)
    files = {(info.filename, folder): info for info, folder in plan.downloads.values()}
    if files:
        wanted = "; ".join(f"{download_url(info)} -> {folder / name}" for (name, folder), info in files.items())
        if unreachable:
            parts.append(f"{len(files)} released model file(s) cannot be downloaded ({unreachable}): download "
                         f"them yourself and save them under these names: {wanted}")
        else:
            parts.append(f"once that is fixed, the next run downloads: {wanted}")
    message = "; ".join(parts)
    return message[:1].upper() + message[1:] + "."


def download_url(info: ModelInfo) -> str:
    """Where huggingface_hub fetches ``info`` from (``HF_ENDPOINT`` honoured, as the hub does)."""
    endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/")
    return f"{endpoint}/{info.repo}/resolve/main/{info.filename}" if endpoint else info.url


def offline_reason(info: ModelInfo) -> str | None:
    """Why no download can work now, or None: ``HF_HUB_OFFLINE`` is set, or one request (HEAD of the file's
    address, through huggingface_hub's own HTTP session, so proxies and mirrors count) got no answer
    within :data:`PROBE_SECONDS`.  Any HTTP answer, even an error status, means the hub is reachable."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _OFFLINE_VALUES:
        return "HF_HUB_OFFLINE is set"
    try:
        import huggingface_hub
        from huggingface_hub.utils import get_session
    except ImportError:
        return "huggingface_hub is not installed (pip install huggingface_hub)"
    if getattr(huggingface_hub, "is_offline_mode", lambda: False)():
        return "huggingface_hub is in offline mode (HF_HUB_OFFLINE)"
    url = download_url(info)
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            get_session().head(url, timeout=PROBE_SECONDS)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - any failure to get an answer means offline
            outcome.append(exc)

    thread = threading.Thread(target=probe, name="seedvr2-hub-probe", daemon=True)
    thread.start()
    thread.join(PROBE_SECONDS + 0.5)
    host = urlsplit(url).netloc or url
    if not outcome:
        return f"no answer from {host} within {PROBE_SECONDS:g} s"
    if outcome[0] is not None:
        return f"{host} is not reachable: {_first_line(outcome[0])}"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


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
    if checked_from_header(path):
        from .checkpoint import CheckpointError, read_index  # imports torch: only when a file is there

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
        f"Download it yourself from {download_url(info)} and put it into the folder {str(folder)!r} "
        f"(keep the name {info.filename!r})."
    )
    log.info("Downloading %s from %s into %s", info.filename, download_url(info), folder)
    try:
        from huggingface_hub import hf_hub_download

        folder.mkdir(parents=True, exist_ok=True)
        staged = Path(hf_hub_download(repo_id=info.repo, filename=info.filename, local_dir=staging))
    except Exception as exc:  # network, HTTP, disk and offline-mode errors all end the same way for the user
        raise ModelFileError(
            f"Could not download the model file {info.filename!r} ({_first_line(exc.__cause__ or exc)}). {manual}"
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
