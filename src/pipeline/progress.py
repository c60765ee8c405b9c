"""How the pipeline reports progress and learns about interrupts, without depending on ComfyUI.

The ComfyUI node passes an adapter around ``comfy.utils.ProgressBar`` and
``comfy.model_management.throw_exception_if_processing_interrupted``; the CLI passes a tqdm-based one;
tests pass :class:`Progress` itself, which does nothing.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


class Progress:
    """No-op progress sink; subclasses forward to a real progress bar."""

    def start_phase(self, phase: str, total: int) -> None:
        """A phase ("encode", "upscale", "decode", "postprocess") begins with ``total`` steps."""

    def advance(self, steps: int = 1) -> None:
        """``steps`` more steps of the current phase are done."""

    def check_interrupt(self) -> None:
        """Raise if the user asked to stop; called between batches, tiles and layers."""

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Mark a timed part of a phase (e.g. "postprocess" inside decoding); benchmarks time these."""
        yield
