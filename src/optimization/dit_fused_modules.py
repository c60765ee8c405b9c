"""The DiT's modules with the fused Triton kernels, swapped into a model in place of the plain ones.

Each class here is a subclass of a plain module of ``models.dit`` that overrides one elementwise chain with
the kernel of :mod:`.fused_kernels` and falls back to the plain method wherever the kernel does not apply
(not CUDA, no Triton, autograd, ``SEEDVR2_DIT_TRITON=0``, a failed kernel; see that module).  No parameter,
buffer or state-dict key changes: :func:`attach_fused_kernels` only changes the class of each matching
module (so hooks, compiled forwards and the weights stay where they are), :func:`detach_fused_kernels` puts
the plain classes back.  torch.compile guards on the module classes, so a compiled block recompiles once when
they change.
"""
from __future__ import annotations

import torch
from torch import nn

from ..models.dit.attention import JointWindowAttention
from ..models.dit.mlp import SwiGLUMLP
from ..models.dit.modulation import Modulation
from ..models.dit.window_plan import WindowPlan
from . import fused_kernels


class FusedSwiGLUMLP(SwiGLUMLP):
    """SwiGLU with ``SiLU(gate) ⊙ up`` in one kernel."""

    def gated_activation(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        hidden = fused_kernels.silu_mul(gate, up)
        return super().gated_activation(gate, up) if hidden is None else hidden


class FusedModulation(Modulation):
    """Modulation with the block's pre-norm + modulation and the gated residual each in one kernel."""

    def modulate_normalized(self, x: torch.Tensor, eps: float, time: torch.Tensor, slot: str,
                            lengths: tuple[int, ...]) -> torch.Tensor:
        scale, shift = self._scale_and_shift(time, slot)
        fused = fused_kernels.modulated_rms_norm(x, eps, scale, shift, lengths)
        return super().modulate_normalized(x, eps, time, slot, lengths) if fused is None else fused

    def add_gated(self, residual: torch.Tensor, update: torch.Tensor, time: torch.Tensor, slot: str,
                  lengths: tuple[int, ...]) -> torch.Tensor:
        fused = fused_kernels.gated_residual(residual, update, self._gate(time, slot), lengths)
        return super().add_gated(residual, update, time, slot, lengths) if fused is None else fused


class FusedJointWindowAttention(JointWindowAttention):
    """Joint window attention with q/k RMSNorm, the window rope and the v split in one kernel per stream."""

    def _norm_and_rotate(self, qkv_vid: torch.Tensor, qkv_txt: torch.Tensor,
                         plan: WindowPlan) -> tuple[torch.Tensor, ...]:
        fused = fused_kernels.qkv_norm_rope(
            [(qkv_vid, self.norm_q.video().weight, self.norm_k.video().weight),
             (qkv_txt, self.norm_q.text().weight, self.norm_k.text().weight)],
            *self.rope.tables(plan), self.heads, self.norm_q.video().eps)
        return super()._norm_and_rotate(qkv_vid, qkv_txt, plan) if fused is None else fused


FUSED_CLASSES: dict[type, type] = {
    SwiGLUMLP: FusedSwiGLUMLP,
    Modulation: FusedModulation,
    JointWindowAttention: FusedJointWindowAttention,
}
_PLAIN_CLASSES = {fused: plain for plain, fused in FUSED_CLASSES.items()}


def _swap_classes(model: nn.Module, classes: dict[type, type]) -> int:
    swapped = 0
    for module in model.modules():
        new_class = classes.get(type(module))
        if new_class is not None:
            module.__class__ = new_class
            swapped += 1
    return swapped


def attach_fused_kernels(model: nn.Module) -> int:
    """Give every plain DiT module under ``model`` that has a fused kernel its fused class; returns how many
    modules changed (0 when attached already).  Imports the kernel module where the kernels can run."""
    fused_kernels.prepare_kernels()
    return _swap_classes(model, FUSED_CLASSES)


def detach_fused_kernels(model: nn.Module) -> int:
    """The plain classes back on every fused module under ``model``; returns how many modules changed."""
    return _swap_classes(model, _PLAIN_CLASSES)


def has_fused_kernels(model: nn.Module) -> bool:
    """Whether any module under ``model`` has a fused class."""
    return any(type(module) in _PLAIN_CLASSES for module in model.modules())
