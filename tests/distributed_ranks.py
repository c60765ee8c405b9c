"""Run a function on N local processes joined in a gloo ``torch.distributed`` group (CPU tests)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TESTS = Path(__file__).resolve().parent


def _entry(rank: int, world: int, init_file: str, out_dir: str, fn, args) -> None:
    sys.path[:0] = [str(TESTS.parent), str(TESTS)]
    torch.set_num_threads(1)   # N processes on a 2-core machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, tmp_path: Path, fn, *args) -> list:
    """``fn(rank, world, *args)`` on ``world`` processes; returns each rank's result (rank order)."""
    out_dir = tmp_path / f"ranks{world}"
    out_dir.mkdir()
    mp.spawn(_entry, args=(world, str(tmp_path / f"init{world}"), str(out_dir), fn, args), nprocs=world,
             join=True)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(world)]
