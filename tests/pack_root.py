"""pytest plugin (named in pyproject.toml): collect the repository root as a plain folder.

The root holds ``__init__.py`` because ComfyUI imports the folder as a package, but the folder a user cloned
into need not be a Python name (``seedvr2-comfyui``); pytest would then fail to import it as a package
before running any test.  The tests import the pack themselves (``conftest.import_pack``).
"""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_collect_directory(path: Path, parent):
    if path.resolve() == ROOT:
        return pytest.Dir.from_parent(parent, path=path)
    return None
