"""The released text conditioning: SeedVR2 runs no text encoder, it uses two fixed prompt embeddings.

They ship with the pack (``assets/text_embeddings.safetensors``: ``pos`` 58x5120 and ``neg`` 64x5120, the
bit-exact bf16 values of the original ``pos_emb.pt`` / ``neg_emb.pt``).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

EMBEDDINGS_FILE = Path(__file__).resolve().parents[2] / "assets" / "text_embeddings.safetensors"


@lru_cache(maxsize=1)
def _load_cpu() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not EMBEDDINGS_FILE.is_file():
        raise FileNotFoundError(
            f"{EMBEDDINGS_FILE} is missing; it ships with the pack. Reinstall the node pack to restore it."
        )
    return load_file(str(EMBEDDINGS_FILE))


def text_embeddings(device: torch.device | str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) prompt embeddings on ``device`` in ``dtype``."""
    tensors = _load_cpu()
    return tensors["pos"].to(device, dtype), tensors["neg"].to(device, dtype)
