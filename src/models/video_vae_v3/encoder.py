"""Encoder: video (B, 3, T, H, W) -> posterior moments (B, 2·latent, (T-1)/4 + 1, H/8, W/8)."""
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
from .resampling import Downsampler3D
from .resnet import NORM_EPS
from .temporal_slicing import CausalMemory


class EncoderLevel(ResnetLevel):
    """``layers_per_block`` resnets at one width, then (except on the last level) a downsampler."""

    def __init__(
        self, in_channels: int, out_channels: int, num_layers: int, norm_num_groups: int, downsample: Optional[str]
    ) -> None:
        super().__init__(in_channels, out_channels, num_layers, norm_num_groups)
        self.downsamplers = nn.ModuleList(
            [] if downsample is None else [Downsampler3D(out_channels, temporal=downsample == "space_time")]
        )

    @property
    def resamplers(self) -> nn.ModuleList:
        return self.downsamplers


class Encoder3D(nn.Module):
    """conv_in -> levels (space halved on every level but the last, time on the last ``temporal_scale_num``
    of those) -> mid block -> GN, SiLU -> conv_out to mean and log-variance channels."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        widths = config.block_out_channels
        levels = config.num_levels
        self.conv_in = CausalConv3d(config.in_channels, widths[0])
        self.down_blocks = nn.ModuleList()
        for j, width in enumerate(widths):
            if j == levels - 1:
                downsample = None
            elif j >= levels - 1 - config.temporal_scale_num:
                downsample = "space_time"
            else:
                downsample = "space"
            self.down_blocks.append(
                EncoderLevel(widths[max(j - 1, 0)], width, config.layers_per_block, config.norm_num_groups, downsample)
            )
        self.mid_block = MidBlock3D(widths[-1], config.norm_num_groups)
        self.conv_norm_out = FrameGroupNorm(config.norm_num_groups, widths[-1], eps=NORM_EPS)
        self.conv_out = CausalConv3d(widths[-1], 2 * config.latent_channels)

    def forward(self, video: torch.Tensor, memory: Optional[CausalMemory] = None) -> torch.Tensor:
        x = self.conv_in(video, memory)
        for number, level in enumerate(self.down_blocks):
            checkpoint(number / (len(self.down_blocks) + 1))  # an interrupt lands between levels
            x = level(x, memory)
        checkpoint(len(self.down_blocks) / (len(self.down_blocks) + 1))
        x = self.mid_block(x, memory)
        x = F.silu(self.conv_norm_out(x), inplace=True)
        return self.conv_out(x, memory)
