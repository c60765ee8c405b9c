"""Sampling math of SeedVR2: lerp schedule, v-prediction, Euler steps, CFG and the condition latent.

Notation follows the golden README §7.  Time τ runs from 1000 (pure noise x_T) to 0 (clean x_0) and
the lerp schedule mixes the two as ``x_τ = A(τ)·x_0 + B(τ)·x_T`` with ``A = 1 − τ/1000`` and
``B = τ/1000``.  The DiT predicts the velocity ``v = x_T − x_0``, so one step from τ = 1000 gives
``x_0 = noise − v``.

Latents are channels-last everywhere here (``(t, h, w, 16)`` or the packed ``(L, 16)``); nothing in
this module depends on the spatial layout except where a function says so.
"""
from __future__ import annotations

from typing import Callable, Sequence, Union

import torch

NUM_TRAIN_TIMESTEPS = 1000.0

# Anchor points of the resolution-dependent shift (§7.1): pixel counts (frames·H·W for video,
# H·W for images) at which the shift is 1 and at which it reaches its reference value.
_VIDEO_SHIFT_LINE = ((256 * 256 * 37, 1.0), (1280 * 720 * 145, 5.0))
_IMAGE_SHIFT_LINE = ((256 * 256, 1.0), (1024 * 1024, 3.2))
_VAE_TEMPORAL_FACTOR = 4
_VAE_SPATIAL_FACTOR = 8

Timestep = Union[float, torch.Tensor]

VelocityModel = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]
"""``model_fn(vid, timestep, negative) -> v``: ``vid`` is ``[x_t, condition]`` concatenated on the
last axis (33 channels), ``timestep`` a ``(1,)`` float32 tensor of τ, ``negative`` selects the
negative text embedding; ``v`` has the shape of ``x_t``."""


# --------------------------------------------------------------------------------------------------
# Timesteps


def sampling_timesteps(steps: int) -> torch.Tensor:
    """The trailing grid τ = 1000·(1, 1 − 1/S, 1 − 2/S, …) in float32, built as the original does.

    The original uses a float ``arange(1, 0, −1/S)``, which for a few S (49, 98, 103, 107, 196, 197
    below 200) yields one extra value ≈ 0; it is kept so multi-step runs match the original.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer (got {steps!r}); SeedVR2 uses 1.")
    u = torch.arange(1.0, 0.0, -1.0 / steps, dtype=torch.float32)
    return u * NUM_TRAIN_TIMESTEPS


def shift_timesteps(t: Timestep, shift: Timestep) -> Timestep:
    """SD3 timestep shift ``1000·K·u / (1 + (K − 1)·u)`` with ``u = τ/1000`` (float64 math)."""
    if isinstance(t, torch.Tensor):
        u = t.double() / NUM_TRAIN_TIMESTEPS
        k = torch.as_tensor(shift, dtype=torch.float64, device=t.device)
        return (NUM_TRAIN_TIMESTEPS * k * u / (1 + (k - 1) * u)).to(t.dtype)
    u = float(t) / NUM_TRAIN_TIMESTEPS
    return NUM_TRAIN_TIMESTEPS * shift * u / (1 + (shift - 1) * u)


def resolution_shift(latent_shape: Sequence[int]) -> float:
    """Shift factor K for a latent grid ``(t, h, w)`` (§7.1): linear in pixel count, video vs image line.

    K may fall below 1 for inputs smaller than the anchors; the original does not clamp it.
    """
    if len(latent_shape) != 3 or min(int(n) for n in latent_shape) < 1:
        raise ValueError(f"latent_shape must be three positive sizes (t, h, w), got {tuple(latent_shape)}.")
    t, h, w = (int(n) for n in latent_shape)
    frames = (t - 1) * _VAE_TEMPORAL_FACTOR + 1
    pixels = (h * _VAE_SPATIAL_FACTOR) * (w * _VAE_SPATIAL_FACTOR)
    if frames > 1:
        line, x = _VIDEO_SHIFT_LINE, pixels * frames
    else:
        line, x = _IMAGE_SHIFT_LINE, pixels
    (x1, y1), (x2, y2) = line
    return y1 + (y2 - y1) * (x - x1) / (x2 - x1)


def resolution_timestep(t: Timestep, latent_shape: Sequence[int]) -> Timestep:
    """τ shifted by :func:`resolution_shift` of ``latent_shape`` (the original's ``timestep_transform``)."""
    return shift_timesteps(t, resolution_shift(latent_shape))


# --------------------------------------------------------------------------------------------------
# Lerp schedule and v-prediction


def A(t: Timestep) -> Timestep:
    """Weight of the clean sample x_0 at time τ: ``1 − τ/1000``."""
    return 1.0 - t / NUM_TRAIN_TIMESTEPS


def B(t: Timestep) -> Timestep:
    """Weight of the noise x_T at time τ: ``τ/1000``."""
    return t / NUM_TRAIN_TIMESTEPS


def _per_sample(t: Timestep, x: torch.Tensor) -> torch.Tensor:
    """τ as a float64 tensor broadcastable to ``x``: a scalar (or one-element tensor) applies to all of
    ``x``; a length-B vector gives one τ per element of ``x``'s first axis."""
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
    if t.numel() == 1:
        return t.reshape(())
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(
            f"timesteps of shape {tuple(t.shape)} do not match a batch of {x.shape[0]}: pass one τ "
            f"or one per element of the first axis."
        )
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def _apply(coefficient: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return coefficient.to(x.dtype) * x


def forward_noise(x0: torch.Tensor, xT: torch.Tensor, t: Timestep) -> torch.Tensor:
    """``x_τ = A(τ)·x_0 + B(τ)·x_T``."""
    t = _per_sample(t, x0)
    return _apply(A(t), x0) + _apply(B(t), xT)


def x0_from_v(x: torch.Tensor, v: torch.Tensor, t: Timestep) -> torch.Tensor:
    """Clean-sample estimate ``x̂_0 = (x − B·v)/(A + B)`` from a velocity prediction at time τ."""
    t = _per_sample(t, x)
    return (x - _apply(B(t), v)) / (A(t) + B(t)).to(x.dtype)


def xT_from_v(x: torch.Tensor, v: torch.Tensor, t: Timestep) -> torch.Tensor:
    """Noise estimate ``x̂_T = (x + A·v)/(A + B)`` from a velocity prediction at time τ."""
    t = _per_sample(t, x)
    return (x + _apply(A(t), v)) / (A(t) + B(t)).to(x.dtype)


def euler_step(x: torch.Tensor, v: torch.Tensor, t: Timestep, s: Timestep) -> torch.Tensor:
    """Euler step of the lerp ODE from τ = t to τ = s: ``A(s)·x̂_0 + B(s)·x̂_T``; s < 0 returns x̂_0."""
    x0 = x0_from_v(x, v, t)
    xT = xT_from_v(x, v, t)
    s = torch.as_tensor(s, dtype=torch.float64, device=x.device)
    stepped = forward_noise(x0, xT, s.clamp(min=0.0))
    return torch.where(_per_sample(s, x) >= 0, stepped, x0)


# --------------------------------------------------------------------------------------------------
# Guidance and condition


def classifier_free_guidance(
    pos: torch.Tensor, neg: torch.Tensor, scale: float, rescale: float = 0.0
) -> torch.Tensor:
    """``neg + scale·(pos − neg)``; with ``rescale = r ≠ 0`` the result is multiplied by
    ``r·std(pos)/std(cfg) + 1 − r``, std (unbiased) over all axes but the first, per first-axis element.

    The sampler passes token rows ``(L, C)``, so there the std is per token over its channels.
    """
    if pos.shape != neg.shape:
        raise ValueError(f"positive {tuple(pos.shape)} and negative {tuple(neg.shape)} predictions differ in shape.")
    guided = neg + scale * (pos - neg)
    if rescale == 0.0:
        return guided
    dims = list(range(1, pos.ndim))
    ratio = pos.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return guided * (rescale * ratio + (1.0 - rescale))


def build_condition(
    cond_latent: torch.Tensor,
    aug_noise: torch.Tensor | None,
    cond_noise_scale: float,
    shift_shape: Sequence[int] | None = None,
) -> torch.Tensor:
    """DiT condition ``[(1 − s)·cond_latent + s·aug_noise, 1]`` (17 channels) for a channels-last
    latent ``(t, h, w, 16)``, with ``s = resolution_timestep(1000·cond_noise_scale, shape)/1000``.

    Quirk of the original, reproduced by default: the shift is computed from the *last three* axes of
    the channels-last latent, ``(h, w, 16)``, not from ``(t, h, w)``.  Pass ``shift_shape`` to use
    another grid (the golden ``condition`` case uses ``(t, h, w)``).  ``aug_noise`` may be None when
    ``cond_noise_scale`` is 0 (the released setting), where the condition is the clean latent.
    """
    if cond_latent.ndim < 3:
        raise ValueError(f"cond_latent must be channels-last (t, h, w, C), got shape {tuple(cond_latent.shape)}.")
    if not 0.0 <= cond_noise_scale <= 1.0:
        raise ValueError(f"cond_noise_scale must be in [0, 1] (got {cond_noise_scale}).")
    mask = torch.ones_like(cond_latent[..., :1])
    if cond_noise_scale == 0.0:
        return torch.cat([cond_latent, mask], dim=-1)
    if aug_noise is None or aug_noise.shape != cond_latent.shape:
        raise ValueError(
            "cond_noise_scale > 0 needs aug_noise with the shape of cond_latent "
            f"{tuple(cond_latent.shape)} (got {None if aug_noise is None else tuple(aug_noise.shape)})."
        )
    shape = tuple(cond_latent.shape[-3:]) if shift_shape is None else tuple(shift_shape)
    t = resolution_timestep(NUM_TRAIN_TIMESTEPS * cond_noise_scale, shape)
    return torch.cat([forward_noise(cond_latent, aug_noise, t), mask], dim=-1)


# --------------------------------------------------------------------------------------------------
# Sampler


def sample(
    model_fn: VelocityModel,
    noise: torch.Tensor,
    condition: torch.Tensor,
    steps: int = 1,
    cfg_scale: float = 1.0,
    cfg_rescale: float = 0.0,
) -> torch.Tensor:
    """Euler sampling from ``noise`` (x at τ = 1000) to x_0 over :func:`sampling_timesteps` ``(steps)``.

    Each step calls ``model_fn`` on ``[x, condition]`` with the positive text and, when
    ``cfg_scale ≠ 1``, then with the negative text, combining them per token row.
    """
    if noise.shape[:-1] != condition.shape[:-1]:
        raise ValueError(
            f"noise {tuple(noise.shape)} and condition {tuple(condition.shape)} must share all axes but the last."
        )
    timesteps = sampling_timesteps(steps).to(noise.device)
    x = noise
    for i, t in enumerate(timesteps):
        vid = torch.cat([x, condition], dim=-1)
        timestep = t.reshape(1)
        v = model_fn(vid, timestep, False)
        if cfg_scale != 1.0:
            v_neg = model_fn(vid, timestep, True)
            channels = v.shape[-1]
            v = classifier_free_guidance(
                v.reshape(-1, channels), v_neg.reshape(-1, channels), cfg_scale, cfg_rescale
            ).reshape(v.shape)
        next_t = timesteps[i + 1] if i + 1 < len(timesteps) else -1.0
        x = euler_step(x, v, t, next_t)
    return x
