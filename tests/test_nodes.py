"""The four nodes without ComfyUI: schemas against the earlier pack's (v2.5.24, census §1), its saved
example workflows (census §8) mapped onto our inputs the way the UI does, validation, device fallback,
the specs the loaders build, the upscaler's hand-off to the pipeline, and the progress adapter."""
from __future__ import annotations

import functools
import inspect
import json
import logging
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, golden_path, import_pack, rel_err

pack = import_pack()
nodes = pack.NODE_CLASS_MAPPINGS
settings = sys.modules["seedvr2_pack.src.pipeline.settings"]
devices = sys.modules["seedvr2_pack.src.pipeline.devices"]
model_folders = sys.modules["seedvr2_pack.nodes.model_folders"]
progress_module = sys.modules["seedvr2_pack.nodes.progress"]
checkpoint = sys.modules["seedvr2_pack.src.models.checkpoint"]
upscaler_module = sys.modules["seedvr2_pack.nodes.video_upscaler"]

# ---------------------------------------------------------------------------------------------- expected
# The earlier pack's inputs in schema order: (name, type, default, (min, max, step) or None, required).
# Types: a socket type, INT/FLOAT/BOOLEAN, a list = combo with exactly those options, or a marker:
#   DEVICE / OFFLOAD: the device combos (theirs listed only CUDA devices; ours are checked separately),
#   DIT_FILES / VAE_FILES: model combos, which must offer the released files of that kind.
COLORS = ["lab", "wavelet", "wavelet_adaptive", "hsv", "adain", "none"]
INCUMBENT = {
    "SeedVR2VideoUpscaler": [
        ("image", "IMAGE", None, None, True),
        ("dit", "SEEDVR2_DIT", None, None, True),
        ("vae", "SEEDVR2_VAE", None, None, True),
        ("seed", "INT", 42, (0, 2**32 - 1, 1), True),
        ("resolution", "INT", 1080, (16, 16384, 2), True),
        ("max_resolution", "INT", 0, (0, 16384, 2), True),
        ("batch_size", "INT", 5, (1, 16384, 4), True),
        ("uniform_batch_size", "BOOLEAN", False, None, True),
        ("color_correction", COLORS, "lab", None, True),
        ("temporal_overlap", "INT", 0, (0, 16, 1), False),
        ("prepend_frames", "INT", 0, (0, 32, 1), False),
        ("input_noise_scale", "FLOAT", 0.0, (0.0, 1.0, 0.001), False),
        ("latent_noise_scale", "FLOAT", 0.0, (0.0, 1.0, 0.001), False),
        ("offload_device", "OFFLOAD", "cpu", None, False),
        ("enable_debug", "BOOLEAN", False, None, False),
    ],
    "SeedVR2LoadDiTModel": [
        ("model", "DIT_FILES", "seedvr2_ema_3b_fp8_e4m3fn.safetensors", None, True),
        ("device", "DEVICE", "auto", None, True),
        ("blocks_to_swap", "INT", 0, (0, 36, 1), False),
        ("swap_io_components", "BOOLEAN", False, None, False),
        ("offload_device", "OFFLOAD", "none", None, False),
        ("cache_model", "BOOLEAN", False, None, False),
        ("attention_mode", ["auto", "sdpa", "flash_attn_2", "flash_attn_3", "sageattn_2", "sageattn_3", "sageattn",
                            "sageattn_3_fp4", "sageattn_3_fp8", "flash_attn", "xformers", "flex"], "auto", None, False),
        ("torch_compile_args", "TORCH_COMPILE_ARGS", None, None, False),
    ],
    "SeedVR2LoadVAEModel": [
        ("model", "VAE_FILES", "ema_vae_fp16.safetensors", None, True),
        ("device", "DEVICE", "auto", None, True),
        ("encode_tiled", "BOOLEAN", False, None, False),
        ("encode_tile_size", "INT", 1024, (64, None, 32), False),
        ("encode_tile_overlap", "INT", 128, (0, None, 32), False),
        ("decode_tiled", "BOOLEAN", False, None, False),
        ("decode_tile_size", "INT", 1024, (64, None, 32), False),
        ("decode_tile_overlap", "INT", 128, (0, None, 32), False),
        ("tile_debug", ["false", "encode", "decode"], "false", None, False),
        ("offload_device", "OFFLOAD", "none", None, False),
        ("cache_model", "BOOLEAN", False, None, False),
        ("torch_compile_args", "TORCH_COMPILE_ARGS", None, None, False),
    ],
    "SeedVR2TorchCompileSettings": [
        ("backend", ["inductor", "cudagraphs"], "inductor", None, True),
        ("mode", ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"], "default", None, True),
        ("fullgraph", "BOOLEAN", False, None, True),
        ("dynamic", "BOOLEAN", False, None, True),
        ("dynamo_cache_size_limit", "INT", 64, (0, 1024, 1), True),
        ("dynamo_recompile_limit", "INT", 128, (0, 1024, 1), True),
    ],
}
# Our new inputs, after all of theirs.  (Where the defaults differ from theirs: devices default to "auto"
# instead of the first CUDA device, attention_mode to "auto" instead of "sdpa".)
ADDED = {
    "SeedVR2VideoUpscaler": [
        ("vram_budget", "FLOAT", 0.0, (0.0, 1024.0, 0.5), False),
    ],
    "SeedVR2LoadDiTModel": [
        ("quantization", ["disabled", "fp8_e4m3fn", "fp4_experimental", "fp4_scaled", "fp4_scaled_fast", "gguf"],
         "disabled", None, False),
        ("enable_optimizations", "BOOLEAN", True, None, False),
    ],
    "SeedVR2LoadVAEModel": [
        ("enable_optimizations", "BOOLEAN", True, None, False),
        ("quantization", ["disabled", "fp8_e4m3fn"], "disabled", None, False),
    ],
}
# Choices our combos offer after all of the incumbent's (which keep its order, so its saved values map).
ADDED_CHOICES = {
    ("SeedVR2LoadDiTModel", "attention_mode"): ["sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math",
                                               "sdpa_chunked", "matmul_chunked", "triton_wide"],
    ("SeedVR2VideoUpscaler", "color_correction"): ["luma"],
}
RETURN_TYPES = {"SeedVR2VideoUpscaler": ("IMAGE",), "SeedVR2LoadDiTModel": ("SEEDVR2_DIT",),
                "SeedVR2LoadVAEModel": ("SEEDVR2_VAE",), "SeedVR2TorchCompileSettings": ("TORCH_COMPILE_ARGS",)}

# widgets_values of the earlier pack's three example workflows (census §8.1-8.3) and what they mean.
EXAMPLES = {
    "4K image": {
        "SeedVR2LoadDiTModel": (["seedvr2_ema_7b_sharp_fp16.safetensors", "cuda:0", 36, False, "cpu", False, "sdpa"],
                                dict(model="seedvr2_ema_7b_sharp_fp16.safetensors", device="cuda:0", blocks_to_swap=36,
                                     swap_io_components=False, offload_device="cpu", cache_model=False,
                                     attention_mode="sdpa")),
        "SeedVR2LoadVAEModel": (["ema_vae_fp16.safetensors", "cuda:0", True, 1024, 128, True, 1024, 128, "false", "cpu",
                                 False],
                                dict(model="ema_vae_fp16.safetensors", device="cuda:0", encode_tiled=True,
                                     encode_tile_size=1024, encode_tile_overlap=128, decode_tiled=True,
                                     decode_tile_size=1024, decode_tile_overlap=128, tile_debug="false",
                                     offload_device="cpu", cache_model=False)),
        "SeedVR2VideoUpscaler": ([42, "fixed", 4096, 4096, 1, False, "lab", 0, 0, 0, 0, "cpu", False],
                                 dict(seed=42, resolution=4096, max_resolution=4096, batch_size=1,
                                      uniform_batch_size=False, color_correction="lab", temporal_overlap=0,
                                      prepend_frames=0, input_noise_scale=0, latent_noise_scale=0,
                                      offload_device="cpu", enable_debug=False)),
    },
    "HD video": {
        "SeedVR2LoadDiTModel": (["seedvr2_ema_3b_fp16.safetensors", "cuda:0", 32, False, "cpu", False, "sdpa"],
                                dict(model="seedvr2_ema_3b_fp16.safetensors", device="cuda:0", blocks_to_swap=32,
                                     swap_io_components=False, offload_device="cpu", cache_model=False,
                                     attention_mode="sdpa")),
        "SeedVR2LoadVAEModel": (["ema_vae_fp16.safetensors", "cuda:0", True, 1024, 128, True, 768, 128, "false", "cpu",
                                 False],
                                dict(model="ema_vae_fp16.safetensors", device="cuda:0", encode_tiled=True,
                                     encode_tile_size=1024, encode_tile_overlap=128, decode_tiled=True,
                                     decode_tile_size=768, decode_tile_overlap=128, tile_debug="false",
                                     offload_device="cpu", cache_model=False)),
        "SeedVR2VideoUpscaler": ([42, "fixed", 1080, 0, 33, True, "lab", 3, 0, 0, 0, "cpu", False],
                                 dict(seed=42, resolution=1080, max_resolution=0, batch_size=33,
                                      uniform_batch_size=True, color_correction="lab", temporal_overlap=3,
                                      prepend_frames=0, input_noise_scale=0, latent_noise_scale=0,
                                      offload_device="cpu", enable_debug=False)),
    },
    "simple image": {
        "SeedVR2LoadDiTModel": (["seedvr2_ema_3b_fp8_e4m3fn.safetensors", "cuda:0", 0, False, "none", False, "sdpa"],
                                dict(model="seedvr2_ema_3b_fp8_e4m3fn.safetensors", device="cuda:0", blocks_to_swap=0,
                                     swap_io_components=False, offload_device="none", cache_model=False,
                                     attention_mode="sdpa")),
        "SeedVR2LoadVAEModel": (["ema_vae_fp16.safetensors", "cuda:0", False, 1024, 128, False, 1024, 128, "false",
                                 "none", False],
                                dict(model="ema_vae_fp16.safetensors", device="cuda:0", encode_tiled=False,
                                     encode_tile_size=1024, encode_tile_overlap=128, decode_tiled=False,
                                     decode_tile_size=1024, decode_tile_overlap=128, tile_debug="false",
                                     offload_device="none", cache_model=False)),
        "SeedVR2VideoUpscaler": ([42, "randomize", 1080, 0, 1, False, "lab", 0, 0, 0, 0, "cpu", False],
                                 dict(seed=42, resolution=1080, max_resolution=0, batch_size=1,
                                      uniform_batch_size=False, color_correction="lab", temporal_overlap=0,
                                      prepend_frames=0, input_noise_scale=0, latent_noise_scale=0,
                                      offload_device="cpu", enable_debug=False)),
    },
}
COMPILE_WIDGETS = ["inductor", "default", False, False, 64, 128]  # the same, bypassed, in all three


# ---------------------------------------------------------------------------------------------- helpers
def widget_names(node_class) -> list[str]:
    """Widget slots of a node in saved workflows, as the UI lays them out: required then optional inputs
    that are widgets (not sockets); a seed widget is followed by its "control after generate" value."""
    names = []
    spec = node_class.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, (kind, *options) in spec.get(section, {}).items():
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN"):
                names.append(name)
                if options and options[0].get("control_after_generate"):
                    names.append("<control_after_generate>")
    return names


def map_widgets(node_class, values: list) -> dict:
    """widgets_values -> {input: value}; missing trailing values keep their defaults, like the UI."""
    names = widget_names(node_class)
    assert len(values) <= len(names), f"{len(values)} values for {len(names)} widgets"
    return {name: value for name, value in zip(names, values) if not name.startswith("<")}


def defaults(node_class) -> dict:
    spec = node_class.INPUT_TYPES()
    return {name: opts[0]["default"] for section in ("required", "optional")
            for name, (kind, *opts) in spec.get(section, {}).items() if opts and "default" in opts[0]}


def rows(node_class):
    spec = node_class.INPUT_TYPES()
    return [(name, entry, section == "required")
            for section in ("required", "optional") for name, entry in spec.get(section, {}).items()]


@pytest.fixture
def models(tmp_path, monkeypatch):
    """A model folder holding the golden tiny models under released names (plus a VAE under a DiT's)."""
    for name, golden in (("seedvr2_ema_3b_fp8_e4m3fn.safetensors", "dit3b_weights.safetensors"),
                         ("seedvr2_ema_3b_fp16.safetensors", "dit3b_weights.safetensors"),
                         ("seedvr2_ema_7b_sharp_fp16.safetensors", "dit7b_weights.safetensors"),
                         ("ema_vae_fp16.safetensors", "vae_weights.safetensors")):
        (tmp_path / name).symlink_to(golden_path(golden))
    monkeypatch.setattr(model_folders, "model_folders", lambda: [tmp_path])
    return tmp_path


# Cached like the real one: Dynamo, when a test first imports it, reads ``is_available.__wrapped__``.
_NO_MPS = functools.lru_cache(maxsize=None)(lambda: False)


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", _NO_MPS)
    devices._warned.clear()


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_available", _NO_MPS)
    devices._warned.clear()


# ---------------------------------------------------------------------------------------------- schemas
def test_registered_names_categories_and_outputs():
    assert list(nodes) == list(INCUMBENT)
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(INCUMBENT)
    for name, node_class in nodes.items():
        assert node_class.CATEGORY == "SEEDVR2"
        assert node_class.RETURN_TYPES == RETURN_TYPES[name]
        assert callable(getattr(node_class(), node_class.FUNCTION))


@pytest.mark.parametrize("name", list(INCUMBENT))
def test_inputs_match_the_incumbent_then_our_additions(name, cpu_only):
    expected = INCUMBENT[name] + ADDED.get(name, [])
    actual = rows(nodes[name])
    assert [(n, required) for n, _e, required in actual] == [(n, r) for n, _t, _d, _range, r in expected]
    for (input_name, (kind, *opts), _req), (_n, want_type, want_default, want_range, _r) in zip(actual, expected):
        options = opts[0] if opts else {}
        if want_type in ("DEVICE", "OFFLOAD"):
            choices = devices.compute_device_choices() if want_type == "DEVICE" else devices.offload_device_choices()
            assert kind == choices and "cpu" in kind, input_name
        elif want_type in ("DIT_FILES", "VAE_FILES"):
            released = [i.filename for i in pack.src.models.registry.KNOWN_MODELS
                        if i.kind == want_type[:3].lower()]
            assert kind[: len(released)] == released, input_name
        elif isinstance(want_type, list):
            assert kind == want_type + ADDED_CHOICES.get((name, input_name), []), input_name
        else:
            assert kind == want_type, input_name
        if want_default is not None:
            assert options["default"] == want_default, input_name
        if want_range is not None:
            low, high, step = want_range
            assert (options.get("min"), options.get("max"), options.get("step")) == (low, high, step), input_name


def test_device_combos_register_on_a_cpu_only_machine(cpu_only):
    loader = nodes["SeedVR2LoadDiTModel"].INPUT_TYPES()
    assert loader["required"]["device"][0] == ["auto", "cpu"]
    assert loader["optional"]["offload_device"][0] == ["none", "cpu"]


def test_device_combos_list_every_gpu(two_gpus):
    assert devices.compute_device_choices() == ["auto", "cpu", "cuda:0", "cuda:1"]
    assert devices.offload_device_choices() == ["none", "cpu", "cuda:0", "cuda:1"]


def test_device_inputs_are_checked_by_the_node_not_by_the_combo():
    """ComfyUI attaches a failed VALIDATE_INPUTS to every input it takes: the loaders' takes the device inputs
    (and the DiT loader's ``quantization``, whose combo check older workflows' booleans would fail), never
    ``model``, so a model name that is not listed is ComfyUI's combo error, attached to ``model`` alone."""
    expected = {"SeedVR2LoadDiTModel": {"device", "offload_device", "quantization"},
                "SeedVR2LoadVAEModel": {"device", "offload_device"}}
    for name, parameters in expected.items():
        assert set(inspect.signature(nodes[name].VALIDATE_INPUTS).parameters) == parameters
    assert "offload_device" in inspect.signature(nodes["SeedVR2VideoUpscaler"].VALIDATE_INPUTS).parameters


def test_execute_defaults_equal_the_schema_defaults():
    for name, node_class in nodes.items():
        signature = inspect.signature(getattr(node_class, node_class.FUNCTION))
        for input_name, default in defaults(node_class).items():
            parameter = signature.parameters[input_name]
            if parameter.default is not inspect.Parameter.empty:
                assert parameter.default == default, (name, input_name)


# ---------------------------------------------------------------------------------------------- workflows
@pytest.mark.parametrize("example", list(EXAMPLES))
def test_incumbent_example_widgets_map_onto_our_inputs(example):
    for node_type, (values, meaning) in EXAMPLES[example].items():
        assert map_widgets(nodes[node_type], values) == meaning, node_type
    compile_node = nodes["SeedVR2TorchCompileSettings"]
    assert map_widgets(compile_node, COMPILE_WIDGETS) == defaults(compile_node)


@pytest.mark.parametrize("example", list(EXAMPLES))
def test_incumbent_examples_validate_and_build_specs_on_a_cpu_machine(example, models, cpu_only):
    """Their values, with "cuda:0" devices, pass validation here and run on the CPU."""
    built = {}
    for node_type in ("SeedVR2LoadDiTModel", "SeedVR2LoadVAEModel"):
        inputs = defaults(nodes[node_type]) | map_widgets(nodes[node_type], EXAMPLES[example][node_type][0])
        node = nodes[node_type]
        assert node.VALIDATE_INPUTS(inputs["device"], inputs["offload_device"]) is True
        assert inputs["model"] in node.INPUT_TYPES()["required"]["model"][0]  # passes ComfyUI's combo check
        (built[node_type],) = getattr(node(), node.FUNCTION)(**inputs)
        assert built[node_type].device == "cpu"
        assert Path(built[node_type].model) == models / inputs["model"]
    dit = built["SeedVR2LoadDiTModel"]
    assert dit.blocks_to_swap == 0, "swapping to the device it already runs on is dropped"
    upscaler_inputs = map_widgets(nodes["SeedVR2VideoUpscaler"], EXAMPLES[example]["SeedVR2VideoUpscaler"][0])
    assert nodes["SeedVR2VideoUpscaler"].VALIDATE_INPUTS(upscaler_inputs["offload_device"]) is True
    settings.UpscaleSettings(**upscaler_inputs).validate()


@pytest.mark.parametrize("toggle", [False, True])
def test_incumbent_workflows_with_a_trailing_local_models_only_value_load(toggle, models, cpu_only):
    """The earlier pack's open PR #625 adds a local_models_only toggle after each loader's last widget; the
    UI hands widget values over by position, so the toggle lands in our first added widget."""
    built = {}
    for node_type in ("SeedVR2LoadDiTModel", "SeedVR2LoadVAEModel"):
        node = nodes[node_type]
        values = EXAMPLES["4K image"][node_type][0] + [toggle]
        inputs = defaults(node) | map_widgets(node, values)
        validate = {k: inputs[k] for k in inspect.signature(node.VALIDATE_INPUTS).parameters if k in inputs}
        assert node.VALIDATE_INPUTS(**validate) is True, node_type
        (built[node_type],) = getattr(node(), node.FUNCTION)(**inputs)
    assert map_widgets(nodes["SeedVR2LoadDiTModel"], EXAMPLES["4K image"]["SeedVR2LoadDiTModel"][0] + [toggle])[
        "quantization"] is toggle
    assert built["SeedVR2LoadDiTModel"].quantization == "disabled"
    assert built["SeedVR2LoadDiTModel"].enable_optimizations is True
    assert built["SeedVR2LoadVAEModel"].enable_optimizations is toggle   # a boolean widget: taken as given
    assert nodes["SeedVR2LoadDiTModel"].VALIDATE_INPUTS(
        device="cpu", offload_device="none", quantization="int4").startswith("quantization: 'int4' is not")


@pytest.mark.parametrize("file", sorted((REPO_ROOT / "example_workflows").glob("*.json")), ids=lambda p: p.name)
def test_our_example_workflows_fit_our_nodes(file):
    workflow = json.loads(file.read_text())
    by_id = {node["id"]: node for node in workflow["nodes"]}
    ours = [node for node in workflow["nodes"] if node["type"] in nodes]
    assert sorted(node["type"] for node in ours) == sorted(nodes)
    for node in ours:
        node_class = nodes[node["type"]]
        assert len(node["widgets_values"]) == len(widget_names(node_class)), node["type"]
        values = map_widgets(node_class, node["widgets_values"])
        for name, (kind, *_o), _r in rows(node_class):
            if isinstance(kind, list) and name in values:
                assert values[name] in kind, (node["type"], name)
    assert next(n for n in ours if n["type"] == "SeedVR2TorchCompileSettings")["mode"] == 4  # bypassed
    wires = {(by_id[link[1]]["type"], by_id[link[3]]["type"], link[4], link[5]) for link in workflow["links"]}
    assert ("SeedVR2LoadDiTModel", "SeedVR2VideoUpscaler", 1, "SEEDVR2_DIT") in wires
    assert ("SeedVR2LoadVAEModel", "SeedVR2VideoUpscaler", 2, "SEEDVR2_VAE") in wires
    assert ("JoinImageWithAlpha", "SeedVR2VideoUpscaler", 0, "IMAGE") in wires
    assert ("SeedVR2TorchCompileSettings", "SeedVR2LoadDiTModel", 0, "TORCH_COMPILE_ARGS") in wires
    inputs = [n["widgets_values"][0] for n in workflow["nodes"] if n["type"] in ("LoadImage", "LoadVideo")]
    assert inputs and all((REPO_ROOT / "assets" / name).is_file() for name in inputs)


# ---------------------------------------------------------------------------------------------- validation
def test_validation_messages_name_the_problem(models, cpu_only):
    dit_loader = nodes["SeedVR2LoadDiTModel"]
    listed = dit_loader.INPUT_TYPES()["required"]["model"][0]
    assert dit_loader.VALIDATE_INPUTS("cuda:3", "cuda:0") is True
    assert "seedvr2_ema_7b_fp16.safetensors" in listed       # downloadable: listed, so it validates
    assert "my_finetune.safetensors" not in listed           # ComfyUI's combo check rejects it, on `model`
    with pytest.raises(settings.SettingsError) as error:     # the same name through a link: the loader says why
        dit_loader().load("my_finetune.safetensors", "auto")
    assert "my_finetune.safetensors" in str(error.value) and str(models) in str(error.value)
    message = dit_loader.VALIDATE_INPUTS("gpu", "auto")
    assert "device: 'gpu' is not a device" in message and "offload_device: 'auto' is not a device" in message
    assert dit_loader.VALIDATE_INPUTS(None, None) is True  # linked inputs are checked at run time
    assert "offload_device: 'cuda:x' is not a device" in nodes["SeedVR2VideoUpscaler"].VALIDATE_INPUTS("cuda:x")
    assert nodes["SeedVR2LoadVAEModel"].VALIDATE_INPUTS("mps", "cpu") is True


def test_device_fallback_warns_once(cpu_only, caplog):
    with caplog.at_level(logging.WARNING, logger="seedvr2"):
        assert devices.resolve_device("cuda:0") == "cpu"
        assert devices.resolve_device("cuda:0") == "cpu"
        assert devices.resolve_device("cuda:1", offload=True) == "cpu"
    assert len([r for r in caplog.records if "'cuda:0' is not available" in r.message]) == 1
    assert devices.resolve_device("auto") == "cpu"
    assert devices.resolve_device("none", offload=True) == "none"
    for bad, offload in (("tpu", False), ("cuda:x", False), ("none", False), ("auto", True)):
        with pytest.raises(devices.DeviceError, match="is not a device"):
            devices.resolve_device(bad, offload=offload)


def test_device_resolution_with_gpus(two_gpus):
    assert devices.resolve_device("cuda:1") == "cuda:1"
    assert devices.resolve_device("cuda") == "cuda:0"
    assert devices.resolve_device("auto") == "cuda:0"
    assert devices.resolve_device("cuda:5") == "cuda:0"
    assert devices.resolve_device("mps", offload=True) == "cpu"


# ---------------------------------------------------------------------------------------------- loaders
def test_dit_loader_builds_its_spec(models, cpu_only):
    compile_settings = nodes["SeedVR2TorchCompileSettings"]().settings("inductor", "max-autotune", True, False, 8, 16)
    (spec,) = nodes["SeedVR2LoadDiTModel"]().load(
        "seedvr2_ema_7b_sharp_fp16.safetensors", "auto", blocks_to_swap=0, offload_device="cpu", cache_model=True,
        attention_mode="sdpa", torch_compile_args=compile_settings[0], quantization="fp8_e4m3fn",
        enable_optimizations=False,
    )
    assert spec == settings.DiTSpec(
        model=str(models / "seedvr2_ema_7b_sharp_fp16.safetensors"), device="cpu", offload_device="cpu",
        cache_model=True, attention_mode="sdpa", quantization="fp8_e4m3fn", enable_optimizations=False,
        compile=settings.CompileSettings("inductor", "max-autotune", True, False, 8, 16),
    )
    hash(spec)  # frozen specs can key the model cache


def test_caching_without_offload_is_allowed(models, cpu_only):
    (spec,) = nodes["SeedVR2LoadDiTModel"]().load("seedvr2_ema_3b_fp16.safetensors", "cpu", cache_model=True)
    assert (spec.cache_model, spec.offload_device) == (True, "none")


def test_dit_loader_refuses_a_vae_file(models, cpu_only):
    with pytest.raises(checkpoint.CheckpointError, match="VAE"):
        nodes["SeedVR2LoadDiTModel"]().load("ema_vae_fp16.safetensors", "cpu")
    with pytest.raises(checkpoint.CheckpointError, match="DiT"):
        nodes["SeedVR2LoadVAEModel"]().load("seedvr2_ema_3b_fp16.safetensors", "cpu")


def test_block_swap_needs_an_offload_device(models, cpu_only):
    with pytest.raises(settings.SettingsError, match="offload_device"):
        nodes["SeedVR2LoadDiTModel"]().load("seedvr2_ema_3b_fp16.safetensors", "cpu", blocks_to_swap=4)


def test_block_swap_is_kept_when_it_moves_weights(models, two_gpus):
    (spec,) = nodes["SeedVR2LoadDiTModel"]().load("seedvr2_ema_3b_fp16.safetensors", "cuda:0", blocks_to_swap=20,
                                                   swap_io_components=True, offload_device="cpu")
    assert (spec.device, spec.offload_device) == ("cuda:0", "cpu")
    assert (spec.blocks_to_swap, spec.swap_io_components) == (20, True)


def test_quantization_follows_the_file_type():
    choose = sys.modules["seedvr2_pack.nodes.dit_model_loader"].choose_quantization
    assert choose("seedvr2_ema_3b-Q8_0.gguf", "disabled") == "gguf"
    assert choose("seedvr2_ema_3b-Q8_0.gguf", "gguf") == "gguf"
    assert choose("seedvr2_ema_3b_fp16.safetensors", "fp4_scaled") == "fp4_scaled"
    with pytest.raises(settings.SettingsError, match="already quantized"):
        choose("seedvr2_ema_3b-Q8_0.gguf", "fp8_e4m3fn")
    with pytest.raises(settings.SettingsError, match=".gguf model file"):
        choose("seedvr2_ema_3b_fp16.safetensors", "gguf")


def test_vae_loader_builds_its_spec(models, cpu_only):
    (spec,) = nodes["SeedVR2LoadVAEModel"]().load(
        "ema_vae_fp16.safetensors", "cuda:0", encode_tiled=True, encode_tile_size=512, encode_tile_overlap=64,
        decode_tiled=True, decode_tile_size=768, decode_tile_overlap=96, tile_debug="decode",
        offload_device="cuda:0", cache_model=True,
    )
    assert spec == settings.VAESpec(
        model=str(models / "ema_vae_fp16.safetensors"), device="cpu", offload_device="cpu", cache_model=True,
        encode_tiled=True, encode_tile_size=512, encode_tile_overlap=64, decode_tiled=True, decode_tile_size=768,
        decode_tile_overlap=96, tile_debug="decode",
    )
    (plain,) = nodes["SeedVR2LoadVAEModel"]().load("ema_vae_fp16.safetensors", "cpu", tile_debug="false")
    assert plain.tile_debug == "false" and plain.encode_tiled is False


def test_tile_overlap_must_be_smaller_than_the_tile(models, cpu_only):
    with pytest.raises(settings.SettingsError, match="decode_tile_overlap"):
        nodes["SeedVR2LoadVAEModel"]().load("ema_vae_fp16.safetensors", "cpu", decode_tiled=True,
                                            decode_tile_size=256, decode_tile_overlap=256)
    nodes["SeedVR2LoadVAEModel"]().load("ema_vae_fp16.safetensors", "cpu", decode_tile_size=256,
                                        decode_tile_overlap=256)  # not tiled: sizes unused


def test_model_combos_list_found_files(models):
    (models / "decoder_v2.safetensors").symlink_to(golden_path("vae_weights.safetensors"))
    (models / "my_3b.safetensors").symlink_to(golden_path("dit3b_weights.safetensors"))
    dit_models = nodes["SeedVR2LoadDiTModel"].INPUT_TYPES()["required"]["model"][0]
    vae_models = nodes["SeedVR2LoadVAEModel"].INPUT_TYPES()["required"]["model"][0]
    assert dit_models[-1] == "my_3b.safetensors" and "decoder_v2.safetensors" not in dit_models
    assert vae_models == ["ema_vae_fp16.safetensors", "decoder_v2.safetensors"]


def test_comfy_folder_registration_honours_extra_model_paths(monkeypatch, tmp_path):
    """With ComfyUI's folder table: a user's "SEEDVR2" entry (any case) is searched first."""
    table = {"SEEDVR2": ([str(tmp_path / "user")], set()), "checkpoints": ([str(tmp_path / "ckpt")], {".ckpt"})}
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "mine.safetensors").write_bytes(b"x")

    def add_model_folder_path(name, path, is_default=False):
        table.setdefault(name, ([], set()))[0].append(path)

    def get_filename_list(key):
        return sorted(p.name for d in table[key][0] if Path(d).is_dir() for p in Path(d).iterdir())

    def get_full_path(key, name):
        return next((str(Path(d) / name) for d in table[key][0] if (Path(d) / name).is_file()), None)

    fake = types.SimpleNamespace(
        folder_names_and_paths=table, models_dir=str(tmp_path / "models"), add_model_folder_path=add_model_folder_path,
        get_folder_paths=lambda key: list(table[key][0]), get_filename_list=get_filename_list,
        get_full_path=get_full_path,
    )
    monkeypatch.setattr(model_folders, "folder_paths", fake)
    model_folders.register_model_folder()
    assert table["seedvr2"] == ([str(tmp_path / "user"), str(tmp_path / "models" / "SEEDVR2")],
                                {".safetensors", ".gguf", ".pth", ".pt"})
    assert model_folders.model_folders() == [tmp_path / "user", tmp_path / "models" / "SEEDVR2"]
    assert model_folders.model_files() == {"mine.safetensors": tmp_path / "user" / "mine.safetensors"}


# ---------------------------------------------------------------------------------------------- upscaler
UPSCALER_ARGS = dict(seed=7, resolution=64, max_resolution=0, batch_size=5, uniform_batch_size=False,
                     color_correction="wavelet")


@pytest.fixture
def pipeline(monkeypatch):
    """A stand-in for src.pipeline.upscaler that records its call."""
    calls = []

    def upscale(images, dit, vae, run_settings, progress):
        calls.append(dict(images=images, dit=dit, vae=vae, settings=run_settings, progress=progress))
        return images * 0.5

    monkeypatch.setitem(sys.modules, "seedvr2_pack.src.pipeline.upscaler", types.SimpleNamespace(upscale=upscale))
    return calls


def test_upscaler_hands_validated_settings_to_the_pipeline(pipeline, cpu_only):
    images = torch.rand(3, 16, 24, 4)
    dit, vae = settings.DiTSpec(model="d.safetensors"), settings.VAESpec(model="v.safetensors")
    (result,) = nodes["SeedVR2VideoUpscaler"]().execute(images, dit, vae, **UPSCALER_ARGS, temporal_overlap=2,
                                                         offload_device="cuda:0", enable_debug=True)
    assert torch.equal(result, images * 0.5)
    (call,) = pipeline
    assert call["images"] is images and call["dit"] is dit and call["vae"] is vae
    assert call["settings"] == settings.UpscaleSettings(**UPSCALER_ARGS, temporal_overlap=2, offload_device="cpu",
                                                        enable_debug=True)
    assert isinstance(call["progress"], progress_module.ComfyProgress)
    assert call["progress"].position == 1000, "the bar is full once the pipeline returned"


@pytest.mark.parametrize("images, message", [
    (torch.zeros(0, 16, 16, 3), "no frames"),
    (torch.zeros(0, 3, 0, 0), "no frames"),  # what ComfyUI's video loader returns for an empty video
    (torch.zeros(2, 16, 16, 2), "RGB or RGBA"),
    (torch.zeros(16, 16, 3), "RGB or RGBA"),
])
def test_upscaler_rejects_bad_images_before_the_pipeline(pipeline, images, message):
    dit, vae = settings.DiTSpec(model="d"), settings.VAESpec(model="v")
    with pytest.raises(upscaler_module.ImageInputError, match=message):
        nodes["SeedVR2VideoUpscaler"]().execute(images, dit, vae, **UPSCALER_ARGS)
    assert pipeline == []


def test_upscaler_rejects_bad_settings_before_the_pipeline(pipeline):
    dit, vae = settings.DiTSpec(model="d"), settings.VAESpec(model="v")
    args = UPSCALER_ARGS | {"max_resolution": 8}
    with pytest.raises(settings.SettingsError, match="max_resolution"):
        nodes["SeedVR2VideoUpscaler"]().execute(torch.rand(1, 8, 8, 3), dit, vae, **args)
    with pytest.raises(settings.SettingsError, match="temporal_overlap"):
        nodes["SeedVR2VideoUpscaler"]().execute(torch.rand(1, 8, 8, 3), dit, vae, **UPSCALER_ARGS, temporal_overlap=5)
    assert pipeline == []


# ---------------------------------------------------------------------------------------------- progress
def test_progress_is_a_no_op_without_comfyui():
    progress = progress_module.ComfyProgress()
    progress.start_phase("encode", 3)
    progress.advance()
    progress.check_interrupt()
    assert progress.position == 67  # 0.2 of the bar for encoding, a third of it done


def test_progress_drives_the_comfy_bar_by_phase_weight(monkeypatch):
    updates = []
    bar = types.SimpleNamespace(update_absolute=updates.append)
    monkeypatch.setattr(progress_module, "comfy_utils", types.SimpleNamespace(ProgressBar=lambda total: bar))
    progress = progress_module.ComfyProgress()
    for phase, weight in (("encode", 200), ("upscale", 250), ("decode", 500), ("postprocess", 50)):
        start = progress.position
        progress.start_phase(phase, 2)
        progress.advance()
        assert progress.position == start + weight // 2
        progress.advance()
        assert progress.position == start + weight
    progress.start_phase("encode", 4)  # a phase started again never moves the bar back
    progress.advance()
    assert updates[-1] == 1000 and updates == sorted(updates)


def test_the_bar_moves_inside_a_step_without_flooding(monkeypatch):
    updates, texts, clock = [], [], [100.0]
    bar = types.SimpleNamespace(update_absolute=updates.append)
    monkeypatch.setattr(progress_module, "comfy_utils", types.SimpleNamespace(ProgressBar=lambda total: bar))
    monkeypatch.setattr(progress_module, "_text_sender", lambda: texts.append)
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: clock[0])
    progress_class = progress_module.ComfyProgress
    progress = progress_class()
    progress.start_phase("decode", 2)                 # decode owns half of the bar (500 of 1000 steps)
    steps = [0.01 * i for i in range(1, 60)]          # 59 reports within one step, all at one instant
    for fraction in steps:
        progress.within_step(fraction)
    # The first FREE_UPDATES are shown as they come (fraction f of batch 1 of 2 is 250·f bar steps) ...
    assert updates[1:] == [round(250 * f) for f in steps[:progress_class.FREE_UPDATES]]
    clock[0] += 2 * progress_class.MIN_INTERVAL_S
    progress.within_step(0.6)                          # ... later ones once the interval has passed
    assert updates[-1] == 150
    progress.within_step(0.61)                         # too soon, and too small a move
    progress.within_step(0.2)                          # never backwards
    assert updates[-1] == 150
    progress.advance()
    assert updates[-1] == 250 and updates == sorted(updates)
    assert texts == ["SeedVR2: decoding, batch 1/2", "SeedVR2: decoding, batch 2/2"]


def test_a_finished_run_fills_the_bar_even_without_post_processing():
    progress = progress_module.ComfyProgress()
    for phase in ("encode", "upscale", "decode"):
        progress.start_phase(phase, 1)
        progress.advance()
    assert progress.position == 950
    progress.finish()
    assert progress.position == 1000


def test_progress_forwards_interrupts(monkeypatch):
    class Interrupted(Exception):
        pass

    def throw():
        raise Interrupted

    monkeypatch.setattr(progress_module, "model_management",
                        types.SimpleNamespace(throw_exception_if_processing_interrupted=throw))
    with pytest.raises(Interrupted):
        progress_module.ComfyProgress().check_interrupt()


# The released files' precisions, written from the golden float32 weights under the released names.  On the
# CPU the pipeline computes in float32, so a file's fp16 / fp8 values must give exactly what the float32 path
# gives from the same (rounded) values: float32 rounding only, the golden README's float32 spread (rel ~1e-6).
# Against the unrounded golden weights the difference is the file's own precision; measured on these weights
# (3B and 7B, the clip below): fp16 DiT + fp16 VAE rel 9e-4, fp8 e4m3fn DiT + fp16 VAE rel 2.5e-2 (2.6 of
# 255 levels on average).  The bounds are about three times that; the 7B's weights in place of the 3B's
# give rel 0.46 (the colour correction keeps any output near the input's colours).
SAME_VALUES_TOLERANCE = 1e-6
PRECISION_TOLERANCE = {torch.float16: 3e-3, torch.float8_e4m3fn: 7.5e-2}
RELEASED_DIT = {(arch, dtype): f"seedvr2_ema_{arch}_{tag}.safetensors" for arch in ("3b", "7b")
                for dtype, tag in ((torch.float16, "fp16"), (torch.float8_e4m3fn, "fp8_e4m3fn"))}
RELEASED_DIT[("7b", torch.float8_e4m3fn)] = "seedvr2_ema_7b_fp8_e4m3fn_mixed_block35_fp16.safetensors"


def _cast(golden: str, dtype: torch.dtype, *, keep=lambda key: False) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {key: value if keep(key) or not value.is_floating_point() else value.to(dtype).contiguous()
            for key, value in load_file(str(golden_path(golden))).items()}


def _as_float32(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.float() if value.is_floating_point() else value for key, value in tensors.items()}


@pytest.fixture(scope="module")
def precision_models(tmp_path_factory):
    """A model folder with real fp16 / fp8 files under the released names (every floating tensor in the
    file's dtype, as the released 3B fp8 file: 3.39 G parameters in 3234 MiB; the 7B "mixed" file keeps
    block 35 in fp16), the golden float32 files, and float32 files holding each rounded file's values."""
    import importlib

    from safetensors.torch import save_file

    # The pipeline imports torch._dynamo, which must see the real torch.cuda.is_available, not cpu_only's.
    importlib.import_module("seedvr2_pack.src.pipeline.upscaler")
    folder = tmp_path_factory.mktemp("released_precisions")
    for arch in ("3b", "7b"):
        golden = f"dit{arch}_weights.safetensors"
        (folder / f"golden_dit{arch}.safetensors").symlink_to(golden_path(golden))
        for dtype in PRECISION_TOLERANCE:
            name = RELEASED_DIT[(arch, dtype)]
            keep = (lambda key: key.startswith("blocks.3.")) if "mixed_block35" in name else (lambda key: False)
            tensors = _cast(golden, dtype, keep=keep)
            if "mixed_block35" in name:  # the tiny 7B has 4 blocks: its last one stands for block 35
                tensors = {key: value.half() if keep(key) else value for key, value in tensors.items()}
            save_file(tensors, str(folder / name))
            save_file(_as_float32(tensors), str(folder / f"values_of_{name}"))
    vae = _cast("vae_weights.safetensors", torch.float16)
    save_file(vae, str(folder / "ema_vae_fp16.safetensors"))
    save_file(_as_float32(vae), str(folder / "values_of_ema_vae_fp16.safetensors"))
    (folder / "golden_vae.safetensors").symlink_to(golden_path("vae_weights.safetensors"))
    return folder


def _node_upscale(images, dit_file, vae_file, **settings):
    (dit,) = nodes["SeedVR2LoadDiTModel"]().load(dit_file, "cuda:0")
    (vae,) = nodes["SeedVR2LoadVAEModel"]().load(vae_file, "cuda:0")
    (result,) = nodes["SeedVR2VideoUpscaler"]().execute(images, dit, vae, seed=1, resolution=32, max_resolution=0,
                                                         batch_size=5, uniform_batch_size=False,
                                                         color_correction="lab", **settings)
    return result


_float32_runs: dict[str, torch.Tensor] = {}


def _float32_run(images, arch):
    if arch not in _float32_runs:
        _float32_runs[arch] = _node_upscale(images, f"golden_dit{arch}.safetensors", "golden_vae.safetensors")
    return _float32_runs[arch]


@pytest.mark.parametrize("arch", ["3b", "7b"])
@pytest.mark.parametrize("dtype", list(PRECISION_TOLERANCE), ids=["fp16", "fp8_e4m3fn"])
def test_the_three_nodes_upscale_with_released_precisions(precision_models, single_thread, monkeypatch, cpu_only,
                                                         arch, dtype):
    """The loaders and the upscaler executed as ComfyUI would call them, with the real pipeline and the tiny
    golden models written in the released files' precisions under their names."""
    monkeypatch.setattr(model_folders, "model_folders", lambda: [precision_models])
    dit_file, vae_file = RELEASED_DIT[(arch, dtype)], "ema_vae_fp16.safetensors"
    images = torch.rand(3, 24, 40, 3, generator=torch.Generator().manual_seed(0))
    result = _node_upscale(images, dit_file, vae_file)
    assert result.shape == (3, 32, 52, 3) and result.dtype == torch.float32
    assert 0.0 <= result.min() and result.max() <= 1.0

    same_values = _node_upscale(images, f"values_of_{dit_file}", f"values_of_{vae_file}")
    assert rel_err(result, same_values) <= SAME_VALUES_TOLERANCE
    golden = _float32_run(images, arch)
    error = rel_err(result, golden)
    assert 0 < error <= PRECISION_TOLERANCE[dtype], f"rel {error:.2e} against the float32 files"
    other = _float32_run(images, "7b" if arch == "3b" else "3b")
    assert rel_err(other, golden) > 4 * PRECISION_TOLERANCE[torch.float8_e4m3fn], \
        "the tolerances must tell another model from a rounded one"


def test_a_value_that_is_not_a_device_name_is_a_validation_message(cpu_only):
    """A workflow whose widget values are out of step with the inputs can put a number into a device input."""
    message = nodes["SeedVR2VideoUpscaler"].VALIDATE_INPUTS(0)
    assert isinstance(message, str) and "offload_device" in message and "0 is not a device name" in message
    assert "device: True is not a device name" in nodes["SeedVR2LoadVAEModel"].VALIDATE_INPUTS(True, "cpu")
