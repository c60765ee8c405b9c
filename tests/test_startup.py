"""Start-up stays light: importing the CLI, the pipeline or the node pack imports no compiler and touches no
GPU; methods kept out of compiled graphs become graph breaks only once compilation is prepared."""
import json
import subprocess
import sys

import torch

from conftest import REPO_ROOT
from src.models.dit import graph_breaks
from src.models.dit.attention import JointWindowAttention
from src.models.dit.model import NaDiT

PROBE = r"""
import importlib.util, json, os, sys
sys.argv = ["inference_cli.py", "--help"]
sys.path.insert(0, os.getcwd())
import inference_cli
from src.models import download, load
from src.pipeline import model_manager, upscaler
# The pack as ComfyUI's load_custom_node imports a folder.
spec = importlib.util.spec_from_file_location("pack_probe", os.path.join(os.getcwd(), "__init__.py"))
pack = importlib.util.module_from_spec(spec)
sys.modules["pack_probe"] = pack
spec.loader.exec_module(pack)
import torch
heavy = [m for m in ("triton", "torch._dynamo", "torch._inductor", "sympy") if m in sys.modules]
print(json.dumps({"heavy": heavy, "cuda": torch.cuda.is_initialized(), "nodes": sorted(pack.NODE_CLASS_MAPPINGS)}))
"""


def test_importing_the_cli_pipeline_and_pack_imports_no_compiler_and_no_cuda():
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert facts["heavy"] == [], f"imported at start-up: {facts['heavy']}"
    assert facts["cuda"] is False
    assert "SeedVR2VideoUpscaler" in facts["nodes"]


def _disabled(function) -> bool:
    return getattr(function, "_torchdynamo_disable", False) is True


def test_marked_methods_become_graph_breaks_when_compilation_is_prepared():
    assert (NaDiT, "_window_plans") in graph_breaks.marked()
    assert (JointWindowAttention, "_attend_windows") in graph_breaks.marked()

    class Probe:
        @graph_breaks.eager
        def twice(self, x):
            return 2 * x

    was_applied = graph_breaks._applied
    assert _disabled(Probe.twice) == was_applied and Probe().twice(3) == 6
    graph_breaks.apply()
    graph_breaks.apply()  # idempotent
    for owner, name in graph_breaks.marked():
        assert _disabled(owner.__dict__[name]), f"{owner.__name__}.{name} is not a graph break"
    assert Probe().twice(torch.tensor(2.0)).item() == 4.0

    class Later:  # a class defined after compilation was prepared is marked at once
        @graph_breaks.eager
        def one(self):
            return 1

    assert _disabled(Later.__dict__["one"]) and Later().one() == 1
