"""Model manager: specs to loaded models, caching between runs, release at the end of a run."""
import torch

from conftest import golden_path
from src.pipeline.model_manager import ModelManager, compute_dtype
from src.pipeline.settings import DiTSpec, VAESpec


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
