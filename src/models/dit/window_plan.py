"""Batched window attention plan: which tokens every window attends over, grouped by window shape.

The joint attention of a layer runs one attention call per *group* of windows with the same video shape
(wt, wh, ww) and the same text length L, instead of one per window.  For a group, ``token_index`` (n, S)
holds, per window, the rows of the concatenated token array ``[video tokens; text tokens]`` that form its
sequence: the window's video tokens in (t, h, w) raster order, then all L text tokens of its sample.
Plans depend only on integer shapes, so they are computed once per (layout, window counts, method, device)
and reused by every layer with the same windowing and by later forward calls.  The cache is owned by the
model (:class:`WindowPlanCache`), not the module: plans hold index tensors on the model's device (tens of MB
at 1080p), which must go when the model goes or moves.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

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
    video_rows: torch.Tensor      # (n·wt·wh·ww,) int64 video token rows in window order, for the scatter back
    text_rows: torch.Tensor       # (n·text_length,) int64 rows of the text array, for the text mean

    @property
    def video_length(self) -> int:
        """Video tokens per window."""
        return math.prod(self.shape)


@dataclass(frozen=True, eq=False)
class WindowPlan:
    """All window groups of one layer, each video token's place in its window, and the text weights."""

    groups: tuple[WindowGroup, ...]
    video_offset: torch.Tensor    # (Lv, 3) int64: (t', h', w') of each video token inside its window
    video_extent: torch.Tensor    # (Lv, 3) int64: (wt, wh, ww) of the window holding each video token
    video_text_length: torch.Tensor  # (Lv,) int64: text length of each video token's sample
    text_position: torch.Tensor   # (Lt,) int64: index j of each text token within its sample's text
    text_weight: torch.Tensor     # (Lt,) float32: 1 / (windows of the token's sample), for the text mean
    cache: dict = field(default_factory=dict)  # per-plan derived tables (rotary), filled on first use


class WindowPlanCache:
    """The window plans of one model, least recently used dropped beyond ``max_entries``.

    A forward needs one plan per distinct layer windowing (two for the released models), so a handful of
    batch shapes fit.  Plans on another device than the one asked for are dropped on the next lookup, so
    a model that moved keeps nothing on its old device; :meth:`clear` drops them all.
    """

    def __init__(self, max_entries: int = 16):
        self.max_entries = max_entries
        self._plans: OrderedDict[tuple, WindowPlan] = OrderedDict()

    def __len__(self) -> int:
        return len(self._plans)

    def get(self, layout: PackedLayout, counts: tuple[int, int, int], method: str,
            device: torch.device) -> WindowPlan:
        device = torch.device(device)
        key = (layout, tuple(counts), method, device)
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
            return plan
        for stale in [k for k in self._plans if k[3] != device]:
            del self._plans[stale]
        plan = self._plans[key] = window_plan(layout, counts, method, device)
        while len(self._plans) > self.max_entries:
            self._plans.popitem(last=False)
        return plan

    def clear(self) -> None:
        self._plans.clear()

    def __deepcopy__(self, memo) -> "WindowPlanCache":
        return WindowPlanCache(self.max_entries)  # a copied model builds its own plans


def window_plan(layout: PackedLayout, counts: tuple[int, int, int], method: str,
                device: torch.device) -> WindowPlan:
    """The window plan of a packed batch for one layer's window counts and method (not cached: models
    cache through their :class:`WindowPlanCache`)."""
    total_video = sum(layout.video_lengths)
    members: dict[tuple[int, int, int, int], list[torch.Tensor]] = {}
    offset = torch.empty((total_video, 3), dtype=torch.int64, device=_HOST)
    extent = torch.empty((total_video, 3), dtype=torch.int64, device=_HOST)
    video_text_length = torch.empty((total_video,), dtype=torch.int64, device=_HOST)
    text_weight, text_position = [], []
    video_offset, text_offset = 0, total_video
    for grid, text_length, video_length in zip(layout.grids, layout.text_lengths, layout.video_lengths):
        token_grid = torch.arange(video_offset, video_offset + video_length, device=_HOST).view(grid)
        text_tokens = torch.arange(text_offset, text_offset + text_length, device=_HOST)
        windows = partition_windows(grid, counts, method)
        for (t0, t1), (h0, h1), (w0, w1) in windows:
            shape = (t1 - t0, h1 - h0, w1 - w0)
            video_tokens = token_grid[t0:t1, h0:h1, w0:w1].reshape(-1)
            local = torch.stack(torch.meshgrid(*(torch.arange(n, device=_HOST) for n in shape), indexing="ij"), -1)
            offset[video_tokens] = local.reshape(-1, 3)
            extent[video_tokens] = torch.tensor(shape, device=_HOST)
            members.setdefault((*shape, text_length), []).append(torch.cat([video_tokens, text_tokens]))
        video_text_length[video_offset:video_offset + video_length] = text_length
        text_weight.append(torch.full((text_length,), 1.0 / len(windows), dtype=torch.float32, device=_HOST))
        text_position.append(torch.arange(text_length, device=_HOST))
        video_offset += video_length
        text_offset += text_length

    groups = []
    for (wt, wh, ww, text_length), sequences in members.items():
        index = torch.stack(sequences)
        groups.append(WindowGroup(
            shape=(wt, wh, ww),
            text_length=text_length,
            token_index=index.to(device),
            video_rows=index[:, : wt * wh * ww].reshape(-1).to(device),
            text_rows=(index[:, wt * wh * ww:].reshape(-1) - total_video).to(device),
        ))
    return WindowPlan(tuple(groups), offset.to(device), extent.to(device), video_text_length.to(device),
                      torch.cat(text_position).to(device), torch.cat(text_weight).to(device))
