"""Rotary position embedding of the window attention (README §4.8).

Frequency ``f_i`` rotates the consecutive channel pair (2i, 2i+1) of a head by ``position·f_i``; the head
channels are grouped [temporal | height | width | untouched rest].  Positions are local to the window: each
token's position comes from the layer's window plan, so the rotation runs once per token, before the
windows are gathered.

* ``mmrope3d`` (3B): frequencies ``10000^(-2i/axis_dim)``; a video token at window offset (t', h', w') sits
  at (L + t', h', w'), text token j at (j, j, j); both streams are rotated.
* ``rope3d`` (7B): "pixel" frequencies ``π·linspace(1, 128, n)``; a video token's position along an axis of
  window extent n is ``linspace(-1, 1, n)[offset]``; text is not rotated.

Tables are computed from the config constants in float32, never from the checkpoint's ``freqs`` buffers.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import NaDiTConfig
from .window_plan import WindowPlan


def _frequencies(rope_type: str, axis_dim: int, device: torch.device | str | None) -> torch.Tensor:
    if rope_type == "mmrope3d":
        exponents = torch.arange(0, axis_dim, 2, device=device)[: axis_dim // 2].float() / axis_dim
        return 1.0 / (10000 ** exponents)
    return torch.linspace(1.0, 128.0, axis_dim // 2, dtype=torch.float32, device=device) * math.pi


def rope_frequencies(config: NaDiTConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """The per-axis rotary frequencies of ``config`` (float32): the constants of ``attn.rope.rope.freqs``."""
    return _frequencies(config.rope_type, config.rope_axis_dim, device)


def token_positions(rope_type: str, plan: WindowPlan) -> torch.Tensor:
    """(rows, 3) float32 positions of the rotated rows of ``[video; text]``, per axis, for one layer's windows.

    Positions are local to each token's window; the 7B rotates video rows only (the text rows come last,
    so its table simply stops after the video rows).
    """
    if rope_type == "mmrope3d":
        video = plan.video_offset.float()
        video[:, 0] += plan.video_text_length.float()   # video frames follow the text positions
        text = plan.text_position.float()[:, None].expand(-1, 3)
        return torch.cat([video, text])
    # linspace(-1, 1, n)[offset] (an axis of extent 1 sits at -1), read from a table of torch.linspace values
    # built on the host from the plan's window extents, so the values are exactly linspace's.
    longest = max(max(group.shape) for group in plan.groups)
    table = torch.zeros(longest + 1, longest)
    for n in range(1, longest + 1):
        table[n, :n] = torch.linspace(-1.0, 1.0, n)
    table = table.to(plan.video_offset.device)
    return table[plan.video_extent, plan.video_offset]


def rotary_rows(rope_type: str, axis_dim: int, plan: WindowPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (rotated rows, 3·n_freqs) float32, cached on the plan (one per layer windowing)."""
    key = ("rotary", rope_type, axis_dim)
    if key not in plan.cache:
        freqs = _frequencies(rope_type, axis_dim, plan.video_offset.device)
        angles = (token_positions(rope_type, plan)[:, :, None] * freqs).flatten(1)  # pair p: axis p // n_freqs
        plan.cache[key] = (angles.cos(), angles.sin())
    return plan.cache[key]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the channel pairs of ``x`` (rows, heads, head_dim) row by row with a table, in float32.

    Rows beyond the table (text under the 7B rope) and channels beyond its pairs are left unchanged.
    """
    rows, pairs = cos.shape
    x0, x1 = x[:rows, :, : 2 * pairs].float().unflatten(-1, (pairs, 2)).unbind(-1)
    cos, sin = cos[:, None, :], sin[:, None, :]   # broadcast over heads
    rotated = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    out = x.clone()
    out[:rows, :, : 2 * pairs] = rotated
    return out


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

    def tables(self, plan: WindowPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of every rotated row of [video; text] for this layer's windows (see :func:`rotary_rows`)."""
        return rotary_rows(self.rope_type, self.axis_dim, plan)

    def forward(self, x: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
        """Rotate ``x`` (rows of [video; text], heads, head_dim) by each row's window-local position."""
        cos, sin = self.tables(plan)
        return apply_rotary(x, cos, sin)
