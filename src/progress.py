"""How the pipeline reports progress and learns about interrupts, without depending on ComfyUI.

The ComfyUI node passes an adapter around ``comfy.utils.ProgressBar`` and
``comfy.model_management.throw_exception_if_processing_interrupted``; the CLI passes
:class:`~.console.ConsoleProgress` (a tqdm bar; Ctrl-C stops it as any Python program); without one the
upscaler uses :class:`Progress` itself, which does nothing.

The phases count steps (batches), and each phase's loop checks for an interrupt before every step.  A
single step can take minutes (one 1080p batch on a small GPU), so the long loops inside a step call
:func:`checkpoint`: the DiT between blocks; the VAE between levels and resnet blocks, between temporal
chunks, streamed pieces and the row bands of a tiled run; the colour correction between its passes; the
upscaler around a batch's post-processing.  It checks for an interrupt and, when the loop says how far it
is, tells the active progress how far into the current step the run is.  The loops know nothing of the
pipeline: the upscaler makes its progress the active one with :func:`reporting`, and a loop that splits
the step (the VAE's temporal chunks) gives each part its share with :func:`part`, so the loops inside a
part report within that share.  Without an active progress, or inside a compiled region,
:func:`checkpoint` does nothing.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator


class Progress:
    """No-op progress sink; subclasses forward to a real progress bar."""

    def start_phase(self, phase: str, total: int) -> None:
        """A phase ("encode", "upscale", "decode", "postprocess") begins with ``total`` steps."""

    def advance(self, steps: int = 1) -> None:
        """``steps`` more steps of the current phase are done."""

    def within_step(self, fraction: float) -> None:
        """The step in progress is ``fraction`` (0 to 1) done; reported from inside long loops."""

    def check_interrupt(self) -> None:
        """Raise if the user asked to stop; called before every step of a phase, and inside a step at
        every :func:`checkpoint` (DiT blocks; VAE levels, chunks, pieces and bands; colour correction)."""

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Mark a timed part of a phase (e.g. "postprocess" inside decoding); benchmarks time these."""
        yield


# The progress of the run on this thread (or asyncio task), and the share of its current step that the
# innermost running loop owns, as (start, stop) fractions of the step.
_ACTIVE: ContextVar[Progress | None] = ContextVar("seedvr2_progress", default=None)
_SPAN: ContextVar[tuple[float, float]] = ContextVar("seedvr2_progress_span", default=(0.0, 1.0))


@contextmanager
def reporting(progress: Progress | None) -> Iterator[None]:
    """Make ``progress`` the one :func:`checkpoint` reports to while the block runs."""
    active, span = _ACTIVE.set(progress), _SPAN.set((0.0, 1.0))
    try:
        yield
    finally:
        _SPAN.reset(span)
        _ACTIVE.reset(active)


@contextmanager
def part(index: int, count: int) -> Iterator[None]:
    """While the block runs, the innermost loop's share is its ``index``-th of ``count`` equal parts."""
    start, stop = _SPAN.get()
    width = (stop - start) / max(count, 1)
    token = _SPAN.set((start + width * index, start + width * (index + 1)))
    try:
        yield
    finally:
        _SPAN.reset(token)


def checkpoint(done: float | None = None) -> None:
    """Called between the iterations of a long loop: raise if the user asked to stop, and report that the
    loop's share of the current step is ``done`` (0 to 1) complete (None: only check for an interrupt)."""
    torch = sys.modules.get("torch")  # not imported here: the CLI's console uses this module before torch
    if torch is not None and torch.compiler.is_compiling():
        return  # inside a compiled region (the plain VAE's compiled forward): no graph break
    progress = _ACTIVE.get()
    if progress is None:
        return
    progress.check_interrupt()
    if done is None:
        return
    start, stop = _SPAN.get()
    progress.within_step(start + (stop - start) * min(max(done, 0.0), 1.0))
