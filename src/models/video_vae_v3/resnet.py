"""The VAE's residual block: two causal 3x3x3 convolutions, each after per-frame GroupNorm and SiLU."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .causal_conv import CausalConv3d
from .frame_norm import FrameGroupNorm
from .temporal_slicing import CausalMemory

if TYPE_CHECKING:
    from ...optimization.vae_optimizer import VAERuntime

NORM_EPS = 1e-6


class ResnetBlock3D(nn.Module):
    """``x' + conv2(SiLU(GN2(conv1(SiLU(GN1(x))))))``; ``x'`` is a 1x1x1 projection of ``x`` when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, norm_num_groups: int) -> None:
        super().__init__()
        self.norm1 = FrameGroupNorm(norm_num_groups, in_channels, eps=NORM_EPS)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.norm2 = FrameGroupNorm(norm_num_groups, out_channels, eps=NORM_EPS)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        self.conv_shortcut = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, memory: Optional[CausalMemory] = None) -> torch.Tensor:
        # One statement per step, so each intermediate is released as soon as the next one exists.
        h = F.silu(self.norm1(x), inplace=True)
        h = self.conv1(h, memory)
        h = F.silu(self.norm2(h), inplace=True)
        h = self.conv2(h, memory)
        return h.add_(x if self.conv_shortcut is None else self.conv_shortcut(x))

    @property
    def lean_growth(self) -> float:
        """Widest activation per frame relative to the input's, for sizing streamed pieces."""
        return self.conv1.lean_growth

    def forward_lean(
        self, x: torch.Tensor, memory: CausalMemory, runtime: "VAERuntime", input_bias: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """``forward(x + input_bias)`` with at most x, one padded conv input, one output and its look-back alive.

        Biases ride along with the next pass over the tensor they belong to instead of costing a pass each:
        ``input_bias`` (left out by the convolution that produced ``x``) goes into the first GroupNorm and the
        residual sum, conv1's into the second GroupNorm, conv2's and the shortcut's into the residual sum."""
        h = self.conv1.forward_lean(x, memory, runtime, norm=self.norm1, with_bias=False, input_bias=input_bias)
        padded = self.conv2.open_input(memory, h.shape, h, runtime)
        look_back = self.conv2.next_look_back(padded, memory, runtime)
        runtime.normalize(h, self.norm2, silu=True, out=padded.new_frames, shift=self.conv1.bias, tail=look_back,
                          out_scale=padded.store_scale)
        del h  # its normalised copy in the padded input is all conv2 needs
        out = self.conv2.convolve_input(padded, memory, runtime, with_bias=False, look_back=look_back)
        del padded, look_back
        if self.conv_shortcut is None:
            residual, residual_bias = x, input_bias
        else:
            residual = runtime.conv3d(x, self.conv_shortcut, with_bias=False)
            residual_bias = self.conv_shortcut.bias
            if input_bias is not None:  # shortcut(x + b) = W x + (W b + shortcut bias)
                residual_bias = residual_bias.float() + self.conv_shortcut.weight.flatten(1).float() @ input_bias.float()
        return runtime.add_residual(out, residual, _sum_of(self.conv2.bias, residual_bias))


def _sum_of(first: Optional[torch.Tensor], second: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The float32 sum of two optional per-channel biases (always float32: one dtype, one compiled kernel)."""
    present = [bias.float() for bias in (first, second) if bias is not None]
    if not present:
        return None
    return present[0] if len(present) == 1 else present[0] + present[1]
