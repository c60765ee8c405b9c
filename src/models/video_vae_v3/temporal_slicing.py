"""Temporal slicing: run a causal network on a clip chunk by chunk with exactly the unsliced result.

Every causal convolution looks back ``k_t - 1`` frames.  At the start of a clip those frames are copies of
the first frame; in a later chunk they are the last frames the convolution saw in the previous chunk.
:class:`CausalMemory` carries them over, so chunks can be as short as one latent frame while the output
equals evaluating the whole clip at once (up to float summation order).

Whether a convolution continues a clip is decided per convolution (has it kept frames?), so a chunk can
also be split further into pieces of frames with the same result.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from ...progress import checkpoint, part


class CausalMemory:
    """The trailing input frames of every causal convolution, kept for the next chunk of the same clip.

    The optimized path may keep a more compact record from which a convolution recomputes them (the
    upsampler keeps its pre-upscale frames); whoever keeps a record for a convolution also reads it.
    """

    def __init__(self, last_chunk: bool = False) -> None:
        self._frames: dict[nn.Module, Any] = {}
        self.at_clip_start = True
        # The chunk now running is the clip's last (set by whoever slices the clip), and, while ``closing``,
        # the running call is the last one any convolution of it gets: nothing kept then would be read.
        self.last_chunk = last_chunk
        self.closing = False

    def continues(self, conv: nn.Module) -> bool:
        """True when ``conv`` kept frames from an earlier call on this clip, False when it starts the clip."""
        if conv in self._frames:
            return True
        if not self.at_clip_start:
            raise RuntimeError(
                "causal memory has no frames for a convolution in a continuation chunk; chunks of one clip "
                "must run through the same model in order, starting with a fresh CausalMemory."
            )
        return False

    def recall(self, conv: nn.Module) -> Any:
        """The frames ``conv`` kept from its previous call (removed from memory: they are used once)."""
        if not self.continues(conv):
            raise RuntimeError("causal memory: recall() of a convolution that starts the clip; ask continues() first.")
        return self._frames.pop(conv)

    def keep(self, conv: nn.Module, frames: Any) -> None:
        """Store ``frames`` (a small copy, so the chunk's activations can be freed) for ``conv``'s next chunk;
        dropped while ``closing``: for a single image that is all of the look-back (tens of GB at 4K)."""
        if not self.closing:
            self._frames[conv] = frames

    def end_chunk(self) -> None:
        """Mark that the next chunk continues the clip instead of starting it."""
        self.at_clip_start = False


ChunkFn = Callable[[torch.Tensor, Optional[CausalMemory]], torch.Tensor]


def causal_chunks(length: int, step: int) -> list[tuple[int, int]]:
    """Chunk bounds ``[0, 1 + step)`` then ``step`` frames at a time: the first frame stands alone in a
    causal clip (4n+1 frames <-> n+1 latents), so every later chunk maps to whole latent frames."""
    bounds = [(0, min(1 + step, length))]
    while bounds[-1][1] < length:
        start = bounds[-1][1]
        bounds.append((start, min(start + step, length)))
    return bounds


def run_sliced(
    run_chunk: ChunkFn,
    clip: torch.Tensor,
    *,
    step: Optional[int],
    out_frames: int,
    out_device: torch.device,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Apply ``run_chunk`` to ``clip`` (B, C, T, ...) in causal chunks of ``step`` frames (``None``: the
    whole clip at once) and gather the results in ``out_dtype``, ``out_frames`` long, on ``out_device``."""
    bounds = [(0, clip.shape[2])] if step is None else causal_chunks(clip.shape[2], step)
    memory = None if step is None else CausalMemory()
    out: Optional[torch.Tensor] = None
    filled = 0
    for number, (start, stop) in enumerate(bounds):
        if memory is not None:
            memory.last_chunk = stop == clip.shape[2]
        checkpoint(number / len(bounds))
        with part(number, len(bounds)):
            piece = run_chunk(clip[:, :, start:stop], memory)
        if out is None:
            out = torch.empty(
                (*piece.shape[:2], out_frames, *piece.shape[3:]), dtype=out_dtype, device=out_device
            )
        out[:, :, filled:filled + piece.shape[2]] = piece
        filled += piece.shape[2]
        del piece
        if memory is not None:
            memory.end_chunk()
    if filled != out_frames:
        raise RuntimeError(f"temporal slicing produced {filled} frames, expected {out_frames}.")
    return out
