"""An encoder or decoder level on the fast path: its resnets and resampler as streamed stages."""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import nn

from ...models.video_vae_v3.level import ResnetLevel
from ...models.video_vae_v3.resampling import Downsampler3D, Upsampler3D
from .resampling import downsampler_growth, lean_downsample, lean_upsample, upsampler_growth
from .resnet import lean_resnet, resnet_growth
from .streaming import Stage

if TYPE_CHECKING:
    from ..vae_optimizer import VAERuntime

# The fast form of each resampler type and its growth (see streaming.Stage).
_RESAMPLERS: dict[type, tuple[Callable[..., torch.Tensor], Callable[[nn.Module], float]]] = {
    Downsampler3D: (lean_downsample, downsampler_growth),
    Upsampler3D: (lean_upsample, upsampler_growth),
}


def level_stages(level: ResnetLevel, runtime: "VAERuntime", input_bias: Optional[torch.Tensor] = None) -> list[Stage]:
    """The level's steps, for streaming.  The first resnet adds ``input_bias`` (left out by the block before);
    the resampling convolution leaves its bias to the block after (:func:`deferred_bias`)."""
    stages = [
        Stage(partial(lean_resnet, resnet, runtime=runtime, input_bias=input_bias if i == 0 else None),
              resnet_growth(resnet))
        for i, resnet in enumerate(level.resnets)
    ]
    for block in level.resamplers:
        run, growth = _RESAMPLERS[type(block)]
        stages.append(Stage(partial(run, block, runtime=runtime, with_bias=False), growth(block)))
    return stages


def deferred_bias(level: ResnetLevel) -> Optional[torch.Tensor]:
    """The bias the level's stages leave out of their output, for the next block to add."""
    return level.resamplers[0].conv.bias if len(level.resamplers) else None
