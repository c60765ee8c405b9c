"""Spatial tiling: encode or decode a large frame as overlapping tiles blended into one result.

Tiles are laid out on the latent grid (so encoder and decoder tiles align with latent pixels) and spread
evenly, neighbours overlapping by at least the requested overlap.  Each tile's output is weighted by a
separable raised-cosine cross-fade over its overlaps with neighbours; the weights are normalised to sum to
one everywhere, so the overlaps blend smoothly and non-overlapping areas are copied unchanged.

Tiling is not exact: GroupNorm statistics and the mid-block attention of a tile see only that tile.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ...pipeline.progress import checkpoint, part
from .errors import VAEInputError

# Tile sizes are whole multiples of 32 pixels (4 latent pixels), so tiles stay reasonably shaped at
# every level of the VAE.
TILE_MULTIPLE = 32


def latent_tiling(tile_size: int, tile_overlap: int, spatial_factor: int) -> tuple[int, int]:
    """Validate a tile size and overlap given in video pixels; return both in latent pixels."""
    multiple = max(TILE_MULTIPLE, spatial_factor)
    if not isinstance(tile_size, int) or tile_size < multiple or tile_size % multiple:
        lower = max(multiple, (tile_size // multiple) * multiple) if isinstance(tile_size, int) else multiple
        raise VAEInputError(
            f"VAE tile size must be a positive multiple of {multiple} pixels, got {tile_size!r}; "
            f"use e.g. {lower} or {lower + multiple}."
        )
    if not isinstance(tile_overlap, int) or tile_overlap < 0 or tile_overlap % spatial_factor:
        raise VAEInputError(
            f"VAE tile overlap must be a non-negative multiple of {spatial_factor} pixels, got {tile_overlap!r}."
        )
    if tile_overlap >= tile_size:
        raise VAEInputError(
            f"VAE tile overlap ({tile_overlap} px) must be smaller than the tile size ({tile_size} px); "
            f"a quarter of the tile size or less is typical."
        )
    return tile_size // spatial_factor, tile_overlap // spatial_factor


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of tiles of size ``tile`` covering ``[0, length)``, evenly spread so that
    neighbours overlap by at least ``overlap``; one span when the length fits in a tile."""
    if length <= tile:
        return [(0, length)]
    count = math.ceil((length - overlap) / (tile - overlap))
    # Integer spacing (length - tile) / (count - 1) <= tile - overlap, rounded per tile.
    starts = [i * (length - tile) // (count - 1) for i in range(count)]
    return [(start, start + tile) for start in starts]


def _raised_cosine(size: int) -> torch.Tensor:
    """Rises from near 0 to near 1 over ``size`` samples; ``ramp + ramp.flip(0) == 1``."""
    position = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    return 0.5 - 0.5 * torch.cos(math.pi * position)


def blend_weights(spans: list[tuple[int, int]], scale: int = 1) -> list[torch.Tensor]:
    """Per span (scaled by ``scale`` to output units), a float32 1-D weight over the span's extent:
    raised-cosine ramps across overlaps with the neighbours, normalised to sum to 1 at every position."""
    spans = [(start * scale, stop * scale) for start, stop in spans]
    weights = []
    for i, (start, stop) in enumerate(spans):
        weight = torch.ones(stop - start, dtype=torch.float64)
        if i > 0 and spans[i - 1][1] > start:
            rise = spans[i - 1][1] - start
            weight[:rise] *= _raised_cosine(rise)
        if i < len(spans) - 1 and spans[i + 1][0] < stop:
            fall = stop - spans[i + 1][0]
            weight[-fall:] *= _raised_cosine(fall).flip(0)
        weights.append(weight)
    total = torch.zeros(spans[-1][1], dtype=torch.float64)
    for (start, stop), weight in zip(spans, weights):
        total[start:stop] += weight
    return [(weight / total[start:stop]).float() for (start, stop), weight in zip(spans, weights)]


def run_tiled(
    run_tile: Callable[[torch.Tensor], torch.Tensor],
    source: torch.Tensor,
    *,
    tile: int,
    overlap: int,
    source_scale: int,
    out_scale: int,
) -> torch.Tensor:
    """Blend ``run_tile`` over spatial tiles of ``source`` (B, C, T, H, W).  ``tile`` and ``overlap`` are in
    latent pixels; one latent pixel is ``source_scale`` pixels of the source and ``out_scale`` of the output.
    The result, blended in float32 whatever the tiles' dtype, has the output's full size."""
    grid_h, grid_w = source.shape[3] // source_scale, source.shape[4] // source_scale
    rows, cols = tile_spans(grid_h, tile, overlap), tile_spans(grid_w, tile, overlap)
    row_weights, col_weights = blend_weights(rows, out_scale), blend_weights(cols, out_scale)
    out: Optional[torch.Tensor] = None
    tiles = len(rows) * len(cols)
    for row, ((top, bottom), row_weight) in enumerate(zip(rows, row_weights)):
        for col, ((left, right), col_weight) in enumerate(zip(cols, col_weights)):
            number = row * len(cols) + col
            checkpoint(number / tiles)
            with part(number, tiles):
                piece = run_tile(
                    source[:, :, :, top * source_scale:bottom * source_scale, left * source_scale:right * source_scale]
                )
            if out is None:
                out = torch.zeros(
                    (*piece.shape[:3], grid_h * out_scale, grid_w * out_scale), dtype=torch.float32, device=piece.device
                )
            weight = (row_weight[:, None] * col_weight[None, :]).to(piece.device)
            out[:, :, :, top * out_scale:bottom * out_scale, left * out_scale:right * out_scale].addcmul_(piece, weight)
            del piece
    return out
