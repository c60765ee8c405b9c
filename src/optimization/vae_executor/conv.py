"""A causal convolution on the fast path: its input buffer is allocated once and filled in place.

The plain :class:`CausalConv3d` concatenates its look-back and the new frames; here the padded input
(:class:`PaddedInput`) is allocated with the look-back copied in, and the producer of the new frames (a
GroupNorm, a copy, the upsampler's shuffle) writes them straight into it.  Convolutions that feed a GroupNorm
may leave their bias to the next pass over their output (``with_bias=False``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from ...models.video_vae_v3.causal_conv import CausalConv3d
from ...models.video_vae_v3.temporal_slicing import CausalMemory

if TYPE_CHECKING:
    from ..vae_optimizer import VAERuntime


@dataclass
class PaddedInput:
    """A causal convolution's input buffer: ``look_back`` history frames, then the new frames."""

    frames: torch.Tensor
    look_back: int
    starts_clip: bool
    # For an e4m3 buffer (a convolution quantized by optimization.vae_fp8): per channel (or one for all), what
    # the producer of the new frames multiplies its values by before storing them.  None: stored as they are.
    store_scale: Optional[torch.Tensor] = None
    # An e4m3 buffer whose scale was chosen for this call (an upsampler's): what a stored value stands for per
    # unit, which the convolution multiplies its sums by.  None: a static scale, folded into the weights.
    input_scale: Optional[torch.Tensor] = None

    @property
    def new_frames(self) -> torch.Tensor:
        """Where the producer of the new frames writes them."""
        return self.frames[:, :, self.look_back:]


def conv_growth(conv: nn.Conv3d) -> float:
    """Output width per frame relative to the input's, for sizing streamed pieces."""
    return max(1.0, conv.out_channels / conv.in_channels)


def open_input(
    conv: CausalConv3d, memory: CausalMemory, new_shape: tuple[int, ...], like: torch.Tensor, runtime: "VAERuntime"
) -> PaddedInput:
    """Allocate the padded input for new frames of ``new_shape`` (B, C, T, H, W), history copied in; at the
    clip start the history slots are filled from the first new frame by :func:`convolve_input`.  A convolution
    the runtime quantizes gets an e4m3 buffer (and keeps e4m3 look-back)."""
    batch, channels, frames, height, width = new_shape
    scale = runtime.input_multiplier(conv)
    dtype = like.dtype if scale is None else runtime.QUANTIZED_DTYPE
    starts = not memory.continues(conv)
    history = None if starts else memory.recall(conv)
    look_back = conv.kernel_size[0] - 1 if history is None else history.shape[2]
    buffer = runtime.empty((batch, channels, look_back + frames, height, width), like, dtype)
    if history is not None:
        buffer[:, :, :look_back].copy_(history)
    return PaddedInput(buffer, look_back, starts_clip=starts, store_scale=scale)


def next_look_back(
    conv: CausalConv3d, padded: PaddedInput, memory: CausalMemory, runtime: "VAERuntime"
) -> Optional[torch.Tensor]:
    """An empty tensor for the look-back this call will keep, when the producer of the new frames can write it
    alongside them (a stride-1 convolution given at least ``k_t - 1`` new frames, with a next call to read
    it); None otherwise: :func:`convolve_input` then copies the input's tail itself."""
    look_back = conv.kernel_size[0] - 1
    new = padded.new_frames
    if conv.stride[0] != 1 or memory.closing or new.shape[2] < look_back or look_back == 0:
        return None
    return runtime.empty((new.shape[0], new.shape[1], look_back, *new.shape[3:]), new)


def convolve_input(
    conv: CausalConv3d, padded: PaddedInput, memory: CausalMemory, runtime: "VAERuntime", *,
    with_bias: bool = True, look_back: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The plain ``conv(x, memory)`` from a filled :class:`PaddedInput` (without the bias if ``with_bias`` is
    False: the caller folds it into its next pass); keeps the input's tail for the next call (``look_back``:
    that tail, already written by the producer of the new frames, see :func:`next_look_back`)."""
    frames = padded.frames
    if frames.shape[2] < conv.kernel_size[0]:
        # A strided convolution still collecting its next window (streamed one frame at a time).
        repeat_first_frame(padded)
        memory.keep(conv, frames)
        return frames.new_empty((frames.shape[0], conv.out_channels, 0, *_output_size(conv, frames)))
    out = convolve_padded(conv, padded, runtime, with_bias=with_bias)
    memory.keep(conv, look_back if look_back is not None else frames[:, :, out.shape[2] * conv.stride[0]:].clone())
    return out


def convolve_padded(
    conv: CausalConv3d, padded: PaddedInput, runtime: "VAERuntime", *, with_bias: bool = True
) -> torch.Tensor:
    """Convolve a filled :class:`PaddedInput` (history slots repeated from the first frame at the clip start);
    the caller keeps whatever the next call needs."""
    repeat_first_frame(padded)
    return runtime.conv3d(padded.frames, conv, with_bias=with_bias, input_scale=padded.input_scale)


def repeat_first_frame(padded: PaddedInput) -> None:
    """At the clip start, fill the history slots with copies of the first new frame."""
    if padded.starts_clip:
        look_back = padded.look_back
        first = padded.frames[:, :, look_back:look_back + 1]
        # Slot by slot: a copy between equally laid out frames is one memcpy, where copying from an expanded
        # view takes a strided kernel.
        for slot in range(look_back):
            padded.frames[:, :, slot:slot + 1].copy_(first)


def lean_conv(
    conv: CausalConv3d, x: torch.Tensor, memory: CausalMemory, runtime: "VAERuntime",
    norm: Optional[nn.GroupNorm] = None, *, with_bias: bool = True, input_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``conv(SiLU(norm(x + input_bias)), memory)``, or ``conv(x, memory)`` without ``norm``, with the
    normalised (or copied) frames written straight into the padded input.  ``input_bias``: the bias the
    producer of ``x`` left out (with ``norm`` only); ``with_bias=False`` leaves ``conv``'s bias to the caller."""
    channels = x.shape[1] if norm is not None else runtime.input_channels(x.shape[1])
    padded = open_input(conv, memory, (x.shape[0], channels, *x.shape[2:]), x, runtime)
    look_back = None
    if norm is not None:
        look_back = next_look_back(conv, padded, memory, runtime)
        runtime.normalize(x, norm, silu=True, out=padded.new_frames, shift=input_bias, tail=look_back,
                          out_scale=padded.store_scale)
    else:
        if input_bias is not None:
            raise ValueError("input_bias is folded into the GroupNorm; a convolution without norm cannot take it.")
        if padded.store_scale is not None:
            raise ValueError("an e4m3 convolution input is written by its GroupNorm; this convolution has none.")
        runtime.copy_channels_into(x, padded.new_frames)  # zero channel padding for cuDNN, if any
    return convolve_input(conv, padded, memory, runtime, with_bias=with_bias, look_back=look_back)


def _output_size(conv: nn.Conv3d, x: torch.Tensor) -> tuple[int, int]:
    """Output height and width of ``conv`` for an input like ``x``."""
    return tuple(
        (size + 2 * pad - kernel) // stride + 1
        for size, pad, kernel, stride in zip(x.shape[3:], conv.padding[1:], conv.kernel_size[1:], conv.stride[1:])
    )
