"""Exact banded execution: encode or decode a frame in row bands with exactly the untiled result.

A band needs its neighbours' rows (one halo row per 3x3 convolution) and the statistics of every GroupNorm
over the whole frame, so a causal chunk runs through the network layer by layer, each layer band by band:
activations live in a :class:`Store` (on the device, or in host memory above ``BandPlan.resident_bytes``),
every convolution accumulates its output's GroupNorm statistics while writing it (:class:`GroupStats`), and
the mid-block attention runs per frame, its queries in chunks.  Nothing is blended.  The layers run as plain
``nn.Conv3d``/``Linear`` calls; ``optimization.vae_banded`` subclasses :class:`BandedRunner` to run them with
the optimized path's kernels.  The design: docs/architecture.md, "Exact spatial tiling".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...progress import checkpoint
from .causal_conv import CausalConv3d
from .mid_block import MidBlockAttention
from .resampling import Downsampler3D, Upsampler3D, pixel_shuffle_3d
from .resnet import ResnetBlock3D
from .temporal_slicing import CausalMemory

if TYPE_CHECKING:
    from .autoencoder import VideoAutoencoder
    from .decoder import Decoder3D
    from .encoder import Encoder3D

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

    # The layout the convolutions want: padded bands are born in it.
    memory_format = torch.contiguous_format
    # The attention backend of the mid-block (None: the block's own ``attention_backend``).
    attention_backend: Optional[str] = None

    def __init__(self, model: "VideoAutoencoder", plan: BandPlan) -> None:
        self.model, self.plan = model, plan
        self.device, self.dtype = model.device, model.dtype
        self.groups = model.config.norm_num_groups
        self.stat_dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self.host_writes = False

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
        """``module``'s plain convolution of ``x`` (a band, padded in time already for a causal one)."""
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
            y = block.attend(x, normalized.to(x.dtype), query_chunk=chunk, backend=self.attention_backend)
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

    def run(self, direction: str, chunk: torch.Tensor, memory: Optional[CausalMemory]) -> torch.Tensor:
        """One causal chunk of the model's encoder or decoder, banded; a (B, C, T, H, W) tensor (a view of
        its store, on the compute device or in host memory)."""
        memory = memory if memory is not None else CausalMemory(last_chunk=True)
        if direction == "encode":
            act = self.encode(self.model.encoder, chunk, memory)
        else:
            act = self.decode(self.model.decoder, chunk, memory)
        self.finish()
        return act.store.tensor


def run_banded(model: "VideoAutoencoder", direction: str, chunk: torch.Tensor, memory: Optional[CausalMemory],
               plan: BandPlan) -> torch.Tensor:
    """One causal chunk of ``model``'s encoder or decoder, banded by the plain :class:`BandedRunner`."""
    return BandedRunner(model, plan).run(direction, chunk, memory)


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
