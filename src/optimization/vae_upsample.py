"""The decoder upsampler's 1x1 conv and pixel shuffle as GEMMs that write the shuffled frames in place.

``pixel_shuffle_3d(conv_1x1(x))`` sends output channel ``((dx·2 + dy)·z_r + dz)·C + c`` of input pixel
``(i, k)`` to frame ``dz``, row ``2i + dx``, column ``2k + dy``, channel ``c``.  In channels-last memory a
row of an output frame is laid out [column][channel], so for fixed ``(dz, dx)`` the outputs of input row
``i`` over all ``k``, ``dy``, ``c`` fill one contiguous stretch of ``W·2C`` values: the product of the
row's pixels ``(W, C_in)`` with the weights of those ``2C`` output channels ``(C_in, 2C)``.  One batched
GEMM over a band of rows per ``(dz, dx)`` therefore writes the shuffled frames straight into the next
convolution's padded input: no 4-8x wide intermediate and no strided shuffling copy (which ran at about
540 GB/s, 0.2 s of a 33-frame 1080p decode on an H100).  The bias rides in the GEMM as an input column of
ones (padded to 8 columns, which tensor cores want).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

# Input columns appended for the bias: a column of ones, then zeros up to a multiple of 8.
BIAS_COLUMNS = 8


def shuffle_matrices(weight: torch.Tensor, bias: Optional[torch.Tensor], time_factor: int) -> torch.Tensor:
    """The 1x1 conv's weight (4·z_r·C, C_in, 1, 1, 1) and bias regrouped as (z_r, 2, C_in + 8, 2C) matrices:
    ``[dz][dx]`` maps an input pixel's channels (then 1, then zeros) to output row ``2i + dx`` of frame ``dz``
    at columns ``2k``, ``2k + 1`` (all C channels of each)."""
    expanded, in_channels = weight.shape[:2]
    channels = expanded // (4 * time_factor)
    by_position = weight.reshape(2, 2, time_factor, channels, in_channels)  # (dx, dy, dz, c, c_in)
    matrices = weight.new_zeros(time_factor, 2, in_channels + BIAS_COLUMNS, 2 * channels)
    matrices[:, :, :in_channels] = by_position.permute(2, 0, 4, 1, 3).reshape(time_factor, 2, in_channels, -1)
    if bias is not None:
        matrices[:, :, in_channels] = bias.reshape(2, 2, time_factor, channels).permute(2, 0, 1, 3).reshape(
            time_factor, 2, -1)
    return matrices


def upscale_shuffle_gemm_into(
    x: torch.Tensor, matrices: torch.Tensor, out: torch.Tensor, *, band_rows: int, drop_first_copy: bool,
    copy: Callable[[torch.Tensor, torch.Tensor], None] = lambda source, target: target.copy_(source),
    store: Callable[[torch.Tensor, torch.Tensor], None] = lambda source, target: target.copy_(source),
) -> None:
    """Write ``pixel_shuffle_3d(conv_1x1(x))`` (``matrices`` from :func:`shuffle_matrices`) into ``out``
    (B, C, F', 2H, 2W), without the second time copy of frame 0 when ``drop_first_copy``.  An ``out`` of
    another dtype (e4m3) receives each GEMM's result through a staging band, cast by ``store(source, target)``.

    Both ``x`` and ``out`` must hold every frame as a contiguous (H, W, C) block (channels-last), which
    :func:`supports` checks.  Input rows go through the GEMMs in bands of ``band_rows``; ``copy(source,
    target)`` puts a band's pixels next to their bias column (a faster kernel than PyTorch's strided copy can
    be passed in).
    """
    batches, in_channels, frames, height, width = x.shape
    time_factor, _, columns, _ = matrices.shape
    rows = max(1, min(band_rows, height))
    band = x.new_zeros(rows, width, columns)
    band[..., in_channels] = 1  # the bias column; the input channels are copied in per band
    stage = None if out.dtype == x.dtype else x.new_empty(rows, width, matrices.shape[3])
    for batch in range(batches):
        for frame in range(frames):
            copies = 1 if drop_first_copy and frame == 0 else time_factor
            start = frame * time_factor - (1 if drop_first_copy and frame > 0 else 0)
            pixels = x[batch, :, frame].permute(1, 2, 0)  # (H, W, C_in)
            for top in range(0, height, rows):
                count = min(rows, height - top)
                tokens = band[:count]
                copy(pixels[top:top + count], tokens[..., :in_channels])
                for dz in range(copies):
                    target_frame = out[batch, :, start + dz].permute(1, 2, 0)  # (2H, 2W, C)
                    for dx in range(2):
                        target = target_frame[2 * top + dx:2 * (top + count):2].view(count, width, -1)
                        if stage is None:
                            torch.bmm(tokens, matrices[dz, dx].expand(count, -1, -1), out=target)
                        else:
                            torch.bmm(tokens, matrices[dz, dx].expand(count, -1, -1), out=stage[:count])
                            store(stage[:count], target)


def supports(x: torch.Tensor, out: torch.Tensor) -> bool:
    """True when every frame of ``x`` and ``out`` is a contiguous (H, W, C) block (channels-last layout)."""
    def frames_channels_last(t: torch.Tensor) -> bool:
        channels, _, height, width = t.shape[1:]
        return t.stride(1) == 1 and t.stride(4) == channels and t.stride(3) == width * channels
    return frames_channels_last(x) and frames_channels_last(out)
