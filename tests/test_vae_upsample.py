"""The upsampler's 1x1 conv + pixel shuffle written by GEMMs straight into a padded channels-last buffer."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from src.models.video_vae_v3.resampling import pixel_shuffle_3d
from src.optimization.vae_upsample import shuffle_matrices, supports, upscale_shuffle_gemm_into

LAST = torch.channels_last_3d


@pytest.mark.parametrize("time_factor, drop_first_copy", [(1, False), (2, False), (2, True)])
@pytest.mark.parametrize("band_rows", [2, 64])  # bands that split the frame unevenly, and one band
def test_gemm_shuffle_equals_conv_then_pixel_shuffle(time_factor, drop_first_copy, band_rows):
    generator = torch.Generator().manual_seed(0)
    batch, in_channels, frames, height, width, channels = 2, 16, 3, 5, 7, 8
    x = torch.randn(batch, in_channels, frames, height, width, generator=generator).to(memory_format=LAST)
    weight = torch.randn(4 * time_factor * channels, in_channels, 1, 1, 1, generator=generator)
    bias = torch.randn(4 * time_factor * channels, generator=generator)
    expected = pixel_shuffle_3d(F.conv3d(x, weight, bias), time_factor)
    if drop_first_copy:
        expected = torch.cat([expected[:, :, :1], expected[:, :, 2:]], dim=2)
    # The destination: new frames after 2 look-back slots of a padded buffer, which must stay untouched.
    buffer = torch.full((batch, channels, expected.shape[2] + 2, 2 * height, 2 * width), float("nan"))
    buffer = buffer.to(memory_format=LAST)
    new_frames = buffer[:, :, 2:]
    assert supports(x, new_frames)
    upscale_shuffle_gemm_into(x, shuffle_matrices(weight, bias, time_factor), new_frames, band_rows=band_rows,
                              drop_first_copy=drop_first_copy)
    torch.testing.assert_close(new_frames, expected, rtol=1e-5, atol=1e-5)
    assert torch.isnan(buffer[:, :, :2]).all()


def test_without_bias_the_bias_column_adds_nothing():
    x = torch.randn(1, 8, 1, 3, 4).to(memory_format=LAST)
    weight = torch.randn(32, 8, 1, 1, 1)
    out = torch.empty(1, 8, 1, 6, 8).to(memory_format=LAST)
    upscale_shuffle_gemm_into(x, shuffle_matrices(weight, None, 1), out, band_rows=3, drop_first_copy=False)
    torch.testing.assert_close(out, pixel_shuffle_3d(F.conv3d(x, weight), 1), rtol=1e-5, atol=1e-5)


def test_supports_only_channels_last_frames():
    x = torch.randn(1, 8, 2, 3, 4)
    assert not supports(x, x.to(memory_format=LAST))
    assert supports(x.to(memory_format=LAST), x.to(memory_format=LAST))
