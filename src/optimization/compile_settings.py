"""What :mod:`.torch_compile` hands to ``torch.compile``: the settings of the Torch Compile Settings node.

A module of its own without torch, so the nodes, the settings and the command line can read the choices
cheaply.  The backends and modes listed are the ones the node offers (in the earlier node pack's order);
``torch.compile`` accepts any other backend name it knows, so :class:`CompileSettings` does not restrict them.
"""
from __future__ import annotations

from dataclasses import dataclass

COMPILE_BACKENDS = ("inductor", "cudagraphs")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class CompileSettings:
    """torch.compile options (the incumbent's SeedVR2TorchCompileSettings node)."""

    backend: str = "inductor"
    mode: str = "default"
    fullgraph: bool = False
    dynamic: bool = False
    dynamo_cache_size_limit: int = 64
    dynamo_recompile_limit: int = 128
