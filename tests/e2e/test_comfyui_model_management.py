"""Our models under ComfyUI's real model management (each checkout's interpreter, no server): the sizes handed
over are the parameter bytes, ComfyUI's bookkeeping agrees after a load, and a cached model goes with the
loader output that held it."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from comfy_dirs import COMFYUI_DIRS, SKIP_REASON, ids
from conftest import REPO_ROOT, golden_path

pytestmark = pytest.mark.skipif(not COMFYUI_DIRS, reason=SKIP_REASON)


@pytest.fixture(scope="module", params=COMFYUI_DIRS, ids=ids())
def figures(request, tmp_path_factory):
    python = Path(request.param) / ".venv" / "bin" / "python"
    probe = Path(__file__).with_name("model_management_probe.py")
    done = subprocess.run([str(python), str(probe), request.param, str(REPO_ROOT),
                           str(golden_path("dit3b_weights.safetensors")), str(golden_path("vae_weights.safetensors"))],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path_factory.mktemp("probe"))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["dit", "dit_fp8", "vae"])
def test_sizes_handed_to_comfyui_are_the_parameter_bytes(figures, kind):
    model = figures[kind]
    assert model["patcher_class"] == "SeedVR2Patcher"   # the load-whole patcher: this ComfyUI's signature fits
    assert model["model_size"] == model["parameter_bytes"] == model["loaded_size"], model
    assert model["registered"] == 1


@pytest.mark.parametrize("kind", ["dit", "dit_fp8", "vae"])
def test_a_cached_model_goes_with_the_loader_output(figures, kind):
    model = figures[kind]
    assert model["cached_after_run"] == 1 and model["cached_after_release"] == 0
    assert model["registered_after_release"] == 0       # and out of ComfyUI's list of loaded models
