"""RMSNorm with float32 statistics (the original's apex ``FusedRMSNorm``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``x / sqrt(mean(x²) + eps)`` over the last dim (times ``weight``), statistics in float32, in x's dtype.

    PyTorch's fused RMSNorm accumulates half-precision inputs in float32, so no float32 copy is made.
    """
    if weight is not None and weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


class RMSNorm(nn.Module):
    """RMSNorm with a learned per-channel weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the last dim of ``x`` and scale it by the weight."""
        return rms_norm(x, self.eps, self.weight)
