"""The option lists: each read without torch from the one module that implements it, equal to what that module
uses, and every declared name implemented; the nodes and the command line offer exactly these lists."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, import_pack
from src import options
from src.optimization import compile_settings, linear_quantization, attention_dispatch, vae_fp8
from src.pipeline import color_correction, tile_debug

DECLARED = [
    (options.ATTENTION_MODES, attention_dispatch.ATTENTION_MODES),
    (options.QUANTIZATION_MODES, linear_quantization.QUANTIZATION_MODES),
    (options.VAE_QUANTIZATIONS, vae_fp8.MODES),
    (options.COLOR_CORRECTIONS, color_correction.METHODS),
    (options.TILE_DEBUG_MODES, tile_debug.TILE_DEBUG_MODES),
    (options.COMPILE_BACKENDS, compile_settings.COMPILE_BACKENDS),
    (options.COMPILE_MODES, compile_settings.COMPILE_MODES),
]


@pytest.mark.parametrize("read, used", DECLARED)
def test_the_list_read_from_the_source_is_the_one_the_module_uses(read, used):
    assert read == used and read is not None


def test_reading_the_lists_imports_no_torch():
    probe = "import json, sys; import src.options as o; print(json.dumps(['torch' in sys.modules, o.COLOR_CORRECTIONS]))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    torch_imported, colors = json.loads(done.stdout)
    assert torch_imported is False and tuple(colors) == color_correction.METHODS


def test_every_attention_name_selects_a_registered_backend():
    import torch

    for name in options.ATTENTION_MODES:
        attention_dispatch.resolve_backend(name, torch.zeros(1, 1, 1, 8))  # raises for a name nothing registered
    assert set(attention_dispatch.available_backends("cpu")) == set(options.ATTENTION_MODES)


def test_every_colour_correction_runs():
    import torch

    content = torch.rand(1, 3, 8, 8) * 2 - 1
    style = torch.rand(1, 3, 8, 8) * 2 - 1
    for method in options.COLOR_CORRECTIONS:
        assert color_correction.color_correct(content, style, method).shape == content.shape


def test_the_nodes_offer_exactly_the_declared_lists():
    pack = import_pack()
    nodes = pack.NODE_CLASS_MAPPINGS

    def combo(node, section, name):
        return tuple(nodes[node].INPUT_TYPES()[section][name][0])

    assert combo("SeedVR2LoadDiTModel", "optional", "attention_mode") == options.ATTENTION_MODES
    assert combo("SeedVR2LoadDiTModel", "optional", "quantization") == options.QUANTIZATION_MODES
    assert combo("SeedVR2LoadVAEModel", "optional", "quantization") == options.VAE_QUANTIZATIONS
    assert combo("SeedVR2LoadVAEModel", "optional", "tile_debug") == options.TILE_DEBUG_MODES
    assert combo("SeedVR2VideoUpscaler", "required", "color_correction") == options.COLOR_CORRECTIONS
    assert combo("SeedVR2TorchCompileSettings", "required", "backend") == options.COMPILE_BACKENDS
    assert combo("SeedVR2TorchCompileSettings", "required", "mode") == options.COMPILE_MODES


def test_the_command_line_offers_exactly_the_declared_lists():
    import inference_cli

    choices = {a.dest: tuple(a.choices) for a in inference_cli.build_parser()._actions if a.choices}
    assert choices["attention_mode"] == options.ATTENTION_MODES
    assert choices["quantization"] == options.QUANTIZATION_MODES
    assert choices["vae_quantization"] == options.VAE_QUANTIZATIONS
    assert choices["color_correction"] == options.COLOR_CORRECTIONS
    assert choices["parallel"] == options.PARALLEL_MODES


@pytest.mark.parametrize("source, problem", [
    ("MODES = ('a', 'b')\nMODES = ('a',)\n", "assigned once"),
    ("B = 'b'\nMODES = ('a', B)\n", "literal tuple"),
    ("MODES = ['a', 'b']\n", "literal tuple"),
    ("MODES = ()\n", "literal tuple"),
    ("MODES = ('a', 1)\n", "literal tuple"),
    ("def f():\n    MODES = ('a',)\n", "literal tuple"),
    ("MODES = ('a', 'b', 'a')\n", "twice"),
])
def test_a_list_that_cannot_be_read_is_refused(tmp_path, source, problem):
    path = tmp_path / f"module_{abs(hash(source))}.py"
    path.write_text(source)
    with pytest.raises(options.DeclarationError, match=problem):
        options.declared_in(path, "MODES")


def test_a_literal_tuple_is_read_as_written(tmp_path):
    path = tmp_path / "module.py"
    path.write_text("import torch\nMODES: tuple[str, ...] = (\n    'b',  # comment\n    'a',\n)\nOTHER = torch.x\n")
    assert options.declared_in(path, "MODES") == ("b", "a")


def test_a_declared_name_without_implementation_is_refused_and_named():
    options.check_implemented("m", ("a", "b"), ("b", "a"))
    with pytest.raises(options.DeclarationError, match=r"without an implementation: \['c'\].*not declared: \[\]"):
        options.check_implemented("m", ("a", "c"), ("a",))
    with pytest.raises(options.DeclarationError, match=r"not declared: \['d'\]"):
        options.check_implemented("m", ("a",), ("a", "d"))
