"""The VAE's residual block: two causal 3x3x3 convolutions, each after per-frame GroupNorm and SiLU."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .causal_conv import CausalConv3d
from .frame_norm import FrameGroupNorm
from .temporal_slicing import CausalMemory

NORM_EPS = 1e-6


class ResnetBlock3D(nn.Module):
    """``x' + conv2(SiLU(GN2(conv1(SiLU(GN1(x))))))``; ``x'`` is a 1x1x1 projection of ``x`` when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, norm_num_groups: int) -> None:
        super().__init__()
        self.norm1 = FrameGroupNorm(norm_num_groups, in_channels, eps=NORM_EPS)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.norm2 = FrameGroupNorm(norm_num_groups, out_channels, eps=NORM_EPS)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        self.conv_shortcut = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, memory: Optional[CausalMemory] = None) -> torch.Tensor:
        # One statement per step, so each intermediate is released as soon as the next one exists.
        h = F.silu(self.norm1(x), inplace=True)
        h = self.conv1(h, memory)
        h = F.silu(self.norm2(h), inplace=True)
        h = self.conv2(h, memory)
        return h.add_(x if self.conv_shortcut is None else self.conv_shortcut(x))
