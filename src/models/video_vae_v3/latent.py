"""The VAE latent space: posterior sampling and the scaling into the DiT's latent space.

The VAE's raw latent ``z`` is rescaled before the DiT sees it.  This is the only place that knows the
released constants; everything else calls :func:`to_dit_latent` / :func:`from_dit_latent`.
"""
from __future__ import annotations

import torch

SCALING_FACTOR = 0.9152
SHIFTING_FACTOR = 0.0


def to_dit_latent(z: torch.Tensor) -> torch.Tensor:
    """VAE latent -> DiT latent: ``(z - shift) * scale``."""
    return (z - SHIFTING_FACTOR) * SCALING_FACTOR


def from_dit_latent(latent: torch.Tensor) -> torch.Tensor:
    """DiT latent -> VAE latent: ``latent / scale + shift``."""
    return latent / SCALING_FACTOR + SHIFTING_FACTOR


def sample_posterior(mean: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """A draw from the diagonal Gaussian posterior: ``mean + exp(logvar / 2) * eps`` with ``eps ~ N(0, 1)``."""
    return mean + torch.exp(logvar / 2) * eps
