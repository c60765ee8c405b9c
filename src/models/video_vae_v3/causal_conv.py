"""Causal 3-D convolution: an output frame depends only on the current and earlier input frames."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .temporal_slicing import CausalMemory


class CausalConv3d(nn.Conv3d):
    """Conv3d with no look-ahead in time: ``k_t - 1`` frames are prepended (copies of the first frame at
    the start of a clip, the previous chunk's last frames otherwise); space is zero-padded as usual."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        spatial_padding: int = 1,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, padding=(0, spatial_padding, spatial_padding)
        )

    def forward(self, x: torch.Tensor, memory: Optional[CausalMemory] = None) -> torch.Tensor:
        if memory is not None and memory.continues(self):
            history = memory.recall(self)
        else:
            history = x[:, :, :1].expand(-1, -1, self.kernel_size[0] - 1, -1, -1)
        padded = torch.cat([history, x], dim=2)
        del history
        out = super().forward(padded)
        if memory is not None:
            # The next output window starts right after the last one computed here; everything from there
            # on is the look-back of the next chunk (k_t - 1 frames for stride 1, k_t - stride when aligned).
            memory.keep(self, padded[:, :, out.shape[2] * self.stride[0]:].clone())
        return out
