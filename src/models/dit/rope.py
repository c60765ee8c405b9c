"""Rotary position embedding of the window attention (README §4.8).

Frequency ``f_i`` rotates the consecutive channel pair (2i, 2i+1) of a head by ``position·f_i``; the head
channels are grouped [temporal | height | width | untouched rest].  Positions are local to the window, so
all windows of one shape (and text length) share one table.

* ``mmrope3d`` (3B): frequencies ``10000^(-2i/axis_dim)``; a video token at window offset (t', h', w') sits
  at (L + t', h', w'), text token j at (j, j, j); both streams are rotated.
* ``rope3d`` (7B): "pixel" frequencies ``π·linspace(1, 128, n)``; a video token's position along an axis of
  window extent n is ``linspace(-1, 1, n)[offset]``; text is not rotated.

Tables are computed from the config constants in float32, never from the checkpoint's ``freqs`` buffers.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

from .config import NaDiTConfig


def _frequencies(rope_type: str, axis_dim: int, device: torch.device | str | None) -> torch.Tensor:
    if rope_type == "mmrope3d":
        exponents = torch.arange(0, axis_dim, 2, device=device)[: axis_dim // 2].float() / axis_dim
        return 1.0 / (10000 ** exponents)
    return torch.linspace(1.0, 128.0, axis_dim // 2, dtype=torch.float32, device=device) * math.pi


def rope_frequencies(config: NaDiTConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """The per-axis rotary frequencies of ``config`` (float32): the constants of ``attn.rope.rope.freqs``."""
    return _frequencies(config.rope_type, config.rope_axis_dim, device)


def _window_positions(rope_type: str, shape: tuple[int, int, int], text_length: int,
                      device: torch.device) -> torch.Tensor:
    """(rows, 3) float32 positions of the rotated rows of one window's sequence, per axis."""
    if rope_type == "mmrope3d":
        axes = [torch.arange(n, dtype=torch.float32, device=device) for n in shape]
        axes[0] = axes[0] + text_length   # video frames follow the text positions
    else:
        axes = [torch.linspace(-1.0, 1.0, n, dtype=torch.float32, device=device) for n in shape]
    video = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    if rope_type != "mmrope3d":
        return video
    text = torch.arange(text_length, dtype=torch.float32, device=device)[:, None].expand(-1, 3)
    return torch.cat([video, text])


@functools.lru_cache(maxsize=256)
def rotary_table(rope_type: str, axis_dim: int, shape: tuple[int, int, int], text_length: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (rows, 3·n_freqs) float32, for a window of ``shape`` followed by its text."""
    freqs = _frequencies(rope_type, axis_dim, device)
    positions = _window_positions(rope_type, shape, text_length, device)
    angles = (positions[:, :, None] * freqs).flatten(1)   # pair p: axis p // n_freqs, frequency p % n_freqs
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the channel pairs of ``x`` (windows, seq, heads, head_dim) row by row with a table, in float32.

    Rows beyond the table (text under the 7B rope) and channels beyond its pairs are left unchanged.
    """
    rows, pairs = min(cos.shape[0], x.shape[1]), cos.shape[1]
    x0, x1 = x[:, :rows, :, : 2 * pairs].float().unflatten(-1, (pairs, 2)).unbind(-1)
    cos, sin = cos[:rows, None, :], sin[:rows, None, :]   # broadcast over windows and heads
    rotated = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2).to(x.dtype)
    out = torch.cat((rotated, x[:, :rows, :, 2 * pairs:]), dim=-1)
    return out if rows == x.shape[1] else torch.cat((out, x[:, rows:]), dim=1)


class RopeFrequencies(nn.Module):
    """Holds the checkpoint's persistent ``freqs`` buffer so original files load strictly; never read."""

    def __init__(self, config: NaDiTConfig):
        super().__init__()
        self.register_buffer("freqs", rope_frequencies(config), persistent=True)


class WindowRope(nn.Module):
    """The window-local 3-D rope of one attention layer (key ``attn.rope.rope.freqs``)."""

    def __init__(self, config: NaDiTConfig):
        super().__init__()
        self.rope = RopeFrequencies(config)   # nested to reproduce the released key name
        self.rope_type = config.rope_type
        self.axis_dim = config.rope_axis_dim

    def forward(self, x: torch.Tensor, shape: tuple[int, int, int], text_length: int) -> torch.Tensor:
        """Rotate ``x`` (windows, seq, heads, head_dim) for windows of ``shape`` followed by their text."""
        cos, sin = rotary_table(self.rope_type, self.axis_dim, shape, text_length, x.device)
        return apply_rotary(x, cos, sin)
