"""Resolution changes: the encoder's strided downsampler and the decoder's pixel-shuffle upsampler."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .causal_conv import CausalConv3d, PaddedInput
from .temporal_slicing import CausalMemory

if TYPE_CHECKING:
    from ...optimization.vae_optimizer import VAERuntime


class Downsampler3D(nn.Module):
    """Halves height and width, and time too on temporal levels (causal: 2m+1 frames -> m+1)."""

    def __init__(self, channels: int, temporal: bool) -> None:
        super().__init__()
        self.temporal = temporal
        if temporal:
            self.conv = CausalConv3d(channels, channels, 3, stride=2, spatial_padding=0)
        else:
            self.conv = nn.Conv3d(channels, channels, (1, 3, 3), stride=(1, 2, 2))

    def forward(self, x: torch.Tensor, memory: Optional[CausalMemory] = None) -> torch.Tensor:
        # The released model pads one zero column on the right and one zero row at the bottom only.
        x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x, memory) if self.temporal else self.conv(x)

    lean_growth = 1.0  # the output is smaller than the input

    def forward_lean(
        self, x: torch.Tensor, memory: CausalMemory, runtime: "VAERuntime", *, with_bias: bool = True
    ) -> torch.Tensor:
        """``forward``'s result, the zero row and column written into the conv's input buffer directly;
        ``with_bias=False`` leaves the conv's bias to the next block (see ``deferred_bias``)."""
        b, c, t, h, w = x.shape
        if self.temporal:
            padded = self.conv.open_input(memory, (b, c, t, h + 1, w + 1), x, runtime)
            _pad_bottom_right_into(x, padded.new_frames, runtime)
            return self.conv.convolve_input(padded, memory, runtime, with_bias=with_bias)
        padded = runtime.empty((b, c, t, h + 1, w + 1), x)
        _pad_bottom_right_into(x, padded, runtime)
        return runtime.conv3d(padded, self.conv, with_bias=with_bias)


def _pad_bottom_right_into(x: torch.Tensor, out: torch.Tensor, runtime: "VAERuntime") -> None:
    """``out = F.pad(x, (0, 1, 0, 1))`` for an ``out`` one row and one column larger than ``x``."""
    h, w = x.shape[3:]
    runtime.copy_into(x, out[..., :h, :w])
    out[..., h, :].zero_()
    out[..., :h, w].zero_()


def pixel_shuffle_3d(x: torch.Tensor, time_factor: int) -> torch.Tensor:
    """(B, C·4·z_r, F, H, W) -> (B, C, F·z_r, 2H, 2W): input channel ``((x·2 + y)·z_r + z)·C + c`` goes to
    frame ``z_r·f + z``, row ``2i + x``, column ``2k + y``, channel ``c`` (z_r = ``time_factor``)."""
    b, expanded, f, h, w = x.shape
    c = expanded // (4 * time_factor)
    x = x.view(b, 2, 2, time_factor, c, f, h, w)  # (B, row offset, column offset, frame offset, C, F, H, W)
    x = x.permute(0, 4, 5, 3, 6, 1, 7, 2)  # (B, C, F, frame offset, H, row offset, W, column offset)
    return x.reshape(b, c, f * time_factor, 2 * h, 2 * w)


class Upsampler3D(nn.Module):
    """Doubles height and width (and time on temporal levels): 1x1x1 conv, pixel shuffle, causal 3x3x3 conv."""

    def __init__(self, channels: int, temporal: bool) -> None:
        super().__init__()
        self.time_factor = 2 if temporal else 1
        self.upscale_conv = nn.Conv3d(channels, channels * 4 * self.time_factor, 1)
        self.conv = CausalConv3d(channels, channels)

    def forward(self, x: torch.Tensor, memory: Optional[CausalMemory] = None) -> torch.Tensor:
        x = pixel_shuffle_3d(self.upscale_conv(x), self.time_factor)
        if self.time_factor == 2 and (memory is None or not memory.continues(self.conv)):
            # The first latent frame stands for one video frame, not two: drop its second copy so that
            # t latent frames become 2t - 1 (and 4(t - 1) + 1 after both temporal levels).
            x = torch.cat([x[:, :, :1], x[:, :, 2:]], dim=2)
        return self.conv(x, memory)

    @property
    def lean_growth(self) -> float:
        """Output size per input frame relative to the input's (2x2 in space, 2 frames with time)."""
        return 4.0 * self.time_factor

    def forward_lean(
        self, x: torch.Tensor, memory: CausalMemory, runtime: "VAERuntime", *, with_bias: bool = True
    ) -> torch.Tensor:
        """``forward``'s result; the shuffled frames are written band by band into the conv's input buffer.
        ``with_bias=False`` leaves the 3x3x3 conv's bias to the next block (see ``deferred_bias``).

        The conv's look-back (its last 2 input frames, 4-8x larger than the upsampler's input) is kept as
        the input frames it is computed from, and recomputed: 1x1 conv and shuffle are cheap, memory is not.
        A conv the runtime quantizes gets an e4m3 buffer, scaled for this call's inputs (look-back included).
        """
        b, c, f, h, w = x.shape
        time_factor, look_back = self.time_factor, self.conv.kernel_size[0] - 1
        starts = not memory.continues(self.conv)
        history: Optional[UpsamplerLookBack] = None if starts else memory.recall(self.conv)
        frames = f * time_factor - (1 if starts and time_factor == 2 else 0)
        scale = runtime.upsampler_input_scale(self.conv, [x] if history is None else [history.inputs, x])
        dtype = None if scale is None else runtime.QUANTIZED_DTYPE
        store_scale = None if scale is None else 1.0 / scale
        padded = PaddedInput(runtime.empty((b, c, look_back + frames, 2 * h, 2 * w), x, dtype), look_back, starts,
                             store_scale=store_scale, input_scale=scale)
        if history is not None:
            history.write(padded, self.upscale_conv, time_factor, runtime)
        runtime.upscale_shuffle_into(
            x, self.upscale_conv, time_factor, padded.new_frames, drop_first_copy=starts and time_factor == 2,
            out_scale=store_scale,
        )
        out = self.conv.convolve_padded(padded, runtime, with_bias=with_bias)
        del padded
        memory.keep(self.conv, UpsamplerLookBack.after(history, x, time_factor, look_back))
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
