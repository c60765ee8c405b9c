"""The answer of a node's VALIDATE_INPUTS in ComfyUI's terms."""
from __future__ import annotations


def validation_result(**problems: str | None) -> bool | str:
    """True when every problem is None; otherwise one message naming each faulty input.  (ComfyUI shows the
    message once per input that VALIDATE_INPUTS takes, so each part says which input it is about.)"""
    messages = [f"{name}: {problem}" for name, problem in problems.items() if problem]
    return " ".join(messages) if messages else True
