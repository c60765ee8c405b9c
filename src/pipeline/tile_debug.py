"""The VAE loader's ``tile_debug`` view: the VAE tiles drawn onto the output frames.

Useful to see where tile seams could appear and how large the overlaps are; encode tiles are drawn red,
decode tiles blue.  The tiles are those the VAE really used (same spans as its tiling).
"""
from __future__ import annotations

import torch

from ..models.video_vae_v3.tiling import latent_tiling, tile_spans
from .settings import TILE_DEBUG_MODES  # noqa: F401  (the loader's choices; checked by VAESpec)
_COLORS = {"encode": (1.0, -1.0, -1.0), "decode": (-1.0, -1.0, 1.0)}  # model range [-1, 1]
LINE_WIDTH = 2


def tile_boxes(padded_size: tuple[int, int], tile_size: int, tile_overlap: int,
               spatial_factor: int = 8) -> list[tuple[int, int, int, int]]:
    """Pixel boxes ``(top, bottom, left, right)`` of the VAE tiles of a frame of ``padded_size`` pixels."""
    tile, overlap = latent_tiling(tile_size, tile_overlap, spatial_factor)
    rows = tile_spans(padded_size[0] // spatial_factor, tile, overlap)
    cols = tile_spans(padded_size[1] // spatial_factor, tile, overlap)
    f = spatial_factor
    return [(r0 * f, r1 * f, c0 * f, c1 * f) for r0, r1 in rows for c0, c1 in cols]


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
