"""Splitting a clip into DiT batches, and the frame operations of a batch: 4n+1 padding, mirrored
frames in front of the clip, the overlap cross-fade.

The causal VAE needs ``4n + 1`` frames per batch (one image is the case n = 0).  Batches start every
``batch_size − temporal_overlap`` frames; the ``overlap`` first frames of a batch are cross-faded with
the last frames of the previous one to hide seams.  ``prepend_frames`` mirrored frames can be put in
front of the clip so the first real frames get temporal context; they are dropped from the output.

All frame indices of a plan refer to the *extended* clip (prepended frames included).  The upscaler
writes each batch into an output whose first frame is extended frame ``prepend_frames``, dropping the
frames before it; a streamed clip is planned again as frames arrive (a plan's full batches do not
depend on the clip's length).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def padded_length(length: int) -> int:
    """The next ``4n + 1`` frame count ≥ ``length`` (1 stays 1, 2…4 → 5, 6…8 → 9)."""
    if length < 1:
        raise ValueError(f"a batch needs at least one frame (got {length}).")
    return length if length % 4 == 1 else ((length - 1) // 4 + 1) * 4 + 1


def overlap_weights(overlap: int) -> torch.Tensor:
    """Weights of the *previous* batch for ``overlap`` shared frames (the new batch gets ``1 − w``).

    Strictly decreasing inside (0, 1), symmetric, so every shared frame is a real mix: linear steps
    for 1–2 frames, a raised cosine for more (smooth start and end of the cross-fade).
    """
    if overlap < 0:
        raise ValueError(f"overlap must not be negative (got {overlap}).")
    progress = torch.arange(1, overlap + 1, dtype=torch.float64) / (overlap + 1)
    if overlap <= 2:
        weights = 1.0 - progress
    else:
        weights = 0.5 + 0.5 * torch.cos(math.pi * progress)
    return weights.float()


@dataclass(frozen=True)
class Batch:
    """One DiT batch: source frames ``[start, stop)`` of the extended clip, padded by ``pad_frames``
    mirrored frames; its first ``overlap`` frames are blended with the previous batch."""

    start: int
    stop: int
    pad_frames: int
    overlap: int

    @property
    def length(self) -> int:
        """Source frames in the batch."""
        return self.stop - self.start

    @property
    def padded_length(self) -> int:
        """Frames the VAE and DiT see (``4n + 1``)."""
        return self.length + self.pad_frames

    @property
    def blend_weights(self) -> torch.Tensor:
        """Previous batch's weights for frames ``[start, start + overlap)`` (see :func:`overlap_weights`)."""
        return overlap_weights(self.overlap)


@dataclass(frozen=True)
class BatchPlan:
    """How a clip of ``num_frames`` is processed: ``prepend_frames`` mirrored frames in front, then
    ``batches`` covering the extended clip of ``num_frames + prepend_frames`` frames in order."""

    num_frames: int
    prepend_frames: int
    batches: tuple[Batch, ...]


def plan_batches(
    num_frames: int,
    batch_size: int,
    temporal_overlap: int = 0,
    uniform_batch_size: bool = False,
    prepend_frames: int = 0,
) -> BatchPlan:
    """Split a clip into batches of ``batch_size`` frames starting every ``batch_size − overlap``
    frames, until one reaches the end of the clip (so every batch adds new frames).  With
    ``uniform_batch_size`` every batch, a lone short one included, is padded to ``batch_size`` (then
    to ``4n + 1``), so all DiT calls have one shape."""
    if num_frames < 1:
        raise ValueError("no frames to process: the clip is empty.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 (got {batch_size}).")
    if temporal_overlap < 0 or prepend_frames < 0:
        raise ValueError(
            f"temporal_overlap ({temporal_overlap}) and prepend_frames ({prepend_frames}) must not be negative."
        )
    if temporal_overlap and temporal_overlap >= batch_size:
        raise ValueError(
            f"temporal_overlap ({temporal_overlap}) must be smaller than batch_size ({batch_size}); "
            "raise batch_size or lower the overlap."
        )
    total = num_frames + prepend_frames
    step = batch_size - temporal_overlap
    batches = []
    for start in range(0, total, step):
        stop = min(start + batch_size, total)
        overlap = temporal_overlap if start > 0 else 0
        target = padded_length(batch_size if uniform_batch_size else stop - start)
        batches.append(Batch(start=start, stop=stop, pad_frames=target - (stop - start), overlap=overlap))
        if stop == total:
            break
    return BatchPlan(num_frames=num_frames, prepend_frames=prepend_frames, batches=tuple(batches))


# --------------------------------------------------------------------------------------------------
# Frame operations (time is the first axis of every tensor here)


def _mirror_index(i: int, length: int) -> int:
    """Index of position ``i`` (any integer) in the endless reflection …2 1 [0 1 … n−1] n−2 … of a clip."""
    if length == 1:
        return 0
    period = 2 * (length - 1)
    i %= period
    return i if i < length else period - i


def pad_temporal(frames: torch.Tensor, target_len: int, mode: str = "mirror") -> torch.Tensor:
    """Extend ``frames`` (time first) to ``target_len`` at the end.

    ``mirror`` reflects back from the last frame without repeating it (…, n−2, n−1, n−2, …) and keeps
    reflecting when more than the clip's length is needed; ``repeat`` repeats the last frame, as the
    released SeedVR2 script does (golden ``pad3`` case).
    """
    length = frames.shape[0]
    if length == 0:
        raise ValueError("cannot pad an empty clip.")
    if target_len < length:
        raise ValueError(f"target_len ({target_len}) is shorter than the clip ({length} frames).")
    if mode == "mirror":
        extra = [_mirror_index(i, length) for i in range(length, target_len)]
    elif mode == "repeat":
        extra = [length - 1] * (target_len - length)
    else:
        raise ValueError(f"unknown padding mode {mode!r}; use 'mirror' or 'repeat'.")
    if not extra:
        return frames
    return torch.cat([frames, frames[torch.tensor(extra, device=frames.device)]], dim=0)


def prepend_mirrored(frames: torch.Tensor, count: int) -> torch.Tensor:
    """Put ``count`` mirrored frames in front: ``frames[count], …, frames[1]``, then the clip
    (reflection about frame 0, continued back and forth for short clips)."""
    if frames.shape[0] == 0:
        raise ValueError("cannot prepend to an empty clip.")
    if count < 0:
        raise ValueError(f"count must not be negative (got {count}).")
    if count == 0:
        return frames
    index = [_mirror_index(-i, frames.shape[0]) for i in range(count, 0, -1)]
    return torch.cat([frames[torch.tensor(index, device=frames.device)], frames], dim=0)


def blend_overlap(prev_tail: torch.Tensor, new_head: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Cross-fade shared frames into ``prev_tail`` in place: ``prev_tail·w + new_head·(1 − w)`` with one
    weight per frame (time first); returns ``prev_tail``.  In place because the tail is a view of the
    output clip."""
    if prev_tail.shape != new_head.shape or prev_tail.shape[0] != weights.numel():
        raise ValueError(
            f"overlap blend needs equal shapes and one weight per frame: got {tuple(prev_tail.shape)}, "
            f"{tuple(new_head.shape)} and {weights.numel()} weights."
        )
    w = weights.to(prev_tail.device).reshape(-1, *([1] * (prev_tail.ndim - 1)))
    return prev_tail.mul_(w).add_(new_head.to(prev_tail.device) * (1.0 - w))
