"""Model manager: specs to loaded models, caching between runs and how long, release at the end of a run, and
the sizes handed to ComfyUI's model management."""
import gc
import json
import math
import struct
from pathlib import Path

import pytest
import torch

from conftest import golden_path
from src.pipeline.model_manager import ModelManager, compute_dtype, weight_bytes
from src.pipeline.settings import DiTSpec, UpscaleSettings, VAESpec


def test_cached_models_are_reused_and_uncached_ones_dropped():
    manager = ModelManager()
    cached = DiTSpec(model=str(golden_path("dit3b_weights.safetensors")), device="cpu", cache_model=True)
    first = manager.dit(cached)
    manager.finish(first)
    assert manager.dit(cached) is first                       # same spec: no reload
    other = manager.dit(DiTSpec(model=cached.model, device="cpu", cache_model=True, quantization="fp8_e4m3fn"))
    assert other is not first                                 # a setting that changes the weights reloads
    uncached = manager.vae(VAESpec(model=str(golden_path("vae_weights.safetensors")), device="cpu"))
    manager.finish(uncached)
    assert uncached.model is None and uncached.key not in manager._cache
    manager.clear()
    assert manager._cache == {}


def test_compute_dtype_per_device():
    assert compute_dtype(torch.device("cpu")) == torch.float32


def test_models_load_in_eval_mode_without_gradients():
    manager = ModelManager()
    managed = manager.dit(DiTSpec(model=str(golden_path("dit7b_weights.safetensors")), device="cpu"))
    assert not managed.model.training
    assert not any(p.requires_grad for p in managed.model.parameters())
    manager.finish(managed)


# ------------------------------------------------------------------------------- caching and its lifetime
def test_cache_model_off_loads_afresh_even_when_a_cached_copy_exists():
    manager = ModelManager()
    path = str(golden_path("dit3b_weights.safetensors"))
    cached = manager.dit(DiTSpec(model=path, device="cpu", cache_model=True))
    manager.finish(cached)
    fresh = manager.dit(DiTSpec(model=path, device="cpu", cache_model=False))
    assert fresh is not cached and fresh.model is not cached.model
    manager.finish(fresh)                                     # dropping it leaves the cached copy alone
    assert fresh.model is None and manager.cached() == [cached] and cached.model is not None
    manager.clear()


def test_models_held_for_specs_live_as_long_as_a_spec_that_asked_for_them():
    """Inside ComfyUI the loader's output (the spec) is what keeps a cached model: when ComfyUI drops it
    (POST /free with free_memory resets its caches), the model goes too."""
    manager = ModelManager(hold_for_specs=True)
    path = str(golden_path("vae_weights.safetensors"))
    spec = VAESpec(model=path, device="cpu", cache_model=True)
    managed = manager.vae(spec)
    manager.finish(managed)
    twin = VAESpec(model=path, device="cpu", cache_model=True)   # a second loader with the same settings
    assert manager.vae(twin) is managed
    del spec
    gc.collect()
    assert manager.cached() == [managed] and managed.model is not None  # the twin still holds it
    del twin
    gc.collect()
    assert manager.cached() == [] and managed.model is None
    uncached = manager.vae(VAESpec(model=path, device="cpu"))
    manager.finish(uncached)
    assert manager.cached() == [] and uncached.model is None


def test_a_spec_that_asks_for_other_weights_releases_the_old_ones():
    manager = ModelManager(hold_for_specs=True)
    spec = DiTSpec(model=str(golden_path("dit3b_weights.safetensors")), device="cpu", cache_model=True)
    first = manager.dit(spec)
    manager.finish(first)
    manager._resolve_path = lambda name: Path(str(golden_path("dit7b_weights.safetensors")))
    second = manager.dit(spec)                                    # the same loader output, another file now
    assert second is not first and first.model is None and manager.cached() == [second]
    manager.clear()


# ------------------------------------------------------------------------------- sizes handed to ComfyUI
def _file_elements(path) -> dict[str, int]:
    header = json.loads(open(path, "rb").read(8 + struct.unpack("<Q", open(path, "rb").read(8))[0])[8:])
    return {k: math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__"}


@pytest.mark.parametrize("name, kind", [("dit3b_weights.safetensors", "dit"), ("dit7b_weights.safetensors", "dit"),
                                        ("vae_weights.safetensors", "vae")])
def test_weight_bytes_are_the_loaded_parameters(name, kind):
    """On the CPU every tensor of the file is held in float32: 4 bytes per element of the file."""
    path = str(golden_path(name))
    manager = ModelManager()
    spec = (DiTSpec if kind == "dit" else VAESpec)(model=path, device="cpu")
    managed = manager.dit(spec) if kind == "dit" else manager.vae(spec)
    loaded = {k for k, _ in managed.model.named_parameters()} | {k for k, _ in managed.model.named_buffers()}
    elements = _file_elements(path)
    assert set(elements) <= loaded or kind == "dit"
    expected = 4 * sum(p.numel() for p in managed.model.parameters()) + 4 * sum(
        b.numel() for b in managed.model.buffers())
    assert weight_bytes(managed.model) == expected
    assert abs(weight_bytes(managed.model) - 4 * sum(elements.values())) <= 4 * 4096  # recomputed rope tables
    manager.finish(managed)


def test_fp8_weights_count_one_byte_each():
    manager = ModelManager()
    managed = manager.dit(DiTSpec(model=str(golden_path("dit3b_weights.safetensors")), device="cpu",
                                  quantization="fp8_e4m3fn"))
    fp8 = sum(p.numel() for p in managed.model.parameters() if p.dtype == torch.float8_e4m3fn)
    assert fp8 > 0
    other = sum(t.numel() * t.element_size() for t in [*managed.model.parameters(), *managed.model.buffers()]
                if t.dtype != torch.float8_e4m3fn)
    assert weight_bytes(managed.model) == fp8 + other
    manager.finish(managed)


class _FakeComfy:
    """comfy.model_management / comfy.model_patcher as far as the manager uses them, recording the figures."""

    def __init__(self):
        self.current_loaded_models, self.loads, self.patchers = [], [], []
        outer = self

        class ModelPatcher:
            def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
                self.model, self.load_device, self.offload_device, self.size = model, load_device, offload_device, size
                outer.patchers.append(self)

            def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
                self.loaded_whole = full_load

            def model_size(self):
                return self.size

            def detach(self, unpatch_all=True):
                return self.model

        self.ModelPatcher = ModelPatcher

    def load_models_gpu(self, models, memory_required=0, force_full_load=False, **kw):
        self.loads.append((models[0], memory_required, force_full_load))
        models[0].load(models[0].load_device, 0.1 * models[0].size)

    def unet_offload_device(self):
        return torch.device("cpu")

    def soft_empty_cache(self):
        pass


def test_comfyui_is_told_the_real_sizes(monkeypatch):
    from src.pipeline import model_manager as mm
    from src.pipeline import upscaler

    fake = _FakeComfy()
    monkeypatch.setattr(mm, "comfy_mm", fake)
    monkeypatch.setattr(mm, "comfy_patcher", fake)
    monkeypatch.setattr(mm, "_PATCHER_CLASS", None)
    manager = ModelManager(hold_for_specs=False)
    dit = DiTSpec(model=str(golden_path("dit3b_weights.safetensors")), device="cpu")
    vae = VAESpec(model=str(golden_path("vae_weights.safetensors")), device="cpu")
    upscaler.upscale(torch.rand(1, 32, 48, 3), dit, vae, UpscaleSettings(resolution=32, batch_size=1), manager=manager)
    dit_patcher, vae_patcher = fake.patchers[1], fake.patchers[0]  # the VAE loads first (encode)
    assert dit_patcher.size == 4 * sum(t.numel() for t in [*dit_patcher.model.inner.parameters(),
                                                           *dit_patcher.model.inner.buffers()])
    assert vae_patcher.size == 4 * sum(t.numel() for t in [*vae_patcher.model.inner.parameters(),
                                                           *vae_patcher.model.inner.buffers()])
    # Whole loads without force_full_load, so ComfyUI sizes the load against its free memory; all of it counts.
    assert all(not forced and patcher.loaded_whole for patcher, _required, forced in fake.loads)
    assert all(patcher.model.model_loaded_weight_memory == patcher.size for patcher, _r, _f in fake.loads)
    (dit_required,) = [required for patcher, required, _ in fake.loads if patcher is dit_patcher]
    # The DiT's working set: 2x3 latent pixels -> 1x... tokens of the tiny 3B (64 wide, SwiGLU).
    config = dit_patcher.model.inner.config
    assert dit_required == mm.dit_working_bytes(config, [(1, 4, 6)], torch.float32) > 0
    assert fake.current_loaded_models == []
