"""One level of the encoder or decoder: resnets at one width, then at most one resampler."""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from ...pipeline.progress import checkpoint
from .resnet import ResnetBlock3D
from .temporal_slicing import CausalMemory, Stage

if TYPE_CHECKING:
    from ...optimization.vae_optimizer import VAERuntime


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

    def lean_stages(self, runtime: "VAERuntime", input_bias: Optional[torch.Tensor] = None) -> list[Stage]:
        """The optimized path's steps, for streaming.  The first resnet adds ``input_bias`` (left out by the
        block before); the resampling convolution leaves its bias to the block after (``deferred_bias``)."""
        stages = [
            Stage(partial(resnet.forward_lean, runtime=runtime, input_bias=input_bias if i == 0 else None),
                  resnet.lean_growth)
            for i, resnet in enumerate(self.resnets)
        ]
        stages += [Stage(partial(block.forward_lean, runtime=runtime, with_bias=False), block.lean_growth)
                   for block in self.resamplers]
        return stages

    @property
    def deferred_bias(self) -> Optional[torch.Tensor]:
        """The bias the lean stages leave out of their output, for the next block to add."""
        return self.resamplers[0].conv.bias if len(self.resamplers) else None
