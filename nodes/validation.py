"""The answer of a node's VALIDATE_INPUTS in ComfyUI's terms."""
from __future__ import annotations

from ..src.pipeline.devices import device_name_problem
from ..src.pipeline.settings import SettingsError
from .model_folders import model_problem


def validation_result(**problems: str | None) -> bool | str:
    """True when every problem is None; otherwise one message naming each faulty input."""
    messages = [f"{name}: {problem}" for name, problem in problems.items() if problem]
    return " ".join(messages) if messages else True


def loader_validation(device: str | None, offload_device: str | None) -> bool | str:
    """VALIDATE_INPUTS of a loader node: its device names.

    ComfyUI attaches a failed VALIDATE_INPUTS to every input the method takes, and skips its own combo check
    for exactly those.  So it takes the device inputs, whose combo check must be skipped (workflows saved on
    another machine, e.g. with "cuda:0", still validate and fall back when they run), and not ``model``: a
    model name that is not listed gets ComfyUI's own "not in list" error, attached to ``model`` alone.
    """
    return validation_result(
        device=device_name_problem(device),
        offload_device=device_name_problem(offload_device, offload=True),
    )


def require_model(name: str, kind: str) -> None:
    """Raise the clear error for a model name that cannot be used (a linked input skips the combo check)."""
    problem = model_problem(name, kind)
    if problem is not None:
        raise SettingsError(problem)
