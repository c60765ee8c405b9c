"""The optimized VAE path (optimization/vae_optimizer.py) against the plain path and against definitions.

Float32 on CPU: the optimized path must give the plain path's result up to float summation order
(rel <= 1e-5; measured ~1e-6, the spread the golden README gives for float32 vs float64) for the golden tiny
model and a mid-size random config, streamed one frame at a time or in whole chunks, in channels-last
layout with channel padding, temporally sliced or not, tiled.  Plus: the golden cases through the
optimized path, switching back, the kernels, the cuDNN-regression rule and the automatic tile size.
"""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import golden_cases, golden_path, rel_err, set_env

from src.benchmark.random_weights import randomize_
from src.models.load import load_vae
from src.models.video_vae_v3 import VAEConfig, VideoAutoencoder
from src.models.video_vae_v3.resampling import pixel_shuffle_3d
from src.models.video_vae_v3.temporal_slicing import CausalMemory
from src.optimization import vae_optimizer
from src.optimization.vae_executor.coder import lean_decode
from src.optimization.vae_executor.streaming import Stage, run_streamed
from src.optimization.vae_optimizer import (
    DEFAULT_PIECE_BYTES,
    TileSizeError,
    VAEOptimizationError,
    VAERuntime,
    choose_tile_size,
    cudnn_bypass_decision,
    estimate_peak_bytes,
    normalize_into,
    optimize_vae,
    runtime_of,
)

pytestmark = pytest.mark.usefixtures("single_thread")

EXACT = 1e-5        # optimized vs plain, float32: summation order only
GOLDEN_REL = 2e-5   # README §9 threshold for VAE outputs

# One piece = one frame everywhere; whole causal chunks; one-frame pieces in the CUDA layout.
VARIANTS = {
    "frames": dict(piece_bytes=1),
    "chunks": dict(piece_bytes=DEFAULT_PIECE_BYTES),
    "channels_last": dict(piece_bytes=1, channels_last=True, pad_channels=True),
}
MID = VAEConfig(block_out_channels=(16, 32, 64, 64), norm_num_groups=8)




def _runtime(**options) -> VAERuntime:
    settings = dict(channels_last=False, pad_channels=False, compile_norm=False, cudnn_direct=False,
                    cudnn_benchmark=False, piece_bytes=1)
    return VAERuntime(**{**settings, **options})


def _golden_vae() -> VideoAutoencoder:
    return load_vae(golden_path("vae_weights.safetensors"))


@pytest.fixture(scope="module")
def plain() -> VideoAutoencoder:
    return _golden_vae()


@pytest.fixture(scope="module")
def optimized() -> dict[str, VideoAutoencoder]:
    models = {}
    for name, options in VARIANTS.items():
        models[name] = _golden_vae()
        optimize_vae(models[name], **options)
    return models


def _video(frames: int, height: int = 40, width: int = 56, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, height, width, generator=generator) * 2 - 1


def _latent(frames: int, height: int = 5, width: int = 7, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + 1)
    return torch.randn(1, 16, frames, height, width, generator=generator)


# --------------------------------------------------------------------------------------- equal results


@pytest.mark.parametrize("sliced", [True, False], ids=["sliced", "unsliced"])
@pytest.mark.parametrize("frames", [1, 5, 9, 13])
def test_encode_equals_plain(plain, optimized, frames, sliced):
    video = _video(frames)
    mean, logvar = plain.encode(video, temporal_slicing=sliced)
    for name, model in optimized.items():
        fast_mean, fast_logvar = model.encode(video, temporal_slicing=sliced)
        assert fast_mean.shape == mean.shape and fast_mean.dtype == torch.float32
        assert rel_err(fast_mean, mean) <= EXACT, name
        assert rel_err(fast_logvar, logvar) <= EXACT, name


@pytest.mark.parametrize("sliced", [True, False], ids=["sliced", "unsliced"])
@pytest.mark.parametrize("frames", [1, 2, 3, 4])
def test_decode_equals_plain(plain, optimized, frames, sliced):
    z = _latent(frames)
    video = plain.decode(z, temporal_slicing=sliced)
    for name, model in optimized.items():
        fast = model.decode(z, temporal_slicing=sliced)
        assert fast.shape == video.shape == (1, 3, 4 * (frames - 1) + 1, 40, 56)
        assert rel_err(fast, video) <= EXACT, name


def test_tiled_equals_plain_tiled(plain, optimized):
    # 48 px frames in 32 px tiles with 16 px overlap: 2 x 2 tiles, each streamed with causal memory.
    video, z = _video(9, 48, 48, seed=3), _latent(3, 6, 6, seed=3)
    mean, _ = plain.encode(video, tile_size=32, tile_overlap=16)
    decoded = plain.decode(z, tile_size=32, tile_overlap=16)
    for name, model in optimized.items():
        assert rel_err(model.encode(video, tile_size=32, tile_overlap=16)[0], mean) <= EXACT, name
        assert rel_err(model.decode(z, tile_size=32, tile_overlap=16), decoded) <= EXACT, name


@pytest.mark.parametrize("variant", ["frames", "channels_last"])
def test_golden_cases_through_optimized_path(optimized, variant):
    model = optimized[variant]
    for name, case in golden_cases("vae_cases.safetensors").items():
        if name.startswith("enc"):
            mean, logvar = model.encode(case["video"])
            assert rel_err(mean, case["mean"]) <= GOLDEN_REL, name
            assert rel_err(logvar, case["logvar"]) <= GOLDEN_REL, name
        else:
            assert rel_err(model.decode(case["z"]), case["x"]) <= GOLDEN_REL, name


@pytest.fixture(scope="module")
def mid_models() -> tuple[VideoAutoencoder, VideoAutoencoder]:
    """A random model with the released width ratios (16/32/64/64, 8 groups), plain and optimized."""
    reference = randomize_(VideoAutoencoder(MID).eval(), seed=5)
    fast = VideoAutoencoder(MID).eval()
    fast.load_state_dict(reference.state_dict())
    optimize_vae(fast, piece_bytes=1, channels_last=True, pad_channels=True)
    return reference, fast


def test_mid_size_config_equals_plain(mid_models):
    reference, fast = mid_models
    video, z = _video(9, 32, 48, seed=7), _latent(3, 4, 6, seed=7)
    assert rel_err(fast.encode(video)[0], reference.encode(video)[0]) <= EXACT
    assert rel_err(fast.decode(z), reference.decode(z)) <= EXACT


def test_bf16_is_as_close_to_float32_as_the_plain_path(plain):
    """bf16 weights: the optimized path (channels-last, padded channels, one-frame pieces) lands as close to
    the float32 result as the plain path: nothing beyond bf16 rounding."""
    video, z = _video(5, seed=4), _latent(2, seed=4)
    reference_mean, reference_video = plain.encode(video)[0], plain.decode(z)
    half = _golden_vae().to(torch.bfloat16)
    plain_error = rel_err(half.encode(video)[0], reference_mean), rel_err(half.decode(z), reference_video)
    optimize_vae(half, piece_bytes=1, channels_last=True, pad_channels=True)
    fast_error = rel_err(half.encode(video)[0], reference_mean), rel_err(half.decode(z), reference_video)
    for fast, slow in zip(fast_error, plain_error):
        assert fast <= 1.25 * slow and fast < 0.05  # measured: 1.6e-2, 1.4e-2 vs plain 1.7e-2, 1.5e-2


def test_switching_back_restores_the_plain_path(plain):
    model = _golden_vae()
    z = _latent(2)
    before = model.decode(z)
    report = optimize_vae(model, piece_bytes=1, channels_last=True)
    assert runtime_of(model) is not None and report.enabled
    assert model.decoder.conv_out.weight.is_contiguous(memory_format=torch.channels_last_3d)
    off = optimize_vae(model, enabled=False)
    assert runtime_of(model) is None and not off.enabled and "plain" in off.summary()
    assert all(p.is_contiguous() for p in model.parameters())
    # Bit for bit the plain computation again, and the same as an untouched model.
    assert torch.equal(model.decode(z), before)
    assert torch.equal(plain.decode(z), before)


def test_optimized_and_plain_models_do_not_interfere(plain, optimized):
    z = _latent(3, seed=9)
    alone = plain.decode(z)
    optimized["frames"].decode(z)
    assert runtime_of(plain) is None
    assert torch.equal(plain.decode(z), alone)


# ----------------------------------------------------------------------------------------------- switch


def test_cpu_report_names_the_choices():
    report = optimize_vae(_golden_vae())
    assert report.enabled and report.device == "cpu" and report.dtype == "float32"
    assert (report.channels_last, report.pad_channels, report.cudnn_benchmark) == (False, False, False)
    assert report.norm_kernel == "eager" and report.conv_route == "F.conv3d"
    assert "CUDA" in report.conv_route_reason and "eager GroupNorm" in report.summary()


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "1024"])
def test_invalid_piece_size_is_rejected(bad):
    with pytest.raises(VAEOptimizationError, match="piece_bytes must be a positive number of bytes"):
        optimize_vae(_golden_vae(), piece_bytes=bad)


def test_only_the_vae_can_be_optimized():
    with pytest.raises(VAEOptimizationError, match="VideoAutoencoder, got Linear"):
        optimize_vae(torch.nn.Linear(2, 2))


def test_cudnn_benchmark_is_set_inside_and_restored(monkeypatch):
    model = _golden_vae()
    optimize_vae(model, cudnn_benchmark=True)
    seen = []
    convolve = VAERuntime.conv3d

    def recording_conv3d(self, x, conv, **options):
        seen.append(torch.backends.cudnn.benchmark)
        return convolve(self, x, conv, **options)

    monkeypatch.setattr(VAERuntime, "conv3d", recording_conv3d)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    model.decode(_latent(1))
    assert seen and all(seen)
    assert torch.backends.cudnn.benchmark is False


# ---------------------------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("silu", [False, True])
def test_normalize_into_is_group_norm_per_frame(channels_last, silu):
    norm = torch.nn.GroupNorm(4, 8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
        norm.bias.copy_(torch.linspace(-0.3, 0.4, 8))
    # Frames of very different scale and offset: statistics shared across frames would be far off.
    x = torch.randn(2, 8, 3, 5, 6) * torch.tensor([1.0, 30.0, 0.1]).view(1, 1, 3, 1, 1) + 2.0
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    padded = torch.full((2, 8, 5, 5, 6), float("nan")).contiguous(memory_format=layout)
    normalize_into(x.contiguous(memory_format=layout), norm.weight, norm.bias, padded[:, :, 2:], 4, 1e-6, silu)
    expected = torch.stack([norm.double()(x[:, :, t].double()) for t in range(3)], dim=2)
    expected = F.silu(expected) if silu else expected
    # float32 inputs of the 0.1-scale frame carry ~1e-6 relative to its normalised values: F.group_norm
    # itself lands 4.8e-6 from the float64 reference here, this kernel 2.3e-6.
    torch.testing.assert_close(padded[:, :, 2:].double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.isnan(padded[:, :, :2]).all()  # the history slots are left alone


def test_frame_group_stats_match_float64_statistics_of_each_frame_and_group():
    # Rows of different means inside one group (a gradient over H) and a large offset: the two-stage
    # combination must add the spread of the row means to the mean row variance, and stay stable.
    x = torch.randn(2, 6, 3, 7, 9) * 0.05 + torch.linspace(-3, 3, 7).view(1, 1, 1, 7, 1) + 100.0
    x = x.contiguous(memory_format=torch.channels_last_3d)
    mean, var = vae_optimizer.frame_group_stats(x, 3)
    grouped = x.double().unflatten(1, (3, 2))  # (B, G, C/G, T, H, W)
    torch.testing.assert_close(mean.double(), grouped.mean(dim=(2, 4, 5)), rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), grouped.var(dim=(2, 4, 5), correction=0), rtol=1e-4, atol=0)


def test_normalize_into_keeps_float32_statistics_for_bf16():
    # Frames far from zero mean: statistics rounded to bf16 would shift every normalised value by ~0.1.
    x = (torch.randn(1, 8, 2, 6, 6) + 60.0).to(torch.bfloat16)
    weight, bias = torch.ones(8, dtype=torch.bfloat16), torch.zeros(8, dtype=torch.bfloat16)
    out = torch.empty_like(x)
    normalize_into(x, weight, bias, out, 2, 1e-6, False)
    expected = torch.stack([F.group_norm(x[:, :, t].double(), 2, eps=1e-6) for t in range(2)], dim=2)
    assert (out.double() - expected).abs().max() <= 2 * 2**-8 * expected.abs().max()  # two bf16 roundings


def test_normalize_kernel_traces_as_one_graph():
    # What runs compiled on CUDA must trace without graph breaks, with dynamic shapes, writing into a
    # view of a padded channels-last buffer (the inductor run itself is covered by the GPU benchmark).
    compiled = torch.compile(normalize_into, backend="aot_eager", fullgraph=True, dynamic=True)
    weight, bias = torch.rand(16) + 0.5, torch.randn(16)
    for frames in (1, 3):
        x = torch.randn(1, 16, frames, 6, 10).contiguous(memory_format=torch.channels_last_3d)
        buffer = torch.empty(1, 16, frames + 2, 6, 10).contiguous(memory_format=torch.channels_last_3d)
        compiled(x, weight, bias, buffer[:, :, 2:], 4, 1e-6, True, bias)
        expected = torch.empty_like(x)
        normalize_into(x, weight, bias, expected, 4, 1e-6, True, bias)
        torch.testing.assert_close(buffer[:, :, 2:], expected, rtol=1e-6, atol=1e-6)


def test_folded_convolution_bias_equals_adding_it_first():
    x = torch.randn(1, 8, 2, 5, 6).contiguous(memory_format=torch.channels_last_3d)
    weight, bias, shift = torch.rand(8) + 0.5, torch.randn(8), torch.randn(8) * 3
    folded, expected = torch.empty_like(x), torch.empty_like(x)
    normalize_into(x, weight, bias, folded, 2, 1e-6, True, shift)
    normalize_into(x + shift.view(1, 8, 1, 1, 1), weight, bias, expected, 2, 1e-6, True)
    torch.testing.assert_close(folded, expected, rtol=1e-6, atol=1e-6)
    out, residual = torch.randn(1, 8, 2, 5, 6), torch.randn(1, 8, 2, 5, 6)
    summed = out + residual + shift.view(1, 8, 1, 1, 1)
    vae_optimizer.add_residual(out, residual, shift)
    torch.testing.assert_close(out, summed)


def test_residual_kernel_traces_as_one_graph():
    compiled = torch.compile(vae_optimizer.add_residual, backend="aot_eager", fullgraph=True, dynamic=True)
    out = torch.randn(1, 8, 3, 4, 5).contiguous(memory_format=torch.channels_last_3d)
    residual, bias = torch.randn_like(out), torch.randn(8)
    expected = out + residual + bias.view(1, 8, 1, 1, 1)
    compiled(out, residual, bias)
    torch.testing.assert_close(out, expected)


def test_per_frame_kernels_compute_what_the_whole_tensor_kernels_do():
    # With compiled kernels on, the runtime calls them frame by frame (eager kernels here on the CPU):
    # the frame views must land in the right slots of a padded buffer and of a batch of two.
    per_frame, whole = _runtime(channels_last=True, compile_norm=True), _runtime(channels_last=True)
    norm = torch.nn.GroupNorm(4, 8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = (torch.randn(2, 8, 3, 5, 6) * torch.tensor([1.0, 5.0, 0.2]).view(1, 1, 3, 1, 1)).contiguous(
        memory_format=torch.channels_last_3d)
    shift = torch.randn(8)
    buffers = [torch.full((2, 8, 5, 5, 6), float("nan")).contiguous(memory_format=torch.channels_last_3d)
               for _ in range(2)]
    with torch.no_grad():
        per_frame.normalize(x, norm, silu=True, out=buffers[0][:, :, 2:], shift=shift)
        whole.normalize(x, norm, silu=True, out=buffers[1][:, :, 2:], shift=shift)
        torch.testing.assert_close(buffers[0][:, :, 2:], buffers[1][:, :, 2:], rtol=1e-6, atol=1e-6)
        assert torch.isnan(buffers[0][:, :, :2]).all()
        residual = torch.randn_like(x)
        results = [runtime.add_residual(x.clone(), residual, shift) for runtime in (per_frame, whole)]
    torch.testing.assert_close(results[0], results[1])


def test_failed_compile_falls_back_once(monkeypatch, caplog):
    def broken_compile(fn, **options):
        def run(*args):
            raise RuntimeError("no compiler here\nsecond line")
        return run

    kernel = vae_optimizer.CompiledKernel(normalize_into, "GroupNorm")
    monkeypatch.setattr(torch, "compile", broken_compile)
    x, weight, bias = torch.randn(1, 8, 2, 4, 4), torch.ones(8), torch.zeros(8)
    expected = torch.empty_like(x)
    normalize_into(x, weight, bias, expected, 2, 1e-6, True)
    with caplog.at_level(logging.WARNING, logger=vae_optimizer.__name__):
        for _ in range(2):
            out = torch.empty_like(x)
            kernel(x, weight, bias, out, 2, 1e-6, True)
            assert torch.equal(out, expected)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "no compiler here" in warnings[0] and "second line" not in warnings[0]


@pytest.mark.parametrize("time_factor, drop_first_copy", [(1, False), (2, False), (2, True)])
def test_upscale_shuffle_into_equals_shuffled_conv(monkeypatch, time_factor, drop_first_copy):
    monkeypatch.setattr(vae_optimizer, "UPSCALE_BAND_BYTES", 1)  # one row per band
    runtime = _runtime(channels_last=True)
    conv = torch.nn.Conv3d(4, 4 * 4 * time_factor, 1)
    x = torch.randn(1, 4, 3, 5, 6)
    with torch.no_grad():
        expected = pixel_shuffle_3d(conv(x), time_factor)
        if drop_first_copy:
            expected = torch.cat([expected[:, :, :1], expected[:, :, 2:]], dim=2)
        out = torch.zeros(1, 4, expected.shape[2] + 2, 10, 12).contiguous(memory_format=torch.channels_last_3d)
        runtime.upscale_shuffle_into(x, conv, time_factor, out[:, :, 2:], drop_first_copy=drop_first_copy)
    torch.testing.assert_close(out[:, :, 2:], expected, rtol=1e-6, atol=1e-6)
    assert torch.count_nonzero(out[:, :, :2]) == 0


def test_channel_padding_leaves_convolutions_unchanged():
    runtime = _runtime(pad_channels=True)
    conv_in, conv_out = torch.nn.Conv3d(3, 16, 3, padding=1), torch.nn.Conv3d(16, 3, 3, padding=1)
    video, features = torch.randn(1, 3, 3, 6, 7), torch.randn(1, 16, 3, 6, 7)
    padded_video = torch.cat([video, torch.zeros(1, 13, 3, 6, 7)], dim=1)  # 3 real channels, 13 zero ones
    assert runtime.input_channels(3) == 16 and runtime.input_channels(16) == 16 and runtime.input_channels(20) == 32
    with torch.no_grad():
        torch.testing.assert_close(runtime.conv3d(padded_video, conv_in), conv_in(video), rtol=1e-6, atol=1e-6)
        out = runtime.conv3d(features, conv_out)
        assert out.shape == (1, 3, 3, 6, 7)
        torch.testing.assert_close(out, conv_out(features), rtol=1e-6, atol=1e-6)


def test_cudnn_route_never_touches_cpu_tensors(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.cudnn_convolution called for a CPU tensor")

    monkeypatch.setattr(torch, "cudnn_convolution", forbidden)
    runtime = _runtime(cudnn_direct=True)
    conv = torch.nn.Conv3d(4, 4, 3).to(torch.bfloat16)
    x = torch.randn(1, 4, 3, 5, 5, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(runtime.conv3d(x, conv), conv(x))


# ------------------------------------------------------------------------------ streaming and memory


def test_run_streamed_sizes_pieces_by_growth():
    sizes = []

    def record(x: torch.Tensor, memory: CausalMemory) -> torch.Tensor:
        sizes.append(x.shape[2])
        return x * 2

    clip = torch.ones(1, 2, 5, 2, 2)  # 32 bytes per frame
    out = run_streamed([Stage(record), Stage(record, growth=2.0)], clip, CausalMemory(), piece_bytes=64)
    # Stage 1 takes 2-frame pieces (64 bytes); stage 2, twice as wide per frame, takes 1-frame pieces,
    # depth first: piece (0, 1) runs through both stages before piece (2, 3) starts.
    assert sizes == [2, 1, 1, 2, 1, 1, 1, 1]
    assert torch.equal(out, clip * 4)


def test_run_streamed_rejects_a_chunk_without_output():
    def collect(x: torch.Tensor, memory: CausalMemory) -> torch.Tensor:
        return x[:, :, :0]

    with pytest.raises(RuntimeError, match="produced no output frames"):
        run_streamed([Stage(collect)], torch.ones(1, 1, 2, 2, 2), CausalMemory(), piece_bytes=1 << 20)


def test_causal_memory_continuation_is_per_convolution():
    first, second = torch.nn.Identity(), torch.nn.Identity()
    memory = CausalMemory()
    assert not memory.continues(first)
    memory.keep(first, torch.zeros(1))
    assert memory.continues(first) and not memory.continues(second)  # both inside the first chunk
    memory.end_chunk()
    assert memory.continues(first)
    with pytest.raises(RuntimeError, match="causal memory has no frames"):
        memory.continues(second)


# --------------------------------------------------------------------------- the conv3d regression rule


@pytest.mark.parametrize(
    "torch_version, cudnn, affected",
    [
        ("2.8.0+cu128", 91002, False),        # before the regression
        ("2.9.0+cu128", 91002, True),         # 2.9.0: cuDNN >= 9.8 skipped ...
        ("2.9.0", 91501, True),               # ... with no upper bound
        ("2.9.0+cu126", 90701, False),        # cuDNN older than 9.8 is fine
        ("2.9.1+cu128", 91002, True),         # 2.9.1+: only 9.8 - 9.14
        ("2.9.1", 91500, False),
        ("2.10.0a0+git1a2b3c4", 91400, True),
        ("2.10.0", 91501, False),
        ("2.11.0+cu130", 91700, False),
    ],
)
def test_cudnn_bypass_rule(torch_version, cudnn, affected):
    decision, reason = cudnn_bypass_decision(torch_version, cudnn, cuda=True)
    assert decision is affected
    assert str(cudnn) in reason or "PyTorch" in reason


def test_cudnn_bypass_needs_nvidia_cuda():
    assert cudnn_bypass_decision("2.9.0", 91002, cuda=False) == (False, "not an NVIDIA CUDA device")
    assert cudnn_bypass_decision("2.9.0", 91002, cuda=True, rocm=True)[0] is False
    assert cudnn_bypass_decision("2.9.0", None, cuda=True) == (False, "cuDNN is not available")
    with pytest.raises(ValueError, match="cannot read a PyTorch version"):
        cudnn_bypass_decision("nightly", 91002, cuda=True)


# ----------------------------------------------------------------------------------------- tile size


@pytest.mark.parametrize("direction", ["encode", "decode"])
def test_choose_tile_size_fits_and_grows_with_free_memory(direction):
    config, dtype = VAEConfig.released(), torch.bfloat16
    chosen = []
    for free in [int(2**30 * 1.25**k) for k in range(4, 24)]:  # 2.4 GiB .. 208 GiB
        tile = choose_tile_size(free, config=config, direction=direction, frames=33, dtype=dtype)
        assert tile % 32 == 0
        assert estimate_peak_bytes(config, direction, tile, tile, frames=33, dtype=dtype) <= free
        larger = range(tile + 32, vae_optimizer.MAX_TILE_SIZE + 1, 32)
        assert all(estimate_peak_bytes(config, direction, s, s, frames=33, dtype=dtype) > free for s in larger)
        chosen.append(tile)
    assert chosen == sorted(chosen) and chosen[0] < chosen[-1]


def test_choose_tile_size_explains_when_nothing_fits():
    with pytest.raises(TileSizeError, match=r"even a 32x32 px tile needs about .* MiB, but only 0 MiB are free"):
        choose_tile_size(1000, config=VAEConfig.released(), direction="decode", frames=5, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="direction must be one of"):
        estimate_peak_bytes(VAEConfig.released(), "upscale", 64, 64, frames=5, dtype=torch.bfloat16)


@pytest.mark.parametrize("value, wanted", [(None, False), ("1", True), ("on", True), ("0", False)])
def test_cudnn_autotuning_follows_its_environment_switch(monkeypatch, value, wanted):
    set_env(monkeypatch, vae_optimizer.CUDNN_BENCHMARK_ENV, value)
    assert vae_optimizer._cudnn_benchmark_wanted() is wanted


@pytest.mark.parametrize("piece_bytes", [1, 1 << 40])  # one frame per piece, or whole chunks
def test_the_last_chunk_keeps_no_look_back(piece_bytes):
    from src.models.video_vae_v3.temporal_slicing import CausalMemory

    model = _golden_vae()
    optimize_vae(model, piece_bytes=piece_bytes)
    z = _latent(2)
    kept, outputs = {}, {}
    with torch.no_grad():
        for last in (False, True):
            memory = CausalMemory(last_chunk=last)
            outputs[last] = lean_decode(model.decoder, z.to(model.dtype), memory, runtime_of(model))
            kept[last] = len(memory._frames)
    torch.testing.assert_close(outputs[True], outputs[False])
    assert kept[False] > 0 and kept[True] == 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the GEMM route runs on CUDA"))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_are_copied_into_a_zero_padded_input(device, dtype):
    # On CUDA in half precision this is the identity-GEMM route: it must still be an exact copy.
    runtime = _runtime(pad_channels=True, channels_last=True)
    clip = torch.randn(2, 3, 7, 5, 7, dtype=torch.float32).to(device, dtype)
    x = clip[:, :, 4:]                                 # a piece of a longer clip: channel stride 7·5·7
    buffer = torch.full((2, 16, 5, 5, 7), float("nan"), dtype=dtype, device=device)
    buffer = buffer.contiguous(memory_format=torch.channels_last_3d)
    new_frames = buffer[:, :, 2:]                      # after two look-back frames, as in a padded conv input
    runtime.copy_channels_into(x, new_frames)
    assert torch.equal(new_frames[:, :3], x)
    assert torch.count_nonzero(new_frames[:, 3:]) == 0 and not new_frames.isnan().any()
    assert buffer[:, :, :2].isnan().all()              # the look-back slots are left alone


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the GEMM route runs on CUDA"))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_output_channels_are_dropped_exactly(device, dtype):
    # conv_out's 3 channels computed as 8: on CUDA in half precision the slice is taken by an identity GEMM.
    runtime = _runtime(pad_channels=True, channels_last=True)
    conv = torch.nn.Conv3d(16, 3, 3, padding=(0, 1, 1)).to(device, dtype)
    x = torch.randn(2, 16, 4, 6, 7, dtype=torch.float32).to(device, dtype).contiguous(
        memory_format=torch.channels_last_3d)
    weight = torch.nn.functional.pad(conv.weight, (0, 0, 0, 0, 0, 0, 0, 0, 0, 5))
    bias = torch.nn.functional.pad(conv.bias, (0, 5))
    with torch.no_grad():
        padded_out = torch.nn.functional.conv3d(x, weight, bias, 1, (0, 1, 1))
        out = runtime.conv3d(x, conv)
    assert out.shape == (2, 3, 2, 6, 7)
    assert torch.equal(out, runtime._leading_channels(padded_out, 3)) and torch.equal(out, padded_out[:, :3])


@pytest.mark.parametrize("optimized_path", [False, True], ids=["plain", "optimized"])
def test_decode_in_the_model_dtype_loses_nothing(optimized_path):
    # The last convolution computes in the model's dtype: a bf16 result holds exactly the float32 one's values
    # at half the memory; so does a banded (tiled) decode, which is exact.
    model = _golden_vae().to(torch.bfloat16)
    if optimized_path:
        optimize_vae(model, piece_bytes=1)
    z = _latent(2)
    wide = model.decode(z)
    narrow = model.decode(z, output_dtype=torch.bfloat16)
    assert wide.dtype == torch.float32 and narrow.dtype == torch.bfloat16
    assert torch.equal(narrow.float(), wide)
    tiled = model.decode(_latent(2, 6, 6), tile_size=32, tile_overlap=16, output_dtype=torch.bfloat16)
    assert tiled.dtype == torch.bfloat16
    assert torch.equal(tiled.float(), model.decode(_latent(2, 6, 6), tile_size=32, tile_overlap=16))
