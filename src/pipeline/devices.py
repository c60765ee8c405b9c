"""Device combos of the nodes and what a saved device name means on this machine.

The combos list what this machine has ("auto", "cpu", every "cuda:N", "mps"), so they register on a
CPU-only ComfyUI too.  A workflow saved elsewhere may name a device this machine lacks (typically
"cuda:0"): that is not an error, the node runs on the best device it has and says so once.  Names that
are no device at all ("gpu", "cuda:x") are refused with a message listing the valid ones.
"""
from __future__ import annotations

import logging
import re

import torch

log = logging.getLogger("seedvr2")

_DEVICE_NAME = re.compile(r"^(auto|none|cpu|mps|cuda(:\d+)?)$")
_warned: set[tuple[str, str]] = set()


class DeviceError(ValueError):
    """A device name is not a device; the message lists the valid names."""


def available_devices() -> list[str]:
    """Devices this machine has: "cpu", then "cuda:0".."cuda:N-1", then "mps" if present."""
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def compute_device_choices() -> list[str]:
    """Combo options for where a model runs."""
    return ["auto", *available_devices()]


def offload_device_choices() -> list[str]:
    """Combo options for where weights or tensors wait while not in use ("none" = stay where they are)."""
    return ["none", *available_devices()]


def device_name_problem(name: str | None, *, offload: bool = False) -> str | None:
    """Why ``name`` is not a device name for a compute (or offload) input, or None if it is one."""
    if name is None:
        return None  # the input is linked; its value is checked when the node runs
    allowed = "none, cpu, cuda:N or mps" if offload else "auto, cpu, cuda:N or mps"
    if not isinstance(name, str):  # e.g. a workflow whose widget values are out of step with the inputs
        return f"{name!r} is not a device name; use {allowed} (found here: {', '.join(available_devices())})."
    valid = _DEVICE_NAME.match(name) is not None and name != ("auto" if offload else "none")
    return None if valid else f"{name!r} is not a device; use {allowed} (found here: {', '.join(available_devices())})."


def best_device() -> str:
    """The device "auto" stands for: ComfyUI's own choice when running in ComfyUI (it honours --cpu),
    else the first GPU, else Apple's MPS, else the CPU."""
    try:
        import comfy.model_management as model_management
    except ImportError:
        model_management = None
    if model_management is not None:
        device = model_management.get_torch_device()
        return f"cuda:{device.index or 0}" if device.type == "cuda" else str(device.type)
    if torch.cuda.is_available():
        return "cuda:0"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_device(name: str, *, offload: bool = False) -> str:
    """The device to use for a saved device name: "cpu", "cuda:N", "mps" (or "none" for offload inputs).

    A device this machine lacks falls back, with one warning, to :func:`best_device` (for offload
    inputs: to "cpu", which always exists).
    """
    problem = device_name_problem(name, offload=offload)
    if problem is not None:
        raise DeviceError(problem)
    if name == "auto":
        return best_device()
    if name == "cuda":
        name = "cuda:0"
    if name == "none" or name in available_devices():
        return name
    fallback = "cpu" if offload else best_device()
    if (name, fallback) not in _warned:
        _warned.add((name, fallback))
        log.warning(
            "SeedVR2: device %r is not available on this machine (it has %s); using %r instead.",
            name, ", ".join(available_devices()), fallback,
        )
    return fallback
