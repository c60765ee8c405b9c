"""How the benchmarks record their results: the device's name and a JSON file."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def device_name(device: torch.device) -> str:
    """The GPU's name, or "cpu"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def write_json(path: str | Path, results) -> None:
    """Write ``results`` as indented JSON; a value JSON has no type for (a dtype, a path) as its ``str``."""
    Path(path).write_text(json.dumps(results, indent=1, default=str))
