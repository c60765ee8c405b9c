"""GroupNorm with per-frame statistics: a video (B, C, T, H, W) is normalised as B·T separate images."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FrameGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` over each frame of a (B, C, T, H, W) tensor; statistics never mix frames."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Frame by frame into one output: no transposed full-size copy of the video is ever made.
        out = torch.empty_like(x)
        for frame in range(x.shape[2]):
            out[:, :, frame] = F.group_norm(x[:, :, frame], self.num_groups, self.weight, self.bias, self.eps)
        return out
