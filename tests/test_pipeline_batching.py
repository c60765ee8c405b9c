"""Batch plans, temporal padding and overlap blending."""
from __future__ import annotations

import itertools

import pytest
import torch

from conftest import golden_cases
from src.pipeline import batching as Bt


def _is_4n1(n: int) -> bool:
    return n % 4 == 1


@pytest.mark.parametrize("length, expected", [(1, 1), (2, 5), (3, 5), (4, 5), (5, 5), (6, 9), (8, 9), (9, 9), (10, 13)])
def test_padded_length(length, expected):
    assert Bt.padded_length(length) == expected


def _check_plan(frames, batch_size, overlap, uniform, prepend):
    plan = Bt.plan_batches(frames, batch_size, overlap, uniform, prepend)
    assert (plan.num_frames, plan.prepend_frames) == (frames, prepend)
    assert plan.batches[-1].stop == frames + prepend  # the batches cover the extended clip
    written = []  # frames each batch writes (its first `overlap` frames are blended, not written)
    for i, batch in enumerate(plan.batches):
        assert 1 <= batch.length <= batch_size
        assert _is_4n1(batch.padded_length) and batch.pad_frames >= 0
        assert batch.overlap == (0 if i == 0 else overlap)
        if i > 0:
            previous = plan.batches[i - 1]
            assert batch.start == previous.stop - overlap  # the shared frames are exactly the overlap
            assert batch.length > batch.overlap            # every batch brings new frames
        written.extend(range(batch.start + batch.overlap, batch.stop))
    assert written == list(range(frames + prepend))
    if uniform:
        assert {b.padded_length for b in plan.batches} == {Bt.padded_length(batch_size)}
    else:
        assert all(b.padded_length == Bt.padded_length(b.length) for b in plan.batches)


def test_plans_cover_every_frame_once():
    grid = itertools.product([1, 2, 5, 9, 13, 37], [1, 4, 5, 8, 21], [0, 1, 2, 3], [False, True], [0, 2, 7])
    for frames, batch_size, overlap, uniform, prepend in grid:
        if overlap and overlap >= batch_size:
            with pytest.raises(ValueError, match="smaller than batch_size"):
                Bt.plan_batches(frames, batch_size, overlap, uniform, prepend)
            continue
        try:
            _check_plan(frames, batch_size, overlap, uniform, prepend)
        except AssertionError as error:
            raise AssertionError(f"plan({frames}, {batch_size}, {overlap}, {uniform}, {prepend})") from error


def test_plan_example():
    plan = Bt.plan_batches(10, 5, temporal_overlap=2)
    assert [(b.start, b.stop, b.pad_frames, b.overlap) for b in plan.batches] == [
        (0, 5, 0, 0), (3, 8, 0, 2), (6, 10, 1, 2)
    ]


def test_plan_errors():
    with pytest.raises(ValueError, match="empty"):
        Bt.plan_batches(0, 5)
    with pytest.raises(ValueError, match="batch_size"):
        Bt.plan_batches(10, 0)
    with pytest.raises(ValueError, match="negative"):
        Bt.plan_batches(10, 5, temporal_overlap=-1)
    with pytest.raises(ValueError, match="negative"):
        Bt.plan_batches(10, 5, prepend_frames=-2)


@pytest.mark.parametrize("overlap", range(1, 9))
def test_overlap_weights_sum_to_one_and_fade_out(overlap):
    weights = Bt.overlap_weights(overlap)
    assert weights.shape == (overlap,)
    assert ((weights > 0) & (weights < 1)).all()
    assert (weights.diff() < 0).all()                                  # monotone cross-fade
    assert torch.allclose(weights + weights.flip(0), torch.ones(overlap))  # symmetric: new = 1 - w, mirrored
    prev, new = torch.ones(overlap, 2), torch.zeros(overlap, 2)
    blended = Bt.blend_overlap(prev, new, weights)
    assert torch.allclose(blended[:, 0], weights)
    assert torch.allclose(Bt.blend_overlap(torch.full((overlap, 2), 3.0), torch.full((overlap, 2), 3.0), weights),
                          torch.full((overlap, 2), 3.0))                # weights of both sides sum to 1


def test_overlap_weight_shapes():
    assert Bt.overlap_weights(1).tolist() == [0.5]
    assert torch.allclose(Bt.overlap_weights(2), torch.tensor([2 / 3, 1 / 3]))
    assert torch.allclose(Bt.overlap_weights(3), torch.tensor([0.8535534, 0.5, 0.1464466]))  # raised cosine
    with pytest.raises(ValueError, match="one weight per frame"):
        Bt.blend_overlap(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3))


def test_pad_temporal_mirror_indices():
    clip = torch.arange(4).view(4, 1, 1, 1).float()
    assert Bt.pad_temporal(clip, 9).flatten().tolist() == [0, 1, 2, 3, 2, 1, 0, 1, 2]  # > 2x length
    assert Bt.pad_temporal(clip, 4) is clip
    assert Bt.pad_temporal(clip[:1], 5).flatten().tolist() == [0] * 5
    assert Bt.pad_temporal(clip[:2], 5).flatten().tolist() == [0, 1, 0, 1, 0]
    assert Bt.pad_temporal(clip, 6, mode="repeat").flatten().tolist() == [0, 1, 2, 3, 3, 3]
    with pytest.raises(ValueError, match="shorter"):
        Bt.pad_temporal(clip, 3)
    with pytest.raises(ValueError, match="mirror"):
        Bt.pad_temporal(clip, 5, mode="wrap")


def test_pad_temporal_repeat_reproduces_golden_pad3():
    c = golden_cases("pipeline_cases.safetensors")["pad3"]
    frames = c["input_video"].permute(1, 0, 2, 3)           # (T, C, H, W)
    padded = Bt.pad_temporal(frames, Bt.padded_length(frames.shape[0]), mode="repeat")
    assert torch.equal(padded, c["cut_video"].permute(1, 0, 2, 3))


def test_prepend_mirrored():
    clip = torch.arange(4).float()
    assert Bt.prepend_mirrored(clip, 2).tolist() == [2, 1, 0, 1, 2, 3]
    assert Bt.prepend_mirrored(clip, 5).tolist() == [1, 2, 3, 2, 1, 0, 1, 2, 3]  # longer than the clip
    assert Bt.prepend_mirrored(clip[:1], 3).tolist() == [0, 0, 0, 0]
    assert Bt.prepend_mirrored(clip, 0) is clip
    with pytest.raises(ValueError, match="empty"):
        Bt.prepend_mirrored(clip[:0], 2)


def test_plan_and_helpers_reassemble_a_clip():
    """Running an identity 'model' through a plan returns the clip (blends of equal frames are exact)."""
    clip = torch.rand(11, 3, 4, 4)
    plan = Bt.plan_batches(11, 5, temporal_overlap=2, prepend_frames=3)
    extended = Bt.prepend_mirrored(clip, plan.prepend_frames)
    out = torch.empty_like(extended)
    for b in plan.batches:
        result = Bt.pad_temporal(extended[b.start : b.stop], b.padded_length)[: b.length]
        shared = slice(b.start, b.start + b.overlap)
        out[shared] = Bt.blend_overlap(out[shared], result[: b.overlap], b.blend_weights)
        out[b.start + b.overlap : b.stop] = result[b.overlap :]
    assert torch.allclose(out[plan.prepend_frames:], clip, atol=1e-6)
