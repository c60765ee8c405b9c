"""The layout of a packed ("varlen") DiT batch: every sample's token grid and text length (README §2).

The layout is read from ``vid_shape`` / ``txt_shape`` once per forward (the only host read of the DiT) and
then passed around as plain Python integers, so no layer needs to synchronise with the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedLayout:
    """Per-sample patched token grids (t, h, w) and text lengths of one packed batch."""

    grids: tuple[tuple[int, int, int], ...]
    text_lengths: tuple[int, ...]

    @property
    def video_lengths(self) -> tuple[int, ...]:
        """Video tokens per sample (after patching)."""
        return tuple(t * h * w for t, h, w in self.grids)

    @property
    def num_samples(self) -> int:
        """Number of samples in the batch."""
        return len(self.grids)

    @classmethod
    def from_shapes(cls, vid_shape: torch.Tensor, txt_shape: torch.Tensor,
                    patch_size: tuple[int, int, int]) -> "PackedLayout":
        """Read and validate ``vid_shape`` (B, 3) latent sizes and ``txt_shape`` (B, 1) text lengths."""
        if vid_shape.ndim != 2 or vid_shape.shape[1] != 3 or vid_shape.shape[0] < 1:
            raise ValueError(f"vid_shape must be (batch, 3) = [T, H, W] per sample, got {tuple(vid_shape.shape)}")
        if txt_shape.ndim != 2 or txt_shape.shape != (vid_shape.shape[0], 1):
            raise ValueError(f"txt_shape must be (batch, 1) = [text length] per sample with batch "
                             f"{vid_shape.shape[0]}, got {tuple(txt_shape.shape)}")
        if vid_shape.is_floating_point() or txt_shape.is_floating_point():
            raise ValueError("vid_shape and txt_shape must be integer tensors (int64)")
        # One transfer for both shape tensors: the single host read of a forward pass.
        rows = torch.cat([vid_shape, txt_shape.to(vid_shape.device)], dim=1).tolist()
        pt, ph, pw = patch_size
        grids, text_lengths = [], []
        for index, (t, h, w, length) in enumerate(rows):
            if min(t, h, w) < 1 or t % pt or h % ph or w % pw:
                raise ValueError(f"sample {index}: latent size [T, H, W] = {[t, h, w]} must be positive with H "
                                 f"divisible by {ph} and W by {pw} (crop the frames to multiples of 16 pixels)")
            if length < 0:
                raise ValueError(f"sample {index}: text length {length} is negative")
            grids.append((t // pt, h // ph, w // pw))
            text_lengths.append(length)
        return cls(tuple(grids), tuple(text_lengths))
