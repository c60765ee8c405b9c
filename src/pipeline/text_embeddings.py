"""The released text conditioning: SeedVR2 runs no text encoder, it uses two fixed prompt embeddings.

They ship with the pack (``assets/text_embeddings.safetensors``: ``pos`` 58x5120 and ``neg`` 64x5120, the
bit-exact bf16 values of the original ``pos_emb.pt`` / ``neg_emb.pt``).  ComfyUI's SeedVR2 DiT files carry
their own copy (``positive_conditioning`` / ``negative_conditioning``); those are used when present.
"""
from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Mapping

import torch

log = logging.getLogger("seedvr2")
_logged: set[tuple] = set()

EMBEDDINGS_FILE = Path(__file__).resolve().parents[2] / "assets" / "text_embeddings.safetensors"


@lru_cache(maxsize=1)
def _load_cpu() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not EMBEDDINGS_FILE.is_file():
        raise FileNotFoundError(
            f"{EMBEDDINGS_FILE} is missing; it ships with the pack. Reinstall the node pack to restore it."
        )
    return load_file(str(EMBEDDINGS_FILE))


def text_embeddings(device: torch.device | str, dtype: torch.dtype,
                    file_conditioning: Mapping[str, torch.Tensor] | None = None,
                    source: str = "the DiT file") -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) prompt embeddings on ``device`` in ``dtype``: the DiT file's own conditioning
    when it has usable buffers (``file_conditioning``), else the released ones that ship with the pack."""
    tensors = _load_cpu()
    ours = tensors["pos"], tensors["neg"]
    chosen = _choose(ours, file_conditioning, source)
    return chosen[0].to(device, dtype), chosen[1].to(device, dtype)


def _choose(ours, file_conditioning, source: str):
    if not file_conditioning or not {"positive", "negative"} <= set(file_conditioning):
        return ours
    theirs = file_conditioning["positive"], file_conditioning["negative"]
    if all(not t.any() for t in theirs):  # ComfyUI itself refuses such files ("DiT-only export")
        _log_once(source, "zero", logging.WARNING,
                  "SeedVR2: %s has all-zero conditioning buffers (a DiT-only export); using the released "
                  "text embeddings that ship with the pack instead.", source)
        return ours
    same_shape = all(a.shape == b.shape for a, b in zip(ours, theirs))
    if same_shape and all(torch.equal(a.to(b.dtype), b) for a, b in zip(ours, theirs)):
        return theirs
    if same_shape:
        diff = max((a.float() - b.float()).norm().item() / max(a.float().norm().item(), 1e-30)
                   for a, b in zip(ours, theirs))
        what = f"differ from the released embeddings (relative difference up to {diff:.2e})"
    else:
        what = (f"have other shapes ({list(theirs[0].shape)}, {list(theirs[1].shape)}) than the released "
                f"embeddings ({list(ours[0].shape)}, {list(ours[1].shape)})")
    _log_once(source, "differ", logging.INFO,
              "SeedVR2: the conditioning buffers in %s %s; using the file's, because its weights were "
              "exported together with them.", source, what)
    return theirs


def _log_once(source: str, reason: str, level: int, message: str, *args) -> None:
    if (source, reason) not in _logged:
        _logged.add((source, reason))
        log.log(level, message, *args)
