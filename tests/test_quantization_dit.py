"""The quantization switch on the real (tiny, golden) DiT: released-style fp8 and fp16 files, every mode."""
from __future__ import annotations

import logging

import pytest
import torch

from conftest import golden_cases, golden_json, load_golden, rel_err
from src.models.dit import NaDiT, NaDiTConfig
from src.optimization import linear_quantization as fq
from src.optimization.linear_quantization import FP8Linear, Fp8Matmul, NVFP4Linear, prepare_model_for_weights

CASE = "image"


@pytest.fixture(scope="module")
def golden():
    config = NaDiTConfig.from_kwargs(golden_json("dit3b_config.json")["kwargs"])
    return config, load_golden("dit3b_weights.safetensors"), golden_cases("dit3b_cases.safetensors")[CASE]


def load(config, state, mode) -> tuple[NaDiT, fq.QuantizationReport]:
    """What the checkpoint loader does: build on meta, swap layers, load strictly with assign."""
    with torch.device("meta"):
        model = NaDiT(config)
    report = prepare_model_for_weights(model, {k: v.dtype for k, v in state.items()}, mode, torch.float32,
                                       device="cpu")
    model.load_state_dict({k: v if k in report else v.float() for k, v in state.items()}, strict=True, assign=True)
    return model.eval(), report


def run(model, case) -> torch.Tensor:
    with torch.no_grad():
        return model(case["vid"], case["txt"], case["vid_shape"], case["txt_shape"], case["timestep"])


def test_fp8_file_runs_in_fp8_storage_exactly_as_upcast_weights(golden):
    config, weights, case = golden
    fp8_state = {k: v.to(torch.float8_e4m3fn) if v.dim() == 2 else v for k, v in weights.items()}
    model, report = load(config, fp8_state, "disabled")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert not linears and len(report.layers) == 36             # every Linear, shared "all" ones included
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in model.modules() if isinstance(m, FP8Linear))
    upcast = NaDiT(config)
    upcast.load_state_dict({k: v.float() for k, v in fp8_state.items()})
    assert rel_err(run(model, case), run(upcast.eval(), case)) < 1e-6


def test_fp16_file_with_fp8_matmuls(golden, monkeypatch):
    """fp8_e4m3fn through torch._scaled_mm (its CPU kernel) in every eligible layer of the DiT."""
    config, weights, case = golden
    monkeypatch.setattr(fq, "fp8_matmul_for", lambda device, dtype: Fp8Matmul.ROWWISE)
    model, report = load(config, {k: v.half() for k, v in weights.items()}, "fp8_e4m3fn")
    assert set(report.skipped) == {"vid_in.proj", "txt_in", "emb_in.proj_in", "emb_in.proj_hid",
                                   "emb_in.proj_out", "vid_out.proj"}
    try:
        out = run(model, case)
    except RuntimeError as error:
        pytest.skip(f"this torch build has no CPU fp8 _scaled_mm: {error}")
    # Measured 2.2 % (per-token fp8 activations, per-channel fp8 weights, 4 blocks of random weights).
    assert rel_err(out, case["out"]) < 0.04


def test_fp4_experimental_on_the_dit(golden):
    config, weights, case = golden
    model, report = load(config, weights, "fp4_experimental")
    assert report.counts == {"nvfp4 weight-only": 30}
    assert isinstance(model.blocks[3].mlp.all.proj_in, NVFP4Linear)
    assert rel_err(run(model, case), case["out"]) < 0.1     # measured 6.1 %


def _summaries(caplog) -> list[int]:
    return [r.levelno for r in caplog.records if r.getMessage().startswith("SeedVR2: quantization")]


def test_the_quantization_summary_is_logged_once_and_only_shown_when_asked_for(golden, tmp_path, caplog):
    """An fp8 file read with quantization "disabled" keeps its fp8 storage without telling the user about a
    quantization they did not ask for (it used to print "quantization disabled: 36 fp8 weight-only" twice)."""
    from safetensors.torch import save_file

    from src.optimization.quantized_load import load_dit

    _config, weights, _case = golden
    path = tmp_path / "dit_fp8.safetensors"
    save_file({k: v.to(torch.float8_e4m3fn) if v.dim() == 2 else v for k, v in weights.items()}, str(path))
    with caplog.at_level(logging.DEBUG, logger="seedvr2"):
        load_dit(path, quantization="disabled")
    assert _summaries(caplog) == [logging.DEBUG]
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="seedvr2"):
        load_dit(path, quantization="fp8_e4m3fn")
    assert _summaries(caplog) == [logging.INFO]
