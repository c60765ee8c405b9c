"""The one attention entry point of the pack.

Every attention in the models calls :func:`attention` with equal-length sequences batched together
as ``(batch, heads, seq, head_dim)``.  The plain path is PyTorch's scaled-dot-product attention; faster
backends plug in behind the same signature, so the model code never changes when a backend is added.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √head_dim) v for ``(batch, heads, seq, head_dim)`` tensors, no mask."""
    return F.scaled_dot_product_attention(q, k, v)
