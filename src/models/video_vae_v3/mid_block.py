"""The bottleneck of encoder and decoder: resnet, single-head spatial self-attention per frame, resnet."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ...optimization.attention_dispatch import PLAIN, attention
from .frame_norm import FrameGroupNorm
from .resnet import NORM_EPS, ResnetBlock3D
from .temporal_slicing import CausalMemory


class MidBlockAttention(nn.Module):
    """Self-attention among the H·W positions of each frame (one head of width C), added to the input."""

    def __init__(self, channels: int, norm_num_groups: int) -> None:
        super().__init__()
        self.group_norm = FrameGroupNorm(norm_num_groups, channels, eps=NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])
        # The attention entry point's backend name (the optimized VAE passes its own per call).
        self.attention_backend: str = PLAIN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(x, self.group_norm(x))

    def attend(self, x: torch.Tensor, normalized: torch.Tensor, *, query_chunk: Optional[int] = None,
               backend: Optional[str] = None) -> torch.Tensor:
        """``x`` plus the attention of its already normalised frames, the queries taken ``query_chunk`` at a
        time (exact: every query row attends to all keys on its own).  ``backend``: the attention backend
        for this call (None: :attr:`attention_backend`)."""
        backend = self.attention_backend if backend is None else backend
        b, c, t, h, w = x.shape
        # Frames become the batch and positions the sequence: (B·T, 1 head, H·W, C).
        tokens = normalized.permute(0, 2, 3, 4, 1).reshape(b * t, 1, h * w, c)
        del normalized
        k, v = self.to_k(tokens), self.to_v(tokens)
        if query_chunk is None or query_chunk >= h * w:
            q = self.to_q(tokens)
            del tokens
            mixed = attention(q, k, v, backend=backend)
            del q, k, v
            mixed = self.to_out[0](mixed)
        else:
            mixed = torch.cat([
                self.to_out[0](attention(self.to_q(tokens[:, :, start:start + query_chunk]), k, v, backend=backend))
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
