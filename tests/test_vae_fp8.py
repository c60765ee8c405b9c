"""The VAE's fp8 quantization (optimization/vae_fp8.py) against an independent fake-quantized plain model.

What ``quantization="fp8_e4m3fn"`` promises: every resnet convolution multiplies e4m3 operands — its input
``SiLU(GroupNorm(.))`` divided by a static per-channel scale ``s_c = (|gamma_c|·64 + |beta_c|) / 448`` and
saturated at 448, its weight times ``s_c`` quantized per output channel by amax / 448 — and nothing else
changes.  The expectation is built here from that definition alone: the plain model, its resnet convolutions'
inputs and weights rounded to e4m3 by forward hooks.  On CPU in float32 each resnet block of the optimized
fp8 path (widened operands), streamed in one-frame pieces (so every look-back frame is kept in e4m3), must
equal its fake-quantized block up to summation order; and on a GPU with fp8 tensor cores, the Triton kernel must equal the widened
route.  The decoder's upsampler convolutions are quantized too, with a scale per call from a bound on the
1x1 conv's outputs (``|y_o| <= Σ_c |W_oc|·max|x_c| + |b_o|``, mapped to 448 / 1.02): each upsampler, streamed
one input frame at a time, must equal its fake-quantized form, and the worst case the bound allows must
store finite values.  Plus: the GroupNorm's e4m3 output and saturation, the settings' validation and the
node's input, the one-time fallback after a kernel failure.
"""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from conftest import golden_path, rel_err

from src.models.load import load_vae
from src.models.video_vae_v3 import VideoAutoencoder
from src.models.video_vae_v3.resampling import Upsampler3D, pixel_shuffle_3d
from src.models.video_vae_v3.resnet import ResnetBlock3D
from src.models.video_vae_v3.temporal_slicing import CausalMemory
from src.optimization import vae_fp8
from src.optimization.vae_executor.conv import lean_conv
from src.optimization.vae_executor.resampling import lean_upsample
from src.optimization.vae_executor.resnet import lean_resnet
from src.optimization.vae_optimizer import VAERuntime, normalize_into, optimize_vae, runtime_of
from src.pipeline.settings import SettingsError, VAESpec

pytestmark = pytest.mark.usefixtures("single_thread")

E4M3 = torch.float8_e4m3fn
# Same operands, summation order only.  A float32 difference of ~1e-7 between the two GroupNorms can move a
# value across an e4m3 rounding boundary now and then, changing it by one e4m3 step: a few in 1e5 elements.
EXACT = 1e-4
BF16_STEP = 2.0**-7


def _e4m3(values: torch.Tensor) -> torch.Tensor:
    """``values`` rounded to e4m3 (saturating), back in float32."""
    return values.float().clamp(-448, 448).to(E4M3).float()


def _fed_by_group_norm(model: VideoAutoencoder) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """(convolution, the GroupNorm before it) for every convolution whose input is SiLU(GroupNorm(.))."""
    pairs = [(coder.conv_out, coder.conv_norm_out) for coder in (model.encoder, model.decoder)]
    for block in _resnets(model):
        pairs += [(block.conv1, block.norm1), (block.conv2, block.norm2)]
    return pairs


def _fake_quantized_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` rounded to e4m3 per output channel (scale = amax / 448), back in float32."""
    weight_scale = weight.abs().amax(dim=(1, 2, 3, 4), keepdim=True) / 448
    return _e4m3(weight / weight_scale) * weight_scale


def _fake_quantize(model: VideoAutoencoder) -> VideoAutoencoder:
    """The plain ``model`` with each GroupNorm-fed convolution computing on e4m3-rounded operands, by the
    definition."""
    for conv, norm in _fed_by_group_norm(model):
        scale = (norm.weight.abs() * 64 + norm.bias.abs()) / 448  # per input channel
        multiplier = 1.0 / scale  # what the GroupNorm multiplies by (a product, as the kernels compute it)
        with torch.no_grad():  # acts on stored input values
            conv.weight.copy_(_fake_quantized_weight(conv.weight.detach() * scale.view(1, -1, 1, 1, 1)))
        conv.register_forward_pre_hook(
            lambda module, args, m=multiplier: (_e4m3(args[0] * m.view(1, -1, 1, 1, 1)), *args[1:]))
    return model


def _upsampler_scale(upsampler: Upsampler3D, inputs: torch.Tensor) -> torch.Tensor:
    """The definition: the bound on the 1x1 conv's outputs over ``inputs``, mapped to 448 / 1.02."""
    largest = inputs.abs().amax(dim=(0, 2, 3, 4))
    bound = upsampler.upscale_conv.weight.flatten(1).abs() @ largest + upsampler.upscale_conv.bias.abs()
    return bound.max() * 1.02 / 448


def _fake_quantized_upsampler(upsampler: Upsampler3D, x: torch.Tensor) -> torch.Tensor:
    """The plain upsampler on ``x`` (B, C, T, h, w) as it runs one input frame per call: call j convolves its
    output frames with their look-back (both from input frames j - 2/time_factor .. j, the first frame
    repeated before the clip) rounded to e4m3 at the call's scale, by e4m3-rounded weights."""
    factor = upsampler.time_factor
    shuffled = pixel_shuffle_3d(upsampler.upscale_conv(x), factor)
    if factor == 2:
        shuffled = torch.cat([shuffled[:, :, :1], shuffled[:, :, 2:]], dim=2)
    padded = torch.cat([shuffled[:, :, :1], shuffled[:, :, :1], shuffled], dim=2)  # causal look-back
    extended = torch.cat([x[:, :, :1], x[:, :, :1], x], dim=2)  # the input frames behind those
    weight = _fake_quantized_weight(upsampler.conv.weight.detach())
    outputs = []
    for j in range(x.shape[2]):
        first = factor * j - (1 if factor == 2 and j > 0 else 0)  # call j's first output frame
        count = 1 if j == 0 else factor
        window = padded[:, :, first:first + 2 + count]
        scale = _upsampler_scale(upsampler, extended[:, :, j + 2 - 2 // factor:j + 3])
        stored = _e4m3(window / scale)
        assert stored.abs().max() <= 448 and not stored.isnan().any()
        outputs.append(torch.nn.functional.conv3d(stored * scale, weight, upsampler.conv.bias, padding=(0, 1, 1)))
    return torch.cat(outputs, dim=2)


def _golden() -> VideoAutoencoder:
    return load_vae(golden_path("vae_weights.safetensors"))


def _latent(frames: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + 1)
    return torch.randn(1, 16, frames, 5, 7, generator=generator)


def _resnets(model: VideoAutoencoder) -> list[ResnetBlock3D]:
    return [block for block in model.modules() if isinstance(block, ResnetBlock3D)]


@pytest.fixture(scope="module")
def models() -> tuple[VideoAutoencoder, VideoAutoencoder]:
    """(the fake-quantized plain golden VAE, the golden VAE on the optimized path with fp8 convolutions)."""
    quantized = _golden()
    report = optimize_vae(quantized, quantization="fp8_e4m3fn")
    assert report.quantization == "fp8_e4m3fn" and "fp8" in report.summary()
    return _fake_quantize(_golden()), quantized


@pytest.mark.parametrize("index", [0, 3, 6, 10, 13], ids=lambda i: f"resnet{i}")
def test_resnet_block_equals_the_fake_quantized_block(models, index):
    # Block by block, on the same input: the whole model amplifies the rare one-step rounding differences
    # (quantizing is discontinuous), the block shows the arithmetic.  The fp8 block runs in one-frame pieces, so
    # each convolution's look-back comes from the e4m3 frames it kept; the reference sees the clip at once.
    reference, quantized = (_resnets(model)[index] for model in models)
    channels = reference.conv1.in_channels
    generator = torch.Generator().manual_seed(index)
    x = torch.randn(1, channels, 5, 10, 14, generator=generator) * 2 + 0.5
    expected = reference(x)
    memory = CausalMemory()
    pieces = [lean_resnet(quantized, piece, memory, runtime_of(models[1])) for piece in x.split(1, dim=2)]
    assert rel_err(torch.cat(pieces, dim=2), expected) <= EXACT


def test_quantization_is_not_the_plain_model_but_close(models):
    # The rounding must actually happen (a path that ignored it would pass the test above only if the
    # reference were broken too), and stay within what e4m3 operands give on this random-weight model.
    quantized, plain = models[1], _golden()
    z = _latent(2, seed=5)
    error = rel_err(quantized.decode(z), plain.decode(z))
    assert 1e-3 < error < 0.2


def _upsamplers(model: VideoAutoencoder) -> list[Upsampler3D]:
    return [block for block in model.modules() if isinstance(block, Upsampler3D)]


def test_group_norm_fed_and_upsampler_convolutions_are_quantized():
    model = _golden()
    optimize_vae(model, quantization="fp8_e4m3fn")
    fed = {conv for conv, _ in _fed_by_group_norm(model)}
    upsampling = {upsampler.conv for upsampler in _upsamplers(model)}
    assert len(fed) == 2 + 2 * len(_resnets(model)) and len(upsampling) == 3
    runtime = runtime_of(model)
    assert set(runtime.fp8.convs) == fed | upsampling
    for conv in upsampling:  # scaled per call, not by a GroupNorm
        assert runtime.input_multiplier(conv) is None and runtime.fp8.convs[conv].bound is not None
    for conv in (model.decoder.conv_in, model.encoder.conv_in):
        assert runtime.input_multiplier(conv) is None and conv not in runtime.fp8.convs


@pytest.mark.parametrize("gemm", [False, True], ids=["bands", "gemm"])
@pytest.mark.parametrize("index", [0, 1, 2], ids=lambda i: f"upsampler{i}")
def test_upsampler_equals_the_fake_quantized_upsampler(index, gemm):
    # One input frame per call: every call after the first recomputes its look-back from kept inputs and takes a
    # scale of its own.  The two routes of the 1x1 conv + shuffle: bands of rows (contiguous layout) and the
    # GEMMs writing through a staging band (channels-last).
    reference = _upsamplers(_golden())[index]
    model = _golden()
    optimize_vae(model, quantization="fp8_e4m3fn", channels_last=gemm)
    upsampler = _upsamplers(model)[index]
    channels = upsampler.conv.in_channels
    x = torch.randn(1, channels, 4, 6, 5, generator=torch.Generator().manual_seed(index)) * 2 + 0.5
    x[0, 1, 2] *= 30  # a frame with an outlying channel: its call's scale is larger than the others'
    with torch.no_grad():
        expected = _fake_quantized_upsampler(reference, x)
        memory = CausalMemory()
        runtime = runtime_of(model)
        pieces = [lean_upsample(upsampler, piece.contiguous(memory_format=runtime.memory_format), memory, runtime)
                  for piece in x.split(1, dim=2)]
    assert rel_err(torch.cat(pieces, dim=2), expected) <= EXACT


@pytest.mark.parametrize("gemm", [False, True], ids=["bands", "gemm"])
def test_the_worst_case_of_the_bound_stores_finite_values(gemm):
    # Inputs at their channels' largest magnitudes with the signs of one output channel's weights reach that
    # channel's bound exactly: stored, it must round to 448 (e4m3's largest), not overflow into NaN.
    torch.manual_seed(0)
    upsampler = Upsampler3D(8, temporal=False)
    with torch.no_grad():
        upsampler.upscale_conv.bias.abs_()
    bound = vae_fp8.ShuffleBound.of(upsampler.upscale_conv)
    x = torch.randn(1, 8, 2, 3, 4)
    largest = x.abs().amax(dim=(0, 2, 3, 4))
    sums = bound.abs_weight @ largest + bound.abs_bias
    extreme = int(sums.argmax())
    x[0, :, 1, 2, 3] = largest * upsampler.upscale_conv.weight[extreme].flatten().sign()
    runtime = VAERuntime(channels_last=gemm, pad_channels=False, compile_norm=False, cudnn_direct=False,
                         cudnn_benchmark=False, piece_bytes=1 << 30, shuffle_gemm=gemm,
                         fp8=vae_fp8.Fp8Convolutions({upsampler.conv: vae_fp8.prepare_upsampler(upsampler)},
                                                     torch.device("cpu"), triton_wanted=False))
    x = x.contiguous(memory_format=runtime.memory_format)
    scale = runtime.upsampler_input_scale(upsampler.conv, [x])
    torch.testing.assert_close(scale, (sums.max() * 1.02 / 448).reshape(1))
    out = runtime.empty((1, 8, 2, 6, 8), x, torch.float8_e4m3fn)
    with torch.no_grad():
        runtime.upscale_shuffle_into(x, upsampler.upscale_conv, 1, out, drop_first_copy=False, out_scale=1 / scale)
        expected = pixel_shuffle_3d(upsampler.upscale_conv(x), 1)
    stored = out.float()
    assert not stored.isnan().any() and stored.abs().max() == 448
    # Everything else is the shuffled output in e4m3 at that scale (up to one rounding step).
    assert ((stored * scale - expected).abs() <= expected.abs() * 2.0**-4 + scale * 2.0**-9).all()


@pytest.mark.parametrize("coder", ["encoder", "decoder"])
def test_conv_out_equals_the_fake_quantized_one(models, coder):
    # The last GroupNorm and conv_out (3 output channels when decoding), streamed in one-frame pieces.
    reference, quantized = (getattr(model, coder) for model in models)
    channels = reference.conv_out.in_channels
    x = torch.randn(1, channels, 5, 10, 14, generator=torch.Generator().manual_seed(2)) * 2 + 0.5
    expected = reference.conv_out(torch.nn.functional.silu(reference.conv_norm_out(x)))
    memory = CausalMemory()
    pieces = [lean_conv(quantized.conv_out, piece, memory, runtime_of(models[1]), norm=quantized.conv_norm_out)
              for piece in x.split(1, dim=2)]
    assert rel_err(torch.cat(pieces, dim=2), expected) <= EXACT


def test_prepared_weights_follow_the_definition():
    conv = torch.nn.Conv3d(8, 4, 3, padding=(0, 1, 1))
    norm = torch.nn.GroupNorm(2, 8)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-2, 3, 8))
        norm.bias.copy_(torch.linspace(1, -1, 8))
        norm.weight[3] = norm.bias[3] = 0  # a dead channel: any positive scale
    prepared = vae_fp8.prepare(conv, norm)
    scale = ((norm.weight.abs() * 64 + norm.bias.abs()) / 448).clamp_min(vae_fp8.MIN_SCALE)
    torch.testing.assert_close(prepared.input_multiplier, 1 / scale)
    assert prepared.matrix.dtype == E4M3 and prepared.matrix.shape == (4, 27 * 8)
    # Every output channel's largest weight lands on 448 exactly.
    assert torch.equal(prepared.matrix.float().abs().amax(dim=1), torch.full((4,), 448.0))
    # The dequantized weight acts on stored values x / s: times 1 / s it is the weight, within e4m3 rounding.
    restored = prepared.dequantized_weight(torch.float32) / scale.view(1, -1, 1, 1, 1)
    bound = 2.0**-4 * conv.weight.abs() + prepared.weight_scale.view(-1, 1, 1, 1, 1) * 2.0**-10 / scale.view(
        1, -1, 1, 1, 1)
    assert ((restored - conv.weight).abs() <= bound + 1e-12).all()


def test_group_norm_stores_scaled_saturated_e4m3():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, 3, 4, 5, generator=generator)
    x[0, 0, 1, 2, 3] = 1e4  # an outlier far beyond INPUT_RANGE deviations
    weight, bias = torch.rand(8, generator=generator) + 0.5, torch.randn(8, generator=generator)
    multiplier = torch.rand(8, generator=generator) * 100 + 1
    wide = torch.empty_like(x)
    normalize_into(x, weight, bias, wide, 2, 1e-6, True)
    stored = torch.empty_like(x, dtype=E4M3)
    normalize_into(x, weight, bias, stored, 2, 1e-6, True, None, multiplier)
    expected = _e4m3(wide * multiplier.view(1, -1, 1, 1, 1))
    assert torch.equal(stored.float(), expected)
    assert stored.float().abs().max() == 448 and not stored.float().isnan().any()


def test_settings_reject_unknown_modes_and_fp8_without_optimizations():
    with pytest.raises(SettingsError, match="one of"):
        VAESpec(model="vae", quantization="int4")
    with pytest.raises(SettingsError, match="enable_optimizations"):
        VAESpec(model="vae", quantization="fp8_e4m3fn", enable_optimizations=False)
    with pytest.raises(vae_fp8.VAEQuantizationError):
        optimize_vae(_golden(), quantization="fp16")


def test_a_failing_kernel_falls_back_once(monkeypatch, caplog):
    model = _golden()
    optimize_vae(model, piece_bytes=1, quantization="fp8_e4m3fn")
    expected = model.decode(_latent(2))
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no kernel image for this device")

    fake = SimpleNamespace(usable_tiles=lambda *args: [object()], conv3d_causal=broken)
    monkeypatch.setattr(vae_fp8.importlib, "import_module", lambda *args: fake)
    runtime_of(model).fp8.kernel_failure = None  # pretend the kernel can run here
    with caplog.at_level(logging.WARNING):
        out = model.decode(_latent(2))
    assert calls == [1] and rel_err(out, expected) <= 1e-6
    assert [r for r in caplog.records if "fp8 VAE convolutions" in r.getMessage()].__len__() == 1
    assert "failed" in runtime_of(model).fp8.route


def test_route_says_why_the_kernel_is_not_used():
    model = _golden()
    report = optimize_vae(model, quantization="fp8_e4m3fn")
    assert "cpu has no fp8 tensor cores" in report.fp8_route


# --------------------------------------------------------------------------------------------- GPU only


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="the Triton fp8 route needs a GPU with fp8 tensor cores (compute capability 8.9+)")
@pytest.mark.parametrize("channels, out_channels, upsampler", [
    (128, 128, False), (256, 128, False), (128, 3, False), (256, 256, True), (512, 512, True)])
def test_triton_route_equals_the_widened_route_on_the_gpu(channels, out_channels, upsampler):
    # One convolution on the same e4m3 input (a whole model would amplify the rare rounding differences); an
    # upsampler's with a per-call input scale.
    pytest.importorskip("triton")
    generator = torch.Generator().manual_seed(channels + out_channels)
    if upsampler:
        module = Upsampler3D(channels, temporal=False).to("cuda", torch.bfloat16)
        conv, prepared = module.conv, vae_fp8.prepare_upsampler(module)
        input_scale = torch.tensor([0.37], device="cuda")
    else:
        conv = torch.nn.Conv3d(channels, out_channels, 3, padding=(0, 1, 1)).to("cuda", torch.bfloat16)
        norm = torch.nn.GroupNorm(32, channels).to("cuda", torch.bfloat16)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 2.0), norm.bias.uniform_(-0.5, 0.5)
        prepared, input_scale = vae_fp8.prepare(conv, norm), None
    convolutions = vae_fp8.Fp8Convolutions({conv: prepared}, torch.device("cuda"), triton_wanted=True)
    x = (torch.randn(1, channels, 2 + 3, 20, 36, generator=generator) * 20).clamp(-448, 448)
    x = x.to("cuda", torch.float8_e4m3fn).contiguous(memory_format=torch.channels_last_3d)
    widen = lambda x, weight, bias, stride, padding: torch.nn.functional.conv3d(  # noqa: E731
        x.float(), weight.float(), None if bias is None else bias.float(), stride, padding)
    fast = convolutions.convolve(x, conv, conv.bias, torch.bfloat16, widen, input_scale)
    assert convolutions.kernel_failure is None and fast.dtype == torch.bfloat16
    convolutions.kernel_failure = "switched off by the test"
    widened = convolutions.convolve(x, conv, conv.bias, torch.float32, widen, input_scale)
    # The tensor cores add the fp8 products in fewer bits over K; the output is rounded to bf16 once.
    assert rel_err(fast, widened) <= 2 * BF16_STEP


def test_the_settings_offer_exactly_the_modes_the_vae_takes():
    from src.options import VAE_QUANTIZATIONS

    assert VAE_QUANTIZATIONS == vae_fp8.MODES
