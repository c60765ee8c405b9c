"""The optimized VAE's fast schedule, run over the plain module tree of ``models.video_vae_v3``.

One file per module type (convolution, resampling, resnet, mid block, level, encoder/decoder); each reads
the plain module's weights and attributes and computes its ``forward`` with the runtime's kernels
(``vae_optimizer.VAERuntime``).  :class:`VAEExecutor` is what ``optimize_vae`` attaches to a model.
"""
from .executor import VAEExecutor

__all__ = ["VAEExecutor"]
