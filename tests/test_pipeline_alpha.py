"""Alpha upscaling: bicubic + guided filter, with hard edges kept hard for cut-out masks."""
from __future__ import annotations

import pytest
import torch

from src.pipeline import alpha as Al


def _disc(size: int, radius: float, centre: float) -> torch.Tensor:
    """Binary disc sampled at pixel centres, (size, size)."""
    y, x = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    return (((y - centre) ** 2 + (x - centre) ** 2) <= radius**2).float()


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a & b).sum() / (a | b).sum()).item()


def test_binary_disc_stays_binary_with_its_edge_in_place():
    low = _disc(32, 10.3, 16.2).view(1, 1, 32, 32)
    analytic = _disc(128, 4 * 10.3, 4 * 16.2).bool()  # the same disc in output pixels
    inside = analytic.float()
    guide = torch.stack([0.1 + 0.8 * inside, torch.full_like(inside, 0.2), 0.9 - 0.7 * inside]).unsqueeze(0)
    out = Al.upscale_alpha(low, guide, (128, 128))
    assert out.shape == (1, 1, 128, 128)
    assert out.min() >= 0 and out.max() <= 1
    assert _iou(out[0, 0] > 0.5, analytic) > 0.97
    assert ((out < 0.05) | (out > 0.95)).float().mean() > 0.95  # still a cut-out, not a soft ramp


@pytest.mark.parametrize("value", [0.0, 0.3, 1.0])
def test_constant_alpha_stays_constant(value):
    alpha = torch.full((2, 1, 12, 20), value)
    guide = torch.rand(2, 3, 36, 60)  # a busy guide must not print its texture into a flat alpha
    out = Al.upscale_alpha(alpha, guide, (36, 60))
    assert out.shape == (2, 1, 36, 60)
    assert torch.allclose(out, torch.full_like(out, value), atol=1e-5)


def test_soft_alpha_ramp_is_preserved():
    ramp = torch.linspace(0.2, 0.8, 16).view(1, 1, 1, 16).expand(1, 1, 16, 16)
    assert not Al.is_near_binary(ramp)
    out = Al.upscale_alpha(ramp, torch.full((1, 3, 64, 64), 0.5), (64, 64))
    source_x = (torch.arange(64) + 0.5) / 4 - 0.5            # output pixel centres in input pixels
    expected = (0.2 + 0.6 * source_x / 15).expand(64, 64)    # the ramp continued linearly
    interior = (slice(8, -8), slice(8, -8))  # box filters keep linear ramps away from the borders
    assert torch.allclose(out[0, 0][interior], expected[interior], atol=2e-3)


def test_near_binary_detection():
    mask = torch.zeros(1, 1, 10, 10)
    mask[..., :5, :] = 1.0
    assert Al.is_near_binary(mask)
    mask[..., :1, :] = 0.5  # 10 % soft values: no longer a cut-out
    assert not Al.is_near_binary(mask)


def test_guided_filter_follows_guide_edges():
    guide = torch.zeros(1, 1, 32, 32)
    guide[..., 16:] = 1.0
    noisy = guide + 0.05 * torch.randn_like(guide)
    out = Al.guided_filter(guide, noisy, radius=3, eps=1e-3)
    assert (out - guide).abs().max() < 0.1           # the step survives
    assert (out - guide).std() < 0.5 * (noisy - guide).std()  # the noise is smoothed


def test_shape_errors():
    with pytest.raises(ValueError, match=r"\(N, 1, h, w\)"):
        Al.upscale_alpha(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 16, 16), (16, 16))
    with pytest.raises(ValueError, match="guide_rgb"):
        Al.upscale_alpha(torch.zeros(1, 1, 8, 8), torch.zeros(1, 3, 16, 12), (16, 16))
