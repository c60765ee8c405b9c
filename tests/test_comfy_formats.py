"""ComfyUI's SeedVR2 file layouts (Comfy-Org/SeedVR2): fp16, fp8_e4m3fn, int8_convrot, mxfp8, nvfp4.

Tiny files in each layout are written from the golden weights by ``tools/comfy_quantize.py`` (encoders
written from the documented formats, independently of the pack's decoders), loaded strictly through
``load_dit`` and run on the golden DiT cases.  Two comparisons per file: against the weights the encoder
actually stored (a correct decoder reproduces them: float32 rounding only), and against the golden
float32 outputs (the format's own error, stated in docs/model-files.md).
"""
from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from conftest import golden_cases, load_golden, rel_err
from src.models import quant_formats as qf
from src.models.checkpoint import CheckpointError, read_index
from src.models.dit import NaDiT
from src.optimization.quantized_load import load_dit
from src.optimization import comfy_quant
from src.pipeline import text_embeddings as te
from tools import comfy_quantize as tool

CASES = ("odd", "packed2")
# Largest relative error against the golden float32 outputs over all five golden cases, 3B and 7B,
# measured on the CPU (docs/model-files.md); the bounds leave ~1.5x room.
GOLDEN_BOUND = {"fp16": 1e-3, "fp8_e4m3fn": 3e-2, "int8_convrot": 7e-3, "mxfp8": 3e-2, "nvfp4": 1e-1}
DECODE_BOUND = 1e-6      # against the encoder's own stored values: float32 arithmetic only


@pytest.fixture(scope="module")
def embeddings():
    emb = load_golden("text_embeddings.safetensors")
    return emb["pos"], emb["neg"]


def _write(tmp_path, variant, fmt, embeddings, **kwargs):
    tensors, reference = tool.convert(load_golden(f"dit{variant}_weights.safetensors"), fmt,
                                      conditioning=embeddings, **kwargs)
    path = tmp_path / f"seedvr2_{variant}_{fmt}.safetensors"
    save_file(tensors, str(path))
    return path, tensors, reference


def _run(model, case):
    with torch.no_grad():
        return model(case["vid"], case["txt"], case["vid_shape"], case["txt_shape"], case["timestep"])


def _reference_model(model, reference):
    """The same architecture holding exactly the values the encoder stored (in float32)."""
    ref = NaDiT(model.config)
    state = {k: v.float() for k, v in reference.items() if k in ref.state_dict()}
    ref.load_state_dict({**ref.state_dict(), **state}, strict=True)
    return ref.eval()


@pytest.mark.parametrize("variant", ["3b", "7b"])
@pytest.mark.parametrize("fmt", tool.FORMATS)
def test_comfy_layout_loads_strictly_and_matches(tmp_path, embeddings, variant, fmt):
    path, tensors, reference = _write(tmp_path, variant, fmt, embeddings)
    index = read_index(path)
    if fmt != "fp16":
        assert index.quantized and all(q.stored is not None for q in index.quantized.values())
        assert not any(k.endswith((".comfy_quant", ".weight_scale", ".weight_scale_2")) for k in index.tensors)
    assert set(index.extras) == {"positive", "negative"}
    model = load_dit(path)
    assert set(model.file_conditioning) == {"positive", "negative"}
    ref_model = _reference_model(model, reference)
    cases = golden_cases(f"dit{variant}_cases.safetensors")
    for name in CASES:
        case = cases[name]
        out = _run(model, case)
        assert rel_err(out, _run(ref_model, case)) <= DECODE_BOUND
        assert rel_err(out, case.get("out_per_sample", case["out"])) <= GOLDEN_BOUND[fmt]


def test_mixed_block_file_keeps_the_named_block_in_16_bit(tmp_path, embeddings):
    path, tensors, _ = _write(tmp_path, "7b", "nvfp4", embeddings, keep_blocks=(3,))
    index = read_index(path)
    assert not any(k.startswith("blocks.3.") for k in index.quantized)
    assert any(k.startswith("blocks.2.") for k in index.quantized)
    case = golden_cases("dit7b_cases.safetensors")["odd"]
    assert rel_err(_run(load_dit(path), case), case["out"]) <= GOLDEN_BOUND["nvfp4"]


def test_dequantization_is_logged_once_per_load(tmp_path, embeddings, caplog):
    path, _, _ = _write(tmp_path, "3b", "int8_convrot", embeddings)
    with caplog.at_level(logging.INFO, logger="seedvr2"):
        load_dit(path, dtype=torch.bfloat16)
    lines = [r.getMessage() for r in caplog.records if "dequantized once at load" in r.getMessage()]
    assert len(lines) == 1 and "to bfloat16" in lines[0] and "int8_convrot" in lines[0]


# --------------------------------------------------------------------------------- decoders, by hand
def test_nvfp4_high_nibble_is_the_even_element_and_scales_are_untiled():
    # Row 33, scale column 1 of a 48x32 weight: offset (33 % 32)·16 + (33 // 32)·4 + 1 = 21 in tile (0, 0).
    packed = torch.zeros(48, 16, dtype=torch.uint8)
    packed[33, 8] = 0x2F                       # inputs 16 and 17 of row 33: codes 2 (1.0) and 15 (-6.0)
    tiled = torch.zeros(128, 4, dtype=torch.uint8)
    tiled.view(-1)[21] = torch.tensor(2.0).to(torch.float8_e4m3fn).view(torch.uint8)
    q = qf.QuantizedWeight("l", "nvfp4", {"format": "nvfp4"}, packed,
                           {"weight_scale": tiled.view(torch.float8_e4m3fn), "weight_scale_2": torch.tensor(0.5)},
                           torch.Size((48, 32)))
    w = q.dequantize()
    assert w[33, 16] == 1.0 and w[33, 17] == -6.0       # value · 2.0 · 0.5
    assert torch.count_nonzero(w) == 2


def test_mxfp8_scales_are_powers_of_two_by_byte():
    assert qf.e8m0_values(torch.tensor([127, 130, 120, 0], dtype=torch.uint8)).tolist() == [1.0, 8.0, 2 ** -7, 0.0]


def test_hadamard_is_the_symmetric_orthogonal_convrot_matrix():
    h4 = torch.tensor([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=torch.float64) / 2
    assert torch.equal(qf.hadamard(4, torch.float64), h4)
    h = qf.hadamard(64, torch.float64)
    assert torch.equal(h, h.T) and torch.allclose(h @ h, torch.eye(64, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(h, tool.hadamard_rows(64), atol=1e-12)


def test_int8_convrot_error_is_within_half_a_step_per_row():
    torch.manual_seed(0)
    w = torch.randn(24, 512, dtype=torch.float64)
    tensors, _ = tool.encode_int8_convrot(w, 256)
    q = qf.QuantizedWeight("l", "int8_tensorwise", {"format": "int8_tensorwise", "convrot": True,
                                                    "convrot_groupsize": 256},
                           tensors["weight"], {"weight_scale": tensors["weight_scale"]}, torch.Size(w.shape))
    err = (q.dequantize(torch.float64) - w).norm(dim=1)
    # Rounding moves each rotated value by at most half a step; the rotation keeps a row's L2 norm.
    assert (err <= tensors["weight_scale"].double().reshape(-1) * 0.5 * 512 ** 0.5 * 1.0001).all()


@pytest.mark.parametrize("fmt, encode", [("nvfp4", tool.encode_nvfp4), ("mxfp8", tool.encode_mxfp8)])
def test_padded_block_formats_decode_to_the_logical_shape(fmt, encode):
    torch.manual_seed(1)
    w = torch.randn(70, 132, dtype=torch.float64)          # neither dimension a multiple of 16 or 32
    tensors, reference = encode(w)
    scales = {k: v for k, v in tensors.items() if k != "weight"}
    q = qf.QuantizedWeight("l", fmt, {"format": fmt}, tensors["weight"], scales, torch.Size(w.shape))
    assert torch.allclose(q.dequantize(torch.float64), reference, rtol=1e-6, atol=1e-9)   # float32 decode
    assert qf.logical_shape_matches({"format": fmt}, tuple(tensors["weight"].shape), (70, 132))


# ------------------------------------------------------------------------------------- the layers
def test_int8_layer_matches_its_dequantized_weight(monkeypatch):
    torch.manual_seed(2)
    w, x = torch.randn(48, 256) / 16, torch.randn(3, 40, 256)
    tensors, _ = tool.encode_int8_convrot(w.double(), 64)
    q = qf.QuantizedWeight("l", "int8_tensorwise", {"format": "int8_tensorwise", "convrot": True,
                                                    "convrot_groupsize": 64},
                           tensors["weight"], {"weight_scale": tensors["weight_scale"]}, torch.Size(w.shape))
    layer = comfy_quant.Int8Linear(256, 48, True, 64, compute_dtype=torch.float32)
    bias = torch.randn(48)
    layer.load_state_dict({"weight": q, "bias": bias}, assign=True)
    expected = torch.nn.functional.linear(x, q.dequantize(), bias)
    out = layer(x)
    # Only the per-row int8 rounding of the (rotated) activations differs: measured 4.7e-3.
    assert rel_err(out, expected) < 8e-3
    codes, scale = comfy_quant.quantize_rows_int8(qf.rotate_groups(x.reshape(-1, 256), 64))
    exact = (codes.double() @ tensors["weight"].double().T) * scale.double() * tensors["weight_scale"].double().T
    assert torch.allclose(out.reshape(-1, 48).double() - bias.double(), exact, atol=1e-4)
    assert layer(x[:, :3]).shape == (3, 3, 48)               # few rows are padded for cuBLASLt


def test_int8_layer_falls_back_once_when_the_int8_gemm_fails(monkeypatch, caplog):
    torch.manual_seed(5)
    w, x = torch.randn(32, 64) / 8, torch.randn(20, 64)
    tensors, reference = tool.encode_int8_convrot(w.double(), 64)
    q = qf.QuantizedWeight("l", "int8_tensorwise", {"format": "int8_tensorwise", "convrot": True,
                                                    "convrot_groupsize": 64},
                           tensors["weight"], {"weight_scale": tensors["weight_scale"]}, torch.Size(w.shape))
    layer = comfy_quant.Int8Linear(64, 32, False, 64, compute_dtype=torch.float32)
    layer.load_state_dict({"weight": q}, assign=True)

    def broken(*args):
        raise RuntimeError("no int8 GEMM here")

    monkeypatch.setattr(torch, "_int_mm", broken)
    with caplog.at_level(logging.WARNING, logger="seedvr2"):
        out = layer(x)
        layer(x)
    assert torch.allclose(out, x @ reference.float().T, atol=1e-5)
    assert sum("int8 matmul failed" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="int8 GEMMs (torch._int_mm) are checked on a CUDA GPU")
def test_int8_layer_on_the_gpu_matches_its_dequantized_weight():
    torch.manual_seed(6)
    w, x = torch.randn(256, 512) / 22, torch.randn(300, 512)
    tensors, reference = tool.encode_int8_convrot(w.double(), 256)
    q = qf.QuantizedWeight("l", "int8_tensorwise", {"format": "int8_tensorwise", "convrot": True,
                                                    "convrot_groupsize": 256},
                           tensors["weight"], {"weight_scale": tensors["weight_scale"]}, torch.Size(w.shape))
    layer = comfy_quant.Int8Linear(512, 256, False, 256, compute_dtype=torch.bfloat16, device="cuda")
    layer.load_state_dict({"weight": q.to("cuda")}, assign=True)
    out = layer(x.cuda().bfloat16()).float().cpu()
    assert not layer._int_mm_failed
    assert rel_err(out, x @ reference.float().T) < 1.5e-2   # int8 activations + bf16 output


def test_int8_matmul_switch_is_off_by_default_and_needs_cuda(monkeypatch):
    monkeypatch.delenv(comfy_quant.INT8_SWITCH, raising=False)
    assert comfy_quant.int8_matmul_support("cpu") == (False, "int8 matmuls are off (SEEDVR2_INT8_MATMUL=1 turns them on)")
    monkeypatch.setenv(comfy_quant.INT8_SWITCH, "1")
    usable, why = comfy_quant.int8_matmul_support("cpu")
    assert not usable and "CUDA" in why


def test_nvfp4_weights_convert_to_the_fp4_layer_without_requantizing():
    torch.manual_seed(3)
    w, x = torch.randn(32, 64), torch.randn(5, 64)
    tensors, reference = tool.encode_nvfp4(w.double())
    scales = {k: v for k, v in tensors.items() if k != "weight"}
    q = qf.QuantizedWeight("l", "nvfp4", {"format": "nvfp4"}, tensors["weight"], scales, torch.Size(w.shape))
    layer = comfy_quant.ComfyNVFP4Linear(64, 32, False, compute_dtype=torch.float32, activation_scaling="none")
    layer.load_state_dict({"weight": q}, assign=True)
    assert torch.allclose(layer.dequantized_weight(torch.float64), reference, atol=1e-12)
    assert torch.allclose(layer(x), x @ reference.float().T, atol=1e-5)


def test_fp8_layer_honours_the_file_scale():
    torch.manual_seed(4)
    w = torch.randn(32, 64) * 0.01
    tensors, reference = tool.encode_fp8(w.double())
    q = qf.QuantizedWeight("l", "float8_e4m3fn", {"format": "float8_e4m3fn"}, tensors["weight"],
                           {"weight_scale": tensors["weight_scale"]}, torch.Size(w.shape))
    layer = comfy_quant.ScaledFP8Linear(64, 32, False, compute_dtype=torch.float32, fp8_activations=False)
    layer.load_state_dict({"weight": q}, assign=True)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.has_channel_scales
    assert torch.allclose(layer.dequantized_weight(torch.float64), reference, atol=1e-12)


# --------------------------------------------------------------------------------------- bad files
def _tamper(tmp_path, embeddings, fmt, edit):
    tensors, _ = tool.convert(load_golden("dit3b_weights.safetensors"), fmt, conditioning=embeddings)
    edit(tensors)
    path = tmp_path / "tampered.safetensors"
    save_file(tensors, str(path))
    return path


LAYER = "blocks.1.mlp.vid.proj_in"


@pytest.mark.parametrize("fmt, edit, message", [
    ("nvfp4", lambda t: t.__setitem__(f"{LAYER}.comfy_quant", torch.tensor(list(b'{"format": nvfp4'), dtype=torch.uint8)),
     "does not hold valid JSON"),
    ("nvfp4", lambda t: t.__setitem__(f"{LAYER}.comfy_quant", tool.marker({"format": "int3_magic"})),
     "format 'int3_magic' is not supported"),
    ("nvfp4", lambda t: t.__setitem__(f"{LAYER}.comfy_quant", tool.marker(["nvfp4"])), "must be a JSON object"),
    ("nvfp4", lambda t: t.__setitem__(f"{LAYER}.weight_scale", t[f"{LAYER}.weight_scale"][:64]),
     r"weight_scale has shape \[64, 4\].*need \[256, 4\]"),
    ("nvfp4", lambda t: t.pop(f"{LAYER}.weight_scale_2"), "has no blocks.1.mlp.vid.proj_in.weight_scale_2"),
    ("int8_convrot", lambda t: t.__setitem__(f"{LAYER}.weight_scale", torch.ones(7)), r"weight_scale has shape \[7\]"),
    ("int8_convrot", lambda t: t.__setitem__(f"{LAYER}.comfy_quant", tool.marker(
        {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 48})), "not a power of 4"),
    ("mxfp8", lambda t: t.__setitem__(f"{LAYER}.weight", t[f"{LAYER}.weight"].float()), "stored as"),
    ("fp8_e4m3fn", lambda t: t.pop(f"{LAYER}.comfy_quant"), "quantization scale but its layer has no"),
])
def test_broken_quantized_layers_are_refused_naming_the_layer(tmp_path, embeddings, fmt, edit, message):
    path = _tamper(tmp_path, embeddings, fmt, edit)
    with pytest.raises(CheckpointError, match=message) as error:
        load_dit(path)
    assert "tampered.safetensors" in str(error.value) and LAYER in str(error.value)


def test_unaccounted_tensor_is_refused_strictly(tmp_path, embeddings):
    path = _tamper(tmp_path, embeddings, "int8_convrot", lambda t: t.__setitem__(f"{LAYER}.input_scale", torch.ones(())))
    with pytest.raises(CheckpointError, match="input_scale does not belong to the int8_tensorwise format"):
        load_dit(path)
    path = _tamper(tmp_path, embeddings, "fp16", lambda t: t.pop("negative_conditioning"))
    with pytest.raises(CheckpointError, match="positive_conditioning but not its counterpart"):
        load_dit(path)


# ------------------------------------------------------------------------------------ conditioning
def test_file_conditioning_equal_to_ours_is_used_silently(embeddings, caplog):
    file = {"positive": embeddings[0].half(), "negative": embeddings[1].half()}
    with caplog.at_level(logging.INFO, logger="seedvr2"):
        pos, neg = te.text_embeddings("cpu", torch.float32, file, "same.safetensors")
    assert torch.equal(pos, embeddings[0].float()) and not caplog.records


def test_different_file_conditioning_is_used_and_logged_once(embeddings, caplog):
    file = {"positive": embeddings[0].float() * 1.5, "negative": embeddings[1].float()}
    with caplog.at_level(logging.INFO, logger="seedvr2"):
        for _ in range(2):
            pos, _neg = te.text_embeddings("cpu", torch.float32, file, "other.safetensors")
    assert torch.equal(pos, file["positive"])
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "other.safetensors" in messages[0] and "using the file's" in messages[0]


def test_zero_file_conditioning_falls_back_to_ours(embeddings, caplog):
    file = {"positive": torch.zeros(58, 5120), "negative": torch.zeros(64, 5120)}
    with caplog.at_level(logging.INFO, logger="seedvr2"):
        pos, _ = te.text_embeddings("cpu", torch.float32, file, "zero.safetensors")
    assert torch.equal(pos, embeddings[0].float()) and "all-zero" in caplog.records[0].getMessage()


def test_marker_json_matches_what_comfyui_writes():
    config = {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256}
    raw = tool.marker(config)
    assert raw.dtype == torch.uint8 and qf.parse_marker("x", raw) == config
    assert bytes(raw.tolist()) == json.dumps(config).encode()
