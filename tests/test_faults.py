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
