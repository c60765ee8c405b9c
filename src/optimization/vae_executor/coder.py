"""Encoder and decoder on the fast path: the network as a list of stages, streamed in pieces of frames.

Each convolution that feeds a GroupNorm leaves its bias to the next block (a pass over its output saved).
"""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Optional

import torch

from ...models.video_vae_v3.decoder import Decoder3D
from ...models.video_vae_v3.encoder import Encoder3D
from ...models.video_vae_v3.temporal_slicing import CausalMemory
from .conv import conv_growth, lean_conv
from .level import deferred_bias, level_stages
from .mid_block import mid_block_stages
from .streaming import Stage, run_streamed

if TYPE_CHECKING:
    from ..vae_optimizer import VAERuntime


def encoder_stages(encoder: Encoder3D, runtime: "VAERuntime") -> list[Stage]:
    """``encoder.forward`` as streamed stages."""
    stages = [Stage(partial(lean_conv, encoder.conv_in, runtime=runtime, with_bias=False),
                    conv_growth(encoder.conv_in))]
    bias = encoder.conv_in.bias
    for level in encoder.down_blocks:
        stages += level_stages(level, runtime, input_bias=bias)
        bias = deferred_bias(level)
    stages += mid_block_stages(encoder.mid_block, runtime, input_bias=bias)
    stages.append(Stage(partial(lean_conv, encoder.conv_out, runtime=runtime, norm=encoder.conv_norm_out)))
    return stages


def decoder_stages(decoder: Decoder3D, runtime: "VAERuntime") -> list[Stage]:
    """``decoder.forward`` as streamed stages."""
    stages = [Stage(partial(lean_conv, decoder.conv_in, runtime=runtime, with_bias=False),
                    conv_growth(decoder.conv_in))]
    stages += mid_block_stages(decoder.mid_block, runtime, input_bias=decoder.conv_in.bias)
    bias = None
    for level in decoder.up_blocks:
        stages += level_stages(level, runtime, input_bias=bias)
        bias = deferred_bias(level)
    stages.append(Stage(partial(lean_conv, decoder.conv_out, runtime=runtime, norm=decoder.conv_norm_out,
                                input_bias=bias)))
    return stages


def lean_encode(encoder: Encoder3D, video: torch.Tensor, memory: Optional[CausalMemory],
                runtime: "VAERuntime") -> torch.Tensor:
    """``encoder(video, memory)``, streamed through the network in pieces of frames (``run_streamed``)."""
    memory = memory if memory is not None else CausalMemory(last_chunk=True)
    return run_streamed(encoder_stages(encoder, runtime), video, memory, runtime.piece_bytes)


def lean_decode(decoder: Decoder3D, z: torch.Tensor, memory: Optional[CausalMemory],
                runtime: "VAERuntime") -> torch.Tensor:
    """``decoder(z, memory)``, streamed through the network in pieces of frames (``run_streamed``)."""
    memory = memory if memory is not None else CausalMemory(last_chunk=True)
    return run_streamed(decoder_stages(decoder, runtime), z, memory, runtime.piece_bytes)
