"""Which ComfyUI checkouts the end-to-end tests run against: ``COMFYUI_DIR``, several separated by ``os.pathsep``
(e.g. ``/work/comfyui:/work/comfyui-new``).  Each needs its virtual environment in ``.venv``."""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from conftest import REPO_ROOT

COMFY_RUN = Path(os.environ.get("COMFY_RUN", REPO_ROOT.parent / "shared" / "comfyui" / "comfy_run.py"))
COMFYUI_DIRS = [path for path in os.environ.get("COMFYUI_DIR", "").split(os.pathsep) if path]
# Load no other custom node pack: a checkout may be shared, and a pack registering our node names (another
# copy of this one) would replace our classes.
ONLY_THIS_PACK = ["--disable-all-custom-nodes", "--whitelist-custom-nodes", REPO_ROOT.name]
SKIP_REASON = ("end-to-end tests need a ComfyUI checkout (0.8.0, and newer ones beside it): set COMFYUI_DIR, "
               "several separated by os.pathsep (see shared/comfyui/README.md)")


def comfyui_version(path: str) -> str:
    """The version a checkout declares (comfyui_version.py), for test ids."""
    try:
        text = (Path(path) / "comfyui_version.py").read_text()
    except OSError:
        return Path(path).name
    found = re.search(r'__version__\s*=\s*"([^"]+)"', text)
    return found.group(1) if found else Path(path).name


def ids() -> list[str]:
    return [f"comfyui-{comfyui_version(path)}" for path in COMFYUI_DIRS]


def has_native_seedvr2(path: str) -> bool:
    """Whether this ComfyUI ships its own SeedVR2 nodes (comfy_extras/nodes_seedvr.py)."""
    return (Path(path) / "comfy_extras" / "nodes_seedvr.py").is_file()


def native_seedvr2_nodes(path: str) -> list[str]:
    """The node ids that ComfyUI's own SeedVR2 module registers."""
    text = (Path(path) / "comfy_extras" / "nodes_seedvr.py").read_text()
    return re.findall(r'node_id\s*=\s*"([^"]+)"', text)


def progress_throttle_s(path: str) -> float:
    """The least interval between two progress messages of this ComfyUI's ProgressBar (0: none; ComfyUI
    0.19 sends at most one per 0.1 s)."""
    try:
        text = (Path(path) / "comfy" / "utils.py").read_text()
    except OSError:
        return 0.0
    found = re.search(r"^PROGRESS_THROTTLE_MIN_INTERVAL\s*=\s*([0-9.]+)", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def load_comfy_run():
    """The comfy_run.py driver as a module (its server, websocket client and workflow runner)."""
    spec = importlib.util.spec_from_file_location("comfy_run", COMFY_RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stray_tracebacks(log: str) -> list[str]:
    """Tracebacks in a server log other than ComfyUI's own reports: of a failed node (the "!!! Exception during
    processing !!!" line it prints before the traceback of every node error, which error-case tests provoke)
    and of its built-in node modules that cannot import here (comfy_extras' audio nodes without torchaudio);
    plus any exception a thread died of.  Each with the lines around it."""
    lines = log.splitlines()
    stray = []
    for number, line in enumerate(lines):
        if "Exception in thread" in line:
            stray.append("\n".join(lines[max(0, number - 3):number + 15]))
        if "Traceback (most recent call last)" not in line:
            continue
        node_error = number > 0 and lines[number - 1].startswith("!!! Exception during processing !!!")
        builtin = next((later for later in lines[number + 1:number + 40] if later.startswith("Cannot import")), "")
        if not node_error and "comfy_extras" not in builtin:
            stray.append("\n".join(lines[max(0, number - 3):number + 15]))
    return stray
