"""Fused elementwise kernels for the DiT's hot spots: q/k RMSNorm + rope, modulated RMSNorm, SwiGLU.

The plain model runs each elementwise step as its own PyTorch op, which at 1080p means several passes
over 0.4-1.5 GB tensors per step.  Here the hand-written Triton kernels of :mod:`.dit_triton` do each chain
in one pass.  Every entry point returns the fused result, or None when the caller should run its plain
code: the kernels run only inside ``fused(True)`` (the pipeline's optimization switch), on CUDA tensors of a
supported dtype with Triton installed, without autograd, outside torch.compile tracing (Inductor fuses the
plain code of a compiled block itself), and unless ``SEEDVR2_DIT_TRITON`` is 0/false/no/off.  A kernel that
fails to import, compile or launch logs one line and leaves its work to the plain path for good.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

log = logging.getLogger("seedvr2")

TRITON_KERNELS_ENV = "SEEDVR2_DIT_TRITON"
# Devices whose tensors the kernels take; tests add "cpu" to run them under Triton's interpreter.
KERNEL_DEVICES = ("cuda",)

_enabled = False


@contextmanager
def fused(enabled: bool = True) -> Iterator[None]:
    """Use the fused kernels inside this block (where they apply, see the module docstring)."""
    global _enabled
    previous, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = previous


def _triton_kernels_wanted() -> bool:
    """The Triton kernels unless ``SEEDVR2_DIT_TRITON`` is 0/false/no/off (to compare with the plain path)."""
    return os.environ.get(TRITON_KERNELS_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@functools.cache
def _triton_installed() -> bool:
    # Missing Triton (e.g. Windows without triton-windows) is a normal setup: no warning, the plain path.
    return importlib.util.find_spec("triton") is not None


def _load_dit_triton():
    """The Triton kernel module; importing it imports Triton, so only the first fused call does."""
    return importlib.import_module(".dit_triton", __package__)


def _wanted(*tensors: torch.Tensor) -> bool:
    """Whether the fused path applies to a call on ``tensors`` (the first one's device decides)."""
    if torch.compiler.is_compiling():
        return False  # checked first: a traced call folds to the plain path
    return (
        _enabled and tensors[0].device.type in KERNEL_DEVICES
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))  # no backward for kernels
        and _triton_kernels_wanted() and _triton_installed()
    )


class _TritonKernel:
    """One launcher of :mod:`.dit_triton` (``name``), called with its arguments; returns its result, or None
    when they are outside its preconditions (``<name>_supported``) or once importing, compiling or launching
    it has failed, after one log line."""

    def __init__(self, name: str, label: str):
        self.name, self.label = name, label
        self.failure: str | None = None

    def __call__(self, *args: Any) -> Any:
        if self.failure is not None:
            return None
        try:
            kernels = _load_dit_triton()
            if not getattr(kernels, f"{self.name}_supported")(*args):
                return None
            return getattr(kernels, self.name)(*args)
        except torch.cuda.OutOfMemoryError:
            raise  # not a kernel problem: the caller must shrink the work
        except Exception as error:  # Triton/toolchain failure: the plain path computes the same
            lines = str(error).strip().splitlines()
            self.failure = f"{type(error).__name__}: {lines[0][:200] if lines else ''}"
            log.warning("SeedVR2: the Triton DiT %s kernel failed (%s); using the plain PyTorch path from now on",
                        self.label, self.failure)
            return None


# Process-wide: one failure switches every DiT to the plain path for this kernel.
_qkv_norm_rope = _TritonKernel("qkv_norm_rope", "q/k RMSNorm + rope")
_modulated_rms_norm = _TritonKernel("modulated_rms_norm", "modulated RMSNorm")
_silu_mul = _TritonKernel("silu_mul", "SwiGLU")


def qkv_norm_rope(streams: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], cos: torch.Tensor,
                  sin: torch.Tensor, heads: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """q, k, v (rows, heads, head_dim) from each stream's (qkv projection, norm_q weight, norm_k weight):
    q/k RMSNorm'd and rotated by the (cos, sin) table; or None to run the plain path."""
    tensors = [t for stream in streams for t in stream]
    return _qkv_norm_rope(streams, cos, sin, heads, eps) if _wanted(*tensors) else None


def modulated_rms_norm(x: torch.Tensor, eps: float, scale: torch.Tensor, shift: torch.Tensor,
                       lengths: Sequence[int]) -> torch.Tensor | None:
    """``rms_norm(x, eps)·scale[b] + shift[b]`` per sample b (rows by ``lengths``), or None for the plain path."""
    return _modulated_rms_norm(x, eps, scale, shift, lengths) if _wanted(x, scale, shift) else None


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """``F.silu(gate) * up`` in one pass, or None to run the plain path."""
    return _silu_mul(gate, up) if _wanted(gate, up) else None
