"""Route the nodes' optimization switches to the optimization package, per loaded model.

Called once per freshly loaded model.  With ``enable_optimizations`` off nothing but the explicit compile
settings applies, and the plain reference path (eager PyTorch, SDPA attention) is what executes.
"""
from __future__ import annotations

import logging

from . import torch_compile, vae_optimizer

log = logging.getLogger("seedvr2")


def optimize_model(managed, spec) -> None:
    """Apply the VAE runtime and the compile settings to a freshly loaded DiT or VAE.

    The DiT's attention backend and fused kernels are chosen per call by the pipeline, and its quantization
    at load time, so neither needs anything here.
    """
    lean_vae = managed.kind == "vae" and spec.enable_optimizations
    if lean_vae:
        vae_optimizer.optimize_vae(managed.model, quantization=spec.quantization)
    if spec.compile is None:
        return
    if managed.kind == "dit":
        torch_compile.compile_repeated_blocks(managed.model, spec.compile)
    elif lean_vae:
        log.info("SeedVR2: the optimized VAE path compiles its own kernels; the compile settings apply to the DiT.")
    else:
        torch_compile.compile_modules(managed.model, ("encoder", "decoder"), spec.compile)
