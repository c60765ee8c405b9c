"""Full-size models with seeded random weights, for speed work when no checkpoint is at hand.

The recipe follows the golden data's tiny models (weights N(0,1)/√fan_in, norm weights ≈ 1, small biases,
modulation shifts/gates small and scales ≈ 1), which keeps activations in a realistic range through 32+
blocks, so bf16 behaves as it would with trained weights.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..models.dit import NaDiT, NaDiTConfig
from ..models.video_vae_v3 import VAEConfig, VideoAutoencoder


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter in place following the golden recipe (generated on the parameter's device)."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        shape, leaf = param.shape, name.rsplit(".", 1)[-1]
        noise = torch.randn(shape, generator=generator, device=param.device, dtype=torch.float32)
        if param.ndim >= 2:
            fan_in = math.prod(shape[1:])
            value = noise / math.sqrt(fan_in)
        elif leaf == "bias":
            value = 0.1 * noise
        elif "scale" in leaf:
            value = 1 + noise / math.sqrt(shape[0])
        elif "shift" in leaf or "gate" in leaf:
            value = noise / math.sqrt(shape[0])
        else:  # norm weights
            value = 1 + 0.1 * noise
        param.copy_(value.to(param.dtype))
    return model


def random_dit(variant_or_config: str | NaDiTConfig, device: torch.device | str, dtype: torch.dtype,
               seed: int = 0) -> NaDiT:
    """A released-size (or given-config) NaDiT with random weights, materialised directly on ``device``."""
    config = NaDiTConfig.released(variant_or_config) if isinstance(variant_or_config, str) else variant_or_config
    with torch.device("meta"):
        model = NaDiT(config)
    model = model.to_empty(device=device).to(dtype)
    for key, value in model.rope_frequency_buffers().items():
        model.get_buffer(key).copy_(value)
    return randomize_(model, seed).eval().requires_grad_(False)


def random_vae(device: torch.device | str, dtype: torch.dtype, seed: int = 0,
               config: VAEConfig | None = None) -> VideoAutoencoder:
    """The released-size VAE with random weights on ``device``."""
    with torch.device("meta"):
        model = VideoAutoencoder(config or VAEConfig.released())
    model = model.to_empty(device=device).to(dtype)
    return randomize_(model, seed).eval().requires_grad_(False)
