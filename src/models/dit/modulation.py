"""Adaptive modulation ("ada single", README §4.4): time-embedding slices plus learned vectors.

The time embedding ``E`` of a sample (6·d values) is read as ``(d, slot, role)`` with slots (attn, mlp)
and roles (shift, scale, gate).  A stream's learned vectors ``<slot>_{shift,scale,gate}`` are *added* to
the slices — the learned scale is ≈ 1, so there is no ``1 +``.  Every token uses its own sample's ``E``.
"""
from __future__ import annotations

import torch
from torch import nn

from .normalization import rms_norm

ATTN_SLOT, MLP_SLOT = 0, 1
SHIFT, SCALE, GATE = 0, 1, 2


def _per_sample(op, lengths: tuple[int, ...], *tokens: torch.Tensor) -> torch.Tensor:
    """``op(b, *segments)`` on each sample's token rows; a single sample broadcasts without splitting."""
    if len(lengths) == 1:
        return op(0, *tokens)
    segments = zip(*(t.split(lengths) for t in tokens))
    return torch.cat([op(b, *parts) for b, parts in enumerate(segments)])


class Modulation(nn.Module):
    """Learned shift/scale (and gate) vectors for named slots, e.g. ``attn_shift``, ``mlp_gate``."""

    def __init__(self, dim: int, slots: tuple[str, ...], with_gate: bool = True):
        super().__init__()
        self.slots = slots
        for slot in slots:
            self.register_parameter(f"{slot}_shift", nn.Parameter(torch.zeros(dim)))
            self.register_parameter(f"{slot}_scale", nn.Parameter(torch.ones(dim)))
            if with_gate:
                self.register_parameter(f"{slot}_gate", nn.Parameter(torch.zeros(dim)))

    def _scale_and_shift(self, time: torch.Tensor, slot: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift), each (B, d): ``sc + <slot>_scale`` and ``sh + <slot>_shift``."""
        return time[..., SCALE] + getattr(self, f"{slot}_scale"), time[..., SHIFT] + getattr(self, f"{slot}_shift")

    def _gate(self, time: torch.Tensor, slot: str) -> torch.Tensor:
        """(B, d): ``ga + <slot>_gate``."""
        return time[..., GATE] + getattr(self, f"{slot}_gate")

    def modulate(self, x: torch.Tensor, time: torch.Tensor, slot: str, lengths: tuple[int, ...]) -> torch.Tensor:
        """``x·(sc + <slot>_scale) + (sh + <slot>_shift)``; ``time`` (B, d, 3) is the sample's E slice."""
        scale, shift = self._scale_and_shift(time, slot)
        return _per_sample(lambda b, seg: torch.addcmul(shift[b], seg, scale[b]), lengths, x)

    def modulate_normalized(self, x: torch.Tensor, eps: float, time: torch.Tensor, slot: str,
                            lengths: tuple[int, ...]) -> torch.Tensor:
        """``modulate(rms_norm(x, eps), time, slot, lengths)``: the block's pre-norm (no weight), modulated."""
        return self.modulate(rms_norm(x, eps), time, slot, lengths)

    def add_gated(self, residual: torch.Tensor, update: torch.Tensor, time: torch.Tensor, slot: str,
                  lengths: tuple[int, ...]) -> torch.Tensor:
        """``residual + update·(ga + <slot>_gate)`` per sample."""
        gate = self._gate(time, slot)
        return _per_sample(lambda b, res, upd: torch.addcmul(res, upd, gate[b]), lengths, residual, update)
