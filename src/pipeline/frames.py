"""Frames to the models and back: target size, resize, padding to the model grid, pixel ranges.

Frames are ``(N, C, H, W)`` float tensors, N frames of C channels.  ComfyUI and the CLI hold pixels in
[0, 1]; the VAE and the colour fix work in [−1, 1].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MIN_RESOLUTION = 16
MODEL_MULTIPLE = 16  # VAE downsamples space by 8 and the DiT patches 2x2 latents


def _even_floor(n: int) -> int:
    return max(2, n - n % 2)


def target_size(h: int, w: int, resolution: int, max_resolution: int = 0) -> tuple[int, int]:
    """Output size ``(H', W')``: shortest edge scaled to ``resolution`` (up or down), then, when
    ``max_resolution > 0``, the longest edge capped at it, keeping the aspect ratio.

    Each edge is rounded *down* to an even number (at least 2), as video encoders (yuv420) need, so
    the result never exceeds ``resolution`` / ``max_resolution``.  Integer arithmetic, no float drift.
    """
    if h <= 0 or w <= 0:
        raise ValueError(f"input frames must have a positive size, got {h}x{w}.")
    if resolution < MIN_RESOLUTION:
        raise ValueError(f"resolution must be at least {MIN_RESOLUTION} pixels (got {resolution}).")
    if max_resolution < 0 or 0 < max_resolution < MIN_RESOLUTION:
        raise ValueError(
            f"max_resolution must be 0 (no cap) or at least {MIN_RESOLUTION} pixels (got {max_resolution})."
        )
    short, long = min(h, w), max(h, w)
    new_short, new_long = resolution, resolution * long // short
    if max_resolution and new_long > max_resolution:
        new_short, new_long = max_resolution * short // long, max_resolution
    new_short, new_long = _even_floor(new_short), _even_floor(new_long)
    return (new_short, new_long) if h <= w else (new_long, new_short)


def _check_frames(frames: torch.Tensor) -> None:
    if frames.ndim != 4:
        raise ValueError(f"frames must be (N, C, H, W), got shape {tuple(frames.shape)}.")
    if frames.shape[0] == 0:
        raise ValueError("no frames to process: the input batch is empty.")


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``(N, C, H, W)`` frames in [0, 1] to ``size = (H', W')``: bicubic, antialiased when
    shrinking, clamped to [0, 1] (bicubic overshoots at edges)."""
    _check_frames(frames)
    if not frames.is_floating_point():
        raise ValueError(f"frames must be a float tensor in [0, 1], got {frames.dtype}.")
    height, width = size
    if height <= 0 or width <= 0:
        raise ValueError(f"target size must be positive, got {height}x{width}.")
    if (height, width) == tuple(frames.shape[-2:]):
        return frames.clamp(0.0, 1.0)
    resized = F.interpolate(frames, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return resized.clamp_(0.0, 1.0)


def pad_to_multiple(x: torch.Tensor, multiple: int = MODEL_MULTIPLE) -> torch.Tensor:
    """Pad the last two axes (H, W) on the right/bottom up to multiples of ``multiple``.

    Padding replicates the edge pixels rather than adding black: a hard black border would be
    restored as content by the models and bleed into the real edge.  Undo with :func:`crop`.
    """
    if x.ndim < 2 or x.numel() == 0:
        raise ValueError(f"nothing to pad: got shape {tuple(x.shape)}.")
    if multiple < 1:
        raise ValueError(f"multiple must be positive (got {multiple}).")
    height, width = x.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    planes = x.reshape(-1, 1, height, width)  # replicate padding wants (N, C, H, W)
    padded = F.pad(planes, (0, pad_w, 0, pad_h), mode="replicate")
    return padded.reshape(*x.shape[:-2], height + pad_h, width + pad_w)


def crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The top-left ``height x width`` of the last two axes (removes :func:`pad_to_multiple` padding)."""
    if not (0 < height <= x.shape[-2] and 0 < width <= x.shape[-1]):
        raise ValueError(f"cannot crop {tuple(x.shape[-2:])} frames to {height}x{width}.")
    return x[..., :height, :width]


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels to the models' [−1, 1]."""
    return x * 2.0 - 1.0


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """[−1, 1] model pixels back to [0, 1] (not clamped)."""
    return (x + 1.0) * 0.5
