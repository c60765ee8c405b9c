"""Chunked DiT execution (optimization.dit_chunking): the golden 3B and 7B give the unchunked result
(rel 1e-5 in float32) with MLP updates and window attention taken a few tokens at a time."""
from __future__ import annotations

import pytest
import torch

from conftest import golden_cases, golden_json, load_golden, rel_err
from src.models.dit import NaDiT, NaDiTConfig
from src.models.dit.block import NaDiTBlock
from src.models.dit.packing import PackedLayout
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

    def counting(fn, x, time, lengths, chunk):
        calls.append(x.shape[0])
        return original(fn, x, time, lengths, chunk)

    dit_chunking.use_token_chunks(model, rows)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(dit_chunking, "by_rows", counting)
            chunked = _run(model, case)
    finally:
        dit_chunking.use_token_chunks(model, None)
    assert calls and max(calls) > rows  # the cases are larger than a chunk: chunking really happened
    assert rel_err(chunked, whole) <= EXACT
    assert rel_err(chunked, case.get("out_per_sample", case["out"])) <= EXACT


def test_window_chunk_and_the_model_setting(variant):
    assert dit_chunking.window_chunk(10, 64, None) == 10  # off: all windows in one call
    assert dit_chunking.window_chunk(10, 64, 200) == 3
    assert dit_chunking.window_chunk(10, 512, 200) == 1
    model, _ = variant
    other = NaDiT(model.config)
    assert dit_chunking.chunk_rows(model) is None
    dit_chunking.use_token_chunks(model, 200)
    try:
        assert dit_chunking.chunk_rows(model) == 200
        assert all(dit_chunking.chunk_rows(block) == 200 for block in model.blocks)
        assert dit_chunking.chunk_rows(other) is None   # a setting of one model, not of the process
        dit_chunking.use_token_chunks(model, 50)
        assert dit_chunking.chunk_rows(model) == 50
    finally:
        dit_chunking.use_token_chunks(model, None)
    assert dit_chunking.chunk_rows(model) is None
    assert type(model) is NaDiT and all(type(block) is NaDiTBlock for block in model.blocks)
    assert set(model.state_dict()) == set(other.state_dict())


@pytest.mark.parametrize("rows", [0, -3, 2.5, True])
def test_invalid_chunk_size_is_rejected(rows):
    with pytest.raises(ValueError, match="positive number of tokens"):
        dit_chunking.use_token_chunks(NaDiT(NaDiTConfig.from_kwargs(golden_json("dit3b_config.json")["kwargs"])),
                                      rows)


def test_by_rows_splits_within_samples():
    x = torch.arange(10.0).view(10, 1)
    time = torch.tensor([[100.0], [200.0]])
    seen = []

    def fn(part, t, lengths):
        seen.append((part[:, 0].tolist(), t[:, 0].tolist(), lengths))
        return part + t

    out = dit_chunking.by_rows(fn, x, time, (6, 4), 4)
    assert seen == [([0, 1, 2, 3], [100.0], (4,)), ([4, 5], [100.0], (2,)), ([6, 7, 8, 9], [200.0], (4,))]
    assert out[:, 0].tolist() == [100, 101, 102, 103, 104, 105, 206, 207, 208, 209]


@pytest.mark.parametrize("rows", [1, 7, 10**9])
def test_split_windows_keeps_every_window_in_order(variant, rows):
    model, cases = variant
    case = cases["packed2"]
    layout = PackedLayout.from_shapes(case["vid_shape"], case["txt_shape"], model.config.patch_size)
    for plan in model._window_plans(layout, torch.device("cpu")).values():
        split = dit_chunking.split_windows(plan, rows)
        assert split.cache is plan.cache and split.video_offset is plan.video_offset
        parts = iter(split.groups)
        for group in plan.groups:
            windows, tokens = group.token_index.shape
            taken = []
            while sum(part.token_index.shape[0] for part in taken) < windows:
                part = next(parts)
                assert part.shape == group.shape and part.text_length == group.text_length
                assert part.token_index.shape[0] <= max(1, rows // tokens)
                taken.append(part)
            for field in ("token_index", "video_rows", "text_rows"):
                assert torch.equal(torch.cat([getattr(part, field) for part in taken]), getattr(group, field))
        assert next(parts, None) is None
