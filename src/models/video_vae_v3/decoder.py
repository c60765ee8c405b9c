"""Decoder: latent (B, latent, t, h, w) -> video (B, 3, 4(t-1) + 1, 8h, 8w), values not clamped."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...progress import checkpoint
from .causal_conv import CausalConv3d
from .config import VAEConfig
from .frame_norm import FrameGroupNorm
from .level import ResnetLevel
from .mid_block import MidBlock3D
from .resampling import Upsampler3D
from .resnet import NORM_EPS
from .temporal_slicing import CausalMemory


class DecoderLevel(ResnetLevel):
    """``layers_per_block + 1`` resnets at one width, then (except on the last level) an upsampler."""

    def __init__(
        self, in_channels: int, out_channels: int, num_layers: int, norm_num_groups: int, upsample: Optional[str]
    ) -> None:
        super().__init__(in_channels, out_channels, num_layers, norm_num_groups)
        self.upsamplers = nn.ModuleList(
            [] if upsample is None else [Upsampler3D(out_channels, temporal=upsample == "space_time")]
        )

    @property
    def resamplers(self) -> nn.ModuleList:
        return self.upsamplers


class Decoder3D(nn.Module):
    """conv_in -> mid block -> levels in reverse width order (time doubled on the first
    ``temporal_scale_num``, space on all but the last) -> GN, SiLU -> conv_out to RGB."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        widths = tuple(reversed(config.block_out_channels))
        levels = config.num_levels
        self.conv_in = CausalConv3d(config.latent_channels, widths[0])
        self.mid_block = MidBlock3D(widths[0], config.norm_num_groups)
        self.up_blocks = nn.ModuleList()
        for j, width in enumerate(widths):
            if j == levels - 1:
                upsample = None
            elif j < config.temporal_scale_num:
                upsample = "space_time"
            else:
                upsample = "space"
            self.up_blocks.append(
                DecoderLevel(
                    widths[max(j - 1, 0)], width, config.layers_per_block + 1, config.norm_num_groups, upsample
                )
            )
        self.conv_norm_out = FrameGroupNorm(config.norm_num_groups, widths[-1], eps=NORM_EPS)
        self.conv_out = CausalConv3d(widths[-1], config.out_channels)

    def forward(self, z: torch.Tensor, memory: Optional[CausalMemory] = None) -> torch.Tensor:
        x = self.conv_in(z, memory)
        x = self.mid_block(x, memory)
        for number, level in enumerate(self.up_blocks):
            checkpoint(number / len(self.up_blocks))  # an interrupt lands between levels
            x = level(x, memory)
        x = F.silu(self.conv_norm_out(x), inplace=True)  # releases the widest full-resolution activation
        return self.conv_out(x, memory)
