"""The mid block on the fast path: its resnets as streamed stages, the attention after the runtime's GroupNorm."""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Optional

import torch

from ...models.video_vae_v3.mid_block import MidBlock3D, MidBlockAttention
from .resnet import lean_resnet
from .streaming import Stage

if TYPE_CHECKING:
    from ..vae_optimizer import VAERuntime


def lean_attention(block: MidBlockAttention, x: torch.Tensor, runtime: "VAERuntime") -> torch.Tensor:
    """``block(x)`` with the runtime's per-frame GroupNorm kernel and attention backend."""
    return block.attend(x, runtime.normalize(x, block.group_norm, silu=False), backend=runtime.attention_backend)


def mid_block_stages(block: MidBlock3D, runtime: "VAERuntime", input_bias: Optional[torch.Tensor] = None) -> list[Stage]:
    """The block's steps, for streaming; the first resnet adds ``input_bias`` (left out by the convolution
    before)."""
    attention = block.attentions[0]
    return [
        Stage(partial(lean_resnet, block.resnets[0], runtime=runtime, input_bias=input_bias)),
        Stage(lambda x, memory: lean_attention(attention, x, runtime)),
        Stage(partial(lean_resnet, block.resnets[1], runtime=runtime)),
    ]
