"""The finiteness checks: what they refuse, what they name, and that the weight check reads back once."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from src.pipeline import finite
from src.pipeline.finite import check_weights, is_finite
from src.pipeline.settings import SettingsError


class _CountReadBacks(TorchDispatchMode):
    """Counts the operations that copy a value to the host (what ``item()``/``float()`` run)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _model(layers: int = 40) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(layers)])


def test_a_clean_model_is_read_back_once_whatever_its_number_of_tensors():
    model = _model()
    with _CountReadBacks() as counter:
        check_weights(model, "model.safetensors")
    assert counter.count == 1, "one host read per device, not one per tensor"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_the_first_bad_weight_is_named(value):
    model = _model()
    with torch.no_grad():
        model[17].bias[3] = value
        model[30].weight[0, 0] = value
    with pytest.raises(SettingsError, match=r"model.safetensors: the weight '17.bias' holds NaN or infinite"):
        check_weights(model, "model.safetensors")


def test_values_in_a_later_slice_are_seen(monkeypatch):
    monkeypatch.setattr(finite, "SLICE_ELEMENTS", 7)
    tensor = torch.arange(100, dtype=torch.bfloat16)
    assert finite._minmax(tensor) == (0.0, 99.0)
    tensor[95] = float("inf")
    assert finite._minmax(tensor) == (0.0, math.inf) and not is_finite(tensor)
    tensor[95] = float("nan")
    low, high = finite._minmax(tensor)
    assert math.isnan(low) and math.isnan(high) and not is_finite(tensor)


def test_float8_weights_are_checked_and_integer_storage_is_skipped():
    model = torch.nn.Module()
    model.register_buffer("codes", torch.full((4,), 255, dtype=torch.uint8))
    model.weight = torch.nn.Parameter(torch.ones(4, 4).to(torch.float8_e4m3fn), requires_grad=False)
    check_weights(model, "f")
    with torch.no_grad():
        model.weight.view(torch.uint8)[1, 1] = 0x7F  # e4m3fn's NaN
    with pytest.raises(SettingsError, match="the weight 'weight' holds NaN"):
        check_weights(model, "f")
