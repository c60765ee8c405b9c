"""A ComfyUI-GGUF style Q8_0 file of the tiny golden 3B DiT, loaded and run through GGUFLinear layers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from conftest import golden_cases, golden_json, load_golden, rel_err  # noqa: E402
from src.models.dit import NaDiT, NaDiTConfig  # noqa: E402
from src.optimization.gguf import GGUFLinear, GGUFWeight, load_gguf_state_dict, prepare_model_for_gguf  # noqa: E402

PREFIX = "model.diffusion_model."
Q8_0 = gguf.GGMLQuantizationType.Q8_0


def test_q8_0_dit_matches_its_dequantized_weights(tmp_path):
    config = NaDiTConfig.from_kwargs(golden_json("dit3b_config.json")["kwargs"])
    weights = load_golden("dit3b_weights.safetensors")
    case = golden_cases("dit3b_cases.safetensors")["image"]

    # Like the ComfyUI-GGUF converter: 2-D weights to Q8_0, vid_in.proj (132 inputs, not whole blocks)
    # flattened to rows of 32 with its shape in metadata, everything else F32.
    writer = gguf.GGUFWriter(str(tmp_path / "dit3b-Q8_0.gguf"), "seedvr2")
    reference = {}
    for key, tensor in weights.items():
        array = tensor.numpy()
        if array.ndim == 2:
            rows = array.reshape(-1, 32) if array.shape[1] % 32 else array
            if rows is not array:
                writer.add_array(f"comfy.gguf.orig_shape.{PREFIX}{key}", list(array.shape))
            raw = gguf.quants.quantize(rows, Q8_0)
            writer.add_tensor(PREFIX + key, raw, raw_dtype=Q8_0)
            reference[key] = torch.from_numpy(gguf.quants.dequantize(raw, Q8_0)).reshape(tensor.shape)
        else:
            writer.add_tensor(PREFIX + key, array)
            reference[key] = tensor
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    state = load_gguf_state_dict(tmp_path / "dit3b-Q8_0.gguf")
    assert isinstance(state["vid_in.proj.weight"], GGUFWeight) and state["vid_in.proj.weight"].shape == (64, 132)
    with torch.device("meta"):
        model = NaDiT(config)
    report = prepare_model_for_gguf(model, state, compute_dtype=torch.float32, cache_bytes=2**20)
    assert len(report.layers) == 36 and all(isinstance(model.get_submodule(n), GGUFLinear) for n in report.layers)
    model.load_state_dict(state, strict=True, assign=True)
    dequantized = NaDiT(config)
    dequantized.load_state_dict(reference)
    with torch.no_grad():
        args = (case["vid"], case["txt"], case["vid_shape"], case["txt_shape"], case["timestep"])
        out = model.eval()(*args)
        assert rel_err(out, dequantized.eval()(*args)) < 1e-6
    assert rel_err(out, case["out"]) < 2e-2                 # Q8_0 itself: measured 0.9 %
    assert np.isfinite(out.numpy()).all()
