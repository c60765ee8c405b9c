"""The one-pass FP8 row quantization (optimization/fp8_triton.py) against the arithmetic it must do.

The kernel runs on the GPU when there is one, else on CPU tensors under Triton's interpreter, which must be
switched on before Triton is imported: here, or, when an earlier test module imported Triton, in a child
pytest process of this file.  Each row's scale must be max(|row|, 1e-12)/448 exactly, and each value the
float32 quotient x/scale rounded once to e4m3 (checked against PyTorch's own float8 cast of that quotient);
inputs cover widths that are not powers of two, row counts that no tile divides, strided rows, an all-zero
row and bf16/fp16/fp32 inputs.  The interpreter mis-rounds float8 casts, so the values are checked on the GPU
only (the scales everywhere).  How FP8 linears pick the kernel, and fall back without it, is tested without
Triton.
"""
from __future__ import annotations

import logging

import pytest
import torch
from triton_interpreter import DEVICE, choose_interpreter, kernel_module, run_in_fresh_interpreter

from src.optimization import linear_quantization, fused_kernels
from src.optimization.linear_quantization import FP8_MAX, quantize_fp8

pytestmark = pytest.mark.usefixtures("single_thread")

choose_interpreter()
NO_TRITON = "Triton is not installed: its FP8 quantization kernel is optional (CUDA only)"



@pytest.fixture(scope="module")
def kernels():
    return kernel_module("fp8_triton", NO_TRITON)


def _rows(rows: int, width: int, dtype: torch.dtype, *, stride_extra: int = 0, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width + stride_extra, generator=generator) * 3
    x[:, : width // 3] *= 40          # rows with a wide dynamic range
    return x.to(DEVICE, dtype)[:, :width]


# Triton 3.5's interpreter rounds float32 -> e4m3 casts wrongly where rounding carries into the exponent (e.g.
# -7.78 becomes -4.0, not -8.0), so the exact values are checked on the GPU only; scales and layout everywhere.
GPU_ROUNDING = pytest.mark.skipif(DEVICE == "cpu", reason="Triton's CPU interpreter rounds float8 casts wrongly "
                                                          "at binade edges; the GPU checks the values")
SHAPES = [(1, 16, 0), (37, 48, 0), (5, 200, 7), (3, 2560, 0)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, width, stride_extra", SHAPES)
def test_each_row_gets_its_amax_scale(kernels, dtype, rows, width, stride_extra):
    x = _rows(rows, width, dtype, stride_extra=stride_extra)
    values, scale = kernels.quantize_rows(x)
    assert values.dtype == torch.float8_e4m3fn and values.shape == (rows, width) and values.is_contiguous()
    assert scale.dtype == torch.float32 and scale.shape == (rows, 1)
    expected_scale = x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    torch.testing.assert_close(scale, expected_scale, rtol=1e-6, atol=0)


@GPU_ROUNDING
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, width, stride_extra", SHAPES)
def test_values_are_the_quotients_rounded_once(kernels, dtype, rows, width, stride_extra):
    x = _rows(rows, width, dtype, stride_extra=stride_extra)
    values, scale = kernels.quantize_rows(x)
    quotient = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX)
    assert torch.equal(values.float(), quotient.to(torch.float8_e4m3fn).float())
    # Every row reaches the top of the e4m3 range, and the dequantized row is within e4m3's rounding.
    assert torch.equal(values.float().abs().amax(dim=1), torch.full((rows,), FP8_MAX, device=DEVICE))
    error = (values.float() * scale - x.float()).abs()
    assert (error <= x.float().abs() * 2.0**-4 + scale * 2.0**-9).all()


@GPU_ROUNDING
def test_a_zero_row_keeps_a_finite_scale(kernels):
    x = torch.zeros(3, 32, device=DEVICE)
    x[1] = 1.0
    values, scale = kernels.quantize_rows(x)
    assert torch.isfinite(scale).all() and scale[0, 0].item() == pytest.approx(1e-12 / FP8_MAX)
    assert torch.count_nonzero(values[0].float()) == 0
    assert torch.equal(values[1].float(), torch.full((32,), FP8_MAX, device=DEVICE))


@GPU_ROUNDING
def test_the_kernel_agrees_with_the_pytorch_quantization(kernels):
    # PyTorch's path multiplies in bf16 before the cast, one rounding more: at most one e4m3 step apart.
    x = _rows(64, 320, torch.bfloat16, seed=3)
    values, scale = kernels.quantize_rows(x)
    reference, reference_scale = quantize_fp8(x, dim=1)
    torch.testing.assert_close(scale, reference_scale, rtol=1e-6, atol=0)
    step = values.float().abs().clamp(min=2.0**-6) * 2.0**-3
    assert ((values.float() - reference.float()).abs() <= step).all()


def test_supported_shapes(kernels):
    assert kernels.quantize_rows_supported(torch.zeros(4, 12288, device=DEVICE, dtype=torch.bfloat16))
    assert not kernels.quantize_rows_supported(torch.zeros(4, 32768, device=DEVICE))     # wider than a tile
    assert not kernels.quantize_rows_supported(torch.zeros(4, 8, device=DEVICE).t())     # columns strided
    assert not kernels.quantize_rows_supported(torch.zeros(4, 8, device=DEVICE, dtype=torch.int32))


def test_kernel_in_a_fresh_interpreter():
    run_in_fresh_interpreter(__file__, NO_TRITON)


# ------------------------------------------------------------------ how FP8 linears choose (no Triton needed)

class _CudaLike:
    """Stands in for a CUDA activation in the quantizer's checks."""

    is_cuda, requires_grad = True, False


def test_the_quantizer_uses_the_kernel_only_where_it_applies(monkeypatch):
    quantizer = linear_quantization._RowQuantizer()
    monkeypatch.setattr(fused_kernels, "triton_installed", lambda: True)
    monkeypatch.delenv(fused_kernels.TRITON_KERNELS_ENV, raising=False)
    assert quantizer._wanted(_CudaLike())
    assert not quantizer._wanted(torch.zeros(2, 16))                  # CPU tensors: PyTorch ops
    monkeypatch.setenv(fused_kernels.TRITON_KERNELS_ENV, "0")
    assert not quantizer._wanted(_CudaLike())
    monkeypatch.delenv(fused_kernels.TRITON_KERNELS_ENV)
    monkeypatch.setattr(fused_kernels, "triton_installed", lambda: False)
    assert not quantizer._wanted(_CudaLike())                         # no Triton installed


def test_a_failing_kernel_falls_back_once_with_one_warning(monkeypatch, caplog):
    quantizer = linear_quantization._RowQuantizer()
    monkeypatch.setattr(quantizer, "_wanted", lambda x: quantizer.failure is None)

    def broken(name, package=None):
        raise ImportError("No module named 'triton'\nsecond line")

    monkeypatch.setattr(linear_quantization.importlib, "import_module", broken)
    x = torch.randn(6, 32)
    with caplog.at_level(logging.WARNING, logger="seedvr2"):
        results = [quantizer(x) for _ in range(3)]
    expected = quantize_fp8(x, dim=1)
    for values, scale in results:
        assert torch.equal(values.float(), expected[0].float()) and torch.equal(scale, expected[1])
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1 and "FP8 quantization" in messages[0] and "second line" not in messages[0]
