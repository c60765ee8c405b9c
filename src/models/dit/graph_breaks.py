"""Methods kept out of torch.compile graphs, marked without importing Dynamo when the model is imported.

``torch.compiler.disable`` imports ``torch._dynamo`` (and Triton with it), which costs every user seconds
of start-up whether or not anything is compiled.  ``@eager`` marks a method instead; :func:`apply`, called by
the compile manager before it compiles anything (next to ``attention_dispatch.prepare_for_compile``), replaces each
marked method by its ``torch.compiler.disable``'d version.  Uncompiled, a marked method is the plain function.
"""
from __future__ import annotations

from typing import Callable

_marked: list[tuple[type, str, Callable]] = []
_applied = False


class eager:
    """Decorator for a method: run it outside any compiled graph, once compilation is prepared."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __set_name__(self, owner: type, name: str) -> None:
        _marked.append((owner, name, self.fn))
        setattr(owner, name, _disabled(self.fn) if _applied else self.fn)


def _disabled(fn: Callable) -> Callable:
    import torch

    return torch.compiler.disable(fn)


def apply() -> None:
    """Make every marked method a graph break (idempotent; classes defined later are marked on definition)."""
    global _applied
    if _applied:
        return
    for owner, name, fn in _marked:
        if owner.__dict__.get(name) is fn:
            setattr(owner, name, _disabled(fn))
    _applied = True


def marked() -> list[tuple[type, str]]:
    return [(owner, name) for owner, name, _ in _marked]
