"""The whole upscaler on 2 and 4 gloo processes equals the single-process run (golden tiny models, CPU)."""
from __future__ import annotations

import pytest
import torch

from conftest import golden_path, rel_err
from distributed_ranks import run_ranks
from src.distributed.clip_parallel import ClipParallel
from src.pipeline.settings import DiTSpec, SettingsError, UpscaleSettings, VAESpec

TOLERANCE = 2e-5   # the golden pipeline threshold (README §9)
# (frames, batch_size, temporal_overlap): several batches with cross-faded seams, and a single batch
# (fewer batches than processes: the windows mode).
CLIPS = ((13, 5, 1), (5, 5, 0))


def _clip(frames: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(frames)
    base = torch.rand(1, 6, 10, 3, generator=generator)
    base = torch.nn.functional.interpolate(base.permute(0, 3, 1, 2), size=(24, 40), mode="bilinear")
    drift = torch.linspace(0, 0.2, frames).view(-1, 1, 1, 1)
    return (base.permute(0, 2, 3, 1) + drift).clamp(0, 1)


def _upscale_all(mode: str) -> dict:
    from src.pipeline.upscaler import upscale
    dit = DiTSpec(model=str(golden_path("dit3b_weights.safetensors")), device="cpu")
    vae = VAESpec(model=str(golden_path("vae_weights.safetensors")), device="cpu")
    results = {}
    for frames, batch_size, overlap in CLIPS:
        settings = UpscaleSettings(resolution=32, batch_size=batch_size, temporal_overlap=overlap,
                                   color_correction="wavelet", parallel=mode)
        results[frames] = upscale(_clip(frames), dit, vae, settings)
    return results


def _ranks_upscale(rank: int, world: int, mode: str) -> dict:
    return _upscale_all(mode)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> dict:
    # In a process of its own (a group of one: no parallelism), like the parallel runs: the optimized pipeline
    # imports Triton, which must not happen in the test process before the Triton interpreter tests choose
    # their mode (tests/triton_interpreter.py).  The golden files are looked up here first: a skip raised in
    # a spawned process would reach the test as that process's failure.
    golden_path("dit3b_weights.safetensors"), golden_path("vae_weights.safetensors")
    (result,) = run_ranks(1, tmp_path_factory.mktemp("single"), _ranks_upscale, "auto")
    return result


@pytest.mark.parametrize("world,mode", [(2, "auto"), (2, "windows"), (4, "auto")])
def test_parallel_pipeline_equals_one_process(world, mode, tmp_path, single_process):
    ranks = run_ranks(world, tmp_path, _ranks_upscale, mode)
    for frames, expected in single_process.items():
        assert rel_err(ranks[0][frames], expected) <= TOLERANCE, frames
        # Only rank 0 assembles and returns the frames.
        assert all(result[frames] is None for result in ranks[1:])


def test_modes_and_ownership():
    part = ClipParallel(rank=1, world=3)
    assert part.resolve(5).mode == "batches" and part.resolve(2).mode == "windows"
    assert [part.owns(i) for i in range(5)] == [False, True, False, False, True]
    windows = ClipParallel(rank=1, world=3, mode="windows")
    assert all(windows.restores(i) for i in range(5)) and not windows.writes_output
    with pytest.raises(SettingsError, match="parallel"):
        UpscaleSettings(parallel="rows").validate()


def test_the_cli_under_torchrun_writes_the_one_process_frames(tmp_path):
    """``torchrun --nproc_per_node 2 inference_cli.py`` on a PNG sequence: rank 0 writes the same frames."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from conftest import REPO_ROOT
    source = tmp_path / "frames"
    source.mkdir()
    for index, frame in enumerate(_clip(7)):
        Image.fromarray((frame.numpy() * 255).round().astype(np.uint8)).save(source / f"{index:03d}.png")
    common = [str(REPO_ROOT / "inference_cli.py"), str(source), "--resolution", "32", "--batch_size", "5",
              "--temporal_overlap", "1", "--color_correction", "wavelet", "--device", "cpu",
              "--dit_model", str(golden_path("dit3b_weights.safetensors")),
              "--vae_model", str(golden_path("vae_weights.safetensors"))]
    single, parallel = tmp_path / "single", tmp_path / "parallel"
    subprocess.run([sys.executable, *common, "--output", str(single)], check=True, cwd=tmp_path, timeout=300)
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               *common, "--output", str(parallel)], cwd=tmp_path, timeout=300,
                              capture_output=True, text=True)
    assert launched.returncode == 0, launched.stderr[-3000:]
    names = sorted(p.name for p in single.iterdir())
    assert len(names) == 7 and sorted(p.name for p in parallel.iterdir()) == names
    for name in names:
        a = np.asarray(Image.open(single / name)).astype(int)
        b = np.asarray(Image.open(parallel / name)).astype(int)
        difference = np.abs(a - b)
        assert difference.max() <= 1 and (difference > 0).mean() <= 0.01, name
