"""Upscaling the alpha channel of RGBA inputs, which never goes through the VAE or the DiT.

Alpha is upscaled with bicubic interpolation and then refined by a guided filter (He et al., "Guided
Image Filtering", 2010) steered by the luminance of the upscaled RGB, so its edges snap to the edges
of the restored image.  Masks that are essentially binary (cut-outs) get a smaller radius and a
contrast curve afterwards, so hard edges stay hard instead of turning into a soft ramp.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_REC709_LUMA = (0.2126, 0.7152, 0.0722)
_BINARY_TOLERANCE = 0.05   # alpha within this of 0 or 1 counts as "binary"
_BINARY_FRACTION = 0.95    # share of such values that marks a mask as near-binary
_SOFT_RADIUS, _BINARY_RADIUS = 3, 2
_EPS = 2e-3                # guided-filter regulariser: edges with luma std above ~0.045 are kept
_SHARPNESS = 12.0          # slope of the contrast curve for near-binary masks


def _box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over the (2r+1)² window around each pixel, border windows shrunk to the image."""
    return F.avg_pool2d(x, 2 * radius + 1, stride=1, padding=radius, count_include_pad=False)


def guided_filter(guide: torch.Tensor, source: torch.Tensor, radius: int, eps: float) -> torch.Tensor:
    """Grey-guide guided filter: ``source`` (N, 1, H, W) smoothed by local linear models of ``guide``
    (N, 1, H, W), so the output follows the guide's edges; ``eps`` sets how strong an edge must be."""
    mean_guide = _box_mean(guide, radius)
    mean_source = _box_mean(source, radius)
    covariance = _box_mean(guide * source, radius) - mean_guide * mean_source
    variance = _box_mean(guide * guide, radius) - mean_guide * mean_guide
    slope = covariance / (variance + eps)
    offset = mean_source - slope * mean_guide
    return _box_mean(slope, radius) * guide + _box_mean(offset, radius)


def is_near_binary(alpha: torch.Tensor) -> bool:
    """True when more than 95 % of the values lie within 0.05 of 0 or 1 (a cut-out mask)."""
    distance = torch.minimum(alpha, 1.0 - alpha)
    return (distance <= _BINARY_TOLERANCE).float().mean().item() > _BINARY_FRACTION


def _contrast(alpha: torch.Tensor) -> torch.Tensor:
    """Sigmoid contrast around 0.5, rescaled so that 0 and 1 stay exactly 0 and 1."""
    low, high = torch.sigmoid(torch.tensor(-0.5 * _SHARPNESS)), torch.sigmoid(torch.tensor(0.5 * _SHARPNESS))
    return (torch.sigmoid(_SHARPNESS * (alpha - 0.5)) - low) / (high - low)


def upscale_alpha(alpha: torch.Tensor, guide_rgb: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Upscale alpha ``(N, 1, h, w)`` in [0, 1] to ``size = (H, W)``, edge-refined by the upscaled RGB
    ``guide_rgb`` ``(N, 3, H, W)`` in [0, 1]; returns ``(N, 1, H, W)`` in [0, 1]."""
    height, width = size
    if alpha.ndim != 4 or alpha.shape[1] != 1 or alpha.shape[0] == 0:
        raise ValueError(f"alpha must be (N, 1, h, w) with N >= 1, got shape {tuple(alpha.shape)}.")
    if guide_rgb.shape != (alpha.shape[0], 3, height, width):
        raise ValueError(
            f"guide_rgb must be the upscaled RGB frames ({alpha.shape[0]}, 3, {height}, {width}), "
            f"got {tuple(guide_rgb.shape)}."
        )
    luma_weights = torch.tensor(_REC709_LUMA, device=guide_rgb.device).view(1, 3, 1, 1)
    out = torch.empty(alpha.shape[0], 1, height, width, device=alpha.device)
    for i in range(alpha.shape[0]):  # frame by frame: the filter keeps several full-size temporaries
        frame = alpha[i : i + 1].float()
        upscaled = F.interpolate(frame, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
        upscaled = upscaled.clamp(0.0, 1.0)
        luma = (guide_rgb[i : i + 1].float() * luma_weights).sum(dim=1, keepdim=True)
        if is_near_binary(frame):
            refined = _contrast(guided_filter(luma, upscaled, _BINARY_RADIUS, _EPS))
        else:
            refined = guided_filter(luma, upscaled, _SOFT_RADIUS, _EPS)
        out[i] = refined.clamp(0.0, 1.0)[0]
    return out.to(alpha.dtype)
