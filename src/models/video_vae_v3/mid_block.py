"""The bottleneck of encoder and decoder: resnet, single-head spatial self-attention per frame, resnet."""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from ...optimization.matrix_ops import AUTO, attention, attention_backend
from .frame_norm import FrameGroupNorm
from .resnet import NORM_EPS, ResnetBlock3D
from .temporal_slicing import CausalMemory, Stage

if TYPE_CHECKING:
    from ...optimization.vae_optimizer import VAERuntime


class MidBlockAttention(nn.Module):
    """Self-attention among the H·W positions of each frame (one head of width C), added to the input."""

    def __init__(self, channels: int, norm_num_groups: int) -> None:
        super().__init__()
        self.group_norm = FrameGroupNorm(norm_num_groups, channels, eps=NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._attend(x, self.group_norm(x))

    def forward_lean(self, x: torch.Tensor, runtime: "VAERuntime") -> torch.Tensor:
        """``forward`` with the optimized path's per-frame GroupNorm kernel and the attention kernel picked
        for this shape ("auto": on CUDA the Triton flash-attention kernel for the 512-wide head, which SDPA's
        fused kernels do not take; see matrix_ops)."""
        with attention_backend(AUTO):
            return self._attend(x, runtime.normalize(x, self.group_norm, silu=False))

    def attend(self, x: torch.Tensor, normalized: torch.Tensor, *, query_chunk: Optional[int] = None,
               runtime: Optional["VAERuntime"] = None) -> torch.Tensor:
        """``x`` plus the attention of its already normalised frames, the queries taken ``query_chunk`` at a
        time (exact: every query row attends to all keys on its own); used by banded execution."""
        if runtime is None:
            return self._attend(x, normalized, query_chunk)
        with attention_backend(AUTO):
            return self._attend(x, normalized, query_chunk)

    def _attend(self, x: torch.Tensor, normalized: torch.Tensor, query_chunk: Optional[int] = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        # Frames become the batch and positions the sequence: (B·T, 1 head, H·W, C).
        tokens = normalized.permute(0, 2, 3, 4, 1).reshape(b * t, 1, h * w, c)
        del normalized
        k, v = self.to_k(tokens), self.to_v(tokens)
        if query_chunk is None or query_chunk >= h * w:
            q = self.to_q(tokens)
            del tokens
            mixed = attention(q, k, v)
            del q, k, v
            mixed = self.to_out[0](mixed)
        else:
            mixed = torch.cat([
                self.to_out[0](attention(self.to_q(tokens[:, :, start:start + query_chunk]), k, v))
                for start in range(0, h * w, query_chunk)
            ], dim=2)
            del tokens, k, v
        return x + mixed.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)


class MidBlock3D(nn.Module):
    """resnet -> attention -> resnet at constant width."""

    def __init__(self, channels: int, norm_num_groups: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock3D(channels, channels, norm_num_groups) for _ in range(2)])
        self.attentions = nn.ModuleList([MidBlockAttention(channels, norm_num_groups)])

    def forward(self, x: torch.Tensor, memory: Optional[CausalMemory] = None) -> torch.Tensor:
        x = self.resnets[0](x, memory)
        x = self.attentions[0](x)
        return self.resnets[1](x, memory)

    def lean_stages(self, runtime: "VAERuntime", input_bias: Optional[torch.Tensor] = None) -> list[Stage]:
        """The optimized path's steps, for streaming; the first resnet adds ``input_bias`` (left out by the
        convolution before)."""
        return [
            Stage(partial(self.resnets[0].forward_lean, runtime=runtime, input_bias=input_bias)),
            Stage(lambda x, memory: self.attentions[0].forward_lean(x, runtime)),
            Stage(partial(self.resnets[1].forward_lean, runtime=runtime)),
        ]
