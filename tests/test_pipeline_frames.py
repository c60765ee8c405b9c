"""Frame preprocessing: target size, resize, padding, ranges and the 8-bit output conversion."""
from __future__ import annotations

import pytest
import torch

from conftest import golden_cases
from src.pipeline import frames as Fr
from src.pipeline import media


@pytest.mark.parametrize(
    "h, w, resolution, max_resolution, expected",
    [
        (1080, 1920, 1080, 0, (1080, 1920)),   # unchanged
        (480, 854, 1080, 0, (1080, 1920)),     # 854·1080/480 = 1921.5 -> 1921 -> even 1920
        (1920, 1080, 720, 0, (1280, 720)),     # portrait, downscale
        (1080, 1920, 2160, 2560, (1440, 2560)),  # long edge capped, aspect kept
        (100, 100, 511, 0, (510, 510)),        # odd sizes round down to even
        (1000, 10, 16, 64, (64, 2)),           # extreme aspect: never below 2 pixels
    ],
)
def test_target_size(h, w, resolution, max_resolution, expected):
    assert Fr.target_size(h, w, resolution, max_resolution) == expected


def test_target_size_never_exceeds_the_requested_edges():
    for h, w in [(333, 777), (1079, 1921), (17, 4000)]:
        for resolution, cap in [(720, 0), (1080, 1500), (99, 0)]:
            out_h, out_w = Fr.target_size(h, w, resolution, cap)
            assert out_h % 2 == 0 and out_w % 2 == 0
            assert min(out_h, out_w) <= resolution
            assert cap == 0 or max(out_h, out_w) <= cap
            # aspect ratio within the rounding of one even step
            assert abs(out_w / out_h - w / h) <= 2.0 * (w / h) / min(out_h, out_w) + 2.0 / out_h


def test_target_size_errors():
    with pytest.raises(ValueError, match="at least 16"):
        Fr.target_size(100, 100, 8)
    with pytest.raises(ValueError, match="positive size"):
        Fr.target_size(0, 100, 720)
    with pytest.raises(ValueError, match="max_resolution"):
        Fr.target_size(100, 100, 720, 10)


def test_resize_frames_shape_range_and_constant_image():
    frames = torch.rand(3, 3, 20, 30)
    out = Fr.resize_frames(frames, (48, 72))
    assert out.shape == (3, 3, 48, 72)
    assert out.min() >= 0 and out.max() <= 1
    flat = torch.full((2, 3, 40, 60), 0.25)
    for size in [(80, 120), (16, 24)]:  # bicubic weights sum to 1 up and down (antialiased)
        assert torch.allclose(Fr.resize_frames(flat, size), torch.full((2, 3, *size), 0.25), atol=1e-6)


def test_resize_frames_antialiases_when_shrinking():
    stripes = torch.zeros(1, 1, 64, 64)
    stripes[..., ::2] = 1.0  # finest possible detail: must average out, not alias
    small = Fr.resize_frames(stripes, (16, 16))[..., 2:-2]  # away from the border taps
    assert torch.allclose(small, torch.full_like(small, 0.5), atol=0.01)


def test_resize_frames_errors():
    with pytest.raises(ValueError, match="empty"):
        Fr.resize_frames(torch.zeros(0, 3, 8, 8), (16, 16))
    with pytest.raises(ValueError, match="float"):
        Fr.resize_frames(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), (16, 16))
    with pytest.raises(ValueError, match="positive"):
        Fr.resize_frames(torch.zeros(1, 3, 8, 8), (0, 16))


def test_pad_to_multiple_and_crop_round_trip():
    x = torch.rand(2, 3, 5, 37, 50)
    padded = Fr.pad_to_multiple(x, 16)
    assert padded.shape == (2, 3, 5, 48, 64)
    assert torch.equal(Fr.crop(padded, 37, 50), x)
    # replicate padding: the extra rows/columns repeat the last real ones
    assert torch.equal(padded[..., 37:, :50], x[..., 36:37, :].expand(-1, -1, -1, 11, -1))
    assert torch.equal(padded[..., :37, 50:], x[..., :, 49:50].expand(-1, -1, -1, -1, 14))
    aligned = torch.rand(1, 3, 32, 16)
    assert Fr.pad_to_multiple(aligned) is aligned
    with pytest.raises(ValueError, match="crop"):
        Fr.crop(aligned, 33, 16)


def test_ranges_are_inverse():
    x = torch.rand(4, 3, 8, 8)
    assert torch.allclose(Fr.from_model_range(Fr.to_model_range(x)), x)
    assert Fr.to_model_range(torch.tensor([0.0, 0.5, 1.0])).tolist() == [-1.0, 0.0, 1.0]


def _to_uint8(x):
    """The product's path from model output to 8-bit levels: back to [0, 1] as the upscaler returns
    frames, then the writers' conversion (any layout here, as one row of one-channel pixels)."""
    levels = media.frame_to_uint8(Fr.from_model_range(x.float().clamp(-1.0, 1.0)).reshape(1, -1, 1))
    return torch.from_numpy(levels).reshape(x.shape)


def test_to_uint8_rounds_half_to_even_and_clips():
    assert _to_uint8(torch.tensor([-1.0, 1.0, 3.0, -2.0, 0.0])).tolist() == [0, 255, 255, 0, 128]
    # float32 inputs for which 255·(x·0.5 + 0.5) evaluates to exactly 128.5 and 252.5: ties go to
    # the even level (round half away from zero would give 129 and 253).
    ties = torch.tensor([0.007843137718737125, 0.9803920984268188], dtype=torch.float32)
    assert (255 * (ties * 0.5 + 0.5)).tolist() == [128.5, 252.5]
    assert _to_uint8(ties).tolist() == [128, 252]


@pytest.mark.parametrize("name", ["video5", "pad3", "image1"])
def test_to_uint8_matches_golden_output(name):
    c = golden_cases("pipeline_cases.safetensors")[name]
    out = _to_uint8(c["colorfixed"].permute(0, 2, 3, 1))
    assert out.dtype == torch.uint8
    assert torch.equal(out, c["output_uint8"])
