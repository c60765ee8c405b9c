"""Progress inside a phase and interrupts inside its long loops (VAE chunks, streamed pieces, tiles, DiT blocks,
post-processing), on the tiny golden models (CPU); and the background threads a run starts."""
import threading

import pytest
import torch

from conftest import golden_path
from src.optimization import stable_memory
from src.pipeline.model_manager import ModelManager
from src.progress import Progress, checkpoint, part, reporting
from src.pipeline.settings import DiTSpec, UpscaleSettings, VAESpec
from src.pipeline.upscaler import upscale


class Recorder(Progress):
    """Records (phase, step, fraction) for every report, and raises at the ``stop_at``-th interrupt check of
    ``stop_phase`` (counting checks made inside steps, i.e. between ``within_step`` reports)."""

    def __init__(self, stop_phase=None, stop_at=0):
        self.phase, self.steps, self.reports, self.checks = None, 0, [], 0
        self.stop_phase, self.stop_at = stop_phase, stop_at
        self.stopped_in = None

    def start_phase(self, phase, total):
        self.phase, self.steps = phase, 0

    def advance(self, steps=1):
        self.steps += steps

    def within_step(self, fraction):
        self.reports.append((self.phase, self.steps, fraction))

    def check_interrupt(self):
        if self.phase == self.stop_phase:
            self.checks += 1
            if self.checks == self.stop_at:
                self.stopped_in = (self.phase, self.steps)
                raise Interrupted


class Interrupted(Exception):
    pass


def specs(cache=False, tiled=False, optimized=True):
    dit = DiTSpec(model=str(golden_path("dit3b_weights.safetensors")), device="cpu", cache_model=cache)
    vae = VAESpec(model=str(golden_path("vae_weights.safetensors")), device="cpu", cache_model=cache,
                  encode_tiled=tiled, encode_tile_size=64, encode_tile_overlap=32, decode_tiled=tiled,
                  decode_tile_size=64, decode_tile_overlap=32, enable_optimizations=optimized)
    return dit, vae


def image(frames=1, height=64, width=96):
    generator = torch.Generator().manual_seed(3)
    return torch.rand(frames, height, width, 3, generator=generator)


def test_parts_nest_and_checkpoints_report_the_share_of_the_step():
    recorder = Recorder()
    recorder.phase = "decode"
    checkpoint(0.5)  # no active progress: nothing happens
    with reporting(recorder):
        checkpoint(0.5)
        with part(1, 4):           # e.g. the second of four tiles
            checkpoint()           # an interrupt check only
            checkpoint(0.0)
            with part(1, 2):       # its second causal chunk
                checkpoint(0.5)
            checkpoint(1.0)
    assert [fraction for *_, fraction in recorder.reports] == [0.5, 0.25, 0.4375, 0.5]


@pytest.mark.parametrize("tiled, optimized", [(False, True), (True, True), (False, False)])
def test_a_single_image_reports_progress_inside_every_phase(tiled, optimized):
    recorder = Recorder()
    upscale(image(), *specs(tiled=tiled, optimized=optimized), UpscaleSettings(resolution=64, batch_size=1),
            progress=recorder, manager=ModelManager())
    for phase in ("encode", "upscale", "decode"):
        fractions = [f for p, step, f in recorder.reports if p == phase and step == 0]
        assert len(set(fractions)) >= 4, (phase, fractions)       # moves inside the one batch
        assert fractions == sorted(fractions) and 0 <= fractions[0] and fractions[-1] <= 1, (phase, fractions)


def test_video_batches_report_inside_each_batch():
    recorder = Recorder()
    upscale(image(frames=9, height=32, width=48), *specs(), UpscaleSettings(resolution=32, batch_size=5),
            progress=recorder, manager=ModelManager())
    for phase in ("encode", "upscale", "decode"):
        steps = {step for p, step, f in recorder.reports if p == phase and 0 < f < 1}
        assert steps == {0, 1}, (phase, recorder.reports)


_CLEAN: dict[bool, torch.Tensor] = {}


@pytest.mark.parametrize("phase, tiled", [("encode", False), ("upscale", False), ("decode", False), ("encode", True)])
def test_an_interrupt_lands_inside_the_first_batch_and_the_next_run_is_clean(phase, tiled):
    manager = ModelManager()
    dit, vae = specs(cache=True, tiled=tiled)
    settings = UpscaleSettings(resolution=64, batch_size=1, seed=5)
    if tiled not in _CLEAN:
        _CLEAN[tiled] = upscale(image(), dit, vae, settings, manager=ModelManager())
    clean = _CLEAN[tiled]
    recorder = Recorder(stop_phase=phase, stop_at=3)
    with pytest.raises(Interrupted):
        upscale(image(), dit, vae, settings, progress=recorder, manager=manager)
    assert recorder.stopped_in == (phase, 0)  # inside the phase's only batch, not after it
    assert not stable_memory.background_threads()
    again = upscale(image(), dit, vae, settings, manager=manager)  # the cached models, used again
    assert torch.equal(again, clean)
    manager.clear()


def test_background_work_runs_under_the_callers_inference_mode_and_is_joined():
    with torch.inference_mode():
        out = torch.empty(4, 1024, 1024)  # an inference tensor, as ComfyUI's nodes make them
    prefault = stable_memory.HostPrefault(out)
    prefault.wait()
    assert torch.all(out[:, :, 0] == 0)  # one value in each 4 KiB page (each row here) was written


def test_a_failing_background_task_logs_once_without_a_traceback(caplog, capsys):
    def fail():
        raise RuntimeError("boom")

    for _ in range(2):
        stable_memory.start_background("seedvr2-test-failure", fail).join()
    warnings = [r for r in caplog.records if "seedvr2-test-failure" in r.getMessage()]
    assert len(warnings) == 1 and "boom" in warnings[0].getMessage()
    assert "Traceback" not in capsys.readouterr().err


def test_no_seedvr2_thread_outlives_a_run():
    before = set(threading.enumerate())
    upscale(image(frames=3, height=32, width=48), *specs(), UpscaleSettings(resolution=32, batch_size=5),
            manager=ModelManager())
    started = [t for t in set(threading.enumerate()) - before if t.is_alive()]
    assert not [t for t in started if t.name.startswith("seedvr2") or not t.daemon], started
    assert not stable_memory.background_threads()
