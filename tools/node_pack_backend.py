"""The build backend named in pyproject.toml: it refuses every build, with the instructions that work.

This repository is a ComfyUI custom node pack (ComfyUI imports its folder from ``custom_nodes/``) plus a
command-line tool run from the folder.  Neither works from site-packages: ComfyUI does not look there, and
the CLI finds its models and assets beside its files.  Without a backend, pip fell back to setuptools'
auto-discovery and scattered the pack's sub-packages into site-packages as top-level ``models``,
``pipeline``, ... that could not even import.  So ``pip install .``, ``pip install -e .``, ``pip wheel .``
and ``python -m build`` stop here, before anything is installed, and say what to run instead.  The
registry's ``comfy node publish`` packs the folder itself and never calls a build backend.
"""
from __future__ import annotations

MESSAGE = """\
seedvr2-comfyui is not installed with pip (nothing was installed): it is a ComfyUI custom node pack and a
command-line tool, both used from this folder. Instead:

  ComfyUI:       clone (or unpack) this folder into ComfyUI/custom_nodes/, then, with ComfyUI's Python:
                 python -m pip install -r ComfyUI/custom_nodes/<this folder>/requirements.txt
                 and restart ComfyUI; the nodes appear under SEEDVR2.
  command line:  python -m pip install -r requirements.txt
                 python inference_cli.py --help            (from this folder)
  tests:         python -m pip install -r requirements-dev.txt && python -m pytest
"""


def _refuse(*_args, **_kwargs):
    # SystemExit with a text prints just the text (no traceback) in pip's and build's hook process.
    raise SystemExit(MESSAGE)


# PEP 517 / PEP 660 hooks.  The get_requires_* hooks are the first ones a frontend calls, so they refuse
# before any other work; the build hooks refuse too, for a frontend that calls them directly.
get_requires_for_build_wheel = _refuse
get_requires_for_build_sdist = _refuse
get_requires_for_build_editable = _refuse
prepare_metadata_for_build_wheel = _refuse
prepare_metadata_for_build_editable = _refuse
build_wheel = _refuse
build_sdist = _refuse
build_editable = _refuse
