"""The VRAM planner (pipeline.memory_plan): plans fit their budget, shrink with it, respect the user's tile
sizes, explain what fails; a budgeted run gives the unbudgeted output (exact bands and DiT chunks)."""
from __future__ import annotations

import logging

import pytest
import torch

from conftest import golden_json, golden_path, rel_err
from src.models.dit import NaDiTConfig
from src.models.video_vae_v3 import VAEConfig
from src.pipeline import memory_plan
from src.pipeline.memory_plan import BudgetError, plan_memory
from src.pipeline.model_manager import ModelManager
from src.pipeline.settings import DiTSpec, SettingsError, UpscaleSettings, VAESpec
from src.pipeline.upscaler import upscale
from src.optimization import vae_optimizer

GIB = 2**30
VAE_WEIGHTS = 478 << 20        # the released VAE in bf16
DIT_3B_WEIGHTS = int(6.6 * GIB)  # the 3B in bf16


def _plan(budget: float, height: int = 1088, width: int = 1920, frames: int = 33, **kwargs):
    config = VAEConfig.released()
    untiled = {d: vae_optimizer.estimate_peak_bytes(config, d, height, width, frames=frames, dtype=torch.bfloat16)
               for d in ("encode", "decode")}
    return plan_memory(int(budget * GIB), vae_config=config, vae_dtype=torch.bfloat16, vae_weight_bytes=VAE_WEIGHTS,
                       height=height, width=width, frames=frames, untiled_peaks=untiled, channels_last=True,
                       dit_config=NaDiTConfig.released("3b"), dit_weight_bytes=DIT_3B_WEIGHTS, dit_blocks=32,
                       text_tokens=memory_plan.TEXT_TOKENS, **kwargs)


@pytest.mark.parametrize("budget", [8, 12, 16, 24])
def test_every_phase_fits_the_budget(budget):
    plan = _plan(budget)
    usable = budget * GIB * (1 - memory_plan.SAFETY_FRACTION)
    for phase in (plan.encode, plan.decode):
        assert phase.peak <= usable
    assert plan.dit_peak <= usable
    assert f"{budget:.2f} GiB budget" in plan.summary()


def test_plenty_of_memory_runs_untiled_and_unchunked():
    plan = _plan(80)
    assert plan.encode.bands is None and plan.decode.bands is None
    assert plan.dit_chunk_rows is None and plan.blocks_to_swap == 0 and not plan.dit_off_during_vae
    assert "untiled" in plan.summary()


def test_smaller_budgets_take_smaller_bands_and_more_swapping():
    tight, roomy = _plan(8), _plan(16)
    assert tight.decode.bands is not None
    assert tight.decode.peak <= roomy.decode.peak
    assert tight.blocks_to_swap >= roomy.blocks_to_swap
    assert tight.dit_off_during_vae
    assert "exact bands" in tight.summary()


def test_an_8k_image_fits_24_gib():
    plan = _plan(24, height=4320, width=7680, frames=1)
    assert plan.decode.bands is not None and plan.decode.peak <= 24 * GIB
    assert plan.dit_peak <= 24 * GIB
    # On 12 GiB the 3B's 129600 tokens need chunks as well as swapped blocks.
    tight = _plan(12, height=4320, width=7680, frames=1)
    assert tight.dit_chunk_rows is not None and tight.blocks_to_swap > 0


def test_dit_chunks_bound_the_activations():
    config = NaDiTConfig.released("3b")
    whole = memory_plan.dit_activation_bytes(config, 129600, 256, torch.bfloat16, None)
    chunked = memory_plan.dit_activation_bytes(config, 129600, 256, torch.bfloat16, 4096)
    # The MLP's hidden rows and the attention's gathers shrink; the full-size q/k/v and residuals remain:
    # 10.0 -> 7.2 GiB for the 3B at 129600 tokens.
    assert 0.6 * whole < chunked < 0.8 * whole


def test_user_tile_size_bounds_the_bands():
    plan = _plan(80, user_bands={"encode": None, "decode": 256 * 256})
    assert plan.encode.bands is None
    assert plan.decode.bands.band_pixels <= 256 * 256


def test_a_budget_nothing_fits_is_explained():
    with pytest.raises(BudgetError, match="raise vram_budget, lower batch_size or resolution"):
        _plan(0.3)


@pytest.mark.parametrize("value", [-1, 5000, "8"])
def test_invalid_budget_is_rejected(value):
    with pytest.raises(SettingsError, match="vram_budget"):
        UpscaleSettings(vram_budget=value).validate()


def test_with_swap_moves_swapped_blocks_to_the_cpu():
    plan = _plan(8)
    spec = memory_plan.with_swap(DiTSpec(model="x"), plan)
    assert spec.blocks_to_swap == plan.blocks_to_swap > 0 and spec.offload_device == "cpu"
    assert memory_plan.with_swap(DiTSpec(model="x", blocks_to_swap=40), plan).blocks_to_swap == 40


def test_budgeted_run_equals_unbudgeted(caplog, monkeypatch):
    """A budget of ~6 MiB for the tiny models on 48x80 frames: both VAE phases run in bands (small band
    sizes allowed for the tiny frames), the DiT in chunks of 7 tokens (forced: its activations are tiny);
    the frames are those of the unbudgeted run."""
    monkeypatch.setattr(memory_plan, "BAND_PIXELS", (1024, 256, 64))
    monkeypatch.setattr(memory_plan, "DIT_CHUNKS", (None, 7))
    real = memory_plan.dit_activation_bytes
    monkeypatch.setattr(memory_plan, "dit_activation_bytes",
                        lambda config, tokens, text, dtype, rows: 1 << 40 if rows is None else real(
                            config, tokens, text, dtype, rows))
    manager = ModelManager()
    dit = DiTSpec(model=str(golden_path("dit3b_weights.safetensors")), device="cpu", cache_model=True)
    vae = VAESpec(model=str(golden_path("vae_weights.safetensors")), device="cpu", cache_model=True)
    generator = torch.Generator().manual_seed(0)
    clip = torch.rand(5, 24, 40, 3, generator=generator)
    try:
        whole = upscale(clip, dit, vae, UpscaleSettings(resolution=48, batch_size=5), manager=manager)
        with caplog.at_level(logging.INFO, logger="seedvr2"):
            budgeted = upscale(clip, dit, vae, UpscaleSettings(resolution=48, batch_size=5, vram_budget=6.5e6 / GIB),
                               manager=manager)
    finally:
        manager.clear()
    summary = [r.getMessage() for r in caplog.records if "memory plan" in r.getMessage()]
    assert len(summary) == 1, summary
    assert summary[0].count("exact bands") == 2 and "DiT in chunks of 7 tokens" in summary[0], summary
    # The golden pipeline threshold (README §9): exact up to float32 summation order, which depends on the
    # band shapes and on the machine's CPU kernels (a 16-core host measured a max abs of 1.4e-5).
    assert rel_err(budgeted, whole) <= 2e-5
