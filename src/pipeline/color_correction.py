"""Colour correction of the restored frames against the low-resolution input.

The DiT restores detail but may drift in colour; every method here keeps the detail of ``content``
(the decoded, upscaled frames) and pulls its colours towards ``style`` (the input frames resized to
the same size).  Both are ``(N, 3, H, W)`` RGB in [−1, 1].

Histogram matching (``lab``, ``hsv``) takes its statistics over all frames passed in, like the
incumbent; pass the frames of one clip (or one image) per call.  To bound memory and time at 4K it
does not sort every pixel: each distribution is summarised by a table of 1024 quantiles estimated
from at most 2^18 randomly chosen values (fixed seed, so results are reproducible), and values are
mapped through the tables piecewise-linearly in chunks.
"""
from __future__ import annotations

import torch

from ..options import check_implemented
from ..progress import checkpoint

# The methods the upscaler offers, in the earlier node pack's order, new ones last (saved workflows keep
# their values).  A literal, read without importing this module (src.options); "none" keeps the colours.
METHODS = ("lab", "wavelet", "wavelet_adaptive", "hsv", "adain", "none", "luma")

# Wavelet colour fix (golden README §7.2): 3x3 binomial low-pass, dilated by these radii.
_WAVELET_RADII = (1, 2, 4, 8, 16)
_WAVELET_GROUP_BYTES = 128 << 20  # frames blurred together (temporaries ~3x this)

_LAB_LUMINANCE_WEIGHT = 0.8          # share of the content's own L* kept by the lab method
_HUE_BINS = 12                       # 30° hue sectors for hsv saturation matching
_MIN_PIXELS_PER_HUE_BIN = 100        # fewer pixels give an unreliable saturation histogram
_ADAIN_EPS = 1e-5
_LUMA_WEIGHTS = (0.2126, 0.7152, 0.0722)  # BT.709 luma of gamma-encoded R′G′B′; they sum to 1
_OVERSATURATION_MARGIN = 0.15        # wavelet_adaptive: saturation excess that triggers hsv blending
_BLEND_SHARPNESS = 5.0

_QUANTILE_LEVELS = 1024
_MAX_HISTOGRAM_SAMPLES = 2**18
_MAP_CHUNK = 2**22

# sRGB (D65) linear RGB -> XYZ.
_RGB_TO_XYZ = torch.tensor(
    [
        [0.4124564, 0.3575761, 0.1804375],
        [0.2126729, 0.7151522, 0.0721750],
        [0.0193339, 0.1191920, 0.9503041],
    ]
)
_XYZ_TO_RGB = torch.linalg.inv(_RGB_TO_XYZ.double()).float()
_LAB_DELTA = 6.0 / 29.0


def color_correct(content: torch.Tensor, style: torch.Tensor, method: str) -> torch.Tensor:
    """Colour-correct ``content`` towards ``style`` (both ``(N, 3, H, W)`` in [−1, 1]) with ``method``,
    one of :data:`METHODS`."""
    if method not in METHODS:
        raise ValueError(f"unknown colour correction {method!r}; choose one of {', '.join(METHODS)}.")
    if content.ndim != 4 or content.shape[1] != 3 or content.shape[0] == 0:
        raise ValueError(f"content must be RGB frames (N, 3, H, W) with N >= 1, got shape {tuple(content.shape)}.")
    if style.shape != content.shape:
        raise ValueError(
            f"style {tuple(style.shape)} must have the shape of content {tuple(content.shape)}: "
            "resize the input frames to the output size before colour correction."
        )
    if method == "none":
        return content
    dtype = content.dtype
    content, style = content.float(), style.float()
    return _FIXES[method](content, style).to(dtype)


# --------------------------------------------------------------------------------------------------
# Wavelet and AdaIN (per frame)


def _blur_axis(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """``[1, 2, 1]/4`` along ``dim`` (-1 or -2) with taps ``radius`` apart, the edge values repeating beyond
    the edges (replicate padding).  Computed as ``(before + 2·x + after)·0.25`` from shifted views of ``x``,
    so no padded copy is made; the arithmetic is that of the padded formula, value for value."""
    size = x.shape[dim]
    shift = min(radius, size)  # before[j] = x[max(j − shift, 0)], after[j] = x[min(j + shift, size − 1)]
    inner = size - shift
    out = torch.empty_like(x)
    torch.add(x.narrow(dim, 0, inner), x.narrow(dim, shift, inner), alpha=2.0, out=out.narrow(dim, shift, inner))
    torch.add(x.narrow(dim, 0, 1), x.narrow(dim, 0, shift), alpha=2.0, out=out.narrow(dim, 0, shift))
    out.narrow(dim, 0, inner).add_(x.narrow(dim, shift, inner))
    out.narrow(dim, inner, shift).add_(x.narrow(dim, size - 1, 1))
    return out.mul_(0.25)


def _blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Per-channel 3x3 binomial blur ``[[1,2,1],[2,4,2],[1,2,1]]/16`` dilated by ``radius`` on a
    replicate-padded image (any radius, any size).  The kernel and the padding are separable, so it
    runs as two 1-D passes, much faster on CPU than a dilated grouped convolution."""
    return _blur_axis(_blur_axis(x, radius, dim=-1), radius, dim=-2)


def wavelet_low_frequency(x: torch.Tensor) -> torch.Tensor:
    """Lowest band of the dilated-binomial wavelet decomposition: x blurred at radii 1, 2, 4, 8, 16."""
    for radius in _WAVELET_RADII:
        checkpoint()
        x = _blur(x, radius)
    return x


def wavelet_color_fix(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """``high(content) + low(style)`` (README §7.2), no clamp.  The high bands of the decomposition
    sum to ``x − low(x)``, so this is ``content − low(content) + low(style)``; the low band is linear, so
    that is ``content + low(style − content)``: one low-pass instead of two."""
    out = torch.empty_like(content)
    frame_bytes = content[0].numel() * content.element_size()
    step = max(1, _WAVELET_GROUP_BYTES // frame_bytes)  # frames per pass: few launches, bounded temporaries
    for start in range(0, content.shape[0], step):
        c = content[start : start + step]
        torch.add(c, wavelet_low_frequency(style[start : start + step] - c), out=out[start : start + step])
    return out


def adain_color_fix(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """Adaptive instance normalisation: per frame and channel, give content the style's mean and std."""
    dims = (2, 3)
    c_mean, s_mean = content.mean(dims, keepdim=True), style.mean(dims, keepdim=True)
    c_std = (content.var(dims, keepdim=True, unbiased=False) + _ADAIN_EPS).sqrt()
    s_std = (style.var(dims, keepdim=True, unbiased=False) + _ADAIN_EPS).sqrt()
    return (content - c_mean) / c_std * s_std + s_mean


def _luma(x: torch.Tensor) -> torch.Tensor:
    """BT.709 luma Y′ ``(N, 1, H, W)`` of RGB frames, summed channel by channel (no 3-channel temporary)."""
    red, green, blue = _LUMA_WEIGHTS
    return x[:, 0:1] * red + x[:, 1:2] * green + x[:, 2:3] * blue


def luma_color_fix(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """AdaIN on the luma alone: per frame, the content's Y′ gets the style's mean and std; its chroma stays.

    For outputs whose colours are right but whose brightness or contrast drifted (the other methods also pull
    the model's saturation back to the blurrier input's).  Adding the same amount to R′, G′ and B′ changes Y′
    by that amount (the weights sum to 1) and keeps B′ − Y′ and R′ − Y′, the chroma, so the correction is
    that shift per pixel.  No clamp, like adain.
    """
    dims = (2, 3)
    c_luma, s_luma = _luma(content), _luma(style)
    c_mean, s_mean = c_luma.mean(dims, keepdim=True), s_luma.mean(dims, keepdim=True)
    c_std = (c_luma.var(dims, keepdim=True, unbiased=False) + _ADAIN_EPS).sqrt()
    s_std = (s_luma.var(dims, keepdim=True, unbiased=False) + _ADAIN_EPS).sqrt()
    return content + ((c_luma - c_mean) / c_std * s_std + s_mean - c_luma)


# --------------------------------------------------------------------------------------------------
# Histogram matching through quantile tables


def _sample_values(x: torch.Tensor) -> torch.Tensor:
    """All values of flat ``x``, or a reproducible random subset of :data:`_MAX_HISTOGRAM_SAMPLES`."""
    if x.numel() <= _MAX_HISTOGRAM_SAMPLES:
        return x
    generator = torch.Generator().manual_seed(0)
    index = torch.randint(x.numel(), (_MAX_HISTOGRAM_SAMPLES,), generator=generator)
    return x[index.to(x.device)]


def _quantile_table(x: torch.Tensor) -> torch.Tensor:
    levels = torch.linspace(0.0, 1.0, _QUANTILE_LEVELS, device=x.device)
    return torch.quantile(_sample_values(x).float(), levels)


def _table_position(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Fractional index of each value in a sorted table, linear between entries and clamped at the
    ends; a value equal to a run of entries maps to the run's middle (e.g. the many zero saturations)."""
    first_not_below = torch.searchsorted(table, x)
    first_above = torch.searchsorted(table, x, right=True)
    upper = first_not_below.clamp(1, table.numel() - 1)
    lo, hi = table[upper - 1], table[upper]
    frac = ((x - lo) / (hi - lo).clamp(min=1e-12)).clamp(0.0, 1.0)
    run_middle = (first_not_below + first_above - 1) * 0.5
    return torch.where(first_above > first_not_below, run_middle, (upper - 1) + frac)


def _interpolate_table(position: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    lower = position.floor().long().clamp(0, table.numel() - 2)
    frac = position - lower
    return table[lower] + frac * (table[lower + 1] - table[lower])


def match_histogram(source: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Map ``source`` values so their distribution matches ``reference`` (quantile mapping over all
    elements of each tensor; the two may differ in size).  Returns a tensor shaped like ``source``."""
    if source.numel() == 0 or reference.numel() == 0:
        raise ValueError("histogram matching needs non-empty source and reference tensors.")
    flat = source.reshape(-1).float()
    checkpoint()
    source_table = _quantile_table(flat)
    checkpoint()
    reference_table = _quantile_table(reference.reshape(-1))
    matched = torch.empty_like(flat)
    for start in range(0, flat.numel(), _MAP_CHUNK):  # chunks bound the index temporaries at 4K
        checkpoint()
        chunk = flat[start : start + _MAP_CHUNK]
        matched[start : start + _MAP_CHUNK] = _interpolate_table(_table_position(chunk, source_table), reference_table)
    return matched.reshape(source.shape).to(source.dtype)


# --------------------------------------------------------------------------------------------------
# CIELAB


def _srgb_to_linear(c: torch.Tensor) -> torch.Tensor:
    return torch.where(c <= 0.04045, c / 12.92, ((c.clamp(min=0.0) + 0.055) / 1.055) ** 2.4)


def _linear_to_srgb(c: torch.Tensor) -> torch.Tensor:
    return torch.where(c <= 0.0031308, c * 12.92, 1.055 * c.clamp(min=0.0) ** (1.0 / 2.4) - 0.055)


def _mix_channels(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,njhw->nihw", matrix.to(x), x)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB ``(N, 3, H, W)`` in [0, 1] to CIELAB (D65 white; L* in [0, 100])."""
    xyz = _mix_channels(_srgb_to_linear(rgb), _RGB_TO_XYZ)
    white = _RGB_TO_XYZ.sum(dim=1).to(rgb).view(1, 3, 1, 1)  # XYZ of RGB (1, 1, 1): white -> a* = b* = 0
    t = xyz / white
    f = torch.where(t > _LAB_DELTA**3, t.clamp(min=1e-12) ** (1.0 / 3.0), t / (3 * _LAB_DELTA**2) + 4.0 / 29.0)
    fx, fy, fz = f.unbind(dim=1)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """CIELAB ``(N, 3, H, W)`` back to sRGB (not clamped; out-of-gamut colours leave [0, 1])."""
    l, a, b = lab.unbind(dim=1)
    fy = (l + 16.0) / 116.0
    f = torch.stack([fy + a / 500.0, fy, fy - b / 200.0], dim=1)
    t = torch.where(f > _LAB_DELTA, f**3, 3 * _LAB_DELTA**2 * (f - 4.0 / 29.0))
    white = _RGB_TO_XYZ.sum(dim=1).to(lab).view(1, 3, 1, 1)
    return _linear_to_srgb(_mix_channels(t * white, _XYZ_TO_RGB))


def lab_color_fix(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """Wavelet fix, then in CIELAB: a*, b* histogram-matched to the style, L* = 0.8·own + 0.2·matched."""
    fixed = wavelet_color_fix(content, style).clamp(-1.0, 1.0)  # LAB is defined on the sRGB gamut
    checkpoint()  # each step is a few passes over the batch: seconds for 33 frames at 4K on a CPU
    content_lab = rgb_to_lab(fixed * 0.5 + 0.5)
    checkpoint()
    style_lab = rgb_to_lab(style.clamp(-1.0, 1.0) * 0.5 + 0.5)
    matched = torch.stack(
        [match_histogram(content_lab[:, ch], style_lab[:, ch]) for ch in range(3)], dim=1
    )
    w = _LAB_LUMINANCE_WEIGHT
    matched[:, 0] = w * content_lab[:, 0] + (1.0 - w) * matched[:, 0]
    checkpoint()
    return lab_to_rgb(matched).clamp(0.0, 1.0) * 2.0 - 1.0


# --------------------------------------------------------------------------------------------------
# HSV


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """RGB ``(N, 3, H, W)`` in [0, 1] to HSV with hue in [0, 1) (fraction of a turn)."""
    r, g, b = rgb.unbind(dim=1)
    value, _ = rgb.max(dim=1)
    chroma = value - rgb.min(dim=1).values
    safe_chroma = chroma.clamp(min=1e-12)
    hue_sector = torch.where(
        value == r,
        (g - b) / safe_chroma,
        torch.where(value == g, (b - r) / safe_chroma + 2.0, (r - g) / safe_chroma + 4.0),
    )
    hue = torch.where(chroma > 0, (hue_sector / 6.0) % 1.0, torch.zeros_like(value))
    saturation = torch.where(value > 0, chroma / value.clamp(min=1e-12), torch.zeros_like(value))
    return torch.stack([hue, saturation, value], dim=1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """HSV ``(N, 3, H, W)`` (hue in [0, 1)) back to RGB."""
    hue, saturation, value = hsv.unbind(dim=1)
    # Each channel is value·(1 − s·clamp(min(k, 4 − k), 0, 1)) with k = (n + 6·hue) mod 6, n = 5, 3, 1.
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (n + 6.0 * hue) % 6.0
        channels.append(value - value * saturation * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(channels, dim=1)


def _hue_bin(hue: torch.Tensor) -> torch.Tensor:
    """12 sectors of 30° centred on 0°, 30°, …; sector 0 spans −15°…15° (red wraps around)."""
    return torch.floor(hue * _HUE_BINS + 0.5).long() % _HUE_BINS


def hsv_color_fix(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """Per 30° hue sector, histogram-match the content's saturation to the style's (hue and value kept)."""
    content_hsv = rgb_to_hsv(content.clamp(-1.0, 1.0) * 0.5 + 0.5)
    style_hsv = rgb_to_hsv(style.clamp(-1.0, 1.0) * 0.5 + 0.5)
    content_bins, style_bins = _hue_bin(content_hsv[:, 0]), _hue_bin(style_hsv[:, 0])
    content_sat, style_sat = content_hsv[:, 1], style_hsv[:, 1]
    matched_sat = content_sat.clone()
    for sector in range(_HUE_BINS):
        in_content, in_style = content_bins == sector, style_bins == sector
        if min(int(in_content.sum()), int(in_style.sum())) <= _MIN_PIXELS_PER_HUE_BIN:
            continue
        matched_sat[in_content] = match_histogram(content_sat[in_content], style_sat[in_style])
    content_hsv[:, 1] = matched_sat
    return hsv_to_rgb(content_hsv).clamp(0.0, 1.0) * 2.0 - 1.0


def _saturation(x: torch.Tensor) -> torch.Tensor:
    return rgb_to_hsv(x.clamp(-1.0, 1.0) * 0.5 + 0.5)[:, 1:2]


def wavelet_adaptive_color_fix(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """Wavelet fix, with the hsv fix blended in where the content is oversaturated relative to the style
    and the wavelet result still is: weight ``sigmoid(5·(sat_c − sat_s − 0.15))`` there, 0 elsewhere."""
    wavelet = wavelet_color_fix(content, style)
    hsv = hsv_color_fix(content, style)
    style_sat = _saturation(style)
    weight = torch.sigmoid(_BLEND_SHARPNESS * (_saturation(content) - style_sat - _OVERSATURATION_MARGIN))
    still_oversaturated = _saturation(wavelet) - style_sat > 0.5 * _OVERSATURATION_MARGIN
    weight = weight * still_oversaturated
    return wavelet * (1.0 - weight) + hsv * weight


_FIXES = {
    "lab": lab_color_fix,
    "wavelet": wavelet_color_fix,
    "wavelet_adaptive": wavelet_adaptive_color_fix,
    "hsv": hsv_color_fix,
    "adain": adain_color_fix,
    "luma": luma_color_fix,
}
check_implemented(__name__, METHODS, ("none", *_FIXES))
