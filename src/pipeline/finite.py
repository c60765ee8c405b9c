"""Finiteness and value-range checks at the pipeline's boundaries: input frames, weights, each batch's result.

One NaN spreads through a batch (the VAE's GroupNorm and the DiT's attention mix every value of it), so a
single bad pixel or weight turns whole batches into NaN, which then reach the user as black or white frames.
What is done per case, and why:

* input frames with NaN/Inf: refused, naming the frames.  We cannot know what the pixel should be, and a
  silent repair would hide the upstream fault;
* input frames in 0..255 (a ``uint8`` tensor, or floats up to 255): converted to [0, 1] with a warning.
  The intent is unambiguous and clamping them made every frame white; other ranges are refused;
* weights with NaN/Inf: refused, naming the tensor (a corrupt or badly converted file; re-download it);
* a batch whose latent or decoded frames are not finite although inputs and weights were: refused, naming
  the phase and the frames (a numerical overflow, e.g. fp16 on a GPU without bf16), before it is written.

Every check reads the values once in slices (``aminmax``: no full-size temporaries).
"""
from __future__ import annotations

import logging
import math

import torch

from .settings import SettingsError

log = logging.getLogger("seedvr2")

SLICE_ELEMENTS = 1 << 24   # values per aminmax call: bounded temporaries for float8 upcasts
RANGE_255_ABOVE = 1.5      # a max above this (and up to 255) marks frames given in 0..255


class NonFiniteError(RuntimeError):
    """A model produced NaN or infinite values; the message says where and what to try."""


def _device_minmax(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of a floating tensor as 0-dim float32 tensors on its device, NaN when it holds a NaN
    (``aminmax`` and ``min``/``max`` propagate NaN; float8 is read through float16).  Nothing is read back to
    the host, so a caller checking many tensors waits for the device once."""
    flat = tensor.detach().reshape(-1)
    lows, highs = [], []
    for start in range(0, flat.numel(), SLICE_ELEMENTS):
        part = flat[start:start + SLICE_ELEMENTS]
        if part.element_size() == 1:
            part = part.to(torch.float16)  # float8: every value fits
        lo, hi = torch.aminmax(part)
        lows.append(lo.float())
        highs.append(hi.float())
    if len(lows) == 1:
        return lows[0], highs[0]
    return torch.stack(lows).min(), torch.stack(highs).max()


def _minmax(tensor: torch.Tensor) -> tuple[float, float]:
    """(min, max) of a floating tensor; NaN when it holds a NaN."""
    low, high = torch.stack(_device_minmax(tensor)).tolist()
    if math.isnan(low) or math.isnan(high):
        return math.nan, math.nan
    return low, high


def _finite_flag(tensor: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool tensor on the tensor's device: True when every value is finite."""
    return torch.isfinite(torch.stack(_device_minmax(tensor))).all()


def is_finite(tensor: torch.Tensor) -> bool:
    return bool(_finite_flag(tensor).item())


def _frame_list(indices: list[int]) -> str:
    shown = ", ".join(map(str, indices[:8]))
    return shown + (f" and {len(indices) - 8} more" if len(indices) > 8 else "")


def input_scale(images: torch.Tensor, scale: float | None = None) -> float:
    """Check input frames ``(N, H, W, C)``; return the divisor that brings them to [0, 1] (1 or 255).

    ``scale``: the divisor chosen for earlier chunks of the same clip (a dark chunk of a 0..255 clip stays
    0..255).  Raises :class:`SettingsError` for NaN/Inf values, non-float dtypes and unknown ranges.
    """
    if images.dtype == torch.uint8:
        if scale is None:
            log.warning("SeedVR2: the frames are uint8 (0..255); converting them to the IMAGE range 0..1.")
        return 255.0
    if not images.is_floating_point():
        raise SettingsError(f"frames must be float values in 0..1 (a ComfyUI IMAGE) or uint8, got {images.dtype}.")
    low, high, bad = math.inf, -math.inf, []
    for index in range(images.shape[0]):
        lo, hi = _minmax(images[index])
        if not (math.isfinite(lo) and math.isfinite(hi)):
            bad.append(index)
            continue
        low, high = min(low, lo), max(high, hi)
    if bad:
        raise SettingsError(
            f"frame(s) {_frame_list(bad)} of the input contain NaN or infinite values; one such pixel would turn "
            f"its whole batch into NaN. Fix the node or file that produced them (nothing was upscaled)."
        )
    if scale is not None and scale != 1.0 and low >= 0 and high <= 255:
        return scale
    if high > RANGE_255_ABOVE:
        if low >= 0 and high <= 255:
            log.warning("SeedVR2: the frames hold values up to %.0f, i.e. 0..255 instead of the IMAGE range 0..1; "
                        "dividing them by 255.", high)
            if scale == 1.0:
                raise SettingsError("these frames are in 0..255 but the clip's earlier frames were in 0..1; "
                                    "give every frame in one range.")
            return 255.0
        raise SettingsError(f"frame values range from {low:g} to {high:g}; an IMAGE holds values in 0..1.")
    if low < -0.5:
        raise SettingsError(f"frame values range from {low:g} to {high:g}; an IMAGE holds values in 0..1.")
    return 1.0


def check_weights(model: torch.nn.Module, path) -> None:
    """Refuse a model whose floating-point weights hold NaN or infinite values (integer and packed
    quantized storage is skipped: it has no NaN).

    One flag per tensor stays on its device and each device is read back once: a host round trip per tensor
    would wait, thousands of times, behind whatever else the device runs (the DiT loads during the encode)."""
    flags: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not tensor.is_floating_point() or tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        flags.setdefault(tensor.device, []).append((name, _finite_flag(tensor)))
    for entries in flags.values():
        stacked = torch.stack([flag for _, flag in entries])
        if bool(stacked.all().item()):
            continue
        bad = int((~stacked).nonzero()[0, 0].item())
        raise SettingsError(
            f"{path}: the weight {entries[bad][0]!r} holds NaN or infinite values, so every output would be NaN (an "
            f"all-black video). The file is corrupt or was converted wrongly; download or convert it again."
        )


def check_batch(tensor: torch.Tensor, phase: str, first_frame: int, frames: int) -> None:
    """Refuse a batch result (latent or frames) that is not finite, before it reaches the output."""
    if is_finite(tensor):
        return
    raise NonFiniteError(
        f"the {phase} of frames {first_frame}–{first_frame + frames - 1} produced NaN or infinite values although "
        f"the input and the weights are finite: a numerical overflow. Try enable_optimizations off, another "
        f"device, or a bf16/fp32-capable GPU (fp16 overflows more easily). Nothing was written for these frames."
    )
