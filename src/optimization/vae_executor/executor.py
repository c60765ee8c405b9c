"""The callable an optimized VideoAutoencoder runs its causal chunks through instead of the plain forward."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from ...models.video_vae_v3.banded import BandPlan
from ...models.video_vae_v3.temporal_slicing import CausalMemory
from ..vae_banded import run_banded_lean
from .coder import lean_decode, lean_encode

if TYPE_CHECKING:
    from ...models.video_vae_v3 import VideoAutoencoder
    from ..vae_optimizer import VAERuntime


class VAEExecutor:
    """Runs one causal chunk of a model's encoder or decoder with ``runtime``'s kernels: streamed in pieces
    (:mod:`.coder`), or banded (:mod:`..vae_banded`) when the call has a band plan.  ``optimize_vae`` sets one
    as the model's ``executor``; the model passes itself in, so the executor holds no reference to it."""

    def __init__(self, runtime: "VAERuntime") -> None:
        self.runtime = runtime

    def __call__(self, model: "VideoAutoencoder", direction: str, chunk: torch.Tensor,
                 memory: Optional[CausalMemory], band_plan: Optional[BandPlan] = None) -> torch.Tensor:
        with self.runtime.kernel_settings():
            if band_plan is not None:
                # The chunk stays where it is: bands are moved to the device one at a time.
                return run_banded_lean(model, direction, chunk, memory, band_plan, self.runtime)
            chunk = chunk.to(device=model.device, dtype=model.dtype)
            if direction == "encode":
                return lean_encode(model.encoder, chunk, memory, self.runtime)
            return lean_decode(model.decoder, chunk, memory, self.runtime)
