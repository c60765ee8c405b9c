"""Exact banded encode/decode on the optimized path, and the memory bound of a banded run.

:class:`LeanBandedRunner` is the plain :class:`~src.models.video_vae_v3.banded.BandedRunner` with the
runtime's convolutions (layout, channel padding, cuDNN route) and attention backend;
:func:`estimate_banded_peak_bytes` bounds the device memory of a banded run, for the pipeline's memory plan.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from ..models.video_vae_v3.banded import ATTENTION_CHUNK_ELEMENTS, BandedRunner, BandPlan
from ..models.video_vae_v3.temporal_slicing import CausalMemory

if TYPE_CHECKING:
    from ..models.video_vae_v3 import VideoAutoencoder
    from .vae_optimizer import VAERuntime

logger = logging.getLogger(__name__)

_FP8_NOTED: set[int] = set()


class LeanBandedRunner(BandedRunner):
    """Banded execution whose convolutions run through ``runtime`` (its fp8 convolutions excepted: a band's
    input is not written by a GroupNorm kernel, so they run in the compute dtype)."""

    def __init__(self, model: "VideoAutoencoder", plan: BandPlan, runtime: "VAERuntime") -> None:
        super().__init__(model, plan)
        self.runtime = runtime
        self.attention_backend = runtime.attention_backend
        # The layout the convolutions want (channels-last on the GPU): padded bands are born in it.
        self.memory_format = runtime.memory_format

    def conv(self, module: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
        if self.runtime.channels_last:
            x = x.contiguous(memory_format=self.runtime.memory_format)
        return self.runtime.conv3d(x, module)


def run_banded_lean(model: "VideoAutoencoder", direction: str, chunk: torch.Tensor, memory: Optional[CausalMemory],
                    plan: BandPlan, runtime: "VAERuntime") -> torch.Tensor:
    """One causal chunk of ``model``'s encoder or decoder, banded, on the optimized path."""
    runner = LeanBandedRunner(model, plan, runtime)
    if runtime.fp8 is not None and id(model) not in _FP8_NOTED:
        _FP8_NOTED.add(id(model))
        logger.info("VAE banded execution runs its convolutions in %s, not fp8 (the fp8 scales are per call)",
                    model.dtype)
    return runner.run(direction, chunk, memory)


# --------------------------------------------------------------------------------------------- memory model


def chunk_frames(config, direction: str, frames: int) -> list[int]:
    """Input frames of each causal chunk of a clip of ``frames`` video frames (``encode``) or latent frames
    (``decode``), as ``VideoAutoencoder`` slices it; the first chunk is the largest."""
    step = config.slicing_sample_min_size if direction == "encode" else (
        config.slicing_sample_min_size // config.temporal_downsample_factor)
    bounds = [min(1 + step, frames)]
    while sum(bounds) < frames:
        bounds.append(min(step, frames - sum(bounds)))
    return bounds


def estimate_banded_peak_bytes(config, direction: str, height: int, width: int, *, frames: int,
                               dtype: torch.dtype, plan: BandPlan, channels_last: bool = False,
                               result_element: int = 4) -> int:
    """Upper bound on the compute device's peak bytes of a banded encode/decode of one clip (weights not
    counted; the clip's input and result on the device counted): ``height`` x ``width`` video pixels,
    ``frames`` video frames.

    Derived from the architecture layer by layer, as :class:`BandedRunner` runs it (first causal chunk,
    the largest): (1) the activations and causal look-back that stay on the device (those of at most
    ``plan.resident_bytes``; everything when None), (2) the largest band working set (a convolution's padded
    band input, its new rows, their float32 normalisation, its output rows with residual and float32
    statistics copy; an upsampler's 1x1-conv and shuffle temporaries) or the per-frame attention (tokens,
    k, v, query chunk and its scores), (3) the clip's input and its result, ``result_element`` bytes a value
    (4: float32; the compute dtype's size for a decode in the model's dtype; 0 when it goes to host memory).
    """
    e = torch.empty((), dtype=dtype).element_size()
    widths, levels = config.block_out_channels, config.num_levels
    groups_factor = 4  # float32 copies
    resident = plan.resident_bytes
    look_back_total = 0
    live_peak = 0
    work_peak = 0
    last_chunk = frames == 1  # a single frame is one chunk, its last: nothing is kept

    def on_device(size: int) -> int:
        return size if resident is None or size <= resident else 0

    def conv(cin: int, cout: int, t_in: int, h_in: int, w_in: int, *, causal: bool = True, kt: int = 3,
             st: int = 1, kh: int = 3, sh: int = 1, ph: int = 1, normalized: bool = True, residual: int = 0,
             shuffle: int = 0, live: int = 0) -> tuple[int, int, int]:
        """Account one banded convolution; returns its output (t, h, w)."""
        nonlocal look_back_total, live_peak, work_peak
        look = kt - 1 if causal else 0
        total = look + t_in
        t_out = (total - kt) // st + 1
        h_out = (h_in + 2 * ph - kh) // sh + 1
        w_out = (w_in + 2 * ph - kh) // sh + 1
        rows = min(h_out, plan.rows(w_out))
        rows_in = min(h_in, (rows - 1) * sh + kh)
        band_in = rows_in * w_in * cin
        # Producing the new rows (a normalisation in float32, or the upsampler's 1x1 conv to 4·tf channels at
        # half size and its shuffled copy), then the padded band input with its new rows.
        produce = band_in * t_in * (e + (groups_factor if normalized else 0))
        if shuffle:
            source = (rows_in // 2 + 1) * (w_in // 2) * cin * -(-t_in // shuffle)
            produce = max(produce, source * e * (1 + 2 * 4 * shuffle))
        work = max(produce, band_in * (total * e * (2 if channels_last else 1) + t_in * e))
        kept = 0
        if causal and not last_chunk:
            kept = (total - t_out * st) * cin * h_in * w_in * e
            work += (total - t_out * st) * band_in * e  # the band's look-back rows, made dense for the store
        out_band = rows * w_out * t_out * cout
        work += out_band * (3 * e + groups_factor) + (rows * w_out * t_out * residual * e if residual else 0)
        activation = t_out * cout * h_out * w_out * e
        work_peak = max(work_peak, work + on_device(kept) * 2)
        live_peak = max(live_peak, live + on_device(activation) + look_back_total)
        look_back_total += on_device(kept)
        return t_out, h_out, w_out

    def resnet(cin: int, cout: int, t: int, h: int, w: int) -> None:
        x = on_device(t * cin * h * w * e)
        conv(cin, cout, t, h, w, live=x)
        conv(cout, cout, t, h, w, live=x + on_device(t * cout * h * w * e), residual=cout)

    def attention(c: int, t: int, h: int, w: int) -> None:
        nonlocal work_peak, live_peak
        tokens = h * w
        chunk = max(1, min(tokens, ATTENTION_CHUNK_ELEMENTS // tokens))
        frame = tokens * c
        work = frame * (e * 6 + groups_factor) + chunk * tokens * groups_factor * 2 + chunk * c * e * 3
        activation = on_device(t * c * h * w * e)
        work_peak = max(work_peak, work + activation * 2)
        live_peak = max(live_peak, 2 * activation + look_back_total)

    if direction == "encode":
        first = chunk_frames(config, direction, frames)[0]
        t, h, w = conv(config.in_channels, widths[0], first, height, width, normalized=False)
        for level, channels in enumerate(widths):
            cin = widths[max(level - 1, 0)]
            for index in range(config.layers_per_block):
                resnet(cin if index == 0 else channels, channels, t, h, w)
            if level < levels - 1:
                temporal = level >= levels - 1 - config.temporal_scale_num
                t, h, w = conv(channels, channels, t, h + 1, w + 1, causal=temporal, kt=3 if temporal else 1,
                               st=2 if temporal else 1, sh=2, ph=0, normalized=False)
        c = widths[-1]
        resnet(c, c, t, h, w)
        attention(c, t, h, w)
        resnet(c, c, t, h, w)
        conv(c, 2 * config.latent_channels, t, h, w)
        io = frames * config.in_channels * height * width * 4  # the pipeline's batch, float32 on the device
        latent_frames = (frames - 1) // config.temporal_downsample_factor + 1
        io += latent_frames * 2 * config.latent_channels * h * w * result_element
    else:
        reversed_widths = widths[::-1]
        latent_frames = (frames - 1) // config.temporal_downsample_factor + 1
        first_latent = chunk_frames(config, direction, latent_frames)[0]
        factor = 2 ** (levels - 1)
        h, w = height // factor, width // factor
        c = reversed_widths[0]
        t, h, w = conv(config.latent_channels, c, first_latent, h, w, normalized=False)
        resnet(c, c, t, h, w)
        attention(c, t, h, w)
        resnet(c, c, t, h, w)
        for index, channels in enumerate(reversed_widths):
            cin = reversed_widths[max(index - 1, 0)]
            for layer in range(config.layers_per_block + 1):
                resnet(cin if layer == 0 else channels, channels, t, h, w)
            if index < levels - 1:
                time_factor = 2 if index < config.temporal_scale_num else 1
                t_in = t * time_factor - (1 if time_factor == 2 else 0)
                t, h, w = conv(channels, channels, t_in, 2 * h, 2 * w, normalized=False, shuffle=time_factor)
        conv(widths[0], config.out_channels, t, h, w)
        io = latent_frames * config.latent_channels * (height // factor) * (width // factor) * 4
        io += frames * config.out_channels * height * width * result_element
    return int(max(live_peak, look_back_total) + work_peak + io)
