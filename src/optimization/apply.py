"""Route the nodes' optimization switches to the optimization package, per loaded model.

Everything here is skipped when ``enable_optimizations`` is off, which leaves the plain reference path
(eager PyTorch, SDPA attention) for comparison.
"""
from __future__ import annotations

import logging

from . import torch_compile

log = logging.getLogger("seedvr2")


def optimize_model(managed, spec) -> None:
    """Apply compile settings (and the other switches) to a freshly loaded DiT or VAE."""
    if spec.compile is not None:
        if managed.kind == "dit":
            torch_compile.compile_repeated_blocks(managed.model, spec.compile)
        else:
            torch_compile.compile_modules(managed.model, ("encoder", "decoder"), spec.compile)
