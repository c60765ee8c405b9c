"""A resnet block on the fast path: GroupNorms written into the convolutions' inputs, biases folded forward.

Biases ride along with the next pass over the tensor they belong to instead of costing a pass each: the
block input's (left out by the convolution that produced it) goes into the first GroupNorm and the residual
sum, conv1's into the second GroupNorm, conv2's and the shortcut's into the residual sum.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from ...models.video_vae_v3.resnet import ResnetBlock3D
from ...models.video_vae_v3.temporal_slicing import CausalMemory
from .conv import conv_growth, convolve_input, lean_conv, next_look_back, open_input

if TYPE_CHECKING:
    from ..vae_optimizer import VAERuntime


def resnet_growth(block: ResnetBlock3D) -> float:
    """Widest activation per frame relative to the input's, for sizing streamed pieces."""
    return conv_growth(block.conv1)


def lean_resnet(
    block: ResnetBlock3D, x: torch.Tensor, memory: CausalMemory, runtime: "VAERuntime",
    input_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``block(x + input_bias, memory)`` with at most x, one padded conv input, one output and its look-back
    alive; ``input_bias``: the bias the convolution that produced ``x`` left out."""
    h = lean_conv(block.conv1, x, memory, runtime, norm=block.norm1, with_bias=False, input_bias=input_bias)
    padded = open_input(block.conv2, memory, h.shape, h, runtime)
    look_back = next_look_back(block.conv2, padded, memory, runtime)
    runtime.normalize(h, block.norm2, silu=True, out=padded.new_frames, shift=block.conv1.bias, tail=look_back,
                      out_scale=padded.store_scale)
    del h  # its normalised copy in the padded input is all conv2 needs
    out = convolve_input(block.conv2, padded, memory, runtime, with_bias=False, look_back=look_back)
    del padded, look_back
    if block.conv_shortcut is None:
        residual, residual_bias = x, input_bias
    else:
        residual = runtime.conv3d(x, block.conv_shortcut, with_bias=False)
        residual_bias = block.conv_shortcut.bias
        if input_bias is not None:  # shortcut(x + b) = W x + (W b + shortcut bias)
            residual_bias = residual_bias.float() + block.conv_shortcut.weight.flatten(1).float() @ input_bias.float()
    return runtime.add_residual(out, residual, _sum_of(block.conv2.bias, residual_bias))


def _sum_of(first: Optional[torch.Tensor], second: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The float32 sum of two optional per-channel biases (always float32: one dtype, one compiled kernel)."""
    present = [bias.float() for bias in (first, second) if bias is not None]
    if not present:
        return None
    return present[0] if len(present) == 1 else present[0] + present[1]
