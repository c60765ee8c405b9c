"""The plain models stay plain: the DiT, its loader and the GGUF reader import nothing from the optimization
package but the attention entry point (``matrix_ops.attention`` and its backend name constants).  Speed and
memory tricks are swapped into a model from outside (optimization/dit_fused_modules.py, dit_chunking.py,
quantized_load.py), never called from inside it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
CHECKED = sorted((SRC / "models" / "dit").glob("*.py")) + [SRC / "models" / "load.py",
                                                           SRC / "models" / "gguf_reader.py",
                                                           SRC / "models" / "gguf_codecs.py"]
# What the models may take from optimization: the attention entry point and the names of its backends.
ALLOWED = {"matrix_ops": {"attention", "PLAIN", "AUTO"}}


def _module_of(path: Path, node: ast.ImportFrom) -> str:
    """The absolute dotted module an ``from ... import`` names, relative to the repository root."""
    if node.level == 0:
        return node.module or ""
    package = list(path.relative_to(SRC.parent).parent.parts)
    base = package[:len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _optimization_imports(path: Path, source: str) -> list[tuple[str, str]]:
    """(module, name) of every import from the optimization package in ``source``, the text of the file at
    ``path`` (name "*" for a whole module)."""
    found = []
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, "*") for alias in node.names if "optimization" in alias.name.split(".")]
        elif isinstance(node, ast.ImportFrom):
            module = _module_of(path, node)
            parts = module.split(".")
            if "optimization" not in parts:
                continue
            if parts[-1] == "optimization":   # from ..optimization import matrix_ops: whole modules
                found += [(alias.name, "*") for alias in node.names]
            else:
                found += [(parts[-1], alias.name) for alias in node.names]
    return found


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: str(p.relative_to(SRC)))
def test_models_import_only_the_attention_entry_point_from_optimization(path):
    unexpected = [f"{module}.{name}" for module, name in _optimization_imports(path, path.read_text())
                  if name not in ALLOWED.get(module, ())]
    assert not unexpected, f"{path.relative_to(SRC)} imports {unexpected} from the optimization package"


def test_the_check_sees_every_spelling_of_an_import():
    source = ("from ...optimization import fused_kernels\nfrom ...optimization.matrix_ops import PLAIN, attention\n"
              "import src.optimization.dit_chunking\nfrom src.optimization.gguf import DEQUANTIZERS\n"
              "from ..models import window_plan\n")
    found = _optimization_imports(SRC / "models" / "dit" / "sample.py", source)
    assert found == [("fused_kernels", "*"), ("matrix_ops", "PLAIN"), ("matrix_ops", "attention"),
                     ("src.optimization.dit_chunking", "*"), ("gguf", "DEQUANTIZERS")]
