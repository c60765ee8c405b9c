"""Patch embedding and output head (README §4.1): 2×2 latent patches ↔ tokens, per packed sample."""
from __future__ import annotations

import torch
from torch import nn

from .packing import PackedLayout


def _per_sample_cat(pieces: list[torch.Tensor]) -> torch.Tensor:
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


class PatchIn(nn.Module):
    """Gathers each 2×2 patch's channels, feature ``(dh·pw + dw)·C + c``, and projects them to the width."""

    def __init__(self, in_channels: int, dim: int, patch_size: tuple[int, int, int]):
        super().__init__()
        _, self.ph, self.pw = patch_size
        self.proj = nn.Linear(in_channels * self.ph * self.pw, dim)

    def forward(self, vid: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        """(Σ T·H·W, C) latent rows → (Σ t·h·w, dim) tokens."""
        channels = vid.shape[-1]
        pieces = []
        for (t, h, w), segment in zip(layout.grids, vid.split([n * self.ph * self.pw for n in layout.video_lengths])):
            patches = segment.view(t, h, self.ph, w, self.pw, channels).permute(0, 1, 3, 2, 4, 5)
            pieces.append(patches.reshape(t * h * w, self.ph * self.pw * channels))
        return self.proj(_per_sample_cat(pieces))


class PatchOut(nn.Module):
    """Projects tokens to 2×2 patches of output channels and scatters them back to latent positions."""

    def __init__(self, out_channels: int, dim: int, patch_size: tuple[int, int, int]):
        super().__init__()
        _, self.ph, self.pw = patch_size
        self.out_channels = out_channels
        self.proj = nn.Linear(dim, out_channels * self.ph * self.pw)

    def forward(self, tokens: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        """(Σ t·h·w, dim) tokens → (Σ T·H·W, out_channels) latent rows."""
        patches = self.proj(tokens)
        pieces = []
        for (t, h, w), segment in zip(layout.grids, patches.split(layout.video_lengths)):
            grid = segment.view(t, h, w, self.ph, self.pw, self.out_channels).permute(0, 1, 3, 2, 4, 5)
            pieces.append(grid.reshape(t * h * self.ph * w * self.pw, self.out_channels))
        return _per_sample_cat(pieces)
