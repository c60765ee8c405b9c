"""Chunked DiT execution (optimization.dit_chunking): the golden 3B and 7B give the unchunked result
(rel 1e-5 in float32) with MLP updates and window attention taken a few tokens at a time."""
from __future__ import annotations

import pytest
import torch

from conftest import golden_cases, golden_json, load_golden, rel_err
from src.models.dit import NaDiT, NaDiTConfig
from src.optimization import dit_chunking

pytestmark = pytest.mark.usefixtures("single_thread")

EXACT = 1e-5


@pytest.fixture(scope="module", params=["3b", "7b"])
def variant(request):
    config = NaDiTConfig.from_kwargs(golden_json(f"dit{request.param}_config.json")["kwargs"])
    model = NaDiT(config)
    model.load_state_dict(load_golden(f"dit{request.param}_weights.safetensors"), strict=True)
    return model.eval(), golden_cases(f"dit{request.param}_cases.safetensors")


def _run(model, case):
    with torch.no_grad():
        return model(case["vid"], case["txt"], case["vid_shape"], case["txt_shape"], case["timestep"])


# 7 tokens: chunks that end inside samples and windows; 1: every token and window alone.
@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("name", ["packed2", "odd"])
def test_chunked_equals_unchunked(variant, name, rows):
    model, cases = variant
    case = cases[name]
    whole = _run(model, case)
    calls = []
    original = dit_chunking.by_rows

    def counting(fn, x, time, lengths):
        calls.append(x.shape[0])
        return original(fn, x, time, lengths)

    with dit_chunking.token_chunks(rows), pytest.MonkeyPatch.context() as patch:
        patch.setattr(dit_chunking, "by_rows", counting)
        chunked = _run(model, case)
    assert calls and max(calls) > rows  # the cases are larger than a chunk: chunking really happened
    assert rel_err(chunked, whole) <= EXACT
    assert rel_err(chunked, case.get("out_per_sample", case["out"])) <= EXACT


def test_window_chunk_and_switch_scope():
    assert dit_chunking.window_chunk(10, 64) == 10  # off: all windows in one call
    with dit_chunking.token_chunks(200):
        assert dit_chunking.chunk_rows() == 200
        assert dit_chunking.window_chunk(10, 64) == 3
        assert dit_chunking.window_chunk(10, 512) == 1
        with dit_chunking.token_chunks(None):
            assert dit_chunking.chunk_rows() is None
        assert dit_chunking.chunk_rows() == 200
    assert dit_chunking.chunk_rows() is None


@pytest.mark.parametrize("rows", [0, -3, 2.5, True])
def test_invalid_chunk_size_is_rejected(rows):
    with pytest.raises(ValueError, match="positive number of tokens"):
        with dit_chunking.token_chunks(rows):
            pass


def test_by_rows_splits_within_samples():
    x = torch.arange(10.0).view(10, 1)
    time = torch.tensor([[100.0], [200.0]])
    seen = []

    def fn(part, t, lengths):
        seen.append((part[:, 0].tolist(), t[:, 0].tolist(), lengths))
        return part + t

    with dit_chunking.token_chunks(4):
        out = dit_chunking.by_rows(fn, x, time, (6, 4))
    assert seen == [([0, 1, 2, 3], [100.0], (4,)), ([4, 5], [100.0], (2,)), ([6, 7, 8, 9], [200.0], (4,))]
    assert out[:, 0].tolist() == [100, 101, 102, 103, 104, 105, 206, 207, 208, 209]
