"""Exact chunked execution of the DiT's per-token work, for large token counts (an 8K image).

Inside ``token_chunks(rows)`` the blocks run their row-wise steps on at most ``rows`` tokens at a time:

* the MLP update ``x + gate·MLP(modulate(RMSNorm(x)))`` (its hidden activations are 4x the model width, the
  largest temporaries of a block), per sample and chunk of rows (:func:`by_rows`);
* the window attention's gathers: each group of equally shaped windows is attended ``rows`` tokens' worth
  of windows at a time (:func:`window_chunk`), so the gathered q/k/v copies are chunk-sized.

Both are exact: every token's MLP, norm and modulation see only that token (and its sample's time
embedding), and windows attend independently.  Outside the block (the default) the model runs unchunked;
the memory planner (``pipeline.memory_plan``) sets ``rows`` from the budget.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

import torch

_rows: Optional[int] = None


@contextmanager
def token_chunks(rows: Optional[int]) -> Iterator[None]:
    """Run the DiT's per-token work in chunks of at most ``rows`` tokens inside this block (None: whole)."""
    global _rows
    if rows is not None and (not isinstance(rows, int) or isinstance(rows, bool) or rows < 1):
        raise ValueError(f"DiT token chunks must be a positive number of tokens or None, got {rows!r}.")
    previous = _rows
    _rows = rows
    try:
        yield
    finally:
        _rows = previous


def chunk_rows() -> Optional[int]:
    """The active chunk size in tokens (None: unchunked)."""
    return _rows


def by_rows(fn: Callable[[torch.Tensor, torch.Tensor, tuple[int, ...]], torch.Tensor], x: torch.Tensor,
            time: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """``fn(x, time, lengths)`` for a row-wise ``fn`` of packed tokens ``x`` (rows of samples by ``lengths``,
    ``time`` one row per sample), evaluated chunk by chunk within each sample into one output."""
    rows = _rows
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


def window_chunk(windows: int, tokens_per_window: int) -> int:
    """How many windows of ``tokens_per_window`` tokens one attention call takes (all of them when off)."""
    rows = _rows
    if rows is None:
        return windows
    return max(1, min(windows, rows // max(1, tokens_per_window)))
