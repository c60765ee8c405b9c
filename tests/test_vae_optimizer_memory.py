"""Peak memory of the optimized VAE path, measured on CPU by tracking live tensor storages.

A TorchDispatchMode sees every tensor an op creates; a storage counts from its allocation until its last
tensor dies.  The look-back that causal convolutions keep in the CausalMemory between calls (the same in
the plain and the optimized path, apart from the upsampler's compact form) is counted apart, so the
"working set" is everything else: what streaming in pieces bounds.  Proxy: a random model with the
released width ratios (16/32/64/64), 9 frames of 64x64; unit A = one full-resolution activation of the
output level for a 4-frame chunk (4 x 16 x 64 x 64 float32), what the plain path holds several of.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Iterator

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from src.benchmark.random_weights import randomize_
from src.models.video_vae_v3 import VAEConfig, VideoAutoencoder
from src.models.video_vae_v3.temporal_slicing import CausalMemory
from src.optimization.vae_optimizer import estimate_peak_bytes, optimize_vae

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIG = VAEConfig(block_out_channels=(16, 32, 64, 64), norm_num_groups=8)
SIZE, FRAMES = 64, 9
A = 4 * 16 * SIZE * SIZE * 4


class LiveStorageBytes(TorchDispatchMode):
    """Live bytes of the storages created inside the block, their peak, and the peak of the working set
    (live bytes minus those held as causal look-back)."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, list[int]] = {}  # data pointer -> [bytes, live tensors using it]
        self.live = self.peak = 0
        self.held: dict[int, int] = {}
        self.peak_working = self.peak_held = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor, inputs)
        return out

    def _track(self, tensor: torch.Tensor, inputs: set[int]) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.storages:
            self.storages[key][1] += 1
        elif key in inputs or storage.nbytes() == 0:
            return  # a view or in-place result of a tensor made outside the block, or nothing
        else:
            self.storages[key] = [storage.nbytes(), 1]
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            self.peak_working = max(self.peak_working, self.live - sum(self.held.values()))
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.storages[key]
        entry[1] -= 1
        if entry[1] == 0:
            del self.storages[key]
            self.live -= entry[0]

    def hold(self, record: object, held: bool) -> None:
        """Count the storage of a kept look-back record (a tensor or an object holding ``inputs``) apart."""
        tensor = record if isinstance(record, torch.Tensor) else record.inputs
        key = tensor.untyped_storage().data_ptr()
        if held and key in self.storages:
            self.held[key] = self.storages[key][0]
            self.peak_held = max(self.peak_held, sum(self.held.values()))
        else:
            self.held.pop(key, None)


@contextmanager
def tracked(monkeypatch) -> Iterator[LiveStorageBytes]:
    tracker = LiveStorageBytes()
    keep, recall = CausalMemory.keep, CausalMemory.recall

    def keeping(memory, conv, frames):
        keep(memory, conv, frames)
        tracker.hold(frames, held=True)

    def recalling(memory, conv):
        frames = recall(memory, conv)
        tracker.hold(frames, held=False)
        return frames

    monkeypatch.setattr(CausalMemory, "keep", keeping)
    monkeypatch.setattr(CausalMemory, "recall", recalling)
    with tracker:
        yield tracker




@pytest.fixture(scope="module")
def model() -> VideoAutoencoder:
    return randomize_(VideoAutoencoder(CONFIG).eval(), seed=5)


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    return {
        "decode": torch.randn(1, 16, (FRAMES - 1) // 4 + 1, SIZE // 8, SIZE // 8, generator=generator),
        "encode": torch.rand(1, 3, FRAMES, SIZE, SIZE, generator=generator) * 2 - 1,
    }


def _measure(model, inputs, direction, monkeypatch, **options) -> LiveStorageBytes:
    if options:
        optimize_vae(model, **options)
    else:
        optimize_vae(model, enabled=False)
    run = model.decode if direction == "decode" else model.encode
    with tracked(monkeypatch) as tracker:
        run(inputs[direction])
    return tracker


def test_streaming_bounds_the_decode_working_set(model, inputs, monkeypatch):
    """One-frame pieces: the working set is one piece of the widest full-resolution convolution (its 32-channel
    input, 3-frame padded input, 16-channel output and 2-frame look-back copy: 3.25 A), plus the upsampler's
    2-frame output at half resolution (0.5 A), the eager GroupNorm's float32 copy (0.5 A) and the float32
    result (0.42 A): 4.67 A, as measured.  The plain path holds whole chunks and their copies: 11.4 A."""
    plain = _measure(model, inputs, "decode", monkeypatch)
    lean = _measure(model, inputs, "decode", monkeypatch, piece_bytes=1)
    assert lean.peak_working <= 5.0 * A
    assert plain.peak_working >= 2.0 * lean.peak_working  # 11.4 A measured
    # The upsamplers keep their pre-upscale frames (8.45 A -> 7.15 A of look-back).
    assert lean.peak_held <= 0.9 * plain.peak_held
    assert lean.peak <= 0.7 * plain.peak  # 10.8 A vs 17.4 A


def test_streaming_bounds_the_encode_working_set(model, inputs, monkeypatch):
    plain = _measure(model, inputs, "encode", monkeypatch)
    lean = _measure(model, inputs, "encode", monkeypatch, piece_bytes=1)
    assert lean.peak_working <= 2.0 * A  # 1.8 A measured, 7.3 A plain
    assert plain.peak_working >= 3.0 * lean.peak_working


@pytest.mark.parametrize("direction", ["decode", "encode"])
@pytest.mark.parametrize("piece_bytes", [1, A], ids=["frame_pieces", "4_frame_pieces"])
def test_estimate_is_a_close_upper_bound(model, inputs, monkeypatch, direction, piece_bytes):
    measured = _measure(model, inputs, direction, monkeypatch, piece_bytes=piece_bytes).peak
    estimate = estimate_peak_bytes(
        CONFIG, direction, SIZE, SIZE, frames=FRAMES, dtype=torch.float32, piece_bytes=piece_bytes, fused_norm=False
    )
    assert measured <= estimate <= 1.4 * measured  # 1.05 .. 1.15 measured


def test_causal_memory_is_freed_without_the_cycle_collector():
    """Nothing may keep a clip's CausalMemory (gigabytes at 1080p) alive after encode/decode returns, not even
    until the next garbage collection: run with the cycle collector off and look for survivors."""
    import gc

    from conftest import golden_path
    from src.models.load import load_vae
    from src.models.video_vae_v3.temporal_slicing import CausalMemory
    from src.optimization.vae_optimizer import optimize_vae

    vae = load_vae(golden_path("vae_weights.safetensors"))
    optimize_vae(vae, piece_bytes=1)  # one frame per piece: the deepest recursion
    video = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    gc.collect()
    gc.disable()
    try:
        mean, _ = vae.encode(video)
        vae.decode(mean)
        survivors = [o for o in gc.get_objects() if type(o) is CausalMemory]
    finally:
        gc.enable()
    assert survivors == []
