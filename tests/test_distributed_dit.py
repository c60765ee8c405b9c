"""The window-parallel DiT on 2 and 4 gloo processes equals the single-process model (golden tiny models)."""
from __future__ import annotations

import pytest
import torch

from conftest import golden_cases, golden_json, load_golden, rel_err
from distributed_ranks import run_ranks
from src.distributed.window_parallel import deal_windows
from src.models.dit import NaDiT, NaDiTConfig

VARIANTS = ("3b", "7b")
CASES = ("single", "packed2", "image", "odd", "long33")
TOLERANCE = 1e-5   # the golden float32 threshold; only the text means' summation order differs


def _model(variant: str) -> NaDiT:
    config = NaDiTConfig.from_kwargs(golden_json(f"dit{variant}_config.json")["kwargs"])
    model = NaDiT(config)
    model.load_state_dict(load_golden(f"dit{variant}_weights.safetensors"), strict=True)
    return model.eval()


def _forward_all(model, cases) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {name: model(c["vid"], c["txt"], c["vid_shape"], c["txt_shape"], c["timestep"])
                for name, c in cases.items()}


def _parallel_outputs(rank: int, world: int) -> dict:
    from src.distributed.window_parallel import WindowParallelDiT
    results = {}
    for variant in VARIANTS:
        cases = {name: golden_cases(f"dit{variant}_cases.safetensors")[name] for name in CASES}
        outputs = _forward_all(WindowParallelDiT(_model(variant)), cases)
        results.update({(variant, name): out for name, out in outputs.items()})
    return results


@pytest.fixture(scope="module")
def single_process() -> dict:
    results = {}
    for variant in VARIANTS:
        cases = {name: golden_cases(f"dit{variant}_cases.safetensors")[name] for name in CASES}
        results.update({(variant, name): out for name, out in _forward_all(_model(variant), cases).items()})
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_window_parallel_dit_equals_one_process(world, tmp_path, single_process):
    ranks = run_ranks(world, tmp_path, _parallel_outputs)
    for key, expected in single_process.items():
        for rank, result in enumerate(ranks):
            assert rel_err(result[key], expected) <= TOLERANCE, (key, rank)
        # Every rank returns the same tensor: the gathers hand each rank the same rows.
        for result in ranks[1:]:
            assert torch.equal(result[key], ranks[0][key]), key


def test_windows_are_dealt_by_token_count():
    owners = deal_windows([10, 10, 10, 4, 4, 2], 2)
    loads = [sum(size for size, owner in zip([10, 10, 10, 4, 4, 2], owners) if owner == rank) for rank in (0, 1)]
    assert sorted(loads) == [20, 20]
    # More ranks than windows: the extra ranks own nothing, and the dealing stays deterministic.
    assert deal_windows([5], 4) == [0]
    assert deal_windows([3, 7], 3) == [1, 0]
