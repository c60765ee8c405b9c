"""Exact FLOP counts of a phase, obtained by running the model on the meta device (no memory, no time)."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..models.dit import NaDiT, NaDiTConfig
from ..models.video_vae_v3 import VAEConfig, VideoAutoencoder


def _count(run) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        run()
    return int(counter.get_total_flops())


def dit_flops(config: NaDiTConfig, latent_shape: tuple[int, int, int], text_len: int = 58) -> int:
    """FLOPs of one DiT forward on one sample of latent grid ``(t, h, w)``."""
    with torch.device("meta"):
        model = NaDiT(config)
        t, h, w = latent_shape
        vid = torch.empty(t * h * w, config.vid_in_channels)
        txt = torch.empty(text_len, config.txt_in_dim)
        timestep = torch.empty(1)
    shapes = torch.tensor([[t, h, w]]), torch.tensor([[text_len]])
    return _count(lambda: model(vid, txt, *shapes, timestep))


def vae_flops(config: VAEConfig, frames: int, height: int, width: int) -> tuple[int, int]:
    """(encode, decode) FLOPs for a clip of ``frames`` (4n+1) frames of ``height`` x ``width`` pixels."""
    with torch.device("meta"):
        model = VideoAutoencoder(config)
        video = torch.empty(1, 3, frames, height, width)
        f = config.spatial_downsample_factor
        latent = torch.empty(1, config.latent_channels, (frames - 1) // 4 + 1, height // f, width // f)
    encode = _count(lambda: model.encode(video))
    decode = _count(lambda: model.decode(latent))
    return encode, decode
