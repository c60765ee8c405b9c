"""Colour correction: the wavelet fix against the goldens (README §7.2), the other modes by their math."""
from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import golden_cases, rel_err
from src.pipeline import color_correction as C


def _smooth_rgb(n: int = 2, size: int = 64) -> torch.Tensor:
    """Smooth random RGB frames in [0, 1] (low-res noise upsampled), like natural images."""
    return F.interpolate(torch.rand(n, 3, 8, 8), size=(size, size), mode="bilinear", align_corners=False)


def _quantiles(x: torch.Tensor) -> torch.Tensor:
    return torch.quantile(x.reshape(-1).float(), torch.linspace(0.0, 1.0, 101))


def test_wavelet_matches_golden_colorfix():
    case = golden_cases("diffusion_cases.safetensors")["colorfix"]
    out = C.color_correct(case["content"], case["style"], "wavelet")
    assert rel_err(out, case["out"]) <= 1e-6
    assert out.abs().max() > 1.0  # no clamp: the golden output leaves [-1, 1] as well


@pytest.mark.parametrize("name", ["video5", "pad3", "image1", "steps3_cfg2", "video5_7b"])
def test_wavelet_matches_pipeline_colorfixed(name):
    c = golden_cases("pipeline_cases.safetensors")[name]
    frames = c["input_video"].shape[1]
    out = C.color_correct(c["vae_decoded"][:frames], c["input_video"].permute(1, 0, 2, 3), "wavelet")
    assert rel_err(out, c["colorfixed"]) <= 2e-5


@pytest.mark.parametrize("radius", [1, 4, 16])
def test_blur_is_the_dilated_binomial_convolution(radius):
    x = torch.randn(2, 3, 9, 13)  # radius 16 exceeds the image: replicate padding still defines it
    kernel = (torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16).expand(3, 1, 3, 3)
    expected = F.conv2d(F.pad(x, (radius,) * 4, mode="replicate"), kernel, dilation=radius, groups=3)
    assert torch.allclose(C._blur(x, radius), expected, atol=1e-6)


@pytest.mark.parametrize("method", C.METHODS)
def test_every_method_leaves_matching_colours_alone(method):
    frames = _smooth_rgb() * 2 - 1
    out = C.color_correct(frames, frames, method)
    assert out.shape == frames.shape and out.dtype == frames.dtype
    assert torch.allclose(out, frames, atol=1e-5)


def test_method_and_shape_errors():
    x = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match="lab, wavelet, wavelet_adaptive, hsv, adain, none"):
        C.color_correct(x, x, "histogram")
    with pytest.raises(ValueError, match="resize"):
        C.color_correct(x, torch.zeros(1, 3, 8, 6), "wavelet")
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        C.color_correct(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), "lab")


def test_low_precision_input_keeps_its_dtype():
    frames = (_smooth_rgb() * 2 - 1).bfloat16()
    assert C.color_correct(frames, frames, "lab").dtype == torch.bfloat16


def test_adain_gives_style_statistics_per_frame_and_channel():
    content = torch.randn(3, 3, 32, 32) * 0.3 + 0.2
    style = torch.rand(3, 3, 32, 32) * 1.5 - 0.9
    out = C.color_correct(content, style, "adain")
    assert torch.allclose(out.mean(dim=(2, 3)), style.mean(dim=(2, 3)), atol=1e-5)
    assert torch.allclose(out.std(dim=(2, 3)), style.std(dim=(2, 3)), rtol=1e-3)


# BT.709 Y′PbPr from R′G′B′ (ITU-R BT.709-6, items 3.2-3.3): Y′ = 0.2126 R′ + 0.7152 G′ + 0.0722 B′,
# Pb = (B′ − Y′) / 1.8556, Pr = (R′ − Y′) / 1.5748.
_KR, _KB = 0.2126, 0.0722
_TO_YPBPR = np.array([
    [_KR, 1 - _KR - _KB, _KB],
    [-_KR / 1.8556, -(1 - _KR - _KB) / 1.8556, (1 - _KB) / 1.8556],
    [(1 - _KR) / 1.5748, -(1 - _KR - _KB) / 1.5748, -_KB / 1.5748],
])


def _ypbpr(frames: torch.Tensor) -> np.ndarray:
    return np.einsum("ij,njhw->nihw", _TO_YPBPR, frames.double().numpy())


def test_luma_is_adain_on_the_luma_in_ypbpr_with_the_chroma_kept():
    """Expectation built independently in float64: to Y′PbPr, standardise Y′ per frame and give it the style's
    mean and std (with adain's eps), keep Pb and Pr, and back through the inverse matrix."""
    content = _smooth_rgb(3) * 1.6 - 0.7
    content[1] = content[1] * 0.3 - 0.2   # a dim, flat frame: the statistics are per frame
    style = _smooth_rgb(3) * 2 - 1
    content_ypbpr, style_y = _ypbpr(content), _ypbpr(style)[:, 0]
    y = content_ypbpr[:, 0]
    eps = 1e-5
    c_mean, c_std = y.mean(axis=(1, 2), keepdims=True), np.sqrt(y.var(axis=(1, 2), keepdims=True) + eps)
    s_mean = style_y.mean(axis=(1, 2), keepdims=True)
    s_std = np.sqrt(style_y.var(axis=(1, 2), keepdims=True) + eps)
    expected_ypbpr = content_ypbpr.copy()
    expected_ypbpr[:, 0] = (y - c_mean) / c_std * s_std + s_mean
    expected = np.einsum("ij,njhw->nihw", np.linalg.inv(_TO_YPBPR), expected_ypbpr)

    out = C.color_correct(content, style, "luma")
    assert out.dtype == content.dtype and out.shape == content.shape
    assert np.abs(out.double().numpy() - expected).max() < 1e-5
    out_ypbpr = _ypbpr(out)
    assert np.abs(out_ypbpr[:, 1:] - content_ypbpr[:, 1:]).max() < 1e-5   # the model's chroma
    assert np.allclose(out_ypbpr[:, 0].mean(axis=(1, 2)), style_y.mean(axis=(1, 2)), atol=1e-5)
    # The style's std, up to adain's eps (it counts on the dim frame, whose Y′ has a std of about 0.07).
    assert np.allclose(out_ypbpr[:, 0].std(axis=(1, 2)), style_y.std(axis=(1, 2)), rtol=2e-3)


def test_luma_corrects_each_frame_on_its_own():
    content, style = _smooth_rgb(4) * 2 - 1, _smooth_rgb(4) * 1.2 - 0.5
    together = C.color_correct(content, style, "luma")
    for n in range(4):
        alone = C.color_correct(content[n : n + 1], style[n : n + 1], "luma")
        assert torch.allclose(together[n : n + 1], alone, atol=1e-6)


def test_lab_round_trip_and_reference_values():
    rgb = torch.rand(2, 3, 16, 16)
    assert (C.lab_to_rgb(C.rgb_to_lab(rgb)) - rgb).abs().max() <= 1e-5
    corners = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]).view(3, 3, 1, 1)
    expected = torch.tensor([[100.0, 0.0, 0.0], [53.24, 80.09, 67.20], [32.30, 79.19, -107.86]])
    assert torch.allclose(C.rgb_to_lab(corners).view(3, 3), expected, atol=0.02)


def test_histogram_match_reproduces_reference_chroma():
    content_lab = C.rgb_to_lab(_smooth_rgb() ** 0.5)
    style_lab = C.rgb_to_lab(torch.rand(3, 3, 40, 40))  # another size and distribution
    for ch in (1, 2):  # a*, b*
        matched = C.match_histogram(content_lab[:, ch], style_lab[:, ch])
        spread = style_lab[:, ch].max() - style_lab[:, ch].min()
        assert (_quantiles(matched) - _quantiles(style_lab[:, ch])).abs().max() <= 0.005 * spread
        # Monotone: the ordering of the content values is kept.
        order = content_lab[:, ch].reshape(-1).argsort()
        assert (matched.reshape(-1)[order].diff() >= -1e-5).all()


def test_histogram_match_on_subsampled_large_input_is_reproducible():
    source = torch.randn(600_000)            # more than the 2^18 values a quantile table is built from
    reference = torch.rand(500_000) * 4 - 1
    matched = C.match_histogram(source, reference)
    assert (_quantiles(matched[1:-1]) - _quantiles(reference)).abs()[1:-1].max() <= 0.02
    assert torch.equal(matched, C.match_histogram(source, reference))


def test_histogram_match_ties_map_to_the_middle_of_their_quantile_range():
    source = torch.zeros(1000)
    source[:300] = 1.0
    matched = C.match_histogram(source, torch.linspace(0.0, 1.0, 1000))
    assert matched[300:].unique().item() == pytest.approx(0.35, abs=0.01)  # middle of the lowest 70 %
    assert matched[:300].unique().item() == pytest.approx(0.85, abs=0.01)  # middle of the top 30 %


def test_lab_removes_a_colour_cast():
    style = _smooth_rgb() * 2 - 1
    cast = (style + torch.tensor([0.2, 0.0, -0.1]).view(1, 3, 1, 1)).clamp(-1, 1)
    out = C.color_correct(cast, style, "lab")
    assert (out - style).abs().mean() < 0.01 < (cast - style).abs().mean()
    assert out.min() >= -1 and out.max() <= 1


def test_hsv_conversion_matches_colorsys():
    rgb = torch.rand(1, 3, 4, 8)
    hsv = C.rgb_to_hsv(rgb)
    pixels = rgb[0].reshape(3, -1).T.tolist()
    expected = torch.tensor([colorsys.rgb_to_hsv(*p) for p in pixels]).T.reshape(1, 3, 4, 8)
    assert torch.allclose(hsv, expected, atol=1e-6)
    assert torch.allclose(C.hsv_to_rgb(hsv), rgb, atol=1e-6)


def _oversaturated(rgb: torch.Tensor) -> torch.Tensor:
    hsv = C.rgb_to_hsv(rgb)
    hsv[:, 1] = hsv[:, 1] ** 0.4  # same hue and value, saturation pushed up
    return C.hsv_to_rgb(hsv)


def test_hsv_undoes_an_oversaturation_per_hue():
    style = _smooth_rgb()
    out = C.color_correct(_oversaturated(style) * 2 - 1, style * 2 - 1, "hsv")
    assert (out - (style * 2 - 1)).abs().max() < 0.01


def test_wavelet_adaptive_pulls_oversaturated_areas_towards_the_style():
    style = _smooth_rgb() * 2 - 1
    content = _oversaturated(style * 0.5 + 0.5) * 2 - 1
    adaptive = C.color_correct(content, style, "wavelet_adaptive")
    wavelet = C.color_correct(content, style, "wavelet")
    hsv = C.color_correct(content, style, "hsv")
    assert (adaptive - style).abs().mean() < 0.75 * (wavelet - style).abs().mean()
    # A blend: every value lies between the two fixes it mixes.
    low, high = torch.minimum(wavelet, hsv), torch.maximum(wavelet, hsv)
    assert ((adaptive >= low - 1e-5) & (adaptive <= high + 1e-5)).all()
