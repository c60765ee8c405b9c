"""One batch through SeedVR2: encode the condition, one DiT step, decode (golden README §7, steps 3–7).

These functions take loaded models and tensors and nothing else, so the golden pipeline cases can drive
them with the stored random draws, and the upscaler can drive them batch by batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.video_vae_v3 import VideoAutoencoder, from_dit_latent, sample_posterior, to_dit_latent
from ..models.video_vae_v3.banded import BandPlan
from .diffusion import VelocityModel, build_condition, sample


@dataclass
class RandomDraws:
    """The three random tensors of a batch, in the original's draw order."""

    eps: torch.Tensor        # (1, 16, t, h, w) posterior sample noise
    noise: torch.Tensor      # (t, h, w, 16) initial x_T
    aug_noise: torch.Tensor  # (t, h, w, 16) condition noise


def draw_randoms(seed: int, latent_shape: tuple[int, int, int], device: torch.device | str) -> RandomDraws:
    """Draw ε, x_T and the condition noise from ``seed`` on the CPU (identical on every device).

    Every batch is seeded the same way, so a frame's result does not depend on its batch's position.
    """
    t, h, w = latent_shape
    generator = torch.Generator("cpu").manual_seed(int(seed))
    eps = torch.randn((1, 16, t, h, w), generator=generator)
    noise = torch.randn((t, h, w, 16), generator=generator)
    aug_noise = torch.randn((t, h, w, 16), generator=generator)
    return RandomDraws(eps.to(device), noise.to(device), aug_noise.to(device))


@dataclass(frozen=True)
class VAETiling:
    """Spatial tiling of one VAE direction, in video pixels (None = untiled)."""

    tile_size: int | None = None
    tile_overlap: int = 128
    bands: BandPlan | None = None   # the memory planner's exact bands (instead of tile_size)


def encode_condition(vae: VideoAutoencoder, video: torch.Tensor, eps: torch.Tensor,
                     tiling: VAETiling = VAETiling()) -> torch.Tensor:
    """Condition latent ``(t, h, w, 16)`` in DiT space of a video ``(3, T, H, W)`` in [-1, 1] (T = 4n+1)."""
    return condition_latent(*encode_posterior(vae, video, tiling), eps)


def encode_posterior(vae: VideoAutoencoder, video: torch.Tensor,
                     tiling: VAETiling = VAETiling()) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior (mean, log-variance) of a video ``(3, T, H, W)``: the GPU work of :func:`encode_condition`,
    queued before its noise is needed, so drawing the noise on the CPU overlaps with it."""
    return vae.encode(video.unsqueeze(0), tile_size=tiling.tile_size, tile_overlap=tiling.tile_overlap,
                      band_plan=tiling.bands)


def condition_latent(mean: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The condition latent ``(t, h, w, 16)`` sampled from the posterior with noise ``eps``."""
    z = sample_posterior(mean, logvar, eps.to(mean.device, mean.dtype))
    return to_dit_latent(z)[0].permute(1, 2, 3, 0).contiguous()


def dit_velocity(dit: torch.nn.Module, positive: torch.Tensor, negative: torch.Tensor | None = None) -> VelocityModel:
    """Wrap the DiT as ``model_fn(vid (t,h,w,33), timestep (1,), negative) -> v (t,h,w,16)``."""

    def model_fn(vid: torch.Tensor, timestep: torch.Tensor, use_negative: bool) -> torch.Tensor:
        text = negative if use_negative else positive
        if text is None:
            raise ValueError("classifier-free guidance needs the negative text embedding.")
        t, h, w, channels = vid.shape
        out = dit(
            vid.reshape(-1, channels),
            text,
            torch.tensor([[t, h, w]], dtype=torch.long),
            torch.tensor([[text.shape[0]]], dtype=torch.long),
            timestep.reshape(1).float(),
        )
        return out.reshape(t, h, w, -1).to(vid.dtype)

    return model_fn


def restore_latent(model_fn: VelocityModel, cond_latent: torch.Tensor, draws: RandomDraws, *,
                   latent_noise_scale: float = 0.0, steps: int = 1, cfg_scale: float = 1.0,
                   cfg_rescale: float = 0.0) -> torch.Tensor:
    """The clean latent x̂₀ ``(t, h, w, 16)`` from the condition latent (one step at τ = 1000 by default)."""
    condition = build_condition(cond_latent, draws.aug_noise.to(cond_latent), latent_noise_scale)
    return sample(model_fn, draws.noise.to(cond_latent), condition, steps=steps,
                  cfg_scale=cfg_scale, cfg_rescale=cfg_rescale)


def decode_latent(vae: VideoAutoencoder, latent: torch.Tensor, tiling: VAETiling = VAETiling(),
                  output_device: torch.device | str | None = None) -> torch.Tensor:
    """Frames ``(T, 3, H, W)`` (not clamped) of a DiT-space latent ``(t, h, w, 16)``, in the VAE's dtype (its
    last convolution's): the caller widens a batch at a time."""
    z = from_dit_latent(latent).permute(3, 0, 1, 2).unsqueeze(0)
    video = vae.decode(z, tile_size=tiling.tile_size, tile_overlap=tiling.tile_overlap, output_device=output_device,
                       output_dtype=vae.dtype, band_plan=tiling.bands)
    return video[0].transpose(0, 1)
