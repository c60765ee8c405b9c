"""Every script in benchmarks/ imports and answers --help on a CPU-only machine (the measurements themselves
need a GPU and are not run here)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

SCRIPTS = sorted(path.name for path in (REPO_ROOT / "benchmarks").glob("*.py"))

# One process runs every script's --help as __main__ (torch is imported once, not once per script).
_RUN_ALL = r"""
import contextlib, io, json, runpy, sys, traceback
results = {}
for path in sys.argv[1:]:
    out, sys.argv = io.StringIO(), [path, "--help"]
    code = None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            runpy.run_path(path, run_name="__main__")
    except SystemExit as exc:
        code = exc.code
    except BaseException:
        code, out = "raised", io.StringIO(out.getvalue() + traceback.format_exc())
    results[path] = {"code": code, "output": out.getvalue()}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def help_runs() -> dict:
    paths = [str(REPO_ROOT / "benchmarks" / name) for name in SCRIPTS]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", _RUN_ALL, *paths], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {os.path.basename(path): run for path, run in json.loads(done.stdout.splitlines()[-1]).items()}


def test_there_are_benchmark_scripts():
    assert "vram_budget.py" in SCRIPTS and "conv3d_triton.py" in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_answers_help(help_runs, script):
    run = help_runs[script]
    if run["code"] != 0 and "No module named 'triton'" in run["output"]:
        pytest.skip("the script's kernels need Triton, which this environment lacks")
    assert run["code"] == 0, run["output"][-3000:]
    assert "usage:" in run["output"]
