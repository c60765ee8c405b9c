"""GGUF reading and the torch dequantization kernels, against the numpy reference of the gguf package."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

from src.models.gguf_codecs import DEQUANTIZERS, dequantize  # noqa: E402
from src.optimization.gguf import (  # noqa: E402
    DequantizedWeightCache,
    GGUFError,
    GGUFLinear,
    GGUFWeight,
    load_gguf_state_dict,
    prepare_model_for_gguf,
)

from conftest import rel_err  # noqa: E402

# Types the gguf package can quantize, and the byte offsets of the fp16 fields (d, dmin) of the others.
QUANTIZABLE = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]
K_QUANT_FP16_FIELDS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def random_blocks(qtype, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes for every field, with finite fp16 scales of either sign."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    for offset in K_QUANT_FP16_FIELDS[qtype]:
        scales = (rng.uniform(1e-3, 0.1, n_blocks) * rng.choice([-1, 1], n_blocks)).astype(np.float16)
        blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def test_every_supported_type_is_tested():
    assert set(DEQUANTIZERS) == set(QUANTIZABLE) | set(K_QUANT_FP16_FIELDS)


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_dequantize_matches_reference_on_quantized_data(qtype):
    rng = np.random.default_rng(0)
    values = rng.standard_normal((6, 256)).astype(np.float32)
    values[1] = 0                                          # an all-zero row (scale 0)
    values[2] *= 1e3                                        # and a large one
    raw = gguf.quants.quantize(values, qtype)
    expected = gguf.quants.dequantize(raw, qtype)
    ours = dequantize(torch.from_numpy(raw), qtype, (6, 256))
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, torch.from_numpy(expected), rtol=1e-6, atol=1e-6)
    assert rel_err(ours, torch.from_numpy(values)) < 0.2    # and it is a quantization of the data


@pytest.mark.parametrize("qtype", list(K_QUANT_FP16_FIELDS), ids=lambda t: t.name)
def test_dequantize_matches_reference_on_random_k_quant_blocks(qtype):
    rng = np.random.default_rng(1)
    raw = random_blocks(qtype, 12, rng)
    expected = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
    ours = dequantize(torch.from_numpy(raw), qtype, tuple(expected.shape))
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    assert ours.abs().max() > 0
    torch.testing.assert_close(dequantize(torch.from_numpy(raw), qtype, tuple(expected.shape), torch.bfloat16),
                               expected.bfloat16())


def test_unsupported_type_names_itself_and_the_alternatives():
    with pytest.raises(GGUFError, match=r"IQ4_NL is not supported; supported: .*Q8_0.*Q4_K"):
        dequantize(torch.zeros(18, dtype=torch.uint8), Q.IQ4_NL, (32,))


# ---------------------------------------------------------------------------------------------- files
PREFIX = "model.diffusion_model."


def write_gguf(path, tensors: dict[str, tuple[np.ndarray, Q | None]], orig_shapes: dict[str, tuple] = {}):
    writer = gguf.GGUFWriter(str(path), "seedvr2")
    for name, shape in orig_shapes.items():
        writer.add_array(f"comfy.gguf.orig_shape.{name}", list(shape))
    for name, (data, raw_dtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(40, 64), nn.GELU(), nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32))


@pytest.fixture
def mlp_file(tmp_path):
    """A ComfyUI-GGUF style file of ``mlp()``: Q8_0 weights (the first one stored flattened to (80, 32) with
    its shape in ``comfy.gguf.orig_shape``), an F16 weight, F16/F32/BF16 biases, all keys prefixed."""
    source = mlp().requires_grad_(False)
    sd = {k: v.numpy() for k, v in source.state_dict().items()}
    flat_first = sd["0.weight"].reshape(80, 32)             # 40 inputs are not a whole number of Q8_0 blocks
    tensors = {
        PREFIX + "0.weight": (gguf.quants.quantize(flat_first, Q.Q8_0), Q.Q8_0),
        PREFIX + "0.bias": (sd["0.bias"].astype(np.float16), None),
        PREFIX + "2.weight": (gguf.quants.quantize(sd["2.weight"], Q.Q8_0), Q.Q8_0),
        PREFIX + "2.bias": (sd["2.bias"], None),
        PREFIX + "4.weight": (sd["4.weight"].astype(np.float16), None),
        PREFIX + "4.bias": (gguf.quants.quantize(sd["4.bias"], Q.BF16), Q.BF16),
    }
    path = tmp_path / "mlp-Q8_0.gguf"
    write_gguf(path, tensors, {PREFIX + "0.weight": (64, 40)})
    # What the file holds, dequantized by the reference implementation.
    reference = {
        name.removeprefix(PREFIX): torch.from_numpy(
            gguf.quants.dequantize(data, qtype) if qtype in (Q.Q8_0, Q.BF16) else data.astype(np.float32)
        )
        for name, (data, qtype) in tensors.items()
    }
    reference["0.weight"] = reference["0.weight"].reshape(64, 40)
    return path, reference


def test_load_gguf_state_dict(mlp_file):
    path, reference = mlp_file
    state = load_gguf_state_dict(path)
    assert set(state) == {"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"}
    first = state["0.weight"]
    assert isinstance(first, GGUFWeight) and first.qtype == Q.Q8_0 and first.shape == (64, 40)
    assert first.data.dtype == torch.uint8 and first.data.numel() == 64 * 40 // 32 * 34
    assert isinstance(state["2.weight"], GGUFWeight) and state["2.weight"].shape == (96, 64)
    assert {k: state[k].dtype for k in ("0.bias", "2.bias", "4.weight", "4.bias")} == {
        "0.bias": torch.float16, "2.bias": torch.float32, "4.weight": torch.float16, "4.bias": torch.bfloat16}
    for key, value in state.items():
        restored = value.dequantize() if isinstance(value, GGUFWeight) else value.float()
        torch.testing.assert_close(restored, reference[key], rtol=0, atol=0)


def test_gguf_linear_layers_run_the_file(mlp_file):
    path, reference = mlp_file
    state = load_gguf_state_dict(path)
    with torch.device("meta"):
        model = mlp()
    report = prepare_model_for_gguf(model, state, compute_dtype=torch.float32)
    assert isinstance(model[0], GGUFLinear) and isinstance(model[2], GGUFLinear) and type(model[4]) is nn.Linear
    assert "0.weight" in report and "2.weight" in report and "4.weight" not in report
    assert report.bytes_saved > 0
    # What a loader does: packed weights as they are, other tensors in the compute dtype.
    model.load_state_dict({k: v if k in report else v.float() for k, v in state.items()}, strict=True, assign=True)
    assert set(model.state_dict()) == set(state)
    expected = mlp()
    expected.load_state_dict(reference)
    x = torch.randn(3, 5, 40)
    out = model(x)
    assert out.shape == (3, 5, 32)
    assert rel_err(out, expected(x)) < 1e-6


def test_dequantized_weight_cache_reuses_then_evicts():
    weights = [torch.randn(32, 64) for _ in range(2)]
    layers = []
    cache = DequantizedWeightCache(max_bytes=32 * 64 * 4)   # room for one float32 weight
    for weight in weights:
        layer = GGUFLinear(64, 32, False, Q.Q8_0, compute_dtype=torch.float32, cache=cache)
        raw = torch.from_numpy(gguf.quants.quantize(weight.numpy(), Q.Q8_0)).reshape(-1)
        layer.load_state_dict({"weight": GGUFWeight(raw, Q.Q8_0, torch.Size((32, 64)))}, assign=True)
        layers.append(layer)
    first = layers[0].dequantized_weight()
    assert layers[0].dequantized_weight() is first          # the shared-weight case: second call is free
    layers[1].dequantized_weight()                          # evicts the first
    again = layers[0].dequantized_weight()
    assert again is not first and torch.equal(again, first)
    uncached = GGUFLinear(64, 32, False, Q.Q8_0, compute_dtype=torch.float32)
    uncached.load_state_dict({"weight": GGUFWeight(layers[0].weight.data, Q.Q8_0, torch.Size((32, 64)))})
    assert uncached.dequantized_weight() is not uncached.dequantized_weight()
    torch.testing.assert_close(F.linear(torch.ones(1, 64), first), uncached(torch.ones(1, 64)))


def test_wrong_weights_are_refused(mlp_file):
    path, _ = mlp_file
    state = load_gguf_state_dict(path)
    layer = GGUFLinear(64, 96, True, Q.Q4_K)
    with pytest.raises(GGUFError, match="expects Q4_K"):
        layer.load_state_dict({"weight": state["2.weight"], "bias": state["2.bias"]})
    with pytest.raises(GGUFError, match="plain"):
        GGUFLinear(64, 96, True, Q.Q8_0).load_state_dict({"weight": torch.zeros(96, 64), "bias": state["2.bias"]})
    with pytest.raises(GGUFError, match="another model"):
        prepare_model_for_gguf(nn.Sequential(nn.Linear(40, 64), nn.GELU(), nn.Linear(64, 48)), state)
    with pytest.raises(GGUFError, match="stays packed"):
        state["2.weight"].to(dtype=torch.float16)


def test_quantized_tensor_outside_a_linear_is_refused():
    weight = GGUFWeight(torch.zeros(34, dtype=torch.uint8), Q.Q8_0, torch.Size((32,)))
    with pytest.raises(GGUFError, match="no Linear layer.*norm.weight"):
        prepare_model_for_gguf(nn.Sequential(nn.Linear(32, 32)), {"norm.weight": weight})


def test_unsupported_type_in_a_file(tmp_path):
    path = tmp_path / "iq4.gguf"
    write_gguf(path, {"0.weight": (np.zeros((4, 18), dtype=np.uint8), Q.IQ4_NL)})
    with pytest.raises(GGUFError, match=r"'0.weight' uses GGUF type IQ4_NL.*supported: .*Q4_K"):
        load_gguf_state_dict(path)


def test_damaged_files_give_clear_errors(mlp_file, tmp_path):
    path, _ = mlp_file
    content = path.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(content[: len(content) - 200])
    with pytest.raises(GGUFError, match="truncated.gguf is not a readable GGUF file.*download it"):
        load_gguf_state_dict(truncated)
    header_cut = tmp_path / "header.gguf"
    header_cut.write_bytes(content[:40])
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        load_gguf_state_dict(header_cut)
    not_gguf = tmp_path / "renamed.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + content[4:])
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        load_gguf_state_dict(not_gguf)
    with pytest.raises(GGUFError, match="does not exist"):
        load_gguf_state_dict(tmp_path / "missing.gguf")
