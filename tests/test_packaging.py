"""Packaging and registry metadata: ``pip install .`` is refused with instructions (this is a ComfyUI node pack
run from its folder, see tools/node_pack_backend.py), the registry fields are filled and valid by ComfyUI's
own rules, the declared oldest torch is the one CI tests, and no file trips ``comfy node validate``."""
from __future__ import annotations

import ast
import importlib.util
import io
import re
import shutil
import subprocess
import sys
import tokenize
import xml.etree.ElementTree as ElementTree

import pytest

from conftest import REPO_ROOT

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
BACKEND_HOOKS = ("build_wheel", "build_sdist", "build_editable", "get_requires_for_build_wheel",
                 "get_requires_for_build_sdist", "get_requires_for_build_editable",
                 "prepare_metadata_for_build_wheel", "prepare_metadata_for_build_editable")
# What the refusal must tell: where the pack goes, and the two commands that install what it needs.
INSTRUCTIONS = ("not installed with pip", "custom_nodes", "pip install -r", "requirements.txt",
                "inference_cli.py", "requirements-dev.txt")


def _backend():
    system = PYPROJECT["build-system"]
    (folder,) = system["backend-path"]
    path = REPO_ROOT / folder / (system["build-backend"].replace(".", "/") + ".py")
    spec = importlib.util.spec_from_file_location("node_pack_backend_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_build_system_is_the_in_tree_refusing_backend():
    system = PYPROJECT["build-system"]
    assert system["requires"] == [], "refusing must not download a build tool first"
    backend = _backend()
    for hook in BACKEND_HOOKS:
        with pytest.raises(SystemExit) as refused:
            getattr(backend, hook)("wheel_dir", config_settings=None)
        message = str(refused.value.code)
        for needed in INSTRUCTIONS:
            assert needed in message, f"{hook}: the message lacks {needed!r}"


def test_pip_install_is_refused_before_anything_is_installed(tmp_path):
    target = tmp_path / "target"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--target", str(target),
                          str(REPO_ROOT)], capture_output=True, text=True, timeout=300, check=False,
                         env={"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PATH": "", "HOME": str(tmp_path)})
    if "No module named pip" in pip.stderr:
        pytest.skip("this environment has no pip")
    output = pip.stdout + pip.stderr
    assert pip.returncode != 0, output
    for needed in INSTRUCTIONS:
        assert needed in output, output
    assert not target.exists() or not any(target.iterdir()), "nothing may be installed"
    assert not list(REPO_ROOT.glob("*.egg-info")) and not (REPO_ROOT / "build").exists()


def test_license_is_the_apache_2_text_the_metadata_names():
    assert PYPROJECT["project"]["license"] == {"file": "LICENSE"}
    text = (REPO_ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text) > 10_000, "the full text, not a notice"


def test_registry_fields_are_filled_and_valid():
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", project["name"]) and len(project["name"]) < 100
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["description"] and project["urls"]["Repository"].startswith("https://github.com/")
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert re.fullmatch(r"(>=|==|~=|>)\s*\d+\.\d+(\.\d+)?", comfy["requires-comfyui"])
    # ComfyUI's comfy_config parser drops the whole list when one value is outside these.
    classifiers = project["classifiers"]
    systems = [c.removeprefix("Operating System :: ") for c in classifiers if c.startswith("Operating System :: ")]
    accelerators = [c.removeprefix("Environment :: ") for c in classifiers if c.startswith("Environment ::")]
    assert systems and all(s.startswith(("Microsoft", "POSIX", "MacOS", "OS Independent")) for s in systems)
    assert accelerators and set(accelerators) <= {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc",
                                                  "NPU :: Huawei Ascend", "GPU :: Apple Metal"}
    assert "License :: OSI Approved :: Apache Software License" in classifiers


def test_the_icon_is_a_square_image_of_this_repository():
    icon = PYPROJECT["tool"]["comfy"]["Icon"]
    repository = PYPROJECT["project"]["urls"]["Repository"].removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{repository}/main/"
    assert icon.startswith(prefix), icon
    path = REPO_ROOT / icon.removeprefix(prefix)
    assert path.is_file(), f"{path} is not in the repository"
    root = ElementTree.parse(path).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    width, height = int(root.get("width")), int(root.get("height"))
    assert width == height <= 400 and root.get("viewBox") == f"0 0 {width} {height}"


def test_the_declared_oldest_torch_is_the_one_ci_tests():
    (torch_requirement,) = [d for d in PYPROJECT["project"]["dependencies"] if re.match(r"torch\b", d)]
    declared = re.fullmatch(r"torch>=(\d+\.\d+)(\.0)?", torch_requirement)
    assert declared, torch_requirement
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    tested = re.search(r"^OLDEST_TORCH=(\S+)$", ci, re.MULTILINE)
    assert tested and 'pip install "torch==$OLDEST_TORCH"' in ci, ".ci/run installs no oldest torch"
    assert tested.group(1) in (declared.group(1), declared.group(1) + ".0"), \
        f"{torch_requirement} is declared, but .ci/run runs the suite on torch {tested.group(1)}"


def _python_files():
    git = shutil.which("git")
    if git and (REPO_ROOT / ".git").exists():
        listed = subprocess.run([git, "ls-files", "*.py"], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
        if listed.returncode == 0:
            return [REPO_ROOT / name for name in listed.stdout.split()]
    return [p for p in REPO_ROOT.rglob("*.py") if not any(part.startswith(".") for part in p.relative_to(REPO_ROOT).parts)]


def test_no_file_trips_the_registry_security_check():
    """`comfy node validate` runs ruff with S102 (exec), S307 (eval) and E702 (statements joined by ';')."""
    found = []
    for path in _python_files():
        source = path.read_text(encoding="utf-8")
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.OP and token.string == ";":
                found.append(f"{path.relative_to(REPO_ROOT)}:{token.start[0]}: statements joined by ';'")
        for node in ast.walk(ast.parse(source, str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("exec", "eval"):
                found.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}: {node.func.id}()")
    assert not found, "\n".join(found)
