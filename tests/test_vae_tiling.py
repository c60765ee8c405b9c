"""Spatial tiling of the video VAE, i.e. exact banded execution: banded encode and decode equal the untiled
ones (rel 1e-5 in float32) on the golden VAE, for bands that cut through every level (odd sizes included),
on the plain and on the optimized path, with temporal slicing; the statistics merge and the input checks."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

from src.models.video_vae_v3 import VAEInputError, banded
from src.models.video_vae_v3.banded import BandPlan, GroupStats
from src.models.video_vae_v3.tiling import check_tiling
from src.optimization.vae_optimizer import optimize_vae

pytestmark = pytest.mark.usefixtures("single_thread")

# 72 x 56 pixels: 72/36/18/9 x 56/28/14/7 through the levels, odd at the bottleneck.
HEIGHT, WIDTH = 72, 56
EXACT = 1e-5


@pytest.fixture(scope="module")
def vae(tiny_vae):
    return tiny_vae


@pytest.fixture(scope="module")
def optimized_vae(tiny_vae):
    """The golden VAE on the optimized path with the GPU's layout choices (channels-last, channel padding)."""
    model = copy.deepcopy(tiny_vae)
    optimize_vae(model, channels_last=True, pad_channels=True)
    return model


def _smooth(shape: tuple[int, ...], factor: int, seed: int) -> torch.Tensor:
    """Low-resolution N(0,1) noise (1/factor of the size) upsampled bicubically: a smooth random field."""
    b, c, t, h, w = shape
    low = torch.randn(b * t, c, h // factor, w // factor, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False).view(b, t, c, h, w).transpose(1, 2)


def _video(frames: int, height: int = HEIGHT, width: int = WIDTH, seed: int = 0) -> torch.Tensor:
    """Like the golden encode inputs: smooth noise plus a little fine noise, clamped to [-1, 1]."""
    fine = torch.randn(1, 3, frames, height, width, generator=torch.Generator().manual_seed(seed + 100))
    return (0.6 * _smooth((1, 3, frames, height, width), 8, seed) + 0.05 * fine).clamp(-1, 1)


def _latent(frames: int, height: int = HEIGHT // 8, width: int = WIDTH // 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 16, frames, height, width, generator=torch.Generator().manual_seed(seed + 50))


@pytest.fixture(scope="module")
def clips(vae, optimized_vae):
    """Inputs and untiled outputs of both paths: a 9-frame clip (3 causal chunks) and a single image."""
    video, z = _video(9), _latent(3)
    return {
        "video": video, "z": z,
        "plain": (vae.encode(video), vae.decode(z)),
        "optimized": (optimized_vae.encode(video), optimized_vae.decode(z)),
    }


def _assert_exact(encoded, decoded, reference) -> None:
    (mean, logvar), video = reference
    assert rel_err(encoded[0], mean) <= EXACT and rel_err(encoded[1], logvar) <= EXACT
    assert rel_err(decoded, video) <= EXACT


# Bands of 1, 2, 3 and 5 rows cut every level (the bottleneck is 9 rows); 3 and 5 leave a short last band.
@pytest.mark.parametrize("path, rows", [("plain", 1), ("plain", 3), ("optimized", 2), ("optimized", 5)])
def test_banded_equals_untiled(vae, optimized_vae, clips, path, rows):
    model = vae if path == "plain" else optimized_vae
    plan = BandPlan(band_rows=rows)
    encoded = model.encode(clips["video"], band_plan=plan)
    decoded = model.decode(clips["z"], band_plan=plan)
    assert decoded.shape == clips[path][1].shape
    _assert_exact(encoded, decoded, clips[path])


@pytest.mark.parametrize("path", ["plain", "optimized"])
def test_tile_size_runs_exact_bands(vae, optimized_vae, path):
    # A 32 px tile: bands of 1024 pixels, 14 rows at the 72-row input level, 36 (all) at the 28-wide one.
    model = vae if path == "plain" else optimized_vae
    video, z = _video(1, seed=3), _latent(1, seed=3)
    encoded = model.encode(video, tile_size=32, tile_overlap=0)
    decoded = model.decode(z, tile_size=32, tile_overlap=16)
    _assert_exact(encoded, decoded, (model.encode(video), model.decode(z)))


def test_banded_without_temporal_slicing_and_odd_frame_size(vae):
    # 40 x 88 pixels: 5 x 11 latents; one 9-frame chunk in one go.
    video, z = _video(9, 40, 88, seed=5), _latent(3, 5, 11, seed=5)
    plan = BandPlan(band_pixels=3 * 11)  # 1 row at 88 px, 3 at 11 px wide
    encoded = vae.encode(video, band_plan=plan, temporal_slicing=False)
    decoded = vae.decode(z, band_plan=plan, temporal_slicing=False)
    _assert_exact(encoded, decoded, (vae.encode(video, temporal_slicing=False), vae.decode(z, temporal_slicing=False)))


def test_attention_query_chunks_are_exact(vae, clips, monkeypatch):
    # 63 bottleneck tokens in chunks of 5 queries (the last one shorter).
    monkeypatch.setattr(banded, "ATTENTION_CHUNK_ELEMENTS", 5 * 63)
    plan = BandPlan(band_rows=4)
    _assert_exact(vae.encode(clips["video"], band_plan=plan), vae.decode(clips["z"], band_plan=plan), clips["plain"])


def test_single_tile_is_exactly_untiled(vae):
    video, z = _video(1, seed=7), _latent(1, seed=7)
    for tile in (96, 128):
        mean, logvar = vae.encode(video, tile_size=tile, tile_overlap=32)
        whole = vae.encode(video)
        assert torch.equal(mean, whole[0]) and torch.equal(logvar, whole[1])
        assert torch.equal(vae.decode(z, tile_size=tile, tile_overlap=32), vae.decode(z))


# ------------------------------------------------------------------------------------------ pieces


def test_group_stats_merge_bands_of_any_size():
    x = torch.randn(2, 12, 3, 17, 5, dtype=torch.float32) * 3 + 1
    stats = GroupStats(4, torch.float64)
    for top, bottom in ((0, 1), (1, 8), (8, 9), (9, 17)):
        stats.add(x[:, :, :, top:bottom])
    var, mean = torch.var_mean(x.double().view(2, 4, 3, 3, 17, 5), dim=(2, 4, 5), correction=0)
    torch.testing.assert_close(stats.mean, mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(stats.m2 / stats.count, var, rtol=1e-6, atol=1e-7)
    norm = torch.nn.GroupNorm(4, 12, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    scale, shift = stats.scale_shift(norm)
    expected = torch.stack([F.group_norm(x[:, :, t], 4, norm.weight, norm.bias, 1e-6) for t in range(3)], dim=2)
    got = x * scale[..., None, None] + shift[..., None, None]
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-5)


def test_band_spans_cover_every_row_once():
    assert BandPlan(band_rows=4).spans(9, 100) == [(0, 4), (4, 8), (8, 9)]
    assert BandPlan(band_pixels=250).spans(5, 100) == [(0, 2), (2, 4), (4, 5)]
    assert BandPlan(band_pixels=10).spans(3, 100) == [(0, 1), (1, 2), (2, 3)]  # at least one row


@pytest.mark.parametrize("kwargs", [{}, {"band_rows": 2, "band_pixels": 4}, {"band_rows": 0}, {"band_pixels": 1.5}])
def test_invalid_band_plan_is_rejected(kwargs):
    with pytest.raises(ValueError, match="BandPlan"):
        BandPlan(**kwargs)


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
        check_tiling(tile, overlap, 8)


def test_invalid_tiling_is_rejected_by_encode_and_decode(vae):
    with pytest.raises(VAEInputError, match="multiple of 32"):
        vae.encode(torch.zeros(1, 3, 1, 16, 16), tile_size=40)
    with pytest.raises(VAEInputError, match="smaller than the tile size"):
        vae.decode(torch.zeros(1, 16, 1, 2, 2), tile_size=32, tile_overlap=32)


def test_tile_debug_boxes_are_the_full_resolution_bands():
    from src.pipeline.tile_debug import band_boxes, tile_boxes

    boxes = band_boxes((100, 64), BandPlan(band_pixels=64 * 30))
    assert boxes == [(0, 30, 0, 64), (30, 60, 0, 64), (60, 90, 0, 64), (90, 100, 0, 64)]
    # A tile size means bands of tile_size² pixels: 64² px at 160 wide = 25 rows.
    assert tile_boxes((96, 160), 64, 16) == [(0, 25, 0, 160), (25, 50, 0, 160), (50, 75, 0, 160), (75, 96, 0, 160)]
