"""Window partition of one sample's patched token grid (README §4.7), in pure Python.

Windows have a roughly fixed size in tokens (a 45×80 grid, i.e. 720p after the VAE and patching, split
into the layer's window counts), whatever the input size.  "win" tiles each axis from 0; "swin" shifts the
tiling by half a window on every axis that has more than one window.
"""
from __future__ import annotations

import math

from .config import SWIN, WIN

Interval = tuple[int, int]                      # half-open [start, stop)
Window = tuple[Interval, Interval, Interval]    # (t, h, w) intervals

_REFERENCE_AREA = 45 * 80     # token grid of a 720p frame
_MAX_WINDOW_FRAMES = 30


def window_size(grid: tuple[int, int, int], counts: tuple[int, int, int]) -> tuple[int, int, int]:
    """Window extent (wt, wh, ww) in tokens for a (t, h, w) grid and window counts (n_t, n_h, n_w)."""
    t, h, w = grid
    n_t, n_h, n_w = counts
    scale = math.sqrt(_REFERENCE_AREA / (h * w))
    # Python's round() rounds half to even, as the original does.
    resized_h, resized_w = round(h * scale), round(w * scale)
    if resized_h < 1 or resized_w < 1:
        raise ValueError(f"token grid {h}×{w} has an aspect ratio too extreme for window attention; "
                         "crop or pad the input closer to a normal aspect ratio")
    return math.ceil(min(t, _MAX_WINDOW_FRAMES) / n_t), math.ceil(resized_h / n_h), math.ceil(resized_w / n_w)


def _tiled(extent: int, size: int) -> list[Interval]:
    return [(j * size, min((j + 1) * size, extent)) for j in range(math.ceil(extent / size))]


def _shifted(extent: int, size: int) -> list[Interval]:
    if size >= extent:
        return [(0, extent)]
    intervals = [
        (max(int((j - 0.5) * size), 0), min(int((j + 0.5) * size), extent))
        for j in range(math.ceil((extent - 0.5) / size) + 1)
    ]
    return [(start, stop) for start, stop in intervals if stop > start]


def partition_windows(grid: tuple[int, int, int], counts: tuple[int, int, int], method: str) -> list[Window]:
    """The windows of a (t, h, w) token grid, enumerated w outermost, then h, then t (as the original)."""
    if method == WIN:
        axis_intervals = _tiled
    elif method == SWIN:
        axis_intervals = _shifted
    else:
        raise ValueError(f"unknown window method {method!r}; expected {WIN!r} or {SWIN!r}")
    sizes = window_size(grid, counts)
    t_list, h_list, w_list = (axis_intervals(extent, size) for extent, size in zip(grid, sizes))
    return [(t_range, h_range, w_range) for w_range in w_list for h_range in h_list for t_range in t_list]
