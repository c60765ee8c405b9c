"""How the upscaler shares one clip between the processes of a ``torch.distributed`` group.

Two modes, both giving the single-process frames (every batch is seeded alike, so a batch's result does not
depend on which process computes it):

* ``batches`` — the clip's batches are dealt out round-robin; each process encodes, restores and decodes its
  own batches with the whole models, and sends the finished frames to rank 0, which cross-fades and writes
  them in order.  Nothing moves between processes but finished frames: the mode for clips of many batches.
* ``windows`` — the VAE phases are dealt out as above, but every batch's DiT step runs on all processes at
  once, each attending whole windows (:mod:`.window_parallel`); the condition latents are shared first.  The
  mode for clips with fewer batches than processes (one long batch, a single image).

``auto`` picks ``batches`` when there are at least as many batches as processes, else ``windows``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import PARALLEL_MODES


@dataclass(frozen=True)
class ClipParallel:
    """This process's part in a clip: its rank among ``world`` processes and the mode."""

    rank: int = 0
    world: int = 1
    mode: str = "auto"

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def writes_output(self) -> bool:
        """Only rank 0 assembles, blends and writes the frames."""
        return self.rank == 0

    def resolve(self, batches: int) -> "ClipParallel":
        """The mode for a clip of ``batches`` batches (``auto`` decided)."""
        if self.mode != "auto":
            return self
        return ClipParallel(self.rank, self.world, "batches" if batches >= self.world else "windows")

    def owner(self, batch_index: int) -> int:
        """The rank that encodes and decodes a batch (and restores it in ``batches`` mode)."""
        return batch_index % self.world

    def owns(self, batch_index: int) -> bool:
        return self.owner(batch_index) == self.rank

    def restores(self, batch_index: int) -> bool:
        """Whether this process takes part in a batch's DiT step."""
        return self.mode == "windows" or self.owns(batch_index)

    def share_latents(self, latents: list[torch.Tensor | None], device: torch.device) -> list[torch.Tensor]:
        """``windows`` mode: every rank gets every batch's condition latent from its owner."""
        shared = []
        for index, latent in enumerate(latents):
            owner = self.owner(index)
            shape = torch.zeros(4, dtype=torch.int64, device=device)
            if latent is not None:
                shape.copy_(torch.tensor(latent.shape, dtype=torch.int64))
            dist.broadcast(shape, owner)
            buffer = (latent.to(device).contiguous() if latent is not None
                      else torch.empty(tuple(shape.tolist()), dtype=torch.float32, device=device))
            if latent is not None and buffer.dtype != torch.float32:
                raise TypeError("condition latents are shared in float32")
            dist.broadcast(buffer, owner)
            shared.append(buffer)
        return shared

    def send_frames(self, frames: torch.Tensor, device: torch.device) -> None:
        """A non-zero rank hands a decoded batch's frames (n, H, W, 3) to rank 0."""
        dist.send(torch.tensor(frames.shape, dtype=torch.int64, device=device), 0)
        dist.send(frames.to(device, torch.float32).contiguous(), 0)

    def receive_frames(self, owner: int, device: torch.device) -> torch.Tensor:
        """Rank 0 receives the frames of a batch that ``owner`` decoded."""
        shape = torch.zeros(4, dtype=torch.int64, device=device)
        dist.recv(shape, owner)
        frames = torch.empty(tuple(shape.tolist()), dtype=torch.float32, device=device)
        dist.recv(frames, owner)
        return frames


SINGLE = ClipParallel()


def current(mode: str = "auto") -> ClipParallel:
    """This process's part: from the initialised default process group, else a single process."""
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel mode {mode!r} is not one of {', '.join(PARALLEL_MODES)}")
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return SINGLE
    return ClipParallel(dist.get_rank(), dist.get_world_size(), mode)


def communication_device() -> torch.device:
    """Where tensors must be for the group's collectives: the local GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return torch.device("cpu")
