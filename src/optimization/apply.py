"""The one place where the nodes' and the command line's switches reach the models.

:func:`optimize_model` runs once per freshly loaded model (the VAE's executor, compilation);
:func:`configure_dit` at the start of every DiT phase (attention backend, fused kernels, the memory plan's
token chunks: choices that can differ between runs of one cached model).  Quantization is applied while
loading (``quantized_load``).  With ``enable_optimizations`` off the plain reference path (eager PyTorch,
SDPA attention) is what executes.
"""
from __future__ import annotations

import logging

from . import dit_chunking, dit_fused_modules, attention_dispatch, torch_compile, vae_optimizer

log = logging.getLogger("seedvr2")


def optimize_model(managed, spec) -> None:
    """Apply the VAE runtime and the compile settings to a freshly loaded DiT or VAE.

    The DiT's per-run choices are :func:`configure_dit`'s.
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


def configure_dit(model, spec, chunk_rows: int | None) -> None:
    """This run's execution choices on the DiT's modules: the attention backend and the fused kernels (plain
    SDPA and plain modules with ``enable_optimizations`` off) and the memory plan's exact token chunks."""
    optimized = spec.enable_optimizations
    attention_dispatch.use_backend(model, spec.attention_mode if optimized else attention_dispatch.PLAIN)
    if optimized:
        dit_fused_modules.attach_fused_kernels(model)
    else:
        dit_fused_modules.detach_fused_kernels(model)
    dit_chunking.use_token_chunks(model, chunk_rows)
