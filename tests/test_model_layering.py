"""Layering: the plain models do not depend on the optimization package.

``src/models/`` holds the reference networks; every speed or memory trick lives in ``src/optimization/`` and
reaches the models from outside (e.g. ``optimize_vae`` attaching an executor).  The one import allowed from
``optimization`` is the attention entry point (``attention_dispatch.attention`` and its backend names), which the
models call.  Checked on the source with ``ast``, so imports under ``TYPE_CHECKING`` or inside functions
count too.  Scope: every file under ``src/models/``; the video VAE's files also never name a ``runtime``.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "src" / "models"
VAE_PACKAGE = MODELS / "video_vae_v3"
ALLOWED = {"src.optimization.attention_dispatch": {"attention", "AUTO", "PLAIN"}}


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, imported names) of every import statement in ``path``."""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.append((node.lineno, module, [alias.name for alias in node.names]))
    return sorted(found)


def _optimization_imports(path: Path) -> list[str]:
    """The imports of ``path`` that reach into ``src.optimization`` beyond what :data:`ALLOWED` names."""
    bad = []
    for line, module, names in _imports(path):
        # ``from src import optimization`` / ``from .. import optimization`` import the package itself.
        targets = [module] if names == [] else [module] + [f"{module}.{name}" for name in names]
        if not any(t == "src.optimization" or t.startswith("src.optimization.") for t in targets):
            continue
        if names and set(names) <= ALLOWED.get(module, set()):
            continue
        bad.append(f"{path.relative_to(ROOT)}:{line}: {module} {names or ''}".rstrip())
    return bad


VAE_FILES = sorted(VAE_PACKAGE.glob("*.py"))
MODEL_FILES = sorted(MODELS.rglob("*.py"))


def test_the_packages_have_files():
    assert len(VAE_FILES) > 5 and len(MODEL_FILES) > len(VAE_FILES) + 10


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: str(p.relative_to(MODELS)))
def test_models_import_only_the_attention_entry_point_from_optimization(path):
    assert _optimization_imports(path) == []


@pytest.mark.parametrize("path", VAE_FILES, ids=lambda p: p.name)
def test_vae_model_knows_no_runtime(path):
    lines = [number for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if "runtime" in line]
    assert lines == [], f"{path.relative_to(ROOT)} mentions 'runtime' on lines {lines}"


def test_the_checker_sees_relative_and_type_checking_imports(monkeypatch):
    # The checker itself: a file in the VAE package's place with the imports the models used to have.
    fake = ROOT / "src" / "models" / "video_vae_v3" / "_layering_probe.py"
    source = (
        "from typing import TYPE_CHECKING\n"
        "from ...optimization.attention_dispatch import AUTO, attention\n"
        "if TYPE_CHECKING:\n"
        "    from ...optimization.vae_optimizer import VAERuntime\n"
        "def f():\n"
        "    from src.optimization import vae_banded\n"
        "    import src.optimization.vae_fp8\n"
        "from ... import optimization\n"
    )
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: source)
    bad = _optimization_imports(fake)
    assert [entry.split(": ", 1)[1] for entry in bad] == [
        "src.optimization.vae_optimizer ['VAERuntime']",
        "src.optimization ['vae_banded']",
        "src.optimization.vae_fp8",
        "src ['optimization']",
    ]
