"""The down- and upsamplers on the fast path: padding and pixel shuffle written into the conv's input buffer.

The upsampler keeps its conv's look-back as the (4-8x smaller) input frames it is shuffled from and
recomputes it in the next call: the 1x1 conv and the shuffle are cheap, memory is not.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from ...models.video_vae_v3.resampling import Downsampler3D, Upsampler3D
from ...models.video_vae_v3.temporal_slicing import CausalMemory
from .conv import PaddedInput, convolve_input, convolve_padded, open_input

if TYPE_CHECKING:
    from ..vae_optimizer import VAERuntime


def downsampler_growth(block: Downsampler3D) -> float:
    """The output is smaller than the input."""
    return 1.0


def lean_downsample(
    block: Downsampler3D, x: torch.Tensor, memory: CausalMemory, runtime: "VAERuntime", *, with_bias: bool = True
) -> torch.Tensor:
    """``block(x, memory)``, the zero row and column written into the conv's input buffer directly;
    ``with_bias=False`` leaves the conv's bias to the next block (see ``level.deferred_bias``)."""
    b, c, t, h, w = x.shape
    if block.temporal:
        padded = open_input(block.conv, memory, (b, c, t, h + 1, w + 1), x, runtime)
        _pad_bottom_right_into(x, padded.new_frames, runtime)
        return convolve_input(block.conv, padded, memory, runtime, with_bias=with_bias)
    padded = runtime.empty((b, c, t, h + 1, w + 1), x)
    _pad_bottom_right_into(x, padded, runtime)
    return runtime.conv3d(padded, block.conv, with_bias=with_bias)


def _pad_bottom_right_into(x: torch.Tensor, out: torch.Tensor, runtime: "VAERuntime") -> None:
    """``out = F.pad(x, (0, 1, 0, 1))`` for an ``out`` one row and one column larger than ``x``."""
    h, w = x.shape[3:]
    runtime.copy_into(x, out[..., :h, :w])
    out[..., h, :].zero_()
    out[..., :h, w].zero_()


def upsampler_growth(block: Upsampler3D) -> float:
    """Output size per input frame relative to the input's (2x2 in space, 2 frames with time)."""
    return 4.0 * block.time_factor


def lean_upsample(
    block: Upsampler3D, x: torch.Tensor, memory: CausalMemory, runtime: "VAERuntime", *, with_bias: bool = True
) -> torch.Tensor:
    """``block(x, memory)``; the shuffled frames are written band by band into the conv's input buffer.
    ``with_bias=False`` leaves the 3x3x3 conv's bias to the next block (see ``level.deferred_bias``).

    The conv's look-back (its last 2 input frames) is kept as the input frames it is computed from
    (:class:`UpsamplerLookBack`), and recomputed.  A conv the runtime quantizes gets an e4m3 buffer, scaled for
    this call's inputs (look-back included).
    """
    b, c, f, h, w = x.shape
    time_factor, look_back = block.time_factor, block.conv.kernel_size[0] - 1
    starts = not memory.continues(block.conv)
    history: Optional[UpsamplerLookBack] = None if starts else memory.recall(block.conv)
    frames = f * time_factor - (1 if starts and time_factor == 2 else 0)
    scale = runtime.upsampler_input_scale(block.conv, [x] if history is None else [history.inputs, x])
    dtype = None if scale is None else runtime.QUANTIZED_DTYPE
    store_scale = None if scale is None else 1.0 / scale
    padded = PaddedInput(runtime.empty((b, c, look_back + frames, 2 * h, 2 * w), x, dtype), look_back, starts,
                         store_scale=store_scale, input_scale=scale)
    if history is not None:
        history.write(padded, block.upscale_conv, time_factor, runtime)
    runtime.upscale_shuffle_into(
        x, block.upscale_conv, time_factor, padded.new_frames, drop_first_copy=starts and time_factor == 2,
        out_scale=store_scale,
    )
    out = convolve_padded(block.conv, padded, runtime, with_bias=with_bias)
    del padded
    memory.keep(block.conv, UpsamplerLookBack.after(history, x, time_factor, look_back))
    return out


@dataclass
class UpsamplerLookBack:
    """The upsampler conv's look-back, as the upsampler inputs it is shuffled from (``first_copy_only``:
    the clip started with a single frame, whose first time copy fills both look-back frames)."""

    inputs: torch.Tensor
    first_copy_only: bool = False

    @classmethod
    def after(
        cls, previous: Optional["UpsamplerLookBack"], x: torch.Tensor, time_factor: int, look_back: int
    ) -> "UpsamplerLookBack":
        """The look-back once ``x`` has been upsampled after ``previous`` (None: ``x`` starts the clip)."""
        needed = look_back // time_factor  # input frames behind the last ``look_back`` shuffled frames
        if previous is None:
            if time_factor == 2 and x.shape[2] == 1:
                return cls(x.clone(), first_copy_only=True)
            # At the clip start the conv repeats the first shuffled frame, i.e. the first input frame.
            before = x[:, :, :1].expand(-1, -1, needed, -1, -1)
        else:
            before = previous.inputs
        sequence = x if x.shape[2] >= needed else torch.cat([before, x], dim=2)
        return cls(sequence[:, :, -needed:].clone())

    def write(self, padded: PaddedInput, upscale_conv: nn.Conv3d, time_factor: int, runtime: "VAERuntime") -> None:
        """Recompute the look-back frames into the history slots of the conv's padded input."""
        out = padded.frames[:, :, :padded.look_back]
        if self.first_copy_only:
            runtime.upscale_shuffle_into(self.inputs, upscale_conv, time_factor, out[:, :, -1:], drop_first_copy=True,
                                         out_scale=padded.store_scale)
            out[:, :, :-1].copy_(out[:, :, -1:].expand(-1, -1, out.shape[2] - 1, -1, -1))
        else:
            runtime.upscale_shuffle_into(self.inputs, upscale_conv, time_factor, out, drop_first_copy=False,
                                         out_scale=padded.store_scale)
