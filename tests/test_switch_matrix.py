"""Every exact switch, on and off, through ``upscale()`` on the golden tiny models (CPU, float32): the frames
must be the plain path's within the float32 tolerance, whatever the switch does to the computation.

The plain run is the reference path: ``enable_optimizations`` off in both loaders (eager PyTorch, SDPA
attention), nothing compiled, swapped or offloaded; its per-batch maths is what test_pipeline_golden checks
against the original implementation.  Tolerance: the golden README's (§9) for the pipeline's float32
tensors, rel <= 2e-5, and every value within half an 8-bit level, so the 8-bit frames differ by at most one
level where a value sits on a rounding edge.  Measured: rel 7.3e-7 to 7.6e-7, max |diff| 1.2e-5 (attention
backends, lean VAE, compiled blocks), exactly 0 for switches that leave the computation alone.

Not here, because they are not exact (each has its own tests and stated error): VAE tiling, fp8 / fp4 /
GGUF quantization, half-precision attention kernels.  Not exact on the CPU either way: BlockSwap needs a
second device, so on a CPU-only machine ``blocks_to_swap`` only takes the loader's path; Triton kernels run
on CUDA only, so their switches must simply change nothing here (their kernels are tested under Triton's
interpreter in the *_triton test modules).
"""
from __future__ import annotations

import pytest
import torch

from conftest import golden_path, rel_err, set_env
from src.pipeline.model_manager import ModelManager
from src.pipeline.settings import CompileSettings, DiTSpec, UpscaleSettings, VAESpec
from src.pipeline.upscaler import upscale

pytestmark = pytest.mark.usefixtures("single_thread")

REL_TOLERANCE = 2e-5
ABS_TOLERANCE = 0.5 / 255
PLAIN_DIT = dict(enable_optimizations=False, attention_mode="sdpa")
PLAIN_VAE = dict(enable_optimizations=False)
SETTINGS = dict(resolution=32, batch_size=5, temporal_overlap=1, seed=3, color_correction="lab")
EAGER_COMPILE = CompileSettings(backend="eager")  # Dynamo's capture and guards, no code generation


def _clip(frames: int = 7, height: int = 24, width: int = 40) -> torch.Tensor:
    """A smooth clip that brightens over time: two batches of 5 with one frame blended between them."""
    generator = torch.Generator().manual_seed(0)
    base = torch.rand(1, 3, height // 4, width // 4, generator=generator)
    base = torch.nn.functional.interpolate(base, size=(height, width), mode="bilinear").permute(0, 2, 3, 1)
    return (base + torch.linspace(0, 0.2, frames).view(-1, 1, 1, 1)).clamp(0, 1)


def _run(arch: str = "3b", dit: dict | None = None, vae: dict | None = None, settings: dict | None = None,
         manager: ModelManager | None = None) -> torch.Tensor:
    dit_spec = DiTSpec(model=str(golden_path(f"dit{arch}_weights.safetensors")), device="cpu",
                       **{**PLAIN_DIT, **(dit or {})})
    vae_spec = VAESpec(model=str(golden_path("vae_weights.safetensors")), device="cpu", **{**PLAIN_VAE, **(vae or {})})
    return upscale(_clip(), dit_spec, vae_spec, UpscaleSettings(**{**SETTINGS, **(settings or {})}),
                   manager=manager or ModelManager())


@pytest.fixture(scope="module")
def plain():
    return {"3b": _run("3b"), "7b": _run("7b")}


def _assert_plain(frames: torch.Tensor, reference: torch.Tensor) -> None:
    assert frames.shape == reference.shape and frames.dtype == reference.dtype
    error, largest = rel_err(frames, reference), (frames - reference).abs().max().item()
    assert error <= REL_TOLERANCE and largest <= ABS_TOLERANCE, f"rel {error:.2e}, max |diff| {largest:.2e}"


OPTIMIZED = dict(enable_optimizations=True)
SWITCHES = {
    # The loaders' enable_optimizations: the DiT's backend choice and fused kernels, the VAE's lean path.
    "dit_optimizations": dict(dit=OPTIMIZED),
    "vae_optimizations": dict(vae=OPTIMIZED),
    "all_optimizations": dict(dit=OPTIMIZED, vae=OPTIMIZED),
    # Attention backends that compute float32 attention exactly on the CPU; the CUDA-only ones fall back.
    **{f"attention_{mode}": dict(dit=dict(enable_optimizations=True, attention_mode=mode))
       for mode in ("auto", "sdpa", "sdpa_flash", "sdpa_math", "sdpa_chunked", "matmul_chunked", "flex",
                    "flash_attn_2", "sageattn_2", "xformers")},
    "attention_ignored_without_optimizations": dict(dit=dict(attention_mode="matmul_chunked")),
    # The compile settings node, regional compilation of the DiT's blocks / the plain VAE's encoder and
    # decoder, and the switch that turns compiling off.
    "compile_dit": dict(dit=dict(enable_optimizations=True, compile=EAGER_COMPILE)),
    "compile_plain_vae": dict(vae=dict(compile=EAGER_COMPILE)),
    "compile_switched_off": dict(dit=dict(compile=EAGER_COMPILE), vae=dict(compile=EAGER_COMPILE),
                                 env={"SEEDVR2_ENABLE_COMPILE": "0"}),
    # Where models and frames live, and what stays cached.
    "block_swap": dict(dit=dict(blocks_to_swap=2, swap_io_components=True, offload_device="cpu")),
    "offload_models": dict(dit=dict(offload_device="cpu"), vae=dict(offload_device="cpu")),
    "frames_kept_on_the_device": dict(settings=dict(offload_device="none")),
    "debug_logging": dict(settings=dict(enable_debug=True), env={"SEEDVR2_DEBUG_MEMORY": "1"}),
    # Environment switches of the kernels: CUDA-only paths, which must leave the CPU run alone.
    "kernel_switches": dict(dit=OPTIMIZED, vae=OPTIMIZED, env={"SEEDVR2_DIT_TRITON": "0", "SEEDVR2_VAE_TRITON": "0",
                                                              "SEEDVR2_CUDNN_BENCHMARK": "1"}),
}


@pytest.mark.parametrize("switch", list(SWITCHES))
def test_an_exact_switch_keeps_the_plain_frames(plain, monkeypatch, switch):
    case = SWITCHES[switch]
    for name, value in case.get("env", {}).items():
        set_env(monkeypatch, name, value)
    _assert_plain(_run("3b", case.get("dit"), case.get("vae"), case.get("settings")), plain["3b"])


def test_all_switches_at_once_on_the_7b(plain):
    # (without compiling: Dynamo's capture of the blocks costs seconds and is covered on the 3B)
    frames = _run("7b", dit=dict(enable_optimizations=True, attention_mode="sdpa_chunked",
                                 blocks_to_swap=2, offload_device="cpu"),
                  vae=dict(enable_optimizations=True, offload_device="cpu"), settings=dict(offload_device="none"))
    _assert_plain(frames, plain["7b"])


def test_cached_models_give_the_same_frames_on_the_next_run(plain):
    manager = ModelManager()
    specs = dict(dit=dict(enable_optimizations=True, cache_model=True),
                 vae=dict(enable_optimizations=True, cache_model=True))
    try:
        first = _run("3b", manager=manager, **specs)
        cached = {key: managed.model for key, managed in manager._cache.items()}
        assert {key[0] for key in cached} == {"dit", "vae"}, "cache_model must keep both models for the next run"
        second = _run("3b", manager=manager, **specs)
        assert {key: managed.model for key, managed in manager._cache.items()} == cached, "the same models ran"
    finally:
        manager.clear()
    _assert_plain(first, plain["3b"])
    assert torch.equal(first, second)


def test_the_tolerance_tells_a_changed_computation(plain):
    """The bound is not loose: another seed (a real but different result) is far outside it."""
    other = _run("3b", settings=dict(seed=4))
    assert rel_err(other, plain["3b"]) > 50 * REL_TOLERANCE


def test_every_switch_case_changes_a_spec_or_the_environment():
    plain = {"dit": PLAIN_DIT, "vae": PLAIN_VAE, "settings": SETTINGS}
    for name, case in SWITCHES.items():
        changes = [key for part in plain for key, value in case.get(part, {}).items()
                   if plain[part].get(key, "unset") != value]
        assert changes or case.get("env"), f"{name} switches nothing"
