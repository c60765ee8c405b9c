"""The DiT loads on a side thread while the VAE encodes, only when it fits beside the encode, in the caller's
inference mode, and its errors and its model reach the run as if it had loaded in line (CUDA mocked)."""
from __future__ import annotations

import threading
from contextlib import contextmanager

import pytest
import torch

from src.pipeline import upscaler
from src.progress import Progress
from src.pipeline.settings import DiTSpec, UpscaleSettings, VAESpec

GIB = 1 << 30
CUDA = torch.device("cuda:0")


class Loaded:
    def __init__(self, thread: str, inference: bool):
        self.thread, self.inference, self.info, self.activated = thread, inference, {"optimized": True}, 0
        self.device = CUDA
        self.model = torch.nn.Linear(2, 2)  # CPU weights: nothing to record on the compute stream

    def activate(self, memory_required: int = 0):
        self.activated += 1


class Manager:
    def __init__(self, weight_bytes, fail: Exception | None = None):
        self.weight_bytes, self.fail, self.loads, self.finished = weight_bytes, fail, [], []
        self.release = threading.Event()
        self.release.set()

    def dit_weight_bytes(self, spec):
        return self.weight_bytes

    def dit(self, spec):
        self.release.wait(5)
        if self.fail is not None:
            raise self.fail
        loaded = Loaded(threading.current_thread().name, torch.is_inference_mode_enabled())
        self.loads.append(loaded)
        return loaded

    def finish(self, *models):
        self.finished.extend(m for m in models if m is not None)


class Stream:
    def __init__(self, device=None):
        self.synchronized = 0

    def synchronize(self):
        self.synchronized += 1


@pytest.fixture
def runner(monkeypatch):
    """A runner whose VAE sits on a (mocked) GPU with 40 GiB free."""
    monkeypatch.delenv(upscaler.PREFETCH_DIT_ENV, raising=False)
    monkeypatch.setattr(upscaler, "resolve_device", lambda name, **kw: name)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "compute stream")
    monkeypatch.setattr(torch.cuda, "stream", contextmanager(lambda stream: (yield)))

    def make(manager):
        run = upscaler._Runner(DiTSpec(model="dit.safetensors", device="cuda:0"),
                               VAESpec(model="vae.safetensors", device="cuda:0"), UpscaleSettings(), Progress(), manager)
        run.vae = Loaded("MainThread", False)
        return run

    return make


def test_the_dit_loads_on_a_side_thread_when_it_fits(runner):
    manager = Manager(weight_bytes=7 * GIB)
    run = runner(manager)
    manager.release.clear()  # the load is still running when the upscale phase asks for the DiT
    run._prefetch_dit(vae_required=20 * GIB)
    assert run._dit_loading is not None and manager.loads == []
    manager.release.set()
    dit = run._dit()
    assert dit.thread == "seedvr2-dit-load" and dit.activated == 1 and len(manager.loads) == 1
    run._prefetch_dit(vae_required=0)  # loaded already: no second load
    assert run._dit() is dit and len(manager.loads) == 1


@pytest.mark.parametrize("weight_bytes, vae_required", [(7 * GIB, 32 * GIB), (None, 0), (0 * GIB, 39 * GIB)])
def test_no_side_load_without_room_or_size(runner, weight_bytes, vae_required):
    manager = Manager(weight_bytes=weight_bytes)
    run = runner(manager)
    run._prefetch_dit(vae_required=vae_required)
    assert run._dit_loading is None
    assert run._dit().thread == threading.current_thread().name


def test_no_side_load_when_switched_off_or_on_the_cpu(runner, monkeypatch):
    run = runner(Manager(weight_bytes=GIB))
    monkeypatch.setenv(upscaler.PREFETCH_DIT_ENV, "0")
    run._prefetch_dit(0)
    assert run._dit_loading is None
    monkeypatch.delenv(upscaler.PREFETCH_DIT_ENV)
    run.vae.device = torch.device("cpu")
    run._prefetch_dit(0)
    assert run._dit_loading is None


def test_the_side_thread_keeps_the_callers_inference_mode(runner):
    for mode in (True, False):
        run = runner(Manager(weight_bytes=GIB))
        with torch.inference_mode(mode):
            run._prefetch_dit(0)
        assert run._dit().inference is mode


def test_a_failed_side_load_fails_the_run_where_the_dit_is_needed(runner):
    run = runner(Manager(weight_bytes=GIB, fail=RuntimeError("file is truncated")))
    run._prefetch_dit(0)
    with pytest.raises(RuntimeError, match="file is truncated"):
        run._dit()


def test_a_run_that_stops_early_releases_the_side_loaded_dit(runner):
    manager = Manager(weight_bytes=GIB)
    run = runner(manager)
    run._prefetch_dit(0)
    run.close()
    assert manager.finished[0] is manager.loads[0] and run._dit_loading is None


def test_weight_bytes_of_a_dit_file_in_the_compute_dtype(tmp_path):
    from safetensors.torch import save_file

    from src.pipeline.model_manager import ModelManager

    path = tmp_path / "dit.safetensors"
    save_file({"a": torch.zeros(3, 4, dtype=torch.float16), "b": torch.zeros(5, dtype=torch.float8_e4m3fn),
               "c": torch.zeros(2, dtype=torch.int64)}, str(path))
    manager = ModelManager(resolve_path=lambda name: path)
    # On the CPU the compute dtype is float32: floating tensors are counted at 4 bytes, others as stored.
    assert manager.dit_weight_bytes(DiTSpec(model=str(path), device="cpu")) == 12 * 4 + 5 * 4 + 2 * 8
    assert manager.dit_weight_bytes(DiTSpec(model=str(path), device="cpu", blocks_to_swap=2,
                                            offload_device="cpu")) == 12 * 4 + 5 * 4 + 2 * 8
    gguf = ModelManager(resolve_path=lambda name: tmp_path / "dit.gguf")
    assert gguf.dit_weight_bytes(DiTSpec(model="dit.gguf", device="cpu")) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_side_loaded_run_equals_the_inline_run(monkeypatch):
    from conftest import golden_path

    from src.pipeline.model_manager import ModelManager

    dit = DiTSpec(model=str(golden_path("dit3b_weights.safetensors")), device="cuda:0")
    vae = VAESpec(model=str(golden_path("vae_weights.safetensors")), device="cuda:0")
    frames = torch.rand(5, 48, 64, 3, generator=torch.Generator().manual_seed(0))
    settings = UpscaleSettings(resolution=64, batch_size=5)
    threads = []
    real_dit = ModelManager.dit
    monkeypatch.setattr(ModelManager, "dit", lambda self, spec: threads.append(threading.current_thread().name)
                        or real_dit(self, spec))
    outputs = []
    for switch in ("1", "0"):
        monkeypatch.setenv(upscaler.PREFETCH_DIT_ENV, switch)
        with torch.inference_mode():
            outputs.append(upscaler.upscale(frames, dit, vae, settings, manager=ModelManager()))
    assert threads == ["seedvr2-dit-load", "MainThread"]
    assert torch.equal(outputs[0], outputs[1])
