"""The Triton implicit-GEMM causal convolution (src/optimization/conv3d_triton.py) against F.conv3d.

The kernel runs on the GPU when there is one, else on CPU tensors under Triton's interpreter, switched on
before Triton is imported: here, or, when an earlier test module imported Triton, in a child pytest process
of this file.  Every kernel test passes fixed tiles (no autotuning), small enough for the interpreter and
valid on a GPU (fp8 needs K steps of 32).  Expectations: float32 equals a float64 F.conv3d up to summation
order (rel <= 1e-5); bfloat16 is that result rounded once (within one bf16 step); fp8 equals F.conv3d of the
dequantized operands rounded to bf16, and stays within FP8_BOUND of the unquantized convolution.  Shapes
have odd H and W that no patch or tile divides, several frames, output-channel tiles with idle columns and
more than one channel block per tap; ``out`` may be any strided view.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from triton_interpreter import (DEVICE, choose_interpreter, compute_as_the_gpu, kernel_module,
                                run_in_fresh_interpreter, skip_unless_kernels_run_here)

from src.optimization import vae_fp8

pytestmark = pytest.mark.usefixtures("single_thread")

choose_interpreter()

NO_TRITON = "Triton is not installed: the implicit-GEMM convolution is an optional CUDA kernel"
EXACT = 1e-5
BF16_STEP = 2.0**-7  # one bfloat16 step, relative (8 significant bits)
# e4m3 keeps 4 significant bits: rounding errs by at most 2**-4 relative, ~2.7 % RMS for normally
# distributed values (uniform error over a log-uniform mantissa: 2**-4 · sqrt(E[1/m²] = 0.54) / sqrt(3)).
# Independent errors of x and w give ~3.8 % RMS per product and, summed over K random terms, the same
# relative L2 error of the output; 6 % leaves room for the sampling spread of a small output.
FP8_BOUND = 6e-2



@pytest.fixture(scope="module")
def conv():
    """The conv3d_triton module (imported, not necessarily runnable here)."""
    return kernel_module("conv3d_triton", NO_TRITON, runnable=False)


@pytest.fixture(scope="module")
def kernels(conv):
    """The module, its kernel compiled for the GPU or run by the interpreter."""
    skip_unless_kernels_run_here()
    if DEVICE == "cuda":
        yield conv
        return
    with pytest.MonkeyPatch.context() as patch:
        compute_as_the_gpu(patch, bf16_dot=True)
        yield conv


def _tiles(conv, block_m, block_n, block_k, patch_width=0):
    return conv.ConvTiles(block_m, block_n, block_k, patch_width, num_warps=4, num_stages=2)


def _input(batches, channels, frames, height, width, *, dtype=torch.float32, seed=0):
    """A channels-last conv input of ``frames`` new frames plus the 2 look-back frames."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batches, channels, frames + 2, height, width, generator=generator)
    return x.to(DEVICE, dtype).contiguous(memory_format=torch.channels_last_3d)


def _weight(out_channels, channels, *, seed=1):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_channels, channels, 3, 3, 3, generator=generator) / (27 * channels) ** 0.5
    return weight.to(DEVICE), (torch.randn(out_channels, generator=generator) * 0.1).to(DEVICE)


def _reference(x, weight, bias=None):
    """The causal convolution in float64 (time unpadded, spatial zero padding 1)."""
    bias = None if bias is None else bias.double()
    return F.conv3d(x.double(), weight.double(), bias, stride=1, padding=(0, 1, 1))


# (batches, C, Cout, new frames, H, W, tiles): 9 x 11 and 5 x 7 frames leave partial pixel tiles and patches
# (4 x 16, 4 x 8); Cout 48 in tiles of 32 leaves 16 idle columns; C 32 in K steps of 16 is two channel blocks
# per tap.
FLOAT32_CASES = {
    "rows_wrap": (1, 32, 48, 3, 9, 11, (64, 32, 16, 0)),
    "patches": (1, 32, 48, 2, 9, 11, (64, 32, 16, 16)),
    "two_batches_patches": (2, 16, 16, 1, 5, 7, (32, 16, 16, 8)),
}


@pytest.mark.parametrize("case", FLOAT32_CASES.values(), ids=FLOAT32_CASES.keys())
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_float32_equals_conv3d(kernels, case, with_bias):
    batches, channels, out_channels, frames, height, width, tiles = case
    x = _input(batches, channels, frames, height, width)
    weight, bias = _weight(out_channels, channels)
    bias = bias if with_bias else None
    out = kernels.conv3d_causal(x, kernels.weight_matrix(weight), bias=bias, tiles=_tiles(kernels, *tiles))
    assert out.shape == (batches, out_channels, frames, height, width) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    assert rel_err(out, _reference(x, weight, bias)) <= EXACT


def test_bfloat16_is_the_exact_result_rounded(kernels):
    x = _input(1, 16, 2, 5, 7, dtype=torch.bfloat16)
    weight, bias = _weight(48, 16)
    weight, bias = weight.bfloat16(), bias.bfloat16()
    out = kernels.conv3d_causal(x, kernels.weight_matrix(weight), bias=bias, tiles=_tiles(kernels, 64, 32, 16))
    assert out.dtype == torch.bfloat16
    # bf16 products are exact in float32; the sum differs from float64 by ~1e-7, far below a bf16 step.
    expected = _reference(x, weight, bias).float()
    torch.testing.assert_close(out.float(), expected.bfloat16().float(), rtol=BF16_STEP, atol=1e-5)


@pytest.mark.parametrize("fast", [False, True], ids=["float32_accumulation", "fast_accumulation"])
def test_fp8_equals_conv3d_of_the_dequantized_operands(kernels, fast):
    if DEVICE == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 tensor-core products need compute capability 8.9 or later")
    x = _input(1, 32, 2, 7, 9, dtype=torch.bfloat16)
    weight, bias = _weight(16, 32)
    x_fp8, x_scale = kernels.quantize_input_fp8(x)
    matrix_fp8, weight_scale = vae_fp8.quantize_weight_fp8(kernels.weight_matrix(weight))
    out = kernels.conv3d_causal(x_fp8, matrix_fp8, bias=bias, fp8_scales=(x_scale, weight_scale),
                                fp8_fast_accumulation=fast, tiles=_tiles(kernels, 64, 16, 32))
    assert out.dtype == torch.bfloat16
    # Scales as the quantization defines them: amax / 448 per tensor for x, per output channel for w.
    torch.testing.assert_close(x_scale, x.float().abs().max().reshape(1) / 448, rtol=1e-6, atol=0)
    torch.testing.assert_close(weight_scale, weight.abs().amax(dim=(1, 2, 3, 4)) / 448, rtol=1e-6, atol=0)
    x_dequantized = x_fp8.double() * x_scale.double()
    weight_dequantized = (matrix_fp8.double() * weight_scale.double()[:, None]).view(16, 3, 3, 3, 32)
    dequantized = _reference(x_dequantized, weight_dequantized.permute(0, 4, 1, 2, 3), bias)
    if fast and DEVICE == "cuda":
        # Hopper adds fp8 products in fewer than float32's bits over the whole K: within a few bf16 steps.
        assert rel_err(out, dequantized) <= 2 * BF16_STEP
    else:
        torch.testing.assert_close(out.float(), dequantized.float().bfloat16().float(), rtol=BF16_STEP, atol=1e-4)
    assert rel_err(out, _reference(x, weight, bias)) <= FP8_BOUND


def test_out_is_a_strided_view_and_x_a_view_of_later_frames(kernels):
    # x: frames 1.. of a buffer whose frame 0 is NaN (a read before the first look-back frame, or across
    # the top edge into the previous frame, would show).  out: channels 4..20 of the new frames of a
    # NaN-filled padded buffer of 24 channels, as a producer writes the next convolution's input.
    buffer = _input(1, 16, 3, 5, 7)
    buffer[:, :, 0] = float("nan")
    x = buffer[:, :, 1:]
    weight, bias = _weight(16, 16)
    target = torch.full((1, 24, 4, 5, 7), float("nan"), device=DEVICE).contiguous(memory_format=torch.channels_last_3d)
    out = target[:, 4:20, 2:]
    returned = kernels.conv3d_causal(x, kernels.weight_matrix(weight), bias=bias, out=out,
                                     tiles=_tiles(kernels, 64, 32, 16))  # 16 idle columns
    assert returned is out
    assert rel_err(out, _reference(x, weight, bias)) <= EXACT
    untouched = torch.ones(target.shape, dtype=torch.bool, device=DEVICE)
    untouched[:, 4:20, 2:] = False
    assert torch.isnan(target[untouched]).all()


# ---------------------------------------------------------------------------------------------------
# Weight layout, quantization and argument checks (no kernel launch)
# ---------------------------------------------------------------------------------------------------


def test_weight_matrix_columns(conv):
    weight = torch.randn(2, 3, 3, 3, 3)
    matrix = conv.weight_matrix(weight)
    assert matrix.shape == (2, 81) and matrix.is_contiguous()
    for kt in range(3):
        for kh in range(3):
            for kw in range(3):
                for c in range(3):
                    assert torch.equal(matrix[:, ((kt * 3 + kh) * 3 + kw) * 3 + c], weight[:, c, kt, kh, kw])


def test_input_quantization(conv):
    x = (torch.randn(1, 8, 3, 20, 20) * 3).bfloat16().contiguous(memory_format=torch.channels_last_3d)
    x_fp8, scale = conv.quantize_input_fp8(x)
    assert x_fp8.dtype == torch.float8_e4m3fn and x_fp8.is_contiguous(memory_format=torch.channels_last_3d)
    assert scale.shape == (1,) and scale.dtype == torch.float32
    assert torch.equal(scale, x.float().abs().max().reshape(1) / 448)
    # x / scale rounded once to e4m3 (through a bf16 product it would round twice, off by a step at times).
    assert torch.equal(x_fp8.float(), (x.float() / scale).to(torch.float8_e4m3fn).float())
    assert x_fp8.float().abs().max().item() == 448.0  # the largest value maps to e4m3's largest
    # Rounded once to nearest with 4 significant bits: within 2**-4 relative (plus float32 rounding of the
    # scaled value), or half the smallest subnormal step (2**-9 · scale).
    error = (x_fp8.float() * scale - x.float()).abs()
    assert (error <= torch.maximum(x.float().abs() * (2**-4 + 2**-20), scale * 2**-10)).all()
    zeros, zero_scale = conv.quantize_input_fp8(torch.zeros(1, 8, 3, 5, 7))
    assert torch.isfinite(zero_scale).all() and not zeros.float().any()


def test_weight_quantization_per_output_channel(conv):
    matrix = torch.randn(4, 54) * torch.tensor([1e-3, 1.0, 30.0, 0.0]).view(-1, 1)
    matrix_fp8, scale = vae_fp8.quantize_weight_fp8(matrix)
    torch.testing.assert_close(scale[:3], matrix[:3].abs().amax(dim=1) / 448, rtol=1e-6, atol=0)
    assert (matrix_fp8[:3].float().abs().amax(dim=1) == 448).all() and not matrix_fp8[3].float().any()
    error = (matrix_fp8.float() * scale[:, None] - matrix).abs()
    assert (error <= torch.maximum(matrix.abs() * (2**-4 + 2**-20), scale[:, None] * 2**-10)).all()


def test_tile_candidates(conv):
    for channels, out_channels in ((128, 128), (256, 256), (512, 512), (256, 128)):
        for fp8 in (False, True):
            tiles = conv.usable_tiles(channels, out_channels, fp8)
            assert tiles and all(channels % t.block_k == 0 and t.block_n <= out_channels for t in tiles)
            assert all(t.block_k >= 32 for t in tiles)  # fp8 dots need K >= 32
    assert any(t.block_n == 256 for t in conv.usable_tiles(256, 256, False))
    assert {t.block_n for t in conv.usable_tiles(64, 48, False)} == {128}  # the narrowest, for Cout < all
    assert conv.usable_tiles(16, 128, False) == []


def _check_rejected(conv, match, x, matrix, **options):
    options.setdefault("tiles", _tiles(conv, 64, 16, 16))
    with pytest.raises(conv.Conv3dTritonError, match=match):
        conv.conv3d_causal(x, matrix, **options)


def test_bad_arguments_are_rejected_with_what_to_do(conv):
    x = _input(1, 16, 2, 5, 7, dtype=torch.bfloat16)
    matrix = conv.weight_matrix(_weight(16, 16)[0].bfloat16())
    _check_rejected(conv, "channels_last_3d", x.contiguous(), matrix)
    _check_rejected(conv, "T \\+ 2", x[:, :, :2], matrix)
    _check_rejected(conv, "weight_matrix\\(weight\\)", x, conv.weight_matrix(_weight(16, 8)[0].bfloat16()))
    _check_rejected(conv, "share one dtype", x, matrix.float())
    _check_rejected(conv, "fp8_scales", x, matrix, fp8_scales=(torch.ones(1), torch.ones(16)))
    x_fp8, x_scale = conv.quantize_input_fp8(x)
    matrix_fp8, weight_scale = vae_fp8.quantize_weight_fp8(matrix)
    _check_rejected(conv, "fp8_scales", x_fp8, matrix_fp8)
    _check_rejected(conv, "16 elements", x_fp8, matrix_fp8, fp8_scales=(x_scale, weight_scale[:8]))
    _check_rejected(conv, "bias", x, matrix, bias=torch.ones(8, device=DEVICE))
    _check_rejected(conv, "out must be \\(1, 16, 2, 5, 7\\)", x, matrix, out=torch.empty(1, 16, 4, 5, 7, device=DEVICE))
    _check_rejected(conv, "block_k must divide", x, matrix, tiles=_tiles(conv, 64, 16, 32))
    with pytest.raises(conv.Conv3dTritonError, match="weight must be"):
        conv.weight_matrix(torch.ones(4, 4, 1, 3, 3))
    if DEVICE == "cpu":
        _check_rejected(conv, "tiles=|CUDA tensors", x, matrix, tiles=None)


def test_kernels_in_a_fresh_interpreter():
    run_in_fresh_interpreter(__file__, NO_TRITON)
