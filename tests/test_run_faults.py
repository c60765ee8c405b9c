"""Fault and bad-input findings of issue #14 in a run: caches released with the model, non-finite values
refused, settings validated before any heavy work.  (Named to run after test_fused_kernels.py, which must
register its custom operator before the pack is imported as a package.)
"""
import gc
import warnings

import pytest
import torch

from conftest import golden_path
from src.pipeline.model_manager import ModelManager
from src.pipeline.settings import DiTSpec, SettingsError, UpscaleSettings, VAESpec
from src.pipeline.upscaler import upscale


@pytest.fixture(scope="module")
def specs():
    dit = DiTSpec(model=str(golden_path("dit3b_weights.safetensors")), device="cpu")
    vae = VAESpec(model=str(golden_path("vae_weights.safetensors")), device="cpu")
    return dit, vae


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on torch.distributed's deprecated aliases warns
        warnings.simplefilter("ignore", FutureWarning)
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def test_runs_at_many_resolutions_leave_no_tensors_behind(specs):
    """Window plans are index tensors on the DiT's device; they go with the model, not with the process."""
    dit, vae = specs
    manager = ModelManager()
    settings = UpscaleSettings(resolution=16, batch_size=1)
    upscale(torch.rand(1, 16, 16, 3), dit, vae, settings, manager=manager)  # imports and lazy state first
    before = _live_tensors()
    for width in range(24, 24 + 20 * 8, 8):  # 20 frame sizes, each a new latent shape and window plan
        upscale(torch.rand(1, 16, width, 3), dit, vae, settings, manager=manager)
    assert manager._cache == {}
    assert _live_tensors() - before <= 2


def test_the_window_plan_cache_is_bounded_and_follows_the_device():
    from src.models.dit.packing import PackedLayout
    from src.models.dit.window_plan import WindowPlanCache

    cache = WindowPlanCache(max_entries=3)
    method = "720pwin_by_size_bysize"
    layouts = [PackedLayout(grids=((1, h, 4),), text_lengths=(3,)) for h in range(2, 7)]
    first = cache.get(layouts[0], (4, 3, 3), method, torch.device("cpu"))
    assert cache.get(layouts[0], (4, 3, 3), method, torch.device("cpu")) is first   # cached
    for layout in layouts[1:]:
        cache.get(layout, (4, 3, 3), method, torch.device("cpu"))
    assert len(cache) == 3
    assert cache.get(layouts[0], (4, 3, 3), method, torch.device("cpu")) is not first  # evicted, rebuilt
    cache.get(layouts[1], (4, 3, 3), method, torch.device("meta"))
    assert len(cache) == 1   # a lookup on another device drops the plans of the old one
    cache.clear()
    assert len(cache) == 0


# ------------------------------------------------------------------------------------------ NaN, Inf, 0..255
def _clip(frames=5, size=16):
    generator = torch.Generator().manual_seed(3)
    return torch.rand(frames, size, size, 3, generator=generator)


def test_one_nan_pixel_is_refused_naming_its_frame(specs):
    dit, vae = specs
    clip = _clip()
    clip[0, 3, 4, 1] = float("nan")
    clip[3, 0, 0, 0] = float("inf")
    with pytest.raises(SettingsError, match=r"frame\(s\) 0, 3 of the input contain NaN or infinite"):
        upscale(clip, dit, vae, UpscaleSettings(resolution=16), manager=ModelManager())


@pytest.mark.parametrize("as_uint8", [True, False])
def test_frames_in_0_to_255_are_converted_not_clamped_to_white(specs, as_uint8, caplog):
    dit, vae = specs
    clip = _clip(1)
    scaled = (clip * 255).round()
    given = scaled.to(torch.uint8) if as_uint8 else scaled
    settings = UpscaleSettings(resolution=16, batch_size=1)
    manager = ModelManager()
    expected = upscale(scaled / 255, dit, vae, settings, manager=manager)
    with caplog.at_level("WARNING", logger="seedvr2"):
        out = upscale(given, dit, vae, settings, manager=manager)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    assert out.mean() < 0.9 and any("0..255" in r.message for r in caplog.records)


@pytest.mark.parametrize("values", [(-3.0, 0.5), (0.0, 300.0), (0.2, 7.5)])
def test_frames_of_unknown_range_are_refused(specs, values):
    dit, vae = specs
    clip = _clip(1)
    clip[0, 0, 0, 0], clip[0, 0, 1, 0] = values
    if values == (0.2, 7.5):
        clip[0, 0, 2, 0] = -1.0
    with pytest.raises(SettingsError, match="IMAGE holds values in 0..1"):
        upscale(clip, dit, vae, UpscaleSettings(resolution=16, batch_size=1), manager=ModelManager())


def test_integer_frames_other_than_uint8_are_refused(specs):
    dit, vae = specs
    with pytest.raises(SettingsError, match="float values in 0..1"):
        upscale(torch.zeros(1, 16, 16, 3, dtype=torch.int32), dit, vae, UpscaleSettings(resolution=16),
                manager=ModelManager())


@pytest.fixture
def poisoned(tmp_path):
    """Golden weight files with one NaN (DiT) or Inf (VAE) value."""
    from safetensors.torch import load_file, save_file

    files = {}
    for name, value, key_part in (("dit3b_weights.safetensors", float("nan"), "blocks.0"),
                                  ("vae_weights.safetensors", float("inf"), "decoder")):
        tensors = load_file(str(golden_path(name)))
        key = next(k for k in sorted(tensors) if key_part in k and tensors[k].is_floating_point()
                   and tensors[k].numel() > 1)
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[1] = value
        files[name] = (tmp_path / name, key)
        save_file(tensors, str(tmp_path / name))
    return files


@pytest.mark.parametrize("which", ["dit3b_weights.safetensors", "vae_weights.safetensors"])
def test_nan_or_inf_weights_are_refused_before_the_run(specs, poisoned, which):
    dit, vae = specs
    path, key = poisoned[which]
    if which.startswith("dit"):
        dit = DiTSpec(model=str(path), device="cpu")
    else:
        vae = VAESpec(model=str(path), device="cpu")
    with pytest.raises(SettingsError, match=rf"weight '{key}' holds NaN or infinite values"):
        upscale(_clip(1), dit, vae, UpscaleSettings(resolution=16, batch_size=1), manager=ModelManager())


def test_a_batch_that_overflows_is_refused_before_it_is_written(specs, monkeypatch):
    from src.pipeline import upscaler as upscaler_module
    from src.pipeline.upscaler import NonFiniteError

    dit, vae = specs
    real = upscaler_module.decode_latent
    calls = []

    def second_batch_overflows(model, latent, tiling):
        out = real(model, latent, tiling)
        calls.append(1)
        if len(calls) == 2:
            out[2, 0, 0, 0] = float("inf")
        return out

    monkeypatch.setattr(upscaler_module, "decode_latent", second_batch_overflows)
    with pytest.raises(NonFiniteError, match="decode and colour correction of frames 5–9 produced NaN"):
        upscale(_clip(10), dit, vae, UpscaleSettings(resolution=16, batch_size=5), manager=ModelManager())


def test_a_dit_result_that_is_not_finite_is_named(specs, monkeypatch):
    from src.pipeline import upscaler as upscaler_module
    from src.pipeline.upscaler import NonFiniteError

    dit, vae = specs
    monkeypatch.setattr(upscaler_module, "restore_latent", lambda *a, **k: torch.full((2, 2, 2, 16), float("nan")))
    with pytest.raises(NonFiniteError, match="DiT upscale of frames 0–0"):
        upscale(_clip(1), dit, vae, UpscaleSettings(resolution=16, batch_size=1), manager=ModelManager())


# ------------------------------------------------------------------------------ settings before heavy work
class _NoModels:
    """A model manager that fails the test if a model is requested: validation must come first."""

    def dit(self, spec):
        raise AssertionError("a model was loaded before the settings were checked")

    vae = dit

    def finish(self, *models):
        pass


@pytest.mark.parametrize("seed", [2**64, -1, 1.5, True, "42"])
def test_seeds_outside_comfyuis_range_are_refused_clearly(seed):
    with pytest.raises(SettingsError, match="seed must be"):
        upscale(_clip(1), DiTSpec(model="x"), VAESpec(model="x"), UpscaleSettings(seed=seed), manager=_NoModels())


def test_the_largest_comfyui_seed_runs_with_input_noise(specs):
    dit, vae = specs
    settings = UpscaleSettings(seed=2**64 - 1, resolution=16, batch_size=1, input_noise_scale=0.5)
    out = upscale(_clip(1), dit, vae, settings, manager=ModelManager())
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("fields,message", [
    (dict(tile_debug="yes"), "tile_debug must be one of false, encode, decode"),
    (dict(tile_debug=True), "tile_debug must be one of"),
    (dict(decode_tiled=True, decode_tile_size=100), "decode_tile_size 100 .*multiple of 32"),
    (dict(encode_tiled=True, encode_tile_size=256, encode_tile_overlap=12), "encode_tile_overlap 12: .*multiple of 8"),
    (dict(encode_tiled=True, encode_tile_size=256, encode_tile_overlap=256), "smaller than the tile size"),
    (dict(decode_tiled=True, decode_tile_size=-64), "decode_tile_size -64"),
])
def test_vae_settings_are_checked_when_the_spec_is_made(fields, message):
    with pytest.raises(SettingsError, match=message):
        VAESpec(model="x", **fields)


def test_untiled_directions_do_not_check_their_unused_sizes():
    VAESpec(model="x", decode_tile_size=100, tile_debug="decode")


def test_a_huge_resolution_is_refused_before_any_model_is_loaded(monkeypatch):
    from src.optimization import stable_memory

    monkeypatch.setattr(stable_memory, "host_memory", lambda: (8 << 30, 16 << 30))
    settings = UpscaleSettings(resolution=16384, batch_size=5)
    # 100 frames of 16384x16384 RGB float32 (300 GiB) plus, with the VAE on the CPU, one batch three times.
    expected = (100 + 3 * 5) * 16384 * 16384 * 3 * 4 / 2**30
    with pytest.raises(SettingsError, match=rf"needs about {expected:.1f} GB of host RAM, and 8.0 GB are available"):
        upscale(torch.rand(100, 16, 16, 3), DiTSpec(model="x", device="cpu"), VAESpec(model="x", device="cpu"),
                settings, manager=_NoModels())


def test_the_cpu_allocators_failure_becomes_advice(specs, monkeypatch):
    from src.pipeline import upscaler as upscaler_module
    from src.pipeline.upscaler import UpscaleError

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 1099511627776 bytes.")

    monkeypatch.setattr(upscaler_module, "restore_latent", no_memory)
    dit, vae = specs
    with pytest.raises(UpscaleError, match="Out of GPU memory during upscale"):
        upscale(_clip(1), dit, vae, UpscaleSettings(resolution=16, batch_size=1), manager=ModelManager())


def test_the_upscaler_node_reports_bad_frames_and_takes_uint8(specs):
    """Through the node class as ComfyUI calls it: a clear error for NaN frames, a run for a uint8 batch."""
    import sys

    from conftest import import_pack

    pack = import_pack()
    pack_settings = sys.modules["seedvr2_pack.src.pipeline.settings"]
    node = pack.NODE_CLASS_MAPPINGS["SeedVR2VideoUpscaler"]()
    dit = pack_settings.DiTSpec(model=specs[0].model, device="cpu")
    vae = pack_settings.VAESpec(model=specs[1].model, device="cpu")
    args = dict(dit=dit, vae=vae, seed=42, resolution=16, max_resolution=0, batch_size=1, uniform_batch_size=False,
                color_correction="lab")
    bad = _clip(2)
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(pack_settings.SettingsError, match=r"frame\(s\) 1 of the input contain NaN"):
        node.execute(bad, **args)
    with pytest.raises(pack_settings.SettingsError, match="seed must be between 0 and 2\\^64"):
        node.execute(_clip(1), **{**args, "seed": 2**64})
    (out,) = node.execute((_clip(1) * 255).round().to(torch.uint8), **args)
    assert out.shape == (1, 16, 16, 3) and out.dtype == torch.float32 and 0.05 < out.mean() < 0.95


def test_the_dits_plans_go_when_it_moves_is_parked_or_dropped(monkeypatch):
    from src.models.dit.packing import PackedLayout
    from src.models.load import load_dit
    from src.pipeline import model_manager
    from src.pipeline.model_manager import ManagedModel

    model = load_dit(golden_path("dit3b_weights.safetensors"), device="cpu", dtype=torch.float32)
    layout = PackedLayout(grids=((1, 4, 6),), text_lengths=(3,))
    model._window_plans(layout, torch.device("cpu"))
    assert len(model.window_plans) > 0
    model.to(torch.float32)  # any move of the weights
    assert len(model.window_plans) == 0
    model._window_plans(layout, torch.device("cpu"))
    managed = ManagedModel("dit", ("k",), model, torch.device("cpu"), torch.device("meta"), torch.float32, False)
    monkeypatch.setattr(model_manager.stable_memory, "offload", lambda *args, **kwargs: None)  # no 2nd device here
    managed.park(torch.device("meta"))  # parking on another device
    assert len(model.window_plans) == 0
    import copy

    model = load_dit(golden_path("dit3b_weights.safetensors"), device="cpu", dtype=torch.float32)
    model._window_plans(layout, torch.device("cpu"))
    assert len(copy.deepcopy(model).window_plans) == 0  # a copy builds its own
