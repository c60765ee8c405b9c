"""Exact chunked execution of the DiT's per-token work, for large token counts (an 8K image).

:func:`use_token_chunks` (model, rows) makes a model run its row-wise steps on at most ``rows`` tokens at a
time, by giving the model and its blocks the subclasses below (``rows`` None: the plain classes again):

* the MLP update ``x + gate·MLP(modulate(RMSNorm(x)))`` (its hidden activations are 4x the model width, the
  largest temporaries of a block), per sample and chunk of rows (:func:`by_rows`);
* the window attention's gathers: each group of equally shaped windows of the layer's window plan is split
  into groups of ``rows`` tokens' worth of windows (:func:`split_windows`), so the attention of one group
  gathers chunk-sized q/k/v copies.

Both are exact: every token's MLP, norm and modulation see only that token (and its sample's time
embedding), and windows attend independently (in the same order, so the text sums add up in the same
order).  The memory planner (``pipeline.memory_plan``) sets ``rows`` from the budget.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..models.dit import graph_breaks
from ..models.dit.block import NaDiTBlock
from ..models.dit.model import NaDiT
from ..models.dit.packing import PackedLayout
from ..models.dit.window_plan import WindowGroup, WindowPlan


def by_rows(fn: Callable[[torch.Tensor, torch.Tensor, tuple[int, ...]], torch.Tensor], x: torch.Tensor,
            time: torch.Tensor, lengths: Sequence[int], rows: Optional[int]) -> torch.Tensor:
    """``fn(x, time, lengths)`` for a row-wise ``fn`` of packed tokens ``x`` (rows of samples by ``lengths``,
    ``time`` one row per sample), evaluated at most ``rows`` tokens at a time within each sample into one
    output (None: in one call)."""
    if rows is None or x.shape[0] <= rows:
        return fn(x, time, tuple(lengths))
    out = torch.empty_like(x)
    start = 0
    for sample, length in enumerate(lengths):
        for offset in range(0, length, rows):
            count = min(rows, length - offset)
            part = slice(start + offset, start + offset + count)
            out[part] = fn(x[part], time[sample:sample + 1], (count,))
        start += length
    return out


def window_chunk(windows: int, tokens_per_window: int, rows: Optional[int]) -> int:
    """How many windows of ``tokens_per_window`` tokens one attention call takes for chunks of ``rows``
    tokens (all of them for None; at least one)."""
    if rows is None:
        return windows
    return max(1, min(windows, rows // max(1, tokens_per_window)))


def split_windows(plan: WindowPlan, rows: int) -> WindowPlan:
    """``plan`` with every group split, in window order, into groups of :func:`window_chunk` windows (views of
    the group's index tensors; the per-token tables, rotary cache included, are shared)."""
    groups = []
    for group in plan.groups:
        windows, tokens_per_window = group.token_index.shape
        step = window_chunk(windows, tokens_per_window, rows)
        if step >= windows:
            groups.append(group)
            continue
        video_length, text_length = group.video_length, group.text_length
        for first in range(0, windows, step):
            last = min(first + step, windows)
            groups.append(WindowGroup(
                shape=group.shape, text_length=text_length, token_index=group.token_index[first:last],
                video_rows=group.video_rows[first * video_length:last * video_length],
                text_rows=group.text_rows[first * text_length:last * text_length]))
    return dataclasses.replace(plan, groups=tuple(groups))


class TokenChunkedNaDiTBlock(NaDiTBlock):
    """A block whose MLP updates run :func:`by_rows` on ``token_chunk_rows`` tokens at a time."""

    token_chunk_rows: int

    def _mlp_update(self, x: torch.Tensor, mlp_time: torch.Tensor, lengths: tuple[int, ...],
                    video: bool) -> torch.Tensor:
        def update(part: torch.Tensor, time: torch.Tensor, part_lengths: tuple[int, ...]) -> torch.Tensor:
            return NaDiTBlock._mlp_update(self, part, time, part_lengths, video)

        return by_rows(update, x, mlp_time, lengths, self.token_chunk_rows)


class TokenChunkedNaDiT(NaDiT):
    """A NaDiT whose window plans hold groups of at most ``token_chunk_rows`` tokens' worth of windows."""

    token_chunk_rows: int

    @graph_breaks.eager
    def _window_plans(self, layout: PackedLayout, device: torch.device) -> dict:
        plans = NaDiT._window_plans(self, layout, device)
        return {key: split_windows(plan, self.token_chunk_rows) for key, plan in plans.items()}


_CHUNKED = {NaDiT: TokenChunkedNaDiT, NaDiTBlock: TokenChunkedNaDiTBlock}
_PLAIN = {chunked: plain for plain, chunked in _CHUNKED.items()}


def use_token_chunks(model: nn.Module, rows: Optional[int]) -> None:
    """Run the per-token work of the DiT ``model`` in chunks of at most ``rows`` tokens (None: whole)."""
    if rows is not None and (not isinstance(rows, int) or isinstance(rows, bool) or rows < 1):
        raise ValueError(f"DiT token chunks must be a positive number of tokens or None, got {rows!r}.")
    for module in model.modules():
        cls = type(module)
        if rows is None:
            if cls in _PLAIN:
                module.__class__ = _PLAIN[cls]
                del module.token_chunk_rows
        elif cls in _CHUNKED or cls in _PLAIN:
            module.__class__ = _CHUNKED.get(cls, cls)
            module.token_chunk_rows = rows


def chunk_rows(model: nn.Module) -> Optional[int]:
    """The chunk size in tokens ``model`` runs with (None: unchunked)."""
    return getattr(model, "token_chunk_rows", None) if type(model) in _PLAIN else None
