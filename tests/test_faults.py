"""Fault and bad-input findings of issue #14: caches released with the model, paths kept inside the model
folders, non-finite values refused, settings validated before any heavy work."""
import gc

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
