"""The upscaler end to end on the tiny golden models (CPU): sizes, batching, seeds, errors, interrupts."""
import pytest
import torch

from conftest import golden_path
from src.pipeline import upscaler as upscaler_module
from src.pipeline.model_manager import ModelManager
from src.progress import Progress
from src.pipeline.settings import DiTSpec, SettingsError, UpscaleSettings, VAESpec
from src.pipeline.upscaler import UpscaleError, upscale, upscale_stream


def _clip(frames, height=24, width=40, channels=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.rand(1, height // 4, width // 4, channels, generator=generator)
    base = torch.nn.functional.interpolate(base.permute(0, 3, 1, 2), size=(height, width), mode="bilinear")
    drift = torch.linspace(0, 0.2, frames).view(-1, 1, 1, 1)
    return (base.permute(0, 2, 3, 1) + drift).clamp(0, 1)


def run(specs, manager, images, **settings):
    dit, vae = specs
    return upscale(images, dit, vae, UpscaleSettings(**settings), manager=manager)


def test_output_size_follows_resolution_and_cap(specs, manager):
    out = run(specs, manager, _clip(1, 24, 40), resolution=32, batch_size=1)
    assert out.shape == (1, 32, 52, 3)  # shortest edge 32, 40·32/24 = 53.3 -> even floor 52
    out = run(specs, manager, _clip(1, 24, 40), resolution=32, max_resolution=40, batch_size=1)
    assert out.shape == (1, 24, 40, 3)  # longest edge capped at 40
    assert out.dtype == torch.float32 and 0.0 <= out.min() and out.max() <= 1.0


def test_batch_position_does_not_change_a_frame(specs, manager):
    clip = _clip(10)
    whole = run(specs, manager, clip, resolution=24, batch_size=5, color_correction="wavelet")
    second_alone = run(specs, manager, clip[5:], resolution=24, batch_size=5, color_correction="wavelet")
    assert torch.allclose(whole[5:], second_alone, atol=1e-6)


def test_same_seed_same_result_other_seed_differs(specs, manager):
    clip = _clip(1)
    a = run(specs, manager, clip, resolution=24, batch_size=1, seed=7, color_correction="none")
    b = run(specs, manager, clip, resolution=24, batch_size=1, seed=7, color_correction="none")
    c = run(specs, manager, clip, resolution=24, batch_size=1, seed=8, color_correction="none")
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_frame_counts_are_kept_with_padding_overlap_and_prepend(specs, manager):
    for frames, settings in [(3, dict(batch_size=5)), (7, dict(batch_size=5, temporal_overlap=2)),
                             (6, dict(batch_size=5, prepend_frames=3, uniform_batch_size=True))]:
        out = run(specs, manager, _clip(frames), resolution=24, **settings)
        assert out.shape[0] == frames


def test_overlap_frames_are_a_blend_of_both_batches(specs, manager):
    clip = _clip(8)
    blended = run(specs, manager, clip, resolution=24, batch_size=5, temporal_overlap=2, color_correction="none")
    first = run(specs, manager, clip[:5], resolution=24, batch_size=5, color_correction="none")
    second = run(specs, manager, clip[3:], resolution=24, batch_size=5, color_correction="none")
    weights = torch.tensor([2 / 3, 1 / 3]).view(2, 1, 1, 1)
    assert torch.allclose(blended[3:5], first[3:5] * weights + second[:2] * (1 - weights), atol=1e-5)
    assert torch.allclose(blended[:3], first[:3], atol=1e-6)
    assert torch.allclose(blended[5:], second[2:], atol=1e-6)


def test_rgba_keeps_an_upscaled_alpha(specs, manager):
    clip = _clip(1, channels=4)
    clip[..., 3] = 1.0
    clip[:, :, :20, 3] = 0.0
    out = run(specs, manager, clip, resolution=48, batch_size=1)
    assert out.shape == (1, 48, 80, 4)
    alpha = out[0, :, :, 3]
    assert alpha[:, :36].max() < 0.05 and alpha[:, 44:].min() > 0.95



@pytest.mark.parametrize("images,message", [
    (torch.zeros(0, 16, 16, 3), "no frames"),
    (torch.zeros(2, 16, 16), r"\(frames, height, width, 3 or 4\)"),
])
def test_bad_frames_are_refused(specs, manager, images, message):
    with pytest.raises(SettingsError, match=message):
        run(specs, manager, images, resolution=32)


def test_impossible_resolution_is_refused(specs, manager):
    with pytest.raises(SettingsError, match="resolution must be at least 16"):
        run(specs, manager, _clip(1), resolution=4)


class _Interrupted(Exception):
    pass


class _InterruptAfter(Progress):
    def __init__(self, calls):
        self.calls = calls

    def check_interrupt(self):
        self.calls -= 1
        if self.calls < 0:
            raise _Interrupted()


def test_interrupt_stops_the_run_and_releases_models(specs):
    dit, vae = specs
    manager = ModelManager()
    dit, vae = DiTSpec(model=dit.model, device="cpu"), VAESpec(model=vae.model, device="cpu")
    with pytest.raises(_Interrupted):
        upscale(_clip(10), dit, vae, UpscaleSettings(resolution=24, batch_size=5), progress=_InterruptAfter(3),
                manager=manager)
    assert manager._cache == {}  # uncached models were dropped on the way out


def test_vae_out_of_memory_retries_with_tiles(specs, manager, monkeypatch):
    real = upscaler_module.encode_posterior
    seen = []

    def flaky(vae, video, tiling):
        seen.append(tiling.tile_size)
        if tiling.tile_size is None:
            raise torch.OutOfMemoryError("simulated")
        return real(vae, video, tiling)

    monkeypatch.setattr(upscaler_module, "encode_posterior", flaky)
    out = run(specs, manager, _clip(1), resolution=24, batch_size=1)
    assert seen == [None, 512] and out.shape[0] == 1


def test_dit_out_of_memory_gives_advice(specs, manager, monkeypatch):
    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(upscaler_module, "restore_latent", boom)
    with pytest.raises(UpscaleError, match="blocks_to_swap.*Your workflow is unchanged"):
        run(specs, manager, _clip(1), resolution=24, batch_size=1)


def test_tile_debug_draws_the_decode_tiles(specs, manager):
    from src.pipeline.tile_debug import tile_boxes

    dit, vae = specs
    tiled = VAESpec(model=vae.model, device="cpu", cache_model=True, decode_tiled=True, decode_tile_size=64,
                    decode_tile_overlap=16, tile_debug="decode")
    out = upscale(_clip(1, 48, 80), dit, tiled, UpscaleSettings(resolution=96, batch_size=1), manager=manager)
    assert out.shape == (1, 96, 160, 3)
    boxes = tile_boxes((96, 160), 64, 16)
    assert len(boxes) > 1
    blue = torch.tensor([0.0, 0.0, 1.0])
    for top, bottom, left, right in boxes:
        assert torch.equal(out[0, top, left:min(right, 160)], blue.expand(min(right, 160) - left, 3))
    plain = upscale(_clip(1, 48, 80), dit, VAESpec(model=vae.model, device="cpu", cache_model=True, decode_tiled=True,
                    decode_tile_size=64, decode_tile_overlap=16), UpscaleSettings(resolution=96, batch_size=1),
                    manager=manager)
    assert not torch.equal(plain[0, 0, :160], blue.expand(160, 3))


def test_the_output_buffer_is_returned_without_a_copy(specs, manager, monkeypatch):
    """Host RAM stays at about the output's size: the frames are written into one preallocated tensor,
    which is what the caller receives (no concatenation, no dtype conversion at the end)."""
    buffers = []
    real_empty = torch.empty

    def recording_empty(*args, **kwargs):
        tensor = real_empty(*args, **kwargs)
        buffers.append(tensor)
        return tensor

    monkeypatch.setattr(upscaler_module.torch, "empty", recording_empty)
    out = run(specs, manager, _clip(7), resolution=24, batch_size=5, temporal_overlap=2)
    full_size = [b for b in buffers if tuple(b.shape) == tuple(out.shape)]
    assert len(full_size) == 1 and full_size[0].data_ptr() == out.data_ptr()


@pytest.mark.parametrize("start,length,overlap,prepend", [(0, 5, 0, 0), (3, 5, 2, 0), (0, 5, 0, 3), (2, 5, 2, 3),
                                                          (4, 5, 3, 6), (8, 4, 1, 2)])
def test_batch_writes_match_the_frame_by_frame_definition(start, length, overlap, prepend):
    from src.pipeline.batching import Batch

    batch = Batch(start, start + length, 0, overlap)
    frames = torch.rand(length, 4, 6, 3)
    total = start + length - prepend
    out = torch.rand(max(total, 1), 4, 6, 3)
    expected = out.clone()
    for offset in range(length):
        index = start + offset - prepend
        if index < 0:
            continue
        if offset < overlap:
            w = float(batch.blend_weights[offset])
            expected[index] = expected[index] * w + frames[offset] * (1 - w)
        else:
            expected[index] = frames[offset]
    upscaler_module._write_batch(out, frames, batch, prepend)
    torch.testing.assert_close(out, expected)


def test_out_of_memory_retry_first_tries_the_tile_that_fits_the_free_memory(monkeypatch):
    from types import SimpleNamespace

    from src.models.video_vae_v3 import VAEConfig
    from src.optimization import vae_optimizer
    from src.pipeline.restoration import VAETiling

    runner = upscaler_module._Runner(DiTSpec(model="dit"), VAESpec(model="vae"), UpscaleSettings(), Progress(),
                                     ModelManager())
    runtime = SimpleNamespace(piece_bytes=2 << 30, compile_norm=True)
    runner.vae = SimpleNamespace(model=SimpleNamespace(device=torch.device("cuda"), executor=SimpleNamespace(
        runtime=runtime), config=VAEConfig.released(), dtype=torch.bfloat16))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (8 << 30, 80 << 30))
    fits = vae_optimizer.choose_tile_size(8 << 30, config=VAEConfig.released(), direction="decode", frames=33,
                                          dtype=torch.bfloat16, piece_bytes=2 << 30)
    sizes = [t.tile_size for t in runner._retry_tilings("decode", VAETiling(), 33)]
    assert sizes[0] == fits and sizes == sorted(set(sizes), reverse=True) and 256 in sizes
    # A run that was already tiled only ever retries with smaller tiles.
    assert all(size < 384 for size in (t.tile_size for t in runner._retry_tilings("decode", VAETiling(384, 64), 33)))


def test_debug_logs_each_phase_with_time_and_memory(specs, manager, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="seedvr2"):
        run(specs, manager, _clip(1), resolution=24, batch_size=1, enable_debug=True)
    phases = [r.message for r in caplog.records if " took " in r.message]
    assert [m.split()[1] for m in phases] == ["encode", "upscale", "decode"]
    assert all("memory" in m for m in phases)
