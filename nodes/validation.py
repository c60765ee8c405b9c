"""The answer of a node's VALIDATE_INPUTS in ComfyUI's terms."""
from __future__ import annotations

from ..src.pipeline.devices import device_name_problem
from .model_folders import model_problem


def validation_result(**problems: str | None) -> bool | str:
    """True when every problem is None; otherwise one message naming each faulty input.  (ComfyUI shows the
    message once per input that VALIDATE_INPUTS takes, so each part says which input it is about.)"""
    messages = [f"{name}: {problem}" for name, problem in problems.items() if problem]
    return " ".join(messages) if messages else True


def loader_validation(kind: str, model: str | None, device: str | None, offload_device: str | None) -> bool | str:
    """VALIDATE_INPUTS of a loader node: the model file (of ``kind`` "dit" or "vae") and its device names.

    Naming the device inputs in VALIDATE_INPUTS skips ComfyUI's combo check for them, so workflows saved on
    another machine (e.g. with "cuda:0") still validate and fall back when they run.
    """
    return validation_result(
        model=model_problem(model, kind),
        device=device_name_problem(device),
        offload_device=device_name_problem(offload_device, offload=True),
    )
