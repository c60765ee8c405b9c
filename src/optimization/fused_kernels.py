"""Fused elementwise kernels for the DiT's hot spots: q/k RMSNorm + rope, modulated RMSNorm, gated residual,
SwiGLU.

The plain model runs each elementwise step as its own PyTorch op, which at high resolution means several
passes over large tensors per step.  Here the hand-written Triton kernels of :mod:`.dit_triton` do each chain
in one pass.  They are called by the fused DiT modules of :mod:`.dit_fused_modules` (swapped into a model by
``attach_fused_kernels``).  Every entry point returns the fused result, or None when the caller should run
its plain code: the kernels run on CUDA tensors of a supported dtype with Triton installed, without
autograd, and unless ``SEEDVR2_DIT_TRITON`` is 0/false/no/off.  A kernel that fails to import, compile or
launch logs one line and leaves its work to the plain path for good.

Inside a torch.compile'd block each kernel is an opaque custom operator (``torch.ops.seedvr2.dit_*``, with a
shape function for tracing): the launchers' Python is not traceable, and Inductor fuses the plain ops around
them as before.  Without the operators a compiled block would trace the plain code, whose fusions are slower
(docs/performance.md).  The operators are registered once per process: a second copy of this module (the
pack imported under another package name) reuses them.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
from typing import Any, Callable, Sequence

import torch

from .switches import env_switch

log = logging.getLogger("seedvr2")

TRITON_KERNELS_ENV = "SEEDVR2_DIT_TRITON"
# Devices whose tensors the kernels take; tests add "cpu" to run them under Triton's interpreter.
KERNEL_DEVICES = ("cuda",)

_module: Any = None  # dit_triton, imported by prepare_kernels() so that compiled code never imports it


def prepare_kernels() -> bool:
    """Import the kernel module now where the kernels can run here (tracing never imports it); returns
    whether it is loaded.  Called when the fused modules are attached to a model."""
    global _module
    if _module is None and triton_kernels_wanted() and triton_installed() and _kernel_device_present():
        try:
            _module = _load_dit_triton()
        except Exception:  # reported by the first eager call, which imports it again
            _module = None
    return _module is not None


def _kernel_device_present() -> bool:
    return any(device != "cuda" for device in KERNEL_DEVICES) or torch.cuda.is_available()


def triton_kernels_wanted() -> bool:
    """The DiT's Triton kernels (fp8 activation quantization included) unless ``SEEDVR2_DIT_TRITON`` is
    0/false/no/off (to compare with the plain path)."""
    return env_switch(TRITON_KERNELS_ENV, default=True)


@functools.cache
def triton_installed() -> bool:
    # Missing Triton (e.g. Windows without triton-windows) is a normal setup: no warning, the plain path.
    return importlib.util.find_spec("triton") is not None


def _load_dit_triton():
    """The Triton kernel module; importing it imports Triton, so only the first fused call does."""
    return importlib.import_module(".dit_triton", __package__)


def _wanted(*tensors: torch.Tensor) -> bool:
    """Whether the fused path applies to a call on ``tensors`` (the first one's device decides)."""
    return (
        tensors[0].device.type in KERNEL_DEVICES
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))  # no backward for kernels
        and triton_kernels_wanted()
        # While compiling, the module prepare_kernels() imported stands for Triton (the probe is not traced).
        and (_module is not None if torch.compiler.is_compiling() else triton_installed())
    )


class _TritonKernel:
    """One launcher of :mod:`.dit_triton` (``name``), called with its arguments; returns its result, or None
    when they are outside its preconditions (``<name>_supported``) or once importing, compiling or launching
    it has failed, after one log line.  While torch.compile traces, ``operator`` (the same arguments) stands
    in for the launcher (None: the plain code is traced)."""

    def __init__(self, name: str, label: str, operator: Callable[..., Any] | None):
        self.name, self.label, self.operator = name, label, operator
        self.failure: str | None = None

    def __call__(self, *args: Any) -> Any:
        if self.failure is not None:
            return None
        if torch.compiler.is_compiling():
            if self.operator is None or _module is None or not getattr(_module, f"{self.name}_supported")(*args):
                return None
            return self.operator(*args)
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


# ---------------------------------------------------------------------------------------------------
# The kernels as custom operators, for compiled blocks (each calls the launcher; the fake computes shapes)
# ---------------------------------------------------------------------------------------------------


def _custom_operator(name: str, implementation: Callable[..., Any], shapes: Callable[..., Any]) -> Any:
    """``implementation`` as the opaque operator ``seedvr2::<name>`` with ``shapes`` as its fake, or None on a
    torch without ``torch.library.custom_op`` (before 2.4): compiled blocks then trace the plain code.

    Registered once per process: torch.library is process-wide, while this module may be imported twice
    (``src.optimization`` and the pack under ComfyUI's package name).  A later copy reuses the operator,
    whose implementation is the same code, instead of replacing the one earlier compiled graphs call."""
    if not hasattr(torch.library, "custom_op"):
        return None
    if hasattr(torch.ops.seedvr2, name):
        return getattr(torch.ops.seedvr2, name).default   # the overload, as a custom_op call traces
    operator = torch.library.custom_op(f"seedvr2::{name}", mutates_args=())(implementation)
    operator.register_fake(shapes)
    return operator


def _qkv_norm_rope_launch(projections: list[torch.Tensor], q_weights: list[torch.Tensor],
                          k_weights: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, heads: int,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _load_dit_triton().qkv_norm_rope(list(zip(projections, q_weights, k_weights)), cos, sin, heads, eps)


def _qkv_norm_rope_shapes(projections, q_weights, k_weights, cos, sin, heads, eps):
    rows = sum(qkv.shape[0] for qkv in projections)
    return tuple(projections[0].new_empty((rows, heads, q_weights[0].shape[0])) for _ in range(3))


def _modulated_rms_norm_launch(x: torch.Tensor, eps: float, scale: torch.Tensor, shift: torch.Tensor,
                               lengths: list[int]) -> torch.Tensor:
    return _load_dit_triton().modulated_rms_norm(x, eps, scale, shift, lengths)


def _gated_residual_launch(residual: torch.Tensor, update: torch.Tensor, gate: torch.Tensor,
                           lengths: list[int]) -> torch.Tensor:
    return _load_dit_triton().gated_residual(residual, update, gate, lengths)


def _silu_mul_launch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _load_dit_triton().silu_mul(gate, up)


_qkv_norm_rope_operator = _custom_operator("dit_qkv_norm_rope", _qkv_norm_rope_launch, _qkv_norm_rope_shapes)
_modulated_rms_norm_operator = _custom_operator(
    "dit_modulated_rms_norm", _modulated_rms_norm_launch, lambda x, eps, scale, shift, lengths: x.new_empty(x.shape))
_gated_residual_operator = _custom_operator(
    "dit_gated_residual", _gated_residual_launch,
    lambda residual, update, gate, lengths: residual.new_empty(residual.shape))
_silu_mul_operator = _custom_operator("dit_silu_mul", _silu_mul_launch, lambda gate, up: torch.empty_like(up))


def _traced(operator: Any, adapt: Callable[..., tuple]) -> Callable[..., Any] | None:
    """The operator called with the launcher's arguments (``adapt`` maps them), or None without operators."""
    return None if operator is None else lambda *args: operator(*adapt(*args))


# Process-wide: one failure switches every DiT to the plain path for this kernel.
_qkv_norm_rope = _TritonKernel("qkv_norm_rope", "q/k RMSNorm + rope", _traced(
    _qkv_norm_rope_operator,
    lambda streams, cos, sin, heads, eps: (*([list(column) for column in zip(*streams)]), cos, sin, heads, eps)))
_modulated_rms_norm = _TritonKernel("modulated_rms_norm", "modulated RMSNorm", _traced(
    _modulated_rms_norm_operator, lambda x, eps, scale, shift, lengths: (x, eps, scale, shift, list(lengths))))
_gated_residual = _TritonKernel("gated_residual", "gated residual", _traced(
    _gated_residual_operator, lambda residual, update, gate, lengths: (residual, update, gate, list(lengths))))
_silu_mul = _TritonKernel("silu_mul", "SwiGLU", _traced(_silu_mul_operator, lambda gate, up: (gate, up)))


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


def gated_residual(residual: torch.Tensor, update: torch.Tensor, gate: torch.Tensor,
                   lengths: Sequence[int]) -> torch.Tensor | None:
    """``residual + update·gate[b]`` per sample b (rows by ``lengths``), or None for the plain path."""
    return _gated_residual(residual, update, gate, lengths) if _wanted(residual, update, gate) else None


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """``F.silu(gate) * up`` in one pass, or None to run the plain path."""
    return _silu_mul(gate, up) if _wanted(gate, up) else None
