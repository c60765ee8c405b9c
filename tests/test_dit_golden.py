"""NaDiT forward against the golden outputs of the original implementation (README §8.1, §9)."""
from __future__ import annotations

import pytest
import torch

from conftest import golden_cases, golden_json, load_golden, rel_err
from src.models.dit import NaDiT, NaDiTConfig

VARIANTS = ("3b", "7b")
CASES = ("single", "packed2", "image", "odd", "long33")
FP32_TOLERANCE = 1e-5      # README §9: a correct float32 implementation measures ≈ 2e-7
BF16_TOLERANCE = 2e-2


def _build(variant: str, dtype: torch.dtype = torch.float32) -> NaDiT:
    config = NaDiTConfig.from_kwargs(golden_json(f"dit{variant}_config.json")["kwargs"])
    model = NaDiT(config)
    model.load_state_dict(load_golden(f"dit{variant}_weights.safetensors"), strict=True)
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def models() -> dict[str, NaDiT]:
    return {variant: _build(variant) for variant in VARIANTS}


@pytest.fixture(scope="module")
def cases() -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    return {variant: golden_cases(f"dit{variant}_cases.safetensors") for variant in VARIANTS}


def _run(model: NaDiT, case: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(case["vid"], case["txt"], case["vid_shape"], case["txt_shape"], case["timestep"])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", CASES)
def test_forward_matches_golden(models, cases, variant, name):
    case = cases[variant][name]
    out = _run(models[variant], case)
    assert out.dtype == torch.float32
    # Packed cases: the target is every sample run alone (README §5).
    target = case.get("out_per_sample", case["out"])
    assert rel_err(out, target) <= FP32_TOLERANCE


def test_packed_3b_does_not_reproduce_original_defect(models, cases):
    case = cases["3b"]["packed2"]
    out = _run(models["3b"], case)
    # The original packed call reads text q/k of the wrong sample (README §5): rel. 6.7e-3 away.
    assert rel_err(out, case["out"]) > 1e-3
    assert rel_err(out, case["out_per_sample"]) <= FP32_TOLERANCE


def test_forward_ignores_rope_buffers(cases):
    model = _build("3b")
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            assert name.endswith("attn.rope.rope.freqs")
            buffer.fill_(float("nan"))   # any use of the buffers would poison the output
    case = cases["3b"]["odd"]
    assert rel_err(_run(model, case), case["out"]) <= FP32_TOLERANCE


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_weights_stay_close_to_fp32_golden(cases, variant):
    # Measured on CPU: 3B ≈ 8.0e-3, 7B ≈ 6.5e-3 relative error (bf16 weights and activations).
    model = _build(variant, torch.bfloat16)
    for name in ("odd", "packed2"):
        case = cases[variant][name]
        out = _run(model, case)          # float32 inputs, cast at the input projections
        assert out.dtype == torch.float32
        assert rel_err(out, case.get("out_per_sample", case["out"])) <= BF16_TOLERANCE
