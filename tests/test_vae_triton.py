"""The Triton VAE kernels (optimization/vae_triton.py) against the eager kernels and F.group_norm.

The kernels run on the GPU when there is one, else on CPU tensors under Triton's interpreter, which must be
switched on before Triton is imported: here, or, when an earlier test module imported Triton (torch._dynamo
does), in a child pytest process of this file.  Float32 must equal the eager kernels and a float64
F.group_norm per frame up to summation order (rel <= 1e-5), bfloat16 must be the float32 result rounded
once (within one bf16 step).  Shapes cover several frames, two batches, a folded shift, SiLU on and off, an
``out`` that is the new frames of a padded buffer, tiles that do not divide the frame, and a mean of 1e3
against a spread of 1.  The runtime's fallback after a failing Triton kernel and the ``SEEDVR2_VAE_TRITON``
switch are tested without Triton.
"""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err, set_env
from triton_interpreter import DEVICE, choose_interpreter, kernel_module, run_in_fresh_interpreter

from src.optimization import vae_optimizer
from src.optimization.vae_optimizer import VAERuntime, add_residual, normalize_into

pytestmark = pytest.mark.usefixtures("single_thread")

choose_interpreter()

EXACT = 1e-5
BF16_STEP = 2.0**-7  # one bfloat16 step, relative (8 significant bits)
EPS = 1e-6


NO_TRITON = "Triton is not installed: its VAE kernels are optional (CUDA only)"



@pytest.fixture(scope="module")
def kernels():
    """The vae_triton module, its kernels compiled for the GPU or run by the interpreter."""
    return kernel_module("vae_triton", NO_TRITON)


def _frames_last(shape, *, mean: float = 0.0, std: float = 1.0, seed: int = 0, dtype=torch.float32,
                 device: str = DEVICE) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=generator) * std + mean
    return values.to(device, dtype).contiguous(memory_format=torch.channels_last_3d)


def _padded(like: torch.Tensor, look_back: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """A NaN-filled padded conv input and its new frames (other frame and batch strides than ``like``)."""
    b, c, t, h, w = like.shape
    buffer = torch.full((b, c, look_back + t, h, w), float("nan"), dtype=like.dtype, device=like.device)
    buffer = buffer.contiguous(memory_format=torch.channels_last_3d)
    return buffer, buffer[:, :, look_back:]


def _norm_parameters(channels: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    weight = torch.rand(channels, generator=generator) + 0.5
    bias, shift = torch.randn(channels, generator=generator), torch.randn(channels, generator=generator) * 3
    return weight.to(DEVICE, dtype), bias.to(DEVICE, dtype), shift.to(DEVICE, dtype)


def _group_norm_per_frame(x, weight, bias, groups, silu, shift) -> torch.Tensor:
    """F.group_norm of every frame of ``x + shift``, in float64."""
    x = x.double() if shift is None else x.double() + shift.double().view(1, -1, 1, 1, 1)
    frames = x.transpose(1, 2).flatten(0, 1)  # (B·T, C, H, W)
    normed = F.group_norm(frames, groups, weight.double(), bias.double(), EPS)
    if silu:
        normed = F.silu(normed)
    return normed.unflatten(0, x.shape[0:1] + x.shape[2:3]).transpose(1, 2)


# (batches, channels, frames, height, width, groups); with 64-element tiles a tile holds 64 / C pixels, so
# 5 x 7 = 35 pixels leave a partial last tile.
SHAPES = {"two_batches": (2, 16, 3, 5, 7, 4), "one_group_channel": (1, 8, 2, 5, 7, 8)}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("silu", [True, False], ids=["silu", "no_silu"])
@pytest.mark.parametrize("with_shift", [True, False], ids=["shift", "no_shift"])
def test_normalize_float32_equals_eager_and_group_norm(kernels, shape, silu, with_shift):
    *size, groups = shape
    x = _frames_last(size, mean=0.5, std=2.0)
    weight, bias, shift = _norm_parameters(size[1])
    shift = shift if with_shift else None
    buffer, out = _padded(x)
    kernels.normalize_into(x, weight, bias, out, groups, EPS, silu, shift, tile_elements=64)
    eager = torch.empty_like(x)
    normalize_into(x, weight, bias, eager, groups, EPS, silu, shift)
    assert torch.isnan(buffer[:, :, :2]).all()  # the look-back slots are untouched
    assert rel_err(out, eager) <= EXACT
    assert rel_err(out, _group_norm_per_frame(x, weight, bias, groups, silu, shift)) <= EXACT


def test_normalize_combines_more_tiles_than_one_combining_block(kernels, monkeypatch):
    # The combining step reads COMBINE_BLOCK tile statistics at a time: here 9 tiles in blocks of 4.
    monkeypatch.setattr(kernels, "COMBINE_BLOCK", 4)
    x = _frames_last((1, 16, 2, 5, 7), std=3.0, seed=2)
    weight, bias, shift = _norm_parameters(16)
    out = torch.empty_like(x)
    kernels.normalize_into(x, weight, bias, out, 4, EPS, True, shift, tile_elements=64)
    assert rel_err(out, _group_norm_per_frame(x, weight, bias, 4, True, shift)) <= EXACT


def test_normalize_bfloat16_is_the_float32_result_rounded(kernels):
    x = _frames_last((2, 16, 2, 5, 7), mean=0.5, std=2.0, dtype=torch.bfloat16)
    weight, bias, shift = _norm_parameters(16, torch.bfloat16)
    buffer, out = _padded(x)
    kernels.normalize_into(x, weight, bias, out, 4, EPS, True, shift, tile_elements=64)
    # The eager kernel on the same values in float32 (it rounds x + shift to bfloat16 first when run in it).
    expected = torch.empty_like(x, dtype=torch.float32)
    normalize_into(x.float(), weight.float(), bias.float(), expected, 4, EPS, True, shift.float())
    torch.testing.assert_close(out.float(), expected.bfloat16().float(), rtol=BF16_STEP, atol=1e-6)
    assert torch.isnan(buffer[:, :, :2]).all()


def test_normalize_stores_scaled_saturated_e4m3_with_its_tail(kernels):
    # The input of an fp8 convolution (vae_fp8): the result times a per-channel scale, saturated at 448, in e4m3,
    # also into the look-back tail.  Triton 3.5's CPU interpreter converts float32 to float8 wrongly (31.3 becomes
    # 16), so there only where the values go is checked; their rounding to nearest is checked on the GPU.
    x = _frames_last((2, 16, 3, 5, 7), mean=0.5, std=2.0, dtype=torch.bfloat16, seed=6)
    x[0, 3, 1, 2, 4] = 1e4  # far beyond 448 after scaling: saturates, no NaN
    weight, bias, shift = _norm_parameters(16, torch.bfloat16)
    multiplier = (torch.rand(16, generator=torch.Generator().manual_seed(7)) * 50 + 1).to(DEVICE)
    buffer = torch.full((2, 16, 5, 5, 7), float("nan"), device=DEVICE).to(torch.float8_e4m3fn)
    buffer = buffer.contiguous(memory_format=torch.channels_last_3d)
    out, tail = buffer[:, :, 2:], torch.empty_like(buffer[:, :, :2])
    kernels.normalize_into(x, weight, bias, out, 4, EPS, True, shift, tail, multiplier, tile_elements=64)
    wide = torch.empty_like(x, dtype=torch.float32)
    normalize_into(x.float(), weight.float(), bias.float(), wide, 4, EPS, True, shift.float())
    expected = (wide * multiplier.view(1, -1, 1, 1, 1)).clamp(-448, 448)
    assert torch.equal(tail.float(), out[:, :, 1:].float()) and not out.float().isnan().any()
    if DEVICE == "cuda":  # rounded to nearest: half an e4m3 step (2**-4 relative; 2**-10 among subnormals)
        assert ((out.float() - expected).abs() <= 2.0**-4 * expected.abs() + 2.0**-10).all()
        assert out.float().abs().max() == 448
    assert buffer[:, :, :2].float().isnan().all()  # the look-back slots are untouched


@pytest.mark.parametrize("tail_frames", [1, 2, 3])
def test_normalize_writes_the_look_back_tail_from_the_same_stores(kernels, tail_frames):
    # The last frames also go to a separate tensor (a causal convolution's look-back for its next call).
    x = _frames_last((2, 16, 3, 5, 7), mean=0.5, std=2.0, dtype=torch.bfloat16, seed=4)
    weight, bias, shift = _norm_parameters(16, torch.bfloat16)
    buffer, out = _padded(x)
    tail_buffer, tail = _padded(x[:, :, :tail_frames], look_back=1)  # NaN-filled, its own strides
    assert kernels.normalize_into_supported(x, weight, bias, out, 4, EPS, True, shift, tail) == (DEVICE == "cuda")
    kernels.normalize_into(x, weight, bias, out, 4, EPS, True, shift, tail, tile_elements=64)
    assert torch.equal(tail, out[:, :, 3 - tail_frames:])
    assert torch.isnan(tail_buffer[:, :, :1]).all() and torch.isnan(buffer[:, :, :2]).all()
    assert not kernels.normalize_into_supported(x.cuda() if DEVICE == "cuda" else x, weight, bias, out, 4, EPS,
                                                True, shift, tail[:, :8])  # not the frames' channels


def test_normalize_statistics_survive_a_large_mean(kernels):
    # Mean 1e3, spread 1: E[x²] - E[x]² in float32 loses the variance to cancellation (E[x²] ≈ 1e6 carries
    # an error of ~0.06; F.group_norm in float32 on the CPU is 0.2 off here); two-pass statistics give ~3e-5,
    # the float32 step of the mean.
    x = _frames_last((1, 16, 2, 24, 24), mean=1e3, std=1.0, seed=3)
    weight, bias, _ = _norm_parameters(16)
    out = torch.empty_like(x)
    kernels.normalize_into(x, weight, bias, out, 4, EPS, False, None, tile_elements=64)
    assert rel_err(out, _group_norm_per_frame(x, weight, bias, 4, False, None)) <= 1e-4


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_residual_float32_equals_eager(kernels, with_bias):
    residual = _frames_last((2, 16, 3, 5, 7), seed=4)  # 35 pixels: a partial last tile of 4
    bias = torch.randn(16, device=DEVICE) if with_bias else None
    buffer, out = _padded(residual)
    out.copy_(_frames_last(residual.shape, seed=5))
    expected = out.clone()
    add_residual(expected, residual, bias)
    kernels.add_residual(out, residual, bias, tile_elements=64)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert torch.isnan(buffer[:, :, :2]).all()


def test_residual_bfloat16_rounds_once(kernels):
    out = _frames_last((2, 16, 3, 5, 7), seed=6, dtype=torch.bfloat16)
    residual, bias = _frames_last(out.shape, seed=7, dtype=torch.bfloat16), torch.randn(16, device=DEVICE)
    expected = (out.float() + residual.float() + bias.view(1, -1, 1, 1, 1)).bfloat16()
    kernels.add_residual(out, residual, bias, tile_elements=64)
    # Rounded once on the GPU (to nearest); Triton's interpreter truncates instead: within one step.
    torch.testing.assert_close(out.float(), expected.float(), rtol=BF16_STEP, atol=0)
    if DEVICE == "cuda":
        assert torch.equal(out, expected)


def test_preconditions(kernels):
    x = _frames_last((2, 16, 3, 5, 7), device="cpu")
    weight, bias = torch.ones(16), torch.zeros(16)
    # CPU tensors only through the interpreter, never from the runtime.
    assert not kernels.normalize_into_supported(x, weight, bias, x, 4, EPS, True)
    assert not kernels.add_residual_supported(x, x, None)
    # The frame layout: whole (H·W, C) frames, at any frame and batch strides.
    assert kernels._frame_layout(x) and kernels._frame_layout(_padded(x)[1])
    assert kernels._frame_layout(x[:, :, :, ::2][:, :, :, :1])  # one row: its stride does not matter
    assert not kernels._frame_layout(x[:, :, :, ::2])
    assert not kernels._frame_layout(x.contiguous())
    assert not kernels._frame_layout(x[:, :8])
    # Tiles span all channels: a power-of-two count.
    assert kernels._fits(x, x) and not kernels._fits(_frames_last((1, 12, 2, 5, 7), device="cpu"))


# ---------------------------------------------------------------------------------------------------
# Row copy into a padded buffer's window
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy_rows_fills_exactly_the_window(kernels, dtype):
    # The downsampler's input: frames one row and one column larger, after two look-back frames.
    x = _frames_last((2, 16, 3, 5, 7), dtype=dtype)
    buffer = torch.full((2, 16, 5, 6, 8), float("nan"), dtype=dtype, device=DEVICE)
    buffer = buffer.contiguous(memory_format=torch.channels_last_3d)
    window = buffer[:, :, 2:, :5, :7]
    assert kernels.copy_rows_supported(x, window) if DEVICE == "cuda" else kernels._row_layout(window)
    kernels.copy_rows(x, window, block=32)  # 7 x 16 = 112 elements a row: four blocks, the last one partial
    assert torch.equal(window, x)
    outside = torch.ones_like(buffer, dtype=torch.bool)
    outside[:, :, 2:, :5, :7] = False
    assert buffer[outside].isnan().all()


def test_copy_rows_preconditions(kernels):
    x = _frames_last((1, 16, 2, 5, 7), device="cpu")
    assert kernels._row_layout(x) and not kernels._row_layout(x.contiguous())  # NCDHW rows are not [W, C]
    assert not kernels.copy_rows_supported(x, x)                              # CPU tensors: PyTorch's copy
    if torch.cuda.is_available():
        cuda = x.cuda()
        assert kernels.copy_rows_supported(cuda, torch.empty_like(cuda))
        assert not kernels.copy_rows_supported(cuda, torch.empty_like(cuda, dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy_pixels_fills_a_wider_band_leaving_its_bias_column(kernels, dtype):
    # The upsampler's GEMM input: each pixel's channels, then a bias column, in rows of a band.
    generator = torch.Generator().manual_seed(5)
    frame = torch.randn(9, 7, 24, generator=generator).to(DEVICE, dtype)      # (H, W, C), channels-last
    pixels = frame[2:7]                                                       # a band of 5 rows
    band = torch.full((5, 7, 24 + 8), float("nan"), dtype=dtype, device=DEVICE)
    kernels.copy_pixels(pixels, band[..., :24])
    assert torch.equal(band[..., :24], pixels) and band[..., 24:].isnan().all()
    assert kernels._evenly_spaced_pixels(band[..., :24]) == 32 and kernels._evenly_spaced_pixels(pixels) == 24
    assert kernels._evenly_spaced_pixels(frame[:, ::2]) is None               # rows and columns spaced apart
    assert not kernels.copy_pixels_supported(pixels.cpu(), band[..., :24].cpu())  # CPU: PyTorch's copy


def test_store_e4m3_rows_fills_every_second_row_saturating(kernels):
    # The upsampling GEMM's staged output (rows of W·2C values) into every second row of an e4m3 conv input.
    # Where the values go is checked everywhere; their rounding to nearest on the GPU only (Triton 3.5's CPU
    # interpreter converts float32 to float8 wrongly).
    generator = torch.Generator().manual_seed(8)
    stage = (torch.randn(3, 7, 32, generator=generator) * 100).to(DEVICE, torch.bfloat16)
    stage[1, 2, 5], stage[2, 0, 0] = 1e4, -1e4  # beyond e4m3's range: saturated, not NaN
    frame = torch.full((6, 7, 32), float("nan"), device=DEVICE).to(torch.float8_e4m3fn)
    target = frame[1::2]  # rows 1, 3, 5
    kernels.store_e4m3_rows(stage, target, block=64)  # 224 values a row: four blocks, the last one partial
    assert frame[0::2].float().isnan().all() and not target.float().isnan().any()
    expected = stage.float().clamp(-448, 448)
    assert target.float()[1, 2, 5] == 448 and target.float()[2, 0, 0] == -448
    if DEVICE == "cuda":
        assert torch.equal(target.float(), expected.to(torch.float8_e4m3fn).float())
        assert kernels.store_e4m3_rows_supported(stage, target)
        assert not kernels.store_e4m3_rows_supported(stage, torch.empty_like(target, dtype=torch.bfloat16))
    assert not kernels.store_e4m3_rows_supported(stage.cpu(), target.cpu())  # CPU: PyTorch's cast


# ---------------------------------------------------------------------------------------------------
# The runtime: where the Triton kernels are used, and the fallback
# ---------------------------------------------------------------------------------------------------


def _runtime(**options) -> VAERuntime:
    settings = {"channels_last": True, "pad_channels": False, "compile_norm": False, "cudnn_direct": False,
                "cudnn_benchmark": False, "piece_bytes": 1, "triton_kernels": True}
    return VAERuntime(**{**settings, **options})


def test_failing_triton_kernel_warns_once_and_falls_back(monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("PTX assembly failed\nsecond line")

    failing = SimpleNamespace(normalize_into_supported=lambda *args: True, normalize_into=broken,
                              add_residual_supported=lambda *args: True, add_residual=broken)
    monkeypatch.setattr(vae_optimizer, "_load_vae_triton", lambda: failing)
    monkeypatch.setattr(vae_optimizer, "triton_normalize", vae_optimizer.TritonKernel("normalize_into", "GroupNorm"))
    monkeypatch.setattr(vae_optimizer, "triton_add_residual", vae_optimizer.TritonKernel("add_residual", "residual"))
    runtime, norm = _runtime(), torch.nn.GroupNorm(4, 16, eps=EPS)
    x, shift = _frames_last((2, 16, 3, 5, 7), device="cpu"), torch.randn(16)
    expected = torch.empty_like(x)
    normalize_into(x, norm.weight, norm.bias, expected, 4, EPS, True, shift)
    with caplog.at_level(logging.WARNING, logger=vae_optimizer.__name__), torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(runtime.normalize(x, norm, silu=True, shift=shift), expected)
            summed = runtime.add_residual(x.clone(), x, shift)
            torch.testing.assert_close(summed, x + x + shift.view(1, -1, 1, 1, 1))
    warnings = [record.getMessage() for record in caplog.records if record.name == vae_optimizer.__name__]
    assert len(warnings) == 2  # one per kernel, not one per call
    assert "GroupNorm" in warnings[0] and "RuntimeError: PTX assembly failed" in warnings[0]
    assert "second line" not in warnings[0] and "residual" in warnings[1]


def test_runtime_keeps_cpu_tensors_on_the_torch_kernels(kernels, caplog):
    # Triton is importable here, but its kernels only take CUDA tensors: the CPU result is the eager one.
    runtime, norm = _runtime(), torch.nn.GroupNorm(4, 16, eps=EPS)
    x = _frames_last((2, 16, 3, 5, 7), device="cpu")
    expected = torch.empty_like(x)
    normalize_into(x, norm.weight, norm.bias, expected, 4, EPS, False)
    with caplog.at_level(logging.WARNING, logger=vae_optimizer.__name__), torch.no_grad():
        assert torch.equal(runtime.normalize(x, norm, silu=False), expected)
    assert not [record for record in caplog.records if record.name == vae_optimizer.__name__]


@pytest.mark.parametrize("value, wanted", [(None, True), ("1", True), ("0", False), ("off", False)])
def test_environment_switch(monkeypatch, value, wanted):
    set_env(monkeypatch, vae_optimizer.TRITON_KERNELS_ENV, value)
    assert vae_optimizer._triton_kernels_wanted() is wanted


def test_kernels_in_a_fresh_interpreter():
    run_in_fresh_interpreter(__file__, NO_TRITON)
