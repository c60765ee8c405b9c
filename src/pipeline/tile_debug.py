"""The VAE loader's ``tile_debug`` view: the VAE's row bands drawn onto the output frames.

Tiling is exact (banded execution, no seams); the view shows how the frame was cut to bound memory: encode
bands are drawn red, decode bands blue, as the VAE ran them at full resolution (the planner's choice when
it tiled by itself).
"""
from __future__ import annotations

import torch

from ..models.video_vae_v3.banded import BandPlan
from ..models.video_vae_v3.tiling import check_tiling
from ..options import check_implemented

# The loader's choices: off, or the direction whose bands are drawn.  A literal, read without importing this
# module (src.options); VAESpec checks the loader's value against it.
TILE_DEBUG_MODES = ("false", "encode", "decode")
_COLORS = {"encode": (1.0, -1.0, -1.0), "decode": (-1.0, -1.0, 1.0)}  # model range [-1, 1]
check_implemented(__name__, TILE_DEBUG_MODES, ("false", *_COLORS))
LINE_WIDTH = 2


def tile_boxes(padded_size: tuple[int, int], tile_size: int, tile_overlap: int = 0,
               spatial_factor: int = 8) -> list[tuple[int, int, int, int]]:
    """Pixel boxes ``(top, bottom, left, right)`` of the full-resolution bands of a frame of ``padded_size``
    pixels tiled with ``tile_size`` (bands of ``tile_size²`` pixels)."""
    check_tiling(tile_size, tile_overlap, spatial_factor)
    return band_boxes(padded_size, BandPlan.from_tile_size(tile_size))


def band_boxes(padded_size: tuple[int, int], plan: BandPlan) -> list[tuple[int, int, int, int]]:
    """Pixel boxes of the bands ``plan`` gives a full-resolution layer of ``padded_size`` pixels."""
    height, width = padded_size
    return [(top, bottom, 0, width) for top, bottom in plan.spans(height, width)]


def draw_tiles(frames: torch.Tensor, boxes: list[tuple[int, int, int, int]], direction: str) -> torch.Tensor:
    """Outline ``boxes`` on ``frames`` (N, 3, H, W) in [-1, 1], in place; boxes are clipped to the frame."""
    color = torch.tensor(_COLORS[direction], dtype=frames.dtype, device=frames.device).view(1, 3, 1, 1)
    height, width = frames.shape[-2:]
    for top, bottom, left, right in boxes:
        bottom, right = min(bottom, height), min(right, width)
        if top >= bottom or left >= right:
            continue
        for rows, cols in (((top, top + LINE_WIDTH), (left, right)), ((bottom - LINE_WIDTH, bottom), (left, right)),
                           ((top, bottom), (left, left + LINE_WIDTH)), ((top, bottom), (right - LINE_WIDTH, right))):
            frames[..., max(rows[0], 0):rows[1], max(cols[0], 0):cols[1]] = color
    return frames
