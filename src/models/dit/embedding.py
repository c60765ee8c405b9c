"""Time embedding (README §4.3): one 6·d vector per sample, shared by all blocks."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sinusoidal_embedding(timestep: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """``[sin(τ·f), cos(τ·f)]`` with ``f_i = exp(-ln(10000)·i/(dim/2))``, float32, (B, dim)."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half
    angles = timestep.float()[:, None] * torch.exp(exponent)[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class TimeEmbedding(nn.Module):
    """Sinusoidal features of the timestep through a SiLU MLP: ``proj_in → proj_hid → proj_out``."""

    def __init__(self, hidden_dim: int, output_dim: int, sinusoidal_dim: int = 256):
        super().__init__()
        self.sinusoidal_dim = sinusoidal_dim
        self.proj_in = nn.Linear(sinusoidal_dim, hidden_dim)
        self.proj_hid = nn.Linear(hidden_dim, hidden_dim)
        self.proj_out = nn.Linear(hidden_dim, output_dim)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B,) diffusion times in [0, 1000] → (B, output_dim), computed in ``dtype``."""
        features = sinusoidal_embedding(timestep, self.sinusoidal_dim).to(dtype)
        hidden = F.silu(self.proj_hid(F.silu(self.proj_in(features))))
        return self.proj_out(hidden)
