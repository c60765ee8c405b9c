"""SeedVR2's causal 3-D video VAE (``models/video_vae_v3`` of the original project), checkpoint-faithful."""
from .autoencoder import VideoAutoencoder
from .config import VAEConfig
from .errors import VAEConfigError, VAEInputError
from .latent import SCALING_FACTOR, SHIFTING_FACTOR, from_dit_latent, sample_posterior, to_dit_latent

__all__ = [
    "SCALING_FACTOR",
    "SHIFTING_FACTOR",
    "VAEConfig",
    "VAEConfigError",
    "VAEInputError",
    "VideoAutoencoder",
    "from_dit_latent",
    "sample_posterior",
    "to_dit_latent",
]
