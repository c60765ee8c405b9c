"""FP8 and NVFP4 layers and the quantization mode switch (CPU; the GPU kernels are checked on hardware)."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from src.optimization import linear_quantization as fq
from src.optimization.linear_quantization import (
    E2M1_VALUES,
    DeviceCapabilities,
    Fp8Matmul,
    FP8Linear,
    NVFP4Linear,
    QuantizationError,
    dequantize_nvfp4,
    e2m1_codes,
    fp8_matmul_support,
    nvfp4_matmul_support,
    nvfp4_tensor_scale,
    pack_fp4,
    prepare_model_for_weights,
    quantize_fp8,
    quantize_linears,
    quantize_nvfp4,
    swizzle_block_scales,
    unpack_fp4,
)

from conftest import rel_err

FP8 = torch.float8_e4m3fn


@pytest.fixture(autouse=True)
def fresh_decisions(monkeypatch):
    """Every test starts as a fresh process: no cached kernel choice, no message logged yet."""
    monkeypatch.setattr(fq, "_already_logged", set())
    monkeypatch.setattr(fq, "_fp8_matmul_by_device", {})
    monkeypatch.setattr(fq, "_nvfp4_matmul_by_device", {})


def random_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features) / in_features**0.5)
        if bias:
            linear.bias.copy_(0.1 * torch.randn(out_features))
    return linear.requires_grad_(False)


class Stream(nn.Module):
    def __init__(self, **layers: nn.Module):
        super().__init__()
        for name, layer in layers.items():
            setattr(self, name, layer)


def dit_like() -> nn.Module:
    """Module names as in the SeedVR2 DiT, one layer of each kind the switch must tell apart."""
    model = nn.Module()
    model.vid_in = Stream(proj=random_linear(132, 64))
    model.txt_in = random_linear(64, 64)
    block = nn.Module()
    block.attn = Stream(proj_qkv=Stream(vid=random_linear(64, 192, bias=False)),
                        proj_out=Stream(vid=random_linear(64, 64)))
    block.mlp = Stream(vid=Stream(proj_in=random_linear(64, 256), proj_out=random_linear(256, 64)))
    block.odd = random_linear(40, 64)                     # 40 inputs: no fp8/fp4 kernel shape
    model.blocks = nn.ModuleList([block])
    model.vid_out = Stream(proj=random_linear(64, 64))
    return model.eval()


QUANTIZABLE = sorted(["blocks.0.attn.proj_qkv.vid", "blocks.0.attn.proj_out.vid", "blocks.0.mlp.vid.proj_in",
                      "blocks.0.mlp.vid.proj_out"])


def run_block(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    block = model.blocks[0]
    h = block.attn.proj_out.vid(block.attn.proj_qkv.vid(x)[..., :64])
    return block.mlp.vid.proj_out(F.gelu(block.mlp.vid.proj_in(h)))


# ------------------------------------------------------------------------------------------------ FP8
def test_fp8_weight_only_matches_float32_linear():
    linear = random_linear(256, 128)
    layer = FP8Linear.from_linear(linear, compute_dtype=torch.float32, fp8_activations=False)
    assert layer.weight.dtype == FP8 and layer.has_channel_scales
    torch.testing.assert_close(layer.weight_scale, linear.weight.abs().amax(dim=1) / 448)
    # e4m3 keeps 3 mantissa bits: each weight is off by at most 2^-4 of itself, or half the smallest
    # subnormal step (2^-10 of its channel scale) near zero.
    error = (layer.dequantized_weight(torch.float32) - linear.weight).abs()
    bound = torch.maximum(linear.weight.abs() / 16, layer.weight_scale[:, None] / 1024)
    assert (error <= bound * (1 + 1e-6)).all()
    x = torch.randn(2, 7, 256)                            # leading dims are kept
    out = layer(x)
    assert out.shape == (2, 7, 128)
    # Output error ≈ the weights' RMS relative rounding error (~2.4 % for Gaussian weights).
    assert rel_err(out, linear(x)) < 3e-2


def test_fp8_plain_cast_checkpoint_is_taken_bit_for_bit():
    linear = random_linear(64, 32)
    stored = linear.weight.to(FP8)                        # how the released fp8 files store weights
    layer = FP8Linear(64, 32, compute_dtype=torch.float32, fp8_activations=False)
    layer.load_state_dict({"weight": stored, "bias": linear.bias})
    assert torch.equal(layer.weight.view(torch.uint8), stored.view(torch.uint8))
    assert not layer.has_channel_scales and torch.equal(layer.weight_scale, torch.ones(32))
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), F.linear(x, stored.float(), linear.bias))


def test_fp8_scaled_linear_uses_per_token_and_per_channel_scales(monkeypatch):
    """The _scaled_mm path itself, on the CPU kernel (same call as on CUDA), through FP8Linear."""
    linear = random_linear(128, 64, bias=False)
    x = torch.randn(3, 6, 128) * torch.logspace(-3, 2, 6)[None, :, None]   # tokens of very different size
    x2d = x.reshape(-1, 128)
    small_tokens = {}
    for path in (Fp8Matmul.ROWWISE, Fp8Matmul.TENSORWISE):
        monkeypatch.setattr(fq, "fp8_matmul_for", lambda device, dtype, path=path: path)
        layer = FP8Linear.from_linear(linear, compute_dtype=torch.float32, fp8_activations=True)
        try:
            out = layer(x)
        except RuntimeError as error:
            pytest.skip(f"this torch build has no CPU fp8 _scaled_mm: {error}")
        assert out.shape == (3, 6, 64)
        x_fp8, x_scale = quantize_fp8(x2d, dim=1) if path is Fp8Matmul.ROWWISE else quantize_fp8(x2d)
        expected = F.linear(x_fp8.float() * x_scale, layer.dequantized_weight(torch.float32), layer.bias)
        assert rel_err(out.reshape(-1, 64), expected) < 1e-5
        small_tokens[path] = rel_err(out[:, 0], linear(x)[:, 0])
    # Per-token scales keep the small tokens accurate; one tensor scale pushes them into subnormals.
    assert small_tokens[Fp8Matmul.ROWWISE] < 6e-2 and small_tokens[Fp8Matmul.TENSORWISE] > 0.2


def test_fp8_layer_requires_kernel_shapes():
    with pytest.raises(QuantizationError, match="multiples of 16"):
        FP8Linear(40, 64, fp8_activations=True)
    FP8Linear(40, 64, fp8_activations=False)              # weight-only has no shape rule


@pytest.mark.parametrize("caps, supported", [
    (DeviceCapabilities("cpu"), False),
    (DeviceCapabilities("mps"), False),
    (DeviceCapabilities("cuda", (8, 6)), False),           # Ampere: no FP8 tensor cores
    (DeviceCapabilities("cuda", (8, 9)), True),            # Ada
    (DeviceCapabilities("cuda", (9, 0)), True),            # Hopper
    (DeviceCapabilities("cuda", (12, 0)), True),
    (DeviceCapabilities("cuda", (9, 0), has_scaled_mm=False), False),
    (DeviceCapabilities("cuda", (9, 4), is_rocm=True), False),
])
def test_fp8_matmul_only_on_capable_cuda(caps, supported):
    ok, reason = fp8_matmul_support(caps)
    assert ok is supported
    if not supported:
        assert reason and "available" not in reason


@pytest.mark.parametrize("caps, supported", [
    (DeviceCapabilities("cpu"), False),
    (DeviceCapabilities("cuda", (9, 0)), False),           # Hopper: FP8 only
    (DeviceCapabilities("cuda", (10, 0)), True),           # B200
    (DeviceCapabilities("cuda", (12, 0)), True),           # RTX 50xx
    (DeviceCapabilities("cuda", (10, 0), has_float4=False), False),
    (DeviceCapabilities("cuda", (10, 0), has_scaled_mm=False), False),
])
def test_nvfp4_matmul_only_on_blackwell(caps, supported):
    assert nvfp4_matmul_support(caps)[0] is supported


def test_fp8_kernel_choice_falls_back_step_by_step(monkeypatch, caplog):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(DeviceCapabilities, "of", classmethod(lambda cls, device: cls("cuda", (9, 0))))
    works = {True: False, False: True}                    # rowwise fails, tensor-wise works
    monkeypatch.setattr(fq, "_fp8_self_test", lambda device, dtype, rowwise: works[rowwise])
    assert fq.fp8_matmul_for(cuda, torch.bfloat16) is Fp8Matmul.TENSORWISE
    works[False] = False
    assert fq.fp8_matmul_for(cuda, torch.bfloat16) is Fp8Matmul.TENSORWISE   # decided once per device
    with caplog.at_level(logging.WARNING, logger="seedvr2"):
        assert fq.fp8_matmul_for(torch.device("cuda", 1), torch.bfloat16) is Fp8Matmul.WEIGHT_ONLY
    assert "self-test" in caplog.text
    monkeypatch.setattr(DeviceCapabilities, "of", classmethod(lambda cls, device: cls("cuda", (8, 6))))
    monkeypatch.setattr(fq, "_fp8_self_test", lambda *a, **k: pytest.fail("no kernel may run below 8.9"))
    assert fq.fp8_matmul_for(torch.device("cuda", 2), torch.bfloat16) is Fp8Matmul.WEIGHT_ONLY


# ---------------------------------------------------------------------------------------------- NVFP4
def nearest_e2m1(v: torch.Tensor) -> torch.Tensor:
    """Reference rounding: the closest grid value; of two equally close ones, the one with the even code."""
    grid = torch.tensor(E2M1_VALUES)
    distance = (v.abs().clamp(max=6)[:, None] - grid).abs()
    nearest = distance == distance.min(dim=1, keepdim=True).values
    even = torch.arange(8) % 2 == 0
    tie = nearest.sum(dim=1) > 1
    code = torch.where(tie, (nearest & even).float().argmax(dim=1), nearest.float().argmax(dim=1))
    return code.to(torch.uint8) | torch.signbit(v).to(torch.uint8) << 3


def test_e2m1_rounding_is_nearest_ties_to_even():
    grid = torch.tensor(E2M1_VALUES)
    midpoints = (grid[1:] + grid[:-1]) / 2
    saturating = torch.tensor([6.5, 100.0])
    v = torch.cat([torch.empty(4000).uniform_(-8, 8), grid, -grid, midpoints, -midpoints, saturating])
    assert torch.equal(e2m1_codes(v), nearest_e2m1(v))
    # The tie rule by hand: 0.25 -> 0, 0.75 -> 1.0, 2.5 -> 2, 3.5 -> 4, 5 -> 4.
    assert e2m1_codes(torch.tensor([0.25, 0.75, 2.5, 3.5, 5.0])).tolist() == [0, 2, 4, 6, 6]


def test_pack_fp4_puts_the_first_value_in_the_low_nibble():
    assert pack_fp4(torch.tensor([0b0010, 0b1011], dtype=torch.uint8)).tolist() == [0b10110010]
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    assert torch.equal(unpack_fp4(pack_fp4(codes)), codes)


def test_nvfp4_represents_grid_values_exactly():
    grid = torch.tensor(E2M1_VALUES)
    block = torch.cat([grid, -grid])                       # 16 values: one NVFP4 block, amax 6
    x = torch.stack([block * 2.0**k for k in range(-3, 4)]).repeat(1, 2)   # block scales 2^k: exact in e4m3
    one = torch.ones(())
    packed, block_scale = quantize_nvfp4(x, one)
    assert torch.equal(block_scale.float(), torch.tensor([2.0**k for k in range(-3, 4)])[:, None].expand(7, 2))
    expected_codes = torch.cat([torch.arange(8), torch.arange(8) | 8]).to(torch.uint8).repeat(7, 2)
    assert torch.equal(unpack_fp4(packed), expected_codes)
    assert torch.equal(dequantize_nvfp4(packed, block_scale, one), x)


def test_nvfp4_round_trip_error_bound():
    # Rows spanning three decades: every block scale stays a normal e4m3 number (it has 2^-6 .. 448 of
    # range below the tensor's largest block), which the bound below assumes.
    x = torch.randn(64, 256) * torch.logspace(-1.5, 1.5, 64)[:, None]
    x[5] = 0                                              # an all-zero row stays finite and zero
    tensor_scale = nvfp4_tensor_scale(x)
    packed, block_scale = quantize_nvfp4(x, tensor_scale)
    assert packed.shape == (64, 128) and packed.dtype == torch.uint8
    assert block_scale.shape == (64, 16) and block_scale.dtype == FP8
    restored = dequantize_nvfp4(packed, block_scale, tensor_scale)
    assert torch.equal(restored[5], torch.zeros(256))
    # Per element: at most one step of the scaled e2m1 grid near its top (4 -> 6 is 2, half of it is 1),
    # i.e. one decoded block scale.
    step = (block_scale.float() * tensor_scale).repeat_interleave(16, dim=1)
    assert ((restored - x).abs() <= step * (1 + 1e-6)).all()
    assert rel_err(restored, x) < 0.11                    # Gaussian data: ~0.095


def cublas_tile_layout(scales: torch.Tensor) -> torch.Tensor:
    """The cuBLAS block-scaling-factor layout written out element by element (reference)."""
    rows, cols = scales.shape
    row_tiles, col_tiles = -(-rows // 128), -(-cols // 4)
    out = torch.zeros(row_tiles * col_tiles * 512, dtype=torch.uint8)
    raw = scales.view(torch.uint8)
    for r in range(rows):
        for c in range(cols):
            tile = (r // 128) * col_tiles + c // 4
            outer, inner = r % 128, c % 4
            out[tile * 512 + (outer % 32) * 16 + (outer // 32) * 4 + inner] = raw[r, c]
    return out


def test_swizzle_block_scales_matches_cublas_layout():
    scales = torch.rand(200, 10).mul(100).to(FP8)          # pads to 256 rows, 12 columns
    swizzled = swizzle_block_scales(scales)
    assert swizzled.dtype == FP8 and swizzled.shape == (256 * 12,)
    assert torch.equal(swizzled.view(torch.uint8), cublas_tile_layout(scales))


def unswizzle(flat: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Read ``(rows, cols)`` scales back out of the tiled layout (same formula as the reference above)."""
    col_tiles = -(-cols // 4)
    r = torch.arange(rows)[:, None]
    c = torch.arange(cols)[None, :]
    offset = ((r // 128) * col_tiles + c // 4) * 512 + (r % 128 % 32) * 16 + (r % 128 // 32) * 4 + c % 4
    return flat.view(torch.uint8)[offset].view(FP8)


def emulated_block_scaled_mm(a, b, scale_a, scale_b, bias=None, out_dtype=None):
    """What cuBLAS computes for NVFP4 operands, checking the layout rules torch._scaled_mm enforces."""
    assert a.dtype == b.dtype == torch.float4_e2m1fn_x2 and bias is None
    assert a.stride(1) == 1 and b.stride(0) == 1, "a row-major, b column-major"
    m, k = a.shape[0], a.shape[1] * 2
    n = b.shape[1]
    assert k % 32 == 0 and n % 16 == 0
    assert scale_a.dtype == scale_b.dtype == FP8 and scale_a.dim() == 1
    a_scales = unswizzle(scale_a, m, k // 16)
    b_scales = unswizzle(scale_b, n, k // 16)
    one = torch.ones(())
    a_values = dequantize_nvfp4(a.view(torch.uint8), a_scales, one)
    b_values = dequantize_nvfp4(b.t().view(torch.uint8), b_scales, one)
    return (a_values @ b_values.t()).to(out_dtype)


@pytest.mark.parametrize("scaling", ["tensor_and_block", "block"])
def test_nvfp4_tensor_core_path_with_emulated_kernel(monkeypatch, scaling):
    """The W4A4 forward as it runs on Blackwell, with torch._scaled_mm replaced by an emulation."""
    monkeypatch.setattr(fq, "_scaled_mm", emulated_block_scaled_mm)
    monkeypatch.setattr(fq, "nvfp4_matmul_for", lambda device, dtype: True)
    linear = random_linear(256, 144)                      # 144 rows: the scale tiles need padding
    layer = NVFP4Linear.from_linear(linear, compute_dtype=torch.float32, activation_scaling=scaling)
    x = torch.randn(2, 100, 256)
    out = layer(x)
    assert out.shape == (2, 100, 144)
    x_tensor_scale = nvfp4_tensor_scale(x) if scaling == "tensor_and_block" else torch.ones(())
    x_restored = dequantize_nvfp4(*quantize_nvfp4(x, x_tensor_scale), x_tensor_scale)
    expected = F.linear(x_restored, layer.dequantized_weight(torch.float32), layer.bias)
    assert rel_err(out, expected) < 1e-5
    assert rel_err(out, linear(x)) < 0.2


def test_nvfp4_modes_differ_on_small_activations(monkeypatch):
    monkeypatch.setattr(fq, "_scaled_mm", emulated_block_scaled_mm)
    monkeypatch.setattr(fq, "nvfp4_matmul_for", lambda device, dtype: True)
    linear = random_linear(256, 64, bias=False)
    x = torch.randn(32, 256) * 1e-3                       # every block's amax is below 6·2^-10
    errors = {}
    for scaling in NVFP4Linear.ACTIVATION_SCALINGS:
        layer = NVFP4Linear.from_linear(linear, compute_dtype=torch.float32, activation_scaling=scaling)
        errors[scaling] = rel_err(layer(x), linear(x))
    assert errors["none"] < 0.12                          # weight-only: activations untouched
    assert errors["tensor_and_block"] < 0.2               # the tensor scale rescues small activations
    assert errors["block"] > 0.9                          # block scales alone flush them to zero


def test_fp4_experimental_stores_four_bits_and_needs_no_fallback(caplog):
    model = dit_like()
    reference = dit_like()
    reference.load_state_dict(model.state_dict())
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="seedvr2"):
        report = quantize_linears(model, "fp4_experimental", compute_dtype=torch.float32, device="cpu")
        x = torch.randn(9, 64)
        out = run_block(model, x)
    assert caplog.text == ""
    assert set(model.state_dict()) == set(keys)
    assert sorted(report.layers) == QUANTIZABLE and report.effective_mode == "fp4_experimental"
    layer = model.blocks[0].mlp.vid.proj_in
    assert isinstance(layer, NVFP4Linear) and layer.weight.shape == (256, 32) and layer.weight.dtype == torch.uint8
    assert rel_err(out, run_block(reference, x)) < 0.25


# ---------------------------------------------------------------------------------------- mode switch
def test_quantize_linears_keeps_keys_and_skips_sensitive_layers():
    model = dit_like()
    reference = dit_like()
    reference.load_state_dict(model.state_dict())
    checkpoint = {k: v.clone() for k, v in model.state_dict().items()}
    report = quantize_linears(model, "fp8_e4m3fn", compute_dtype=torch.float32, device="cpu")
    assert set(model.state_dict()) == set(checkpoint)     # same keys: checkpoints still load
    assert sorted(report.layers) == QUANTIZABLE
    assert set(report.skipped) == {"vid_in.proj", "txt_in", "vid_out.proj", "blocks.0.odd"}
    assert "multiple of 16x16" in report.skipped["blocks.0.odd"]
    assert all(isinstance(model.get_submodule(name), FP8Linear) for name in QUANTIZABLE)
    assert type(model.txt_in) is nn.Linear
    # Bytes: float32 weight + bias before; one byte per weight, a float32 scale per row and the bias after.
    shapes = [model.get_submodule(name).weight.shape for name in QUANTIZABLE]
    biases = [model.get_submodule(name).bias is not None for name in QUANTIZABLE]
    before = sum((o * i + o * b) * 4 for (o, i), b in zip(shapes, biases))
    after = sum(o * i + o * 4 + o * b * 4 for (o, i), b in zip(shapes, biases))
    assert (report.bytes_before, report.bytes_after) == (before, after)
    assert report.bytes_saved == before - after and "MiB saved" in report.summary()
    # A full-precision checkpoint loads strictly into the quantized model and is quantized on the way in.
    model.load_state_dict(checkpoint, strict=True)
    x = torch.randn(9, 64)
    assert rel_err(run_block(model, x), run_block(reference, x)) < 6e-2


def meta_copy() -> nn.Module:
    with torch.device("meta"):
        return dit_like()


def fp8_file(model: nn.Module, keep_full_precision: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Linear weights as plain fp8 casts, like the released fp8 checkpoints."""
    return {
        key: value.to(FP8) if value.dim() == 2 and not key.startswith(keep_full_precision) else value.clone()
        for key, value in model.state_dict().items()
    }


def test_prepare_model_for_weights_keeps_fp8_file_weights_in_fp8():
    source = dit_like()
    state = fp8_file(source)
    model = meta_copy()
    report = prepare_model_for_weights(model, {k: v.dtype for k, v in state.items()}, "disabled", torch.float32)
    assert all(f"{name}.weight" in report for name in report.layers) and "txt_in.bias" not in report
    model.load_state_dict(state, strict=True, assign=True)
    for name, module in model.named_modules():
        if isinstance(module, FP8Linear):
            assert not module.fp8_activations
            assert torch.equal(module.weight.view(torch.uint8), state[f"{name}.weight"].view(torch.uint8))
    assert len(report.layers) == 8 and not report.skipped
    # Same result as the fp8 weights upcast to float32 up front.
    expected = dit_like()
    expected.load_state_dict({k: v.float() for k, v in state.items()})
    x = torch.randn(9, 64)
    assert rel_err(run_block(model, x), run_block(expected, x)) < 1e-6
    assert rel_err(model.txt_in(x), expected.txt_in(x)) < 1e-6


def test_prepare_model_for_weights_fp8_mode_on_a_mixed_file():
    source = dit_like()
    state = fp8_file(source, keep_full_precision=("blocks.0.mlp.vid.proj_out",))   # like block 35 of the 7B
    model = meta_copy()
    report = prepare_model_for_weights(model, {k: v.dtype for k, v in state.items()}, "fp8_e4m3fn", torch.float32,
                                       device="cpu")
    model.load_state_dict(state, strict=True, assign=True)
    assert type(model.blocks[0].mlp.vid.proj_out) is nn.Linear
    assert report.skipped["blocks.0.mlp.vid.proj_out"] == "kept in full precision by the file"
    assert model.blocks[0].mlp.vid.proj_in.fp8_activations          # eligible: FP8 matmuls
    assert not model.txt_in.fp8_activations                          # skip pattern: fp8 storage only
    assert not model.blocks[0].odd.fp8_activations                   # 40 inputs: fp8 storage only


def test_prepare_model_for_weights_quantizes_a_full_precision_file_on_load():
    source = dit_like()
    state = {k: v.half() for k, v in source.state_dict().items()}
    model = meta_copy()
    dtypes = {k: v.dtype for k, v in state.items()}
    report = prepare_model_for_weights(model, dtypes, "fp8_e4m3fn", torch.float32, device="cpu")
    assert sorted(report.layers) == QUANTIZABLE and "txt_in.weight" not in report
    model.load_state_dict(state, strict=True, assign=True)
    layer = model.blocks[0].mlp.vid.proj_in
    assert layer.weight.dtype == FP8 and layer.has_channel_scales and layer.bias.dtype == torch.float32


def test_fp4_mode_on_an_fp8_file_requantizes_eligible_layers():
    source = dit_like()
    state = fp8_file(source)
    model = meta_copy()
    prepare_model_for_weights(model, {k: v.dtype for k, v in state.items()}, "fp4_experimental", torch.float32)
    model.load_state_dict(state, strict=True, assign=True)
    assert isinstance(model.blocks[0].mlp.vid.proj_in, NVFP4Linear)
    assert isinstance(model.txt_in, FP8Linear) and not model.txt_in.fp8_activations
    x = torch.randn(9, 64)
    assert rel_err(run_block(model, x), run_block(source, x)) < 0.3


def test_fp4_scaled_falls_back_to_fp8_once_with_a_reason(caplog):
    with caplog.at_level(logging.WARNING, logger="seedvr2"):
        first = quantize_linears(dit_like(), "fp4_scaled", compute_dtype=torch.float32, device="cpu")
        model = dit_like()
        second = quantize_linears(model, "fp4_scaled", compute_dtype=torch.float32, device="cpu")
    assert first.effective_mode == second.effective_mode == "fp8_e4m3fn"
    assert "compute capability >= 10.0" in first.fallback_reason and "cpu" in first.fallback_reason
    assert isinstance(model.blocks[0].mlp.vid.proj_in, FP8Linear)
    messages = [r.getMessage() for r in caplog.records if "fp4_scaled" in r.getMessage()]
    assert len(messages) == 1 and "'fp8_e4m3fn'" in messages[0]


def test_fp4_scaled_on_blackwell_builds_nvfp4_layers(monkeypatch, caplog):
    model = dit_like()
    with monkeypatch.context() as patch:
        patch.setattr(DeviceCapabilities, "of", classmethod(lambda cls, device: cls("cuda", (10, 0))))
        report = quantize_linears(model, "fp4_scaled_fast", compute_dtype=torch.float32)
    assert report.effective_mode == "fp4_scaled_fast" and report.fallback_reason is None
    layer = model.blocks[0].mlp.vid.proj_in
    assert isinstance(layer, NVFP4Linear) and layer.activation_scaling == "block"
    # Run on the CPU after all: the layer dequantizes its weight and says so once.
    x = torch.randn(4, 64)
    with caplog.at_level(logging.WARNING, logger="seedvr2"):
        out = layer(x)
        layer(x)
    torch.testing.assert_close(out, F.linear(x, layer.dequantized_weight(torch.float32), layer.bias))
    assert caplog.text.count("NVFP4 matmul is not used on cpu") == 1


@pytest.mark.parametrize("mode, message", [
    ("gguf", "select a .gguf model"),
    ("int8", "must be one of disabled, fp8_e4m3fn"),
])
def test_bad_modes_are_rejected_with_advice(mode, message):
    with pytest.raises(QuantizationError, match=message):
        quantize_linears(dit_like(), mode, compute_dtype=torch.bfloat16)
    with pytest.raises(QuantizationError, match="compute_dtype"):
        quantize_linears(dit_like(), "fp8_e4m3fn", compute_dtype=torch.float64)


def test_documented_mlp_errors_hold():
    """The error table in the module docstring, for the paths that run on the CPU as they do on GPUs."""
    generator = torch.Generator().manual_seed(0)
    w1 = torch.randn(1024, 256, generator=generator) / 16
    w2 = torch.randn(256, 1024, generator=generator) / 32
    x = torch.randn(512, 256, generator=generator)
    reference = F.linear(F.gelu(F.linear(x, w1), approximate="tanh"), w2)

    def mlp_error(make) -> float:
        first, second = make(w1), make(w2)
        return rel_err(second(F.gelu(first(x), approximate="tanh")), reference)

    def fp8_weight_only(w):
        layer = FP8Linear(w.shape[1], w.shape[0], bias=False, compute_dtype=torch.float32, fp8_activations=False)
        layer.load_state_dict({"weight": w})
        return layer

    def nvfp4_weight_only(w):
        layer = NVFP4Linear(w.shape[1], w.shape[0], bias=False, compute_dtype=torch.float32,
                            activation_scaling="none")
        layer.load_state_dict({"weight": w})
        return layer

    assert mlp_error(fp8_weight_only) == pytest.approx(3.8e-2, rel=0.05)
    assert mlp_error(nvfp4_weight_only) == pytest.approx(1.4e-1, rel=0.05)


def test_the_seed_module_name_is_an_entry_point_to_the_same_layers():
    from src.optimization import fp4_quantization, linear_quantization

    for name in ("QUANTIZATION_MODES", "FP8Linear", "NVFP4Linear", "quantize_linears", "prepare_model_for_weights"):
        assert getattr(fp4_quantization, name) is getattr(linear_quantization, name), name
