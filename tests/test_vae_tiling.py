"""Spatial tiling of the video VAE: tile layout, blend weights, exact placement of every tile's output,
composition with temporal slicing, and the measured tiled-vs-untiled tolerance."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

from src.models.video_vae_v3 import VAEInputError
from src.models.video_vae_v3.tiling import blend_weights, latent_tiling, run_tiled, tile_spans

pytestmark = pytest.mark.usefixtures("single_thread")

FRAME = 128                 # test frames are FRAME x FRAME pixels (16 x 16 latents)
TILE, OVERLAP = 96, 32      # -> latent spans [0, 12) and [4, 16) on both axes: 2 x 2 tiles overlapping by 8
LATENT_SPANS = [(0, 12), (4, 16)]




@pytest.fixture(scope="module")
def vae(tiny_vae):
    return tiny_vae


def _smooth(shape: tuple[int, ...], factor: int, seed: int) -> torch.Tensor:
    """Low-resolution N(0,1) noise (1/factor of the size) upsampled bicubically: a smooth random field."""
    b, c, t, h, w = shape
    low = torch.randn(b * t, c, h // factor, w // factor, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False).view(b, t, c, h, w).transpose(1, 2)


def _smooth_video(frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Like the golden encode inputs: smooth noise plus a little fine noise, clamped to [-1, 1]."""
    fine = torch.randn(1, 3, frames, height, width, generator=torch.Generator().manual_seed(seed + 100))
    return (0.6 * _smooth((1, 3, frames, height, width), 16, seed) + 0.05 * fine).clamp(-1, 1)


def _smooth_latent(frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return _smooth((1, 16, frames, height, width), 4, seed + 50)


# ------------------------------------------------------------------------------------------- layout


@pytest.mark.parametrize(
    "length, tile, overlap",
    [(16, 12, 4), (16, 8, 2), (100, 32, 8), (33, 32, 0), (25, 12, 8), (64, 16, 15), (9, 4, 1)],
)
def test_tile_spans_cover_with_requested_overlap(length, tile, overlap):
    spans = tile_spans(length, tile, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(stop - start == tile for start, stop in spans)
    for (start, stop), (next_start, _) in zip(spans, spans[1:]):
        assert start < next_start and stop - next_start >= overlap, spans
    # No tile could be dropped: one fewer would leave a gap or an overlap below the request.
    assert (len(spans) - 1) * (tile - overlap) + overlap < length


def test_frame_that_fits_gets_one_span():
    assert tile_spans(12, 12, 4) == [(0, 12)]
    assert tile_spans(5, 12, 4) == [(0, 5)]


@pytest.mark.parametrize(
    "rows, cols, scale",
    [
        (LATENT_SPANS, LATENT_SPANS, 1),
        (LATENT_SPANS, [(0, 16)], 8),
        (tile_spans(25, 12, 8), tile_spans(100, 32, 8), 1),  # rows: three tiles overlapping at once
    ],
)
def test_blend_weights_sum_to_one(rows, cols, scale):
    height, width = rows[-1][1] * scale, cols[-1][1] * scale
    total = torch.zeros(height, width, dtype=torch.float64)
    coverage = torch.zeros(height, width)
    for (top, bottom), row_weight in zip(rows, blend_weights(rows, scale)):
        for (left, right), col_weight in zip(cols, blend_weights(cols, scale)):
            weight = row_weight[:, None] * col_weight[None, :]
            assert weight.shape == ((bottom - top) * scale, (right - left) * scale)
            assert weight.min() > 0 and weight.max() <= 1
            total[top * scale:bottom * scale, left * scale:right * scale] += weight.double()
            coverage[top * scale:bottom * scale, left * scale:right * scale] += 1
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-6)
    # Where only one tile covers a position it is copied unweighted.
    only_one = coverage == 1
    assert only_one.any()
    assert torch.all(total[only_one] == 1)


def test_blend_is_a_smooth_cross_fade():
    first, second = blend_weights(LATENT_SPANS)
    fade = first[4:]  # the overlap [4, 12) is the first tile's positions 4..11, the second's 0..7
    assert torch.all(first[:4] == 1) and torch.all(second[8:] == 1)
    assert torch.all(fade[1:] < fade[:-1])  # falls monotonically
    torch.testing.assert_close(fade + second[:8], torch.ones(8))
    torch.testing.assert_close(fade, second[:8].flip(0))  # symmetric raised cosine


@pytest.mark.parametrize("direction", ["encode", "decode"])
def test_run_tiled_reassembles_pointwise_maps_exactly(direction):
    # For a map without spatial context, tiled and whole evaluation must agree to rounding.
    if direction == "encode":
        source, source_scale, out_scale = torch.randn(1, 3, 2, 128, 96), 8, 1
        def fn(x): return F.avg_pool3d(x, (1, 8, 8))
    else:
        source, source_scale, out_scale = torch.randn(1, 3, 2, 16, 12), 1, 8
        def fn(x): return F.interpolate(x, scale_factor=(1, 8, 8), mode="nearest")
    tiled = run_tiled(fn, source, tile=8, overlap=2, source_scale=source_scale, out_scale=out_scale)
    torch.testing.assert_close(tiled, fn(source), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "tile, overlap, fragment",
    [
        (100, 16, "multiple of 32"),
        (0, 0, "multiple of 32"),
        (64.0, 16, "multiple of 32"),
        (64, 12, "multiple of 8"),
        (64, -8, "non-negative"),
        (64, 64, "smaller than the tile size"),
    ],
)
def test_invalid_tiling_is_rejected(tile, overlap, fragment):
    with pytest.raises(VAEInputError, match=fragment):
        latent_tiling(tile, overlap, 8)


def test_invalid_tiling_is_rejected_by_encode_and_decode(vae):
    with pytest.raises(VAEInputError, match="multiple of 32"):
        vae.encode(torch.zeros(1, 3, 1, 16, 16), tile_size=40)
    with pytest.raises(VAEInputError, match="smaller than the tile size"):
        vae.decode(torch.zeros(1, 16, 1, 2, 2), tile_size=32, tile_overlap=32)


# ------------------------------------------------------------------------------------- the real VAE


@pytest.fixture(scope="module")
def encoded(vae):
    video = _smooth_video(1, FRAME, FRAME)
    tiles = {
        (r, c): vae.encode(video[:, :, :, 8 * r0:8 * r1, 8 * c0:8 * c1])[0]
        for r, (r0, r1) in enumerate(LATENT_SPANS)
        for c, (c0, c1) in enumerate(LATENT_SPANS)
    }
    return {
        "video": video,
        "whole": vae.encode(video),
        "tiled": vae.encode(video, tile_size=TILE, tile_overlap=OVERLAP),
        "tiles": tiles,
    }


@pytest.fixture(scope="module")
def decoded(vae):
    z = _smooth_latent(1, FRAME // 8, FRAME // 8)
    tiles = {
        (r, c): vae.decode(z[:, :, :, r0:r1, c0:c1])
        for r, (r0, r1) in enumerate(LATENT_SPANS)
        for c, (c0, c1) in enumerate(LATENT_SPANS)
    }
    return {"z": z, "whole": vae.decode(z), "tiled": vae.decode(z, tile_size=TILE, tile_overlap=OVERLAP), "tiles": tiles}


def _assert_tiles_placed(tiled: torch.Tensor, tiles: dict, scale: int) -> None:
    """Exclusive regions equal the owning tile exactly; overlaps lie between the covering tiles' values."""
    low = torch.full_like(tiled, float("inf"))
    high = torch.full_like(tiled, float("-inf"))
    for (r, c), piece in tiles.items():
        (r0, r1), (c0, c1) = LATENT_SPANS[r], LATENT_SPANS[c]
        region = (..., slice(r0 * scale, r1 * scale), slice(c0 * scale, c1 * scale))
        low[region] = torch.minimum(low[region], piece)
        high[region] = torch.maximum(high[region], piece)
    assert torch.all(tiled >= low - 1e-6) and torch.all(tiled <= high + 1e-6)
    # Corners [0, 4) and [12, 16) (latent units) belong to one tile only.
    first, last = slice(0, 4 * scale), slice(12 * scale, 16 * scale)
    assert torch.equal(tiled[..., first, first], tiles[0, 0][..., first, first])
    assert torch.equal(tiled[..., last, last], tiles[1, 1][..., slice(8 * scale, 12 * scale), slice(8 * scale, 12 * scale)])
    assert torch.equal(tiled[..., first, last], tiles[0, 1][..., first, slice(8 * scale, 12 * scale)])


def test_encode_tiles_are_placed_and_blended(encoded):
    _assert_tiles_placed(encoded["tiled"][0], encoded["tiles"], scale=1)


def test_decode_tiles_are_placed_and_blended(decoded):
    _assert_tiles_placed(decoded["tiled"], decoded["tiles"], scale=8)


def test_tiled_is_close_to_untiled(encoded, decoded):
    """Tiled vs untiled on smooth inputs, 128x128 frames in 2 x 2 tiles of 96 px with 32 px overlap.

    Not exact: every GroupNorm and the mid-block attention of a tile see only that tile.  The tiny
    golden model has random weights, so each GroupNorm depends strongly on the tile's content and the
    differences are large: measured over 10 seeds, rel 0.15..0.35 (mean), 0.14..0.32 (logvar),
    0.24..0.47 (decoded video); this seed gives 0.24, 0.22, 0.28.  Bound 0.5: above every measured
    seed, below what misplaced or unnormalised tiles give (rel near 1 or more).  Exact placement and
    blending are checked by the other tests.
    """
    mean, logvar = encoded["tiled"]
    assert rel_err(mean, encoded["whole"][0]) <= 0.5
    assert rel_err(logvar, encoded["whole"][1]) <= 0.5
    assert rel_err(decoded["tiled"], decoded["whole"]) <= 0.5


def test_single_tile_is_exactly_untiled(vae, encoded, decoded):
    for tile in (FRAME, 2 * FRAME):
        mean, logvar = vae.encode(encoded["video"], tile_size=tile, tile_overlap=OVERLAP)
        assert torch.equal(mean, encoded["whole"][0]) and torch.equal(logvar, encoded["whole"][1])
        assert torch.equal(vae.decode(decoded["z"], tile_size=tile, tile_overlap=OVERLAP), decoded["whole"])


def test_tiling_composes_with_temporal_slicing(vae):
    # 9 frames = 2 causal chunks inside each of 2 x 2 tiles (32 px tiles, 16 px overlap on 48 px frames).
    video = _smooth_video(9, 48, 48, seed=1)
    sliced = vae.encode(video, tile_size=32, tile_overlap=16)
    whole = vae.encode(video, tile_size=32, tile_overlap=16, temporal_slicing=False)
    assert sliced[0].shape == (1, 16, 3, 6, 6)
    assert rel_err(sliced[0], whole[0]) <= 1e-5 and rel_err(sliced[1], whole[1]) <= 1e-5
    z = _smooth_latent(3, 6, 6, seed=1)
    sliced = vae.decode(z, tile_size=32, tile_overlap=16)
    assert sliced.shape == (1, 3, 9, 48, 48)
    assert rel_err(sliced, vae.decode(z, tile_size=32, tile_overlap=16, temporal_slicing=False)) <= 1e-5
