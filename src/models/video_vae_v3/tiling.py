"""Validation of the tiling inputs (tile size and overlap in video pixels).

Tiling itself is exact banded execution (:mod:`.banded`): a tile size bounds the pixels of a band, and the
overlap, kept so that saved workflows and scripts stay valid, is no longer needed (nothing is blended).
"""
from __future__ import annotations

from .errors import VAEInputError

# Tile sizes are whole multiples of 32 pixels (4 latent pixels), as the loader's widgets step.
TILE_MULTIPLE = 32


def check_tiling(tile_size: int, tile_overlap: int, spatial_factor: int) -> None:
    """Raise VAEInputError for a tile size that is not a positive multiple of 32 pixels, or an overlap that
    is negative, not a multiple of the spatial factor, or not smaller than the tile."""
    multiple = max(TILE_MULTIPLE, spatial_factor)
    if not isinstance(tile_size, int) or isinstance(tile_size, bool) or tile_size < multiple or tile_size % multiple:
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
            f"tiles are exact now, so 0 is fine."
        )
