"""Fused elementwise kernels for the DiT's hot spots, compiled once and shared by every layer.

The plain model runs each elementwise step as its own PyTorch op, which at 1080p means several passes
over 0.4-1.5 GB tensors per step.  Here the same math is compiled (Inductor, dynamic shapes) into one
kernel per step.  Used only on CUDA, only inside ``fused(True)`` (the pipeline's optimization switch), and
only while compiling works: any failure logs one line and the plain path takes over for good.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from . import torch_compile

log = logging.getLogger("seedvr2")

_enabled = False
_compiled: dict[str, Callable] = {}
_failed: set[str] = set()


@contextmanager
def fused(enabled: bool = True) -> Iterator[None]:
    """Use the fused kernels inside this block (when on CUDA and compilation is allowed)."""
    global _enabled
    previous, _enabled = _enabled, enabled and torch_compile.compile_enabled()
    try:
        yield
    finally:
        _enabled = previous


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the channel pairs of the first ``len(cos)`` rows of ``x`` (rows, heads, head_dim) in float32."""
    rows, pairs = cos.shape
    x0, x1 = x[:rows, :, : 2 * pairs].float().unflatten(-1, (pairs, 2)).unbind(-1)
    c, s = cos[:, None, :], sin[:, None, :]
    rotated = torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1).flatten(-2).to(x.dtype)
    head = torch.cat((rotated, x[:rows, :, 2 * pairs:]), dim=-1)
    return head if rows == x.shape[0] else torch.cat((head, x[rows:]), dim=0)


_REFERENCES = {"rotary": rotary_reference}


def _kernel(name: str) -> Callable | None:
    if name in _failed:
        return None
    if name not in _compiled:
        torch_compile.configure_compile_cache()
        _compiled[name] = torch.compile(_REFERENCES[name], dynamic=True, fullgraph=True)
    return _compiled[name]


def _run(name: str, *args: torch.Tensor) -> torch.Tensor | None:
    """The fused kernel's result, or None when the caller should run its plain code."""
    if not _enabled or not args[0].is_cuda:
        return None
    kernel = _kernel(name)
    if kernel is None:
        return None
    try:
        return kernel(*args)
    except Exception as exc:  # compile errors surface here on first use; never fail the user's run
        _failed.add(name)
        log.warning("SeedVR2: fused %s kernel unavailable (%s: %s); using the plain PyTorch path.",
                    name, type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
        return None


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """Fused rotary embedding (see :func:`rotary_reference`), or None to run the plain path."""
    return _run("rotary", x, cos, sin)
