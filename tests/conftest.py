"""Shared test fixtures: where the golden data lives and how outputs are compared.

The golden files (tiny SeedVR2 models with the released architecture, inputs and outputs computed by
the original implementation) live in ``../shared/golden`` beside the repository, or wherever
``SEEDVR2_GOLDEN_DIR`` points.  Tests that need them skip with a message when they are absent.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

GOLDEN_DIR = Path(os.environ.get("SEEDVR2_GOLDEN_DIR", REPO_ROOT.parent / "shared" / "golden"))


def golden_path(name: str) -> Path:
    path = GOLDEN_DIR / name
    if not path.exists():
        pytest.skip(f"golden file {path} not found (set SEEDVR2_GOLDEN_DIR)")
    return path


def load_golden(name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(golden_path(name)))


def golden_meta(name: str) -> dict:
    from safetensors import safe_open

    with safe_open(str(golden_path(name)), "pt") as f:
        return json.loads(f.metadata()["golden"])


def golden_cases(name: str) -> dict[str, dict[str, torch.Tensor]]:
    """Split a ``<case>.<tensor>`` flat dict into ``{case: {tensor: value}}``."""
    cases: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_golden(name).items():
        case, tensor = key.split(".", 1)
        cases.setdefault(case, {})[tensor] = value
    return cases


def golden_json(name: str) -> dict:
    return json.loads(golden_path(name).read_text())


def set_env(monkeypatch: pytest.MonkeyPatch, name: str, value: str | None) -> None:
    """Set the environment variable ``name`` to ``value`` for one test; None: unset."""
    if value is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, value)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error ||a - b|| / ||b|| in float64 (the golden README's metric)."""
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    assert a64.shape == b64.shape, f"shape {tuple(a64.shape)} != {tuple(b64.shape)}"
    denom = b64.norm().item()
    return (a64 - b64).norm().item() / (denom if denom > 0 else 1.0)


def import_pack():
    """Import the repository root as the package ``seedvr2_pack``, the way ComfyUI imports a custom
    node folder, so that ``nodes/`` and its relative imports of ``src/`` resolve."""
    name = "seedvr2_pack"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a module: the tiny models' convolutions are far too small to gain from threads,
    and on a shared 2-core machine a busy second thread makes them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def specs():
    """The golden 3B DiT and VAE on the CPU, cached by the module's :func:`manager`."""
    from src.pipeline.settings import DiTSpec, VAESpec

    dit = DiTSpec(model=str(golden_path("dit3b_weights.safetensors")), device="cpu", cache_model=True)
    vae = VAESpec(model=str(golden_path("vae_weights.safetensors")), device="cpu", cache_model=True)
    return dit, vae


@pytest.fixture(scope="module")
def manager():
    """One model manager per test module (models loaded once), cleared at the module's end."""
    from src.pipeline.model_manager import ModelManager

    manager = ModelManager()
    yield manager
    manager.clear()


@pytest.fixture(scope="module")
def tiny_vae():
    """The golden tiny VAE, built from its released kwargs and loaded strictly."""
    from src.models.video_vae_v3 import VAEConfig, VideoAutoencoder

    model = VideoAutoencoder(VAEConfig.from_kwargs(golden_json("vae_config.json")["kwargs"]))
    model.load_state_dict(load_golden("vae_weights.safetensors"), strict=True)
    return model.eval()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def module_copies(module) -> list:
    """``module`` and, once the pack is imported as ComfyUI imports it (:func:`import_pack`), its second copy
    ``seedvr2_pack.<name>``: state that one copy registers process-wide (torch.library operators) runs the code
    of whichever copy came first, so a test that stands in for that code patches both."""
    twin = sys.modules.get(f"seedvr2_pack.{module.__name__}")
    return [module] if twin is None or twin is module else [module, twin]
