"""The choices the nodes and the command line offer, without importing torch.

Each list is defined once, as a literal tuple of names in the module that implements it, and that module
checks when it is imported that every name it declares has an implementation.  The command line lists
and checks the choices before torch is imported (``--help`` stays instant), and those modules import
torch, so this module reads the literals from their source instead of importing them.  The lists that
live in torch-free modules are imported from there.

Adding a choice therefore touches one file: the implementing module's tuple and its implementation.
Names the earlier node pack had keep its order, and new ones follow, so saved workflows keep their values.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

from .distributed import PARALLEL_MODES
from .optimization.compile_settings import COMPILE_BACKENDS, COMPILE_MODES

_SRC = Path(__file__).resolve().parent


class DeclarationError(RuntimeError):
    """A module does not declare its choices as one literal tuple of names."""


@functools.lru_cache(maxsize=None)
def _top_level_literals(path: Path) -> dict[str, object]:
    """Every ``NAME = <literal>`` at the top level of ``path``; names assigned more than once map to None."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: dict[str, object] = {}
    for statement in tree.body:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
            target, value = statement.targets[0], statement.value
        elif isinstance(statement, ast.AnnAssign) and statement.value is not None:
            target, value = statement.target, statement.value
        else:
            continue
        if not isinstance(target, ast.Name):
            continue
        try:
            literal = ast.literal_eval(value)
        except (ValueError, TypeError, SyntaxError):
            literal = None  # not a literal: cannot be read without running the module
        found[target.id] = None if target.id in found else literal
    return found


def declared(module: str, name: str) -> tuple[str, ...]:
    """The tuple of names that ``src/<module>.py`` (dotted, e.g. ``"optimization.vae_fp8"``) assigns to
    ``name`` once, as a literal, at its top level."""
    return declared_in(_SRC.joinpath(*module.split(".")).with_suffix(".py"), name)


def declared_in(path: Path, name: str) -> tuple[str, ...]:
    """:func:`declared` for a source file given by its path."""
    value = _top_level_literals(Path(path)).get(name)
    if not (isinstance(value, tuple) and value and all(isinstance(item, str) for item in value)):
        raise DeclarationError(
            f"{path}: {name} must be assigned once, at the top level, to a literal tuple of names (the command "
            f"line reads it without importing the module)."
        )
    if len(set(value)) != len(value):
        raise DeclarationError(f"{path}: {name} lists a name twice: {value}.")
    return value


def check_implemented(owner: str, names: tuple[str, ...], implemented) -> None:
    """Raise unless the names ``owner`` declares are exactly the ones it implements (run at its import)."""
    missing, undeclared = set(names) - set(implemented), set(implemented) - set(names)
    if missing or undeclared:
        raise DeclarationError(
            f"{owner}: declared without an implementation: {sorted(missing)}; implemented but not declared: "
            f"{sorted(undeclared)}."
        )


# Attention kernels and their aliases, "auto" first (optimization.attention_dispatch registers a kernel for each).
ATTENTION_MODES = declared("optimization.attention_dispatch", "ATTENTION_MODES")
# The DiT's quantization modes (optimization.linear_quantization; "gguf": optimization.gguf).
QUANTIZATION_MODES = declared("optimization.linear_quantization", "QUANTIZATION_MODES")
# The VAE's quantization modes (optimization.vae_fp8).
VAE_QUANTIZATIONS = declared("optimization.vae_fp8", "MODES")
# Colour correction of the output against the input (pipeline.color_correction).
COLOR_CORRECTIONS = declared("pipeline.color_correction", "METHODS")
# The VAE loader's tile_debug view (pipeline.tile_debug).
TILE_DEBUG_MODES = declared("pipeline.tile_debug", "TILE_DEBUG_MODES")

__all__ = [
    "ATTENTION_MODES", "COLOR_CORRECTIONS", "COMPILE_BACKENDS", "COMPILE_MODES", "PARALLEL_MODES",
    "QUANTIZATION_MODES", "TILE_DEBUG_MODES", "VAE_QUANTIZATIONS", "DeclarationError", "check_implemented",
    "declared",
]
