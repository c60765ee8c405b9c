"""Batched window attention plan: which tokens every window attends over, grouped by window shape.

The joint attention of a layer runs one attention call per *group* of windows with the same video shape
(wt, wh, ww) and the same text length L, instead of one per window.  For a group, ``token_index`` (n, S)
holds, per window, the rows of the concatenated token array ``[video tokens; text tokens]`` that form its
sequence: the window's video tokens in (t, h, w) raster order, then all L text tokens of its sample.
Plans depend only on integer shapes, so they are computed once per (layout, window counts, method, device)
and reused by every layer with the same windowing and by later forward calls.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .packing import PackedLayout
from .windows import partition_windows

# Plans are built on the CPU (whatever default device is active) and copied to the target device once.
_HOST = torch.device("cpu")


@dataclass(frozen=True)
class WindowGroup:
    """Windows of equal video shape and text length, attended in one batched call."""

    shape: tuple[int, int, int]   # (wt, wh, ww) video tokens per window
    text_length: int
    token_index: torch.Tensor     # (n, S) int64 rows of [video; text]; S = wt·wh·ww + text_length
    text_rows: torch.Tensor       # (n·text_length,) int64 rows of the text array, for the text mean

    @property
    def video_length(self) -> int:
        """Video tokens per window."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class WindowPlan:
    """All window groups of one layer plus what is needed to put the outputs back."""

    groups: tuple[WindowGroup, ...]
    video_order: torch.Tensor     # (Lv,) row of each video token in the groups' concatenated video outputs
    text_weight: torch.Tensor     # (Lt,) float32: 1 / (windows of the token's sample), for the text mean


@functools.lru_cache(maxsize=64)
def window_plan(layout: PackedLayout, counts: tuple[int, int, int], method: str,
                device: torch.device) -> WindowPlan:
    """The (cached) window plan of a packed batch for one layer's window counts and method."""
    total_video = sum(layout.video_lengths)
    members: dict[tuple[int, int, int, int], list[torch.Tensor]] = {}
    text_weight = []
    video_offset, text_offset = 0, total_video
    for grid, text_length, video_length in zip(layout.grids, layout.text_lengths, layout.video_lengths):
        token_grid = torch.arange(video_offset, video_offset + video_length, device=_HOST).view(grid)
        text_tokens = torch.arange(text_offset, text_offset + text_length, device=_HOST)
        windows = partition_windows(grid, counts, method)
        for (t0, t1), (h0, h1), (w0, w1) in windows:
            video_tokens = token_grid[t0:t1, h0:h1, w0:w1].reshape(-1)
            key = (t1 - t0, h1 - h0, w1 - w0, text_length)
            members.setdefault(key, []).append(torch.cat([video_tokens, text_tokens]))
        text_weight.append(torch.full((text_length,), 1.0 / len(windows), dtype=torch.float32, device=_HOST))
        video_offset += video_length
        text_offset += text_length

    index_per_group = {key: torch.stack(sequences) for key, sequences in members.items()}
    # Every video token lies in exactly one window: invert the windowed order to scatter outputs back.
    windowed_order = torch.cat([index[:, : wt * wh * ww].reshape(-1)
                                for (wt, wh, ww, _), index in index_per_group.items()])
    video_order = torch.empty_like(windowed_order)
    video_order[windowed_order] = torch.arange(windowed_order.numel(), device=_HOST)

    groups = tuple(
        WindowGroup(
            shape=(wt, wh, ww),
            text_length=text_length,
            token_index=index.to(device),
            text_rows=(index[:, wt * wh * ww:].reshape(-1) - total_video).to(device),
        )
        for (wt, wh, ww, text_length), index in index_per_group.items()
    )
    return WindowPlan(groups, video_order.to(device), torch.cat(text_weight).to(device))
