"""Resolution changes: the encoder's strided downsampler and the decoder's pixel-shuffle upsampler."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .causal_conv import CausalConv3d
from .temporal_slicing import CausalMemory


class Downsampler3D(nn.Module):
    """Halves height and width, and time too on temporal levels (causal: 2m+1 frames -> m+1)."""

    def __init__(self, channels: int, temporal: bool) -> None:
        super().__init__()
        self.temporal = temporal
        if temporal:
            self.conv = CausalConv3d(channels, channels, 3, stride=2, spatial_padding=0)
        else:
            self.conv = nn.Conv3d(channels, channels, (1, 3, 3), stride=(1, 2, 2))

    def forward(self, x: torch.Tensor, memory: Optional[CausalMemory] = None) -> torch.Tensor:
        # The released model pads one zero column on the right and one zero row at the bottom only.
        x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x, memory) if self.temporal else self.conv(x)


def pixel_shuffle_3d(x: torch.Tensor, time_factor: int) -> torch.Tensor:
    """(B, C·4·z_r, F, H, W) -> (B, C, F·z_r, 2H, 2W): input channel ``((x·2 + y)·z_r + z)·C + c`` goes to
    frame ``z_r·f + z``, row ``2i + x``, column ``2k + y``, channel ``c`` (z_r = ``time_factor``)."""
    b, expanded, f, h, w = x.shape
    c = expanded // (4 * time_factor)
    x = x.view(b, 2, 2, time_factor, c, f, h, w)  # (B, row offset, column offset, frame offset, C, F, H, W)
    x = x.permute(0, 4, 5, 3, 6, 1, 7, 2)  # (B, C, F, frame offset, H, row offset, W, column offset)
    return x.reshape(b, c, f * time_factor, 2 * h, 2 * w)


class Upsampler3D(nn.Module):
    """Doubles height and width (and time on temporal levels): 1x1x1 conv, pixel shuffle, causal 3x3x3 conv."""

    def __init__(self, channels: int, temporal: bool) -> None:
        super().__init__()
        self.time_factor = 2 if temporal else 1
        self.upscale_conv = nn.Conv3d(channels, channels * 4 * self.time_factor, 1)
        self.conv = CausalConv3d(channels, channels)

    def forward(self, x: torch.Tensor, memory: Optional[CausalMemory] = None) -> torch.Tensor:
        x = pixel_shuffle_3d(self.upscale_conv(x), self.time_factor)
        if self.time_factor == 2 and (memory is None or not memory.continues(self.conv)):
            # The first latent frame stands for one video frame, not two: drop its second copy so that
            # t latent frames become 2t - 1 (and 4(t - 1) + 1 after both temporal levels).
            x = torch.cat([x[:, :, :1], x[:, :, 2:]], dim=2)
        return self.conv(x, memory)
