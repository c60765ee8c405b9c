"""The per-stream feed-forward networks: SwiGLU (3B) and GELU-tanh (7B)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import NaDiTConfig


class SwiGLUMLP(nn.Module):
    """``proj_out(SiLU(proj_in_gate(x)) ⊙ proj_in(x))``, no biases (3B)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.proj_in_gate = nn.Linear(dim, hidden_dim, bias=False)
        self.proj_in = nn.Linear(dim, hidden_dim, bias=False)
        self.proj_out = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the gated MLP to the last dim."""
        return self.proj_out(self.gated_activation(self.proj_in_gate(x), self.proj_in(x)))

    def gated_activation(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """``SiLU(gate) ⊙ up`` (overwrites ``gate``: it is a temporary of :meth:`forward`, no extra copy)."""
        return F.silu(gate, inplace=True) * up


class GELUMLP(nn.Module):
    """``proj_out(GELU_tanh(proj_in(x)))`` with biases (7B)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.proj_in = nn.Linear(dim, hidden_dim)
        self.proj_out = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP to the last dim."""
        return self.proj_out(F.gelu(self.proj_in(x), approximate="tanh"))


def make_mlp(config: NaDiTConfig) -> nn.Module:
    """The MLP of ``config.mlp_type`` at the config's width and hidden size."""
    mlp_class = SwiGLUMLP if config.mlp_type == "swiglu" else GELUMLP
    return mlp_class(config.vid_dim, config.mlp_hidden_dim)
