"""Exact banded execution: encode or decode a frame in row bands with exactly the untiled result.

What a band needs from outside itself is (a) its neighbours' rows, one halo row per 3x3 convolution, and (b)
the statistics of every GroupNorm over the whole frame.  Both are only available layer by layer, so a causal
chunk runs through the network one layer at a time, each layer band by band:

* every activation of the chunk (B, C, T, H, W) lives in a :class:`Store`, on the compute device when it is
  small and in (pinned) host memory when it is larger than ``BandPlan.resident_bytes``; a band's rows are
  contiguous in it (layout B, H, T, W, C), so moving a band is one copy;
* a convolution reads, per band of output rows, its input rows plus the halo (the real neighbours; zeros
  only at the frame's edges), its causal look-back rows (kept, like the input, per layer in a Store), runs
  on the compute device and writes the band's output rows;
* while writing, the per-(batch, group, frame) count, mean and M2 of the output are accumulated (Chan's
  parallel combination), so the next GroupNorm normalises every band with the whole frame's statistics
  without another pass;
* the mid-block attention runs per frame over all h·w latent tokens (the bottleneck is small), in chunks of
  queries (exact: every query row is independent).

Nothing is blended and no band sees less than the untiled network, so the output equals the untiled one up
to float summation order.  The model's layers run as they are (plain ``nn.Conv3d``/``Linear`` calls), or
through the optimized runtime's convolution when the model has one.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...pipeline.progress import checkpoint
from .causal_conv import CausalConv3d
from .mid_block import MidBlockAttention
from .resampling import Downsampler3D, Upsampler3D, pixel_shuffle_3d
from .resnet import ResnetBlock3D
from .temporal_slicing import CausalMemory

if TYPE_CHECKING:
    from .autoencoder import VideoAutoencoder
    from .decoder import Decoder3D
    from .encoder import Encoder3D

logger = logging.getLogger(__name__)

_FP8_NOTED: set[int] = set()

# Attention scores of one query chunk (queries x keys float32 values) stay below this many elements.
ATTENTION_CHUNK_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class BandPlan:
    """How a banded encode/decode bounds its memory.

    ``band_pixels``: a band of a layer holds at most this many of that layer's output pixels (rows x width;
    at least one row); ``band_rows``: a fixed number of output rows per band at every layer instead (tests).
    ``resident_bytes``: activations (and look-back) of a chunk up to this size stay on the compute device,
    larger ones go to host memory (None: everything stays on the compute device).
    """

    band_pixels: Optional[int] = None
    band_rows: Optional[int] = None
    resident_bytes: Optional[int] = None

    def __post_init__(self) -> None:
        if (self.band_pixels is None) == (self.band_rows is None):
            raise ValueError("BandPlan takes exactly one of band_pixels and band_rows.")
        size = self.band_pixels if self.band_pixels is not None else self.band_rows
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"BandPlan band size must be a positive integer, got {size!r}.")
        if self.resident_bytes is not None and self.resident_bytes < 0:
            raise ValueError(f"BandPlan resident_bytes must be >= 0 or None, got {self.resident_bytes!r}.")

    @classmethod
    def from_tile_size(cls, tile_size: int, resident_bytes: Optional[int] = None) -> "BandPlan":
        """The band equivalent of square tiles of ``tile_size`` pixels: bands of ``tile_size²`` pixels."""
        return cls(band_pixels=tile_size * tile_size, resident_bytes=resident_bytes)

    def rows(self, width: int) -> int:
        if self.band_rows is not None:
            return self.band_rows
        return max(1, self.band_pixels // max(1, width))

    def spans(self, height: int, width: int) -> list[tuple[int, int]]:
        """``[start, stop)`` of the bands of a layer output ``height`` x ``width``."""
        step = self.rows(width)
        return [(top, min(top + step, height)) for top in range(0, height, step)]


class Store:
    """One activation (B, C, T, H, W) in memory laid out (B, H, T, W, C): a band of rows is one block."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, pin: bool) -> None:
        b, c, t, h, w = shape
        self.physical = torch.empty((b, h, t, w, c), dtype=dtype, device=device, pin_memory=pin)
        self.shape = tuple(shape)

    @property
    def tensor(self) -> torch.Tensor:
        """The activation as a (B, C, T, H, W) view."""
        return self.physical.permute(0, 4, 2, 1, 3)

    def read(self, top: int, bottom: int, device: torch.device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Rows ``[top, bottom)`` on ``device`` as a (B, C, T, rows, W) view."""
        block = self.physical[:, top:bottom].to(device=device, dtype=dtype, non_blocking=True)
        return block.permute(0, 4, 2, 1, 3)

    def write(self, top: int, rows: torch.Tensor) -> None:
        """Store ``rows`` (B, C, T, r, W) at rows ``[top, top + r)``."""
        block = rows.permute(0, 3, 2, 4, 1)
        if block.device != self.physical.device:
            block = block.contiguous()  # one dense transfer
        self.physical[:, top:top + rows.shape[3]].copy_(block, non_blocking=True)


class GroupStats:
    """Count, mean and M2 of every (batch, group, frame), accumulated band by band (Chan et al.)."""

    def __init__(self, groups: int, eps_dtype: torch.dtype) -> None:
        self.groups, self.dtype = groups, eps_dtype
        self.count = 0
        self.mean: Optional[torch.Tensor] = None
        self.m2: Optional[torch.Tensor] = None

    def add(self, band: torch.Tensor) -> None:
        b, c, t, h, w = band.shape
        values = band.float().view(b, self.groups, c // self.groups, t, h, w)
        var, mean = torch.var_mean(values, dim=(2, 4, 5), correction=0)  # (B, G, T)
        count = (c // self.groups) * h * w
        mean, m2 = mean.to(self.dtype), var.to(self.dtype) * count
        if self.mean is None:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * count / total)
        self.count = total

    @classmethod
    def of_frames(cls, parts: list["GroupStats"]) -> "GroupStats":
        """The statistics of consecutive frames, each part covering whole frames."""
        joined = cls(parts[0].groups, parts[0].dtype)
        joined.count = parts[0].count
        joined.mean = torch.cat([part.mean for part in parts], dim=2)
        joined.m2 = torch.cat([part.m2 for part in parts], dim=2)
        return joined

    def scale_shift(self, norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """Per (batch, channel, frame) float32 ``a, c`` with ``norm(x) = a·x + c``."""
        if self.mean is None:
            raise RuntimeError("GroupNorm statistics of an empty activation.")
        rstd = torch.rsqrt(self.m2 / self.count + norm.eps)
        per = norm.num_channels // self.groups
        rstd = rstd.float().repeat_interleave(per, dim=1)
        mean = self.mean.float().repeat_interleave(per, dim=1)
        scale = rstd * norm.weight.float().view(1, -1, 1)
        return scale, norm.bias.float().view(1, -1, 1) - mean * scale


@dataclass
class Activation:
    store: Store
    stats: Optional[GroupStats]


class RowSource:
    """The new input frames of a convolution, produced band by band on the compute device."""

    height: int
    width: int
    channels: int
    frames: int

    def rows(self, top: int, bottom: int) -> torch.Tensor:  # (B, C, T, bottom - top, W)
        raise NotImplementedError


class BandedRunner:
    """Runs one causal chunk of the encoder or decoder layer by layer in row bands (see the module doc)."""

    def __init__(self, model: "VideoAutoencoder", plan: BandPlan) -> None:
        self.model, self.plan = model, plan
        self.runtime = model.runtime
        self.device, self.dtype = model.device, model.dtype
        self.groups = model.config.norm_num_groups
        self.stat_dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self.host_writes = False
        # The layout the convolutions want (channels-last on the optimized GPU path): padded bands are born in it.
        self.memory_format = self.runtime.memory_format if self.runtime is not None else torch.contiguous_format

    # ----------------------------------------------------------------------------------------- memory
    def store(self, shape: tuple[int, ...]) -> Store:
        size = math.prod(shape) * torch.empty((), dtype=self.dtype).element_size()
        resident = self.plan.resident_bytes
        if self.device.type == "cpu" or resident is None or size <= resident:
            return Store(shape, self.dtype, self.device, pin=False)
        self.host_writes = True
        return Store(shape, self.dtype, torch.device("cpu"), pin=self.device.type == "cuda")

    def finish(self) -> None:
        """Wait for transfers into host memory before anyone reads it there."""
        if self.host_writes and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    # ----------------------------------------------------------------------------------------- layers
    def conv(self, module: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
        if self.runtime is not None:
            if self.runtime.channels_last:
                x = x.contiguous(memory_format=self.runtime.memory_format)
            return self.runtime.conv3d(x, module)
        return nn.Conv3d.forward(module, x)

    def convolve(
        self, conv: nn.Conv3d, source: RowSource, memory: CausalMemory, *,
        residual: Optional[Callable[[int, int], torch.Tensor]] = None, stats: bool = True,
    ) -> Activation:
        """``conv`` over the rows of ``source`` (causal in time when ``conv`` is a CausalConv3d), plus
        ``residual(top, bottom)`` of the output rows; statistics of the output for the next GroupNorm."""
        kt, kh = conv.kernel_size[0], conv.kernel_size[1]
        st, sh = conv.stride[0], conv.stride[1]
        ph = conv.padding[1]
        if sh != 1 and ph != 0:
            raise ValueError("banded convolution: a strided convolution must have no padding (the downsamplers').")
        causal = isinstance(conv, CausalConv3d)
        history: Optional[Store] = None
        if causal and memory.continues(conv):
            history = memory.recall(conv)
        look_back = (kt - 1 if history is None else history.shape[2]) if causal else 0
        total = look_back + source.frames
        out_frames = (total - kt) // st + 1
        keep = causal and not memory.last_chunk
        kept_from = out_frames * st
        out_height = (source.height + 2 * ph - kh) // sh + 1
        out_width = (source.width + 2 * conv.padding[2] - conv.kernel_size[2]) // conv.stride[2] + 1
        batch = None
        out: Optional[Store] = None
        kept: Optional[Store] = None
        group_stats = GroupStats(self.groups, self.stat_dtype) if stats else None
        spans = self.plan.spans(out_height, out_width)
        for number, (top, bottom) in enumerate(spans):
            checkpoint()  # Cancel lands between bands
            lo, hi = max(0, top * sh - ph), min(source.height, (bottom - 1) * sh - ph + kh)
            new = source.rows(lo, hi)
            batch = new.shape[0]
            if causal:
                padded = torch.empty((batch, new.shape[1], total, hi - lo, new.shape[4]), dtype=new.dtype,
                                     device=new.device, memory_format=self.memory_format)
                padded[:, :, look_back:].copy_(new)
                if history is None:
                    padded[:, :, :look_back].copy_(new[:, :, :1].expand(-1, -1, look_back, -1, -1))
                else:
                    padded[:, :, :look_back].copy_(history.read(lo, hi, self.device))
                del new
            else:
                padded = new
            if keep:
                own_lo = max(0, min(source.height, top * sh - ph))
                own_hi = source.height if number == len(spans) - 1 else max(0, min(source.height, bottom * sh - ph))
                if kept is None:
                    kept = self.store((batch, padded.shape[1], total - kept_from, source.height, source.width))
                if own_hi > own_lo:
                    kept.write(own_lo, padded[:, :, kept_from:, own_lo - lo:own_hi - lo])
            y = self.conv(conv, padded)
            del padded
            first = top - lo // sh if ph == 0 else top - lo
            y = y[:, :, :, first:first + bottom - top]
            if residual is not None:
                y = y + residual(top, bottom)
            if group_stats is not None:
                group_stats.add(y)
            if out is None:
                out = self.store((batch, y.shape[1], y.shape[2], out_height, out_width))
            out.write(top, y)
            del y
        if keep:
            memory.keep(conv, kept)
        return Activation(out, group_stats)

    def normalized(self, act: Activation, norm: nn.GroupNorm, silu: bool = True) -> RowSource:
        scale, shift = act.stats.scale_shift(norm)
        return _NormalizedRows(act.store, scale, shift, silu, self)

    def resnet(self, block: ResnetBlock3D, act: Activation, memory: CausalMemory) -> Activation:
        h = self.convolve(block.conv1, self.normalized(act, block.norm1), memory)
        x = act.store

        def residual(top: int, bottom: int) -> torch.Tensor:
            rows = x.read(top, bottom, self.device)
            return rows if block.conv_shortcut is None else self.conv(block.conv_shortcut, rows)

        out = self.convolve(block.conv2, self.normalized(h, block.norm2), memory, residual=residual)
        return out

    def attention(self, block: MidBlockAttention, act: Activation) -> Activation:
        """The mid-block attention frame by frame over the whole frame (h·w latent tokens)."""
        b, c, t, h, w = act.store.shape
        scale, shift = act.stats.scale_shift(block.group_norm)
        out = self.store(act.store.shape)
        frame_stats = []
        chunk = max(1, ATTENTION_CHUNK_ELEMENTS // (h * w))
        for frame in range(t):
            x = act.store.physical[:, :, frame:frame + 1].to(self.device, non_blocking=True).permute(0, 4, 2, 1, 3)
            normalized = _affine(x, scale[:, :, frame:frame + 1], shift[:, :, frame:frame + 1], silu=False)
            y = block.attend(x, normalized.to(x.dtype), query_chunk=chunk, runtime=self.runtime)
            del normalized
            frame_stats.append(GroupStats(self.groups, self.stat_dtype))
            frame_stats[-1].add(y)
            # The frame's rows of every band at once: the whole frame is on the device anyway.
            out.physical[:, :, frame:frame + 1].copy_(y.permute(0, 3, 2, 4, 1), non_blocking=True)
            del x, y
        return Activation(out, GroupStats.of_frames(frame_stats))

    def down(self, block: Downsampler3D, act: Activation, memory: CausalMemory) -> Activation:
        return self.convolve(block.conv, _PaddedRows(_StoreRows(act.store, self)), memory)

    def up(self, block: Upsampler3D, act: Activation, memory: CausalMemory) -> Activation:
        drop = block.time_factor == 2 and not memory.continues(block.conv)
        return self.convolve(block.conv, _ShuffledRows(act.store, block, drop, self), memory)

    # ----------------------------------------------------------------------------------------- networks
    def encode(self, encoder: "Encoder3D", video: torch.Tensor, memory: CausalMemory) -> Activation:
        act = self.convolve(encoder.conv_in, _TensorRows(video, self), memory)
        for index, level in enumerate(encoder.down_blocks):
            checkpoint(index / (len(encoder.down_blocks) + 1))  # progress per level
            for block in level.resnets:
                act = self.resnet(block, act, memory)
            for block in level.downsamplers:
                act = self.down(block, act, memory)
        checkpoint(len(encoder.down_blocks) / (len(encoder.down_blocks) + 1))
        act = self.mid(encoder.mid_block, act, memory)
        return self.convolve(encoder.conv_out, self.normalized(act, encoder.conv_norm_out), memory, stats=False)

    def decode(self, decoder: "Decoder3D", z: torch.Tensor, memory: CausalMemory) -> Activation:
        act = self.convolve(decoder.conv_in, _TensorRows(z, self), memory)
        act = self.mid(decoder.mid_block, act, memory)
        for index, level in enumerate(decoder.up_blocks):
            checkpoint((index + 1) / (len(decoder.up_blocks) + 1))  # progress per level
            for block in level.resnets:
                act = self.resnet(block, act, memory)
            for block in level.upsamplers:
                act = self.up(block, act, memory)
        return self.convolve(decoder.conv_out, self.normalized(act, decoder.conv_norm_out), memory, stats=False)

    def mid(self, block, act: Activation, memory: CausalMemory) -> Activation:
        act = self.resnet(block.resnets[0], act, memory)
        act = self.attention(block.attentions[0], act)
        return self.resnet(block.resnets[1], act, memory)


def run_banded(model: "VideoAutoencoder", direction: str, chunk: torch.Tensor, memory: Optional[CausalMemory],
               plan: BandPlan) -> torch.Tensor:
    """One causal chunk of ``model``'s encoder or decoder, banded; a (B, C, T, H, W) tensor (a view of
    its store, on the compute device or in host memory)."""
    runner = BandedRunner(model, plan)
    if model.runtime is not None and model.runtime.fp8 is not None and id(model) not in _FP8_NOTED:
        _FP8_NOTED.add(id(model))
        logger.info("VAE banded execution runs its convolutions in %s, not fp8 (the fp8 scales are per call)",
                    model.dtype)
    memory = memory if memory is not None else CausalMemory(last_chunk=True)
    coder = model.encoder if direction == "encode" else model.decoder
    act = runner.encode(coder, chunk, memory) if direction == "encode" else runner.decode(coder, chunk, memory)
    runner.finish()
    return act.store.tensor


# --------------------------------------------------------------------------------------------- sources


def _affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, silu: bool) -> torch.Tensor:
    """``x·scale + shift`` per (batch, channel, frame) in float32 (then SiLU)."""
    values = torch.addcmul(shift[..., None, None], x.float(), scale[..., None, None])
    return F.silu(values, inplace=True) if silu else values


class _TensorRows(RowSource):
    """Rows of a (B, C, T, H, W) tensor anywhere (the chunk given to encode/decode)."""

    def __init__(self, tensor: torch.Tensor, runner: BandedRunner) -> None:
        self.tensor, self.runner = tensor, runner
        _, self.channels, self.frames, self.height, self.width = tensor.shape

    def rows(self, top: int, bottom: int) -> torch.Tensor:
        return self.tensor[:, :, :, top:bottom].to(device=self.runner.device, dtype=self.runner.dtype)


class _StoreRows(RowSource):
    def __init__(self, store: Store, runner: BandedRunner) -> None:
        self.store, self.runner = store, runner
        _, self.channels, self.frames, self.height, self.width = store.shape

    def rows(self, top: int, bottom: int) -> torch.Tensor:
        return self.store.read(top, bottom, self.runner.device)


class _NormalizedRows(_StoreRows):
    """SiLU(GroupNorm(rows)) with the whole frame's statistics."""

    def __init__(self, store: Store, scale: torch.Tensor, shift: torch.Tensor, silu: bool,
                 runner: BandedRunner) -> None:
        super().__init__(store, runner)
        self.scale, self.shift, self.silu = scale, shift, silu

    def rows(self, top: int, bottom: int) -> torch.Tensor:
        x = super().rows(top, bottom)
        return _affine(x, self.scale, self.shift, self.silu).to(x.dtype)


class _PaddedRows(RowSource):
    """The downsampler's input: one zero row at the bottom and one zero column at the right."""

    def __init__(self, inner: RowSource) -> None:
        self.inner = inner
        self.channels, self.frames = inner.channels, inner.frames
        self.height, self.width = inner.height + 1, inner.width + 1

    def rows(self, top: int, bottom: int) -> torch.Tensor:
        inside = min(bottom, self.inner.height)
        x = self.inner.rows(top, inside) if inside > top else None
        missing = bottom - max(inside, top)
        if x is None:
            raise ValueError("banded downsampler: a band of the zero padding row only")
        x = F.pad(x, (0, 1, 0, missing))
        return x


class _ShuffledRows(RowSource):
    """The upsampler's 3x3x3 conv input: 1x1 conv and pixel shuffle of the rows a band needs."""

    def __init__(self, store: Store, block: Upsampler3D, drop_first_copy: bool, runner: BandedRunner) -> None:
        self.store, self.block, self.drop, self.runner = store, block, drop_first_copy, runner
        _, channels, frames, height, width = store.shape
        self.channels = channels
        self.frames = frames * block.time_factor - (1 if drop_first_copy else 0)
        self.height, self.width = 2 * height, 2 * width

    def rows(self, top: int, bottom: int) -> torch.Tensor:
        source_top, source_bottom = top // 2, (bottom + 1) // 2
        x = self.store.read(source_top, source_bottom, self.runner.device)
        y = pixel_shuffle_3d(self.runner.conv(self.block.upscale_conv, x), self.block.time_factor)
        del x
        if self.drop:
            y = torch.cat([y[:, :, :1], y[:, :, 2:]], dim=2)
        return y[:, :, :, top - 2 * source_top:bottom - 2 * source_top]


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
