"""Streamed output (the CLI's chunks) equals the whole-clip output frame by frame, for any chunk size,
batch size, temporal overlap and prepended frames; every frame read is written once."""
import numpy as np
import pytest
import torch

from conftest import golden_path
from src.pipeline.model_manager import ModelManager
from src.pipeline.settings import DiTSpec, UpscaleSettings, VAESpec
from src.pipeline import upscaler as upscaler_module
from src.pipeline.batching import overlap_weights
from src.pipeline.upscaler import upscale, upscale_stream

pytestmark = pytest.mark.usefixtures("single_thread")


def _clip(frames, channels=3, height=16, width=16):
    """Frames that differ from each other (a moving gradient), so a misplaced frame or blend shows."""
    generator = torch.Generator().manual_seed(frames)
    base = torch.rand(frames, height // 4, width // 4, channels, generator=generator)
    base = torch.nn.functional.interpolate(base.permute(0, 3, 1, 2), size=(height, width), mode="bilinear")
    return base.permute(0, 2, 3, 1).clamp(0, 1)


def _chunks(clip, size):
    return [clip[i:i + size] for i in range(0, clip.shape[0], size)]


@pytest.mark.parametrize("frames,chunk,settings", [
    (11, 2, dict(batch_size=5, temporal_overlap=3)),                      # overlap larger than the chunk
    (20, 8, dict(batch_size=13, temporal_overlap=12)),                    # the 48 -> 16 settings
    (11, 3, dict(batch_size=5)),                                          # chunks not aligned with batches
    (10, 4, dict(batch_size=5, temporal_overlap=2, prepend_frames=3, uniform_batch_size=True)),
    (9, 9, dict(batch_size=5, temporal_overlap=1)),                       # one chunk
    (4, 1, dict(batch_size=5, temporal_overlap=2, prepend_frames=6)),     # clip shorter than the prepend
    (13, 5, dict(batch_size=9, temporal_overlap=6, prepend_frames=2)),    # three batches share frames
])
def test_streamed_output_equals_the_whole_clip_frame_by_frame(specs, manager, frames, chunk, settings):
    dit, vae = specs
    settings = UpscaleSettings(resolution=16, **settings)
    clip = _clip(frames)
    whole = upscale(clip, dit, vae, settings, manager=manager)
    parts = list(upscale_stream(_chunks(clip, chunk), dit, vae, settings, manager=manager))
    streamed = torch.cat(parts)
    assert streamed.shape == whole.shape == (frames, 16, 16, 3)
    torch.testing.assert_close(streamed, whole, rtol=0, atol=1e-5)


def _fake_batches(self, source, base, batches, geometry, out, out_start, held=0):
    """A model stand-in that keeps the run's batch accounting: each batch's frames (source frames plus a
    per-batch offset, so that a misplaced or misblended batch shows) written as the decode phase does."""
    for batch in batches:
        frames = source[batch.start - base:batch.stop - base, ..., :3] + 0.001 * batch.start
        local = upscaler_module.replace(batch, start=batch.start - base, stop=batch.stop - base)
        upscaler_module._write_batch(out, frames, local, out_start - base)
        yield batches.index(batch)


@pytest.mark.parametrize("frames,chunk,batch_size,overlap,prepend", [
    (17, 4, 5, 3, 0), (17, 1, 5, 4, 0), (48, 8, 13, 12, 0), (48, 7, 13, 12, 5), (30, 6, 9, 7, 11),
    (5, 100, 5, 4, 0), (1, 1, 5, 4, 9), (23, 5, 1, 0, 0), (23, 4, 6, 0, 3), (40, 3, 33, 16, 2),
])
def test_stream_accounting_matches_the_whole_clip_for_any_chunking(monkeypatch, frames, chunk, batch_size,
                                                                    overlap, prepend):
    """The issue's cases (17 in with overlap > chunk; 48 in with --chunk_size 8 --temporal_overlap 12
    --batch_size 13) and others, without the models: frames written == frames read, in the same blend."""
    monkeypatch.setattr(upscaler_module._Runner, "run_batches", _fake_batches)
    settings = UpscaleSettings(resolution=16, batch_size=batch_size, temporal_overlap=overlap,
                               prepend_frames=prepend)
    dit, vae = DiTSpec(model="unused"), VAESpec(model="unused")
    clip = torch.rand(frames, 16, 16, 3)
    whole = upscale(clip, dit, vae, settings, manager=ModelManager())
    parts = list(upscale_stream(_chunks(clip, chunk), dit, vae, settings, manager=ModelManager()))
    assert sum(p.shape[0] for p in parts) == frames
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=1e-6)
    # Independent check of the whole-clip fold: frame f is the blend of every batch that covers it.
    step = batch_size - overlap
    expected = torch.empty(frames + prepend, 16, 16, 3)
    extended = torch.cat([clip[[min(i, frames - 1) if frames > 1 else 0 for i in range(prepend, 0, -1)]], clip]) \
        if frames > prepend else None
    if extended is not None:
        start = 0
        while True:
            stop = min(start + batch_size, frames + prepend)
            values = extended[start:stop] + 0.001 * start
            lap = overlap if start else 0
            weights = overlap_weights(lap).view(-1, 1, 1, 1)
            expected[start:start + lap] = expected[start:start + lap] * weights + values[:lap] * (1 - weights)
            expected[start + lap:stop] = values[lap:]
            if stop == frames + prepend:
                break
            start += step
        torch.testing.assert_close(whole, expected[prepend:], rtol=0, atol=1e-6)


def test_streamed_rgba_keeps_the_whole_clip_alpha(specs, manager):
    dit, vae = specs
    settings = UpscaleSettings(resolution=24, batch_size=5, temporal_overlap=2, prepend_frames=2)
    clip = _clip(8, channels=4)
    whole = upscale(clip, dit, vae, settings, manager=manager)
    streamed = torch.cat(list(upscale_stream(_chunks(clip, 3), dit, vae, settings, manager=manager)))
    torch.testing.assert_close(streamed, whole, rtol=0, atol=1e-5)


def test_frames_are_yielded_as_soon_as_they_are_final(specs, manager):
    """Bounded memory: the stream never reads far ahead of what it has written."""
    dit, vae = specs
    settings = UpscaleSettings(resolution=16, batch_size=5, temporal_overlap=2)
    clip = _clip(30)
    read = []

    def source():
        for part in _chunks(clip, 4):
            read.append(part.shape[0])
            yield part

    lags = []
    written = 0
    for out in upscale_stream(source(), dit, vae, settings, manager=manager):
        written += out.shape[0]
        lags.append(sum(read) - written)
    assert written == 30
    # At most one chunk, one batch and the overlap read but not yet written.
    assert max(lags) <= 4 + 5 + 2


def test_frames_of_another_size_are_refused(specs, manager):
    from src.pipeline.settings import SettingsError

    dit, vae = specs
    chunks = [_clip(5), _clip(5, height=24)]
    with pytest.raises(SettingsError, match="every frame must have one size"):
        list(upscale_stream(chunks, dit, vae, UpscaleSettings(resolution=16), manager=manager))


def _write_sequence(folder, frames, size=16):
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(frames)
    for index in range(frames):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{index:04d}.png")


def _read_sequence(folder):
    from PIL import Image

    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.iterdir())])


@pytest.mark.parametrize("chunk", ["2", "auto"])
def test_the_cli_writes_every_frame_with_overlap_larger_than_the_chunk(tmp_path, monkeypatch, caplog, chunk):
    """The issue's CLI case: 17 frames in, --temporal_overlap 3 > --chunk_size 2, gave 11 frames out."""
    import logging

    import inference_cli

    _write_sequence(tmp_path / "in", 17)
    monkeypatch.setenv("SEEDVR2_CHUNK_MEMORY_MB", "0.05")  # auto: a few frames per chunk at this size
    models = ["--dit_model", str(golden_path("dit3b_weights.safetensors")),
              "--vae_model", str(golden_path("vae_weights.safetensors")), "--device", "cpu",
              "--resolution", "16", "--batch_size", "5", "--temporal_overlap", "3", "--output_format", "png"]
    with caplog.at_level(logging.INFO, logger="seedvr2"):
        assert inference_cli.main([str(tmp_path / "in"), "--output", str(tmp_path / "chunked"),
                                   "--chunk_size", chunk, *models]) == 0
    if chunk == "auto":
        assert any("frames at a time (--chunk_size auto)" in r.message for r in caplog.records)
    assert inference_cli.main([str(tmp_path / "in"), "--output", str(tmp_path / "whole"), "--chunk_size", "0",
                               *models]) == 0
    chunked, whole = _read_sequence(tmp_path / "chunked"), _read_sequence(tmp_path / "whole")
    assert chunked.shape == whole.shape == (17, 16, 16, 3)
    assert np.abs(chunked.astype(int) - whole.astype(int)).max() <= 1  # float-equal frames, rounded to uint8


def test_the_default_chunk_fits_the_memory_budget():
    from src.pipeline.upscaler import auto_chunk_frames, stream_frame_bytes

    settings = UpscaleSettings(resolution=1080, batch_size=5)
    # 960x540 in, 1920x1080 out: 24.9 MB of float32 output + 7.8 MB of input (float32 + the reader's uint8).
    per_frame = 1920 * 1080 * 3 * 4 + 960 * 540 * 3 * 5
    assert stream_frame_bytes(540, 960, 3, settings) == per_frame
    assert auto_chunk_frames(540, 960, 3, settings, budget=4 << 30) == (4 << 30) // per_frame // 5 * 5 == 130
    overlapping = UpscaleSettings(resolution=1080, batch_size=13, temporal_overlap=12)  # step 1
    assert auto_chunk_frames(540, 960, 3, overlapping, budget=4 << 30) == 131
    assert auto_chunk_frames(540, 960, 3, UpscaleSettings(resolution=1080, batch_size=33, temporal_overlap=3),
                             budget=4 << 30) == 120
    assert auto_chunk_frames(540, 960, 3, settings, budget=1) == 5   # never less than one batch


@pytest.mark.parametrize("overlap,expected", [
    # batches [0,5) [5,10) [10,15) complete in the chunk, [15,17) ends the clip
    (0, [("written", 0), ("yielded", 5), ("written", 5), ("yielded", 5), ("written", 10), ("yielded", 5),
         ("written", 15), ("yielded", 2)]),
    # batches start every 3 frames; the last one's 2 frames that a next batch could blend into come at the end
    (2, [("written", 0), ("yielded", 3), ("written", 3), ("yielded", 3), ("written", 6), ("yielded", 3),
         ("written", 9), ("yielded", 3), ("written", 12), ("yielded", 3), ("yielded", 2)]),
])
def test_a_chunk_of_several_batches_yields_each_batch_once_it_is_written(monkeypatch, overlap, expected):
    """The writer gets a batch's final frames while the chunk's later batches still decode."""
    events = []

    def recording_batches(self, source, base, batches, geometry, out, out_start, held=0):
        for index in _fake_batches(self, source, base, batches, geometry, out, out_start, held):
            events.append(("written", batches[index].start))
            yield index

    monkeypatch.setattr(upscaler_module._Runner, "run_batches", recording_batches)
    settings = UpscaleSettings(resolution=16, batch_size=5, temporal_overlap=overlap)
    clip = torch.rand(17, 16, 16, 3)
    whole = upscale(clip, DiTSpec(model="unused"), VAESpec(model="unused"), settings, manager=ModelManager())
    events.clear()
    parts = []
    for part in upscale_stream([clip], DiTSpec(model="unused"), VAESpec(model="unused"), settings,
                               manager=ModelManager()):
        events.append(("yielded", part.shape[0]))
        parts.append(part)
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=0)
    assert events == expected
