"""One level of the encoder or decoder: resnets at one width, then at most one resampler."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ...progress import checkpoint
from .resnet import ResnetBlock3D
from .temporal_slicing import CausalMemory


class ResnetLevel(nn.Module):
    """``num_layers`` resnets (the first from ``in_channels``), then the resamplers the subclass registers
    under the released checkpoints' name (``downsamplers`` / ``upsamplers``) and returns from ``resamplers``."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, norm_num_groups: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, norm_num_groups)
            for i in range(num_layers)
        )

    @property
    def resamplers(self) -> nn.ModuleList:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, memory: Optional[CausalMemory] = None) -> torch.Tensor:
        for resnet in self.resnets:
            checkpoint()
            x = resnet(x, memory)
        for resampler in self.resamplers:
            x = resampler(x, memory)
        return x
