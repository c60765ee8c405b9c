"""Errors of the weight-file readers (one module, so that every reader can raise them without importing
another reader)."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A weight file cannot be used; the message names the file and says what to do."""


class GGUFError(CheckpointError):
    """A GGUF file or tensor cannot be used; the message names it and says what to do."""
