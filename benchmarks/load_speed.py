#!/usr/bin/env python3
"""Checkpoint load time from the page cache: safetensors tensor by tensor vs the chunked pinned reader.

    python benchmarks/load_speed.py --gb 3 --device cuda:0 --output load_speed.json

Writes a safetensors file of random fp16 tensors shaped like the 3B's MLP weights (once, in --dir), reads it
once so the page cache holds it, then loads it into a meta-built module ``--repeat`` times per path, keeping
fp16 or converting to --dtype as the pipeline does (bf16 on a GPU).  Reports seconds and GB/s per path.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src.benchmark.results import write_json  # noqa: E402
from src.models import checkpoint, staged_read  # noqa: E402
from src.models.checkpoint import float_dtype_rule  # noqa: E402

SHAPE = (2560, 10240)  # one 3B MLP projection in fp16: 52 MB


class Weights(nn.Module):
    def __init__(self, count: int):
        super().__init__()
        for index in range(count):
            self.register_parameter(f"w{index}", nn.Parameter(torch.empty(SHAPE, dtype=torch.float16)))


def make_file(path: Path, count: int) -> None:
    if path.exists() and path.stat().st_size > count * SHAPE[0] * SHAPE[1] * 2:
        return
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    tensors = {f"w{i}": torch.randn(SHAPE, generator=generator).half() for i in range(count)}
    save_file(tensors, str(path))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=3.0)
    p.add_argument("--dir", default="/tmp/seedvr2-load-speed")
    p.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", help="storage dtype of the loaded tensors (float16 = as in the file)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    count = max(1, round(args.gb * 1e9 / (SHAPE[0] * SHAPE[1] * 2)))
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"random_{count}x{SHAPE[0]}x{SHAPE[1]}_fp16.safetensors"
    make_file(path, count)
    size = path.stat().st_size
    with open(path, "rb") as f:  # into the page cache
        while f.read(64 << 20):
            pass
    device = torch.device(args.device)
    rule = float_dtype_rule(getattr(torch, args.dtype))
    paths = {"safetensors_per_tensor": checkpoint.materialize, "staged_chunks": staged_read.materialize}
    results = {"file_bytes": size, "device": str(device), "dtype": args.dtype, "cpus": os.cpu_count(),
               "torch": torch.__version__, "runs": {}}
    for name, materialize in paths.items():
        times = []
        for _ in range(args.repeat):
            with torch.device("meta"):
                model = Weights(count)
            start = time.perf_counter()
            materialize(model, path, device=device, dtype_for=rule)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
            del model
        best = min(times)
        results["runs"][name] = {"seconds": times, "best_s": best, "gb_per_s": size / best / 1e9}
        print(f"{name:<24} best {best:6.2f} s  {size / best / 1e9:5.2f} GB/s  (runs: "
              + ", ".join(f"{t:.2f}" for t in times) + ")", flush=True)
    if args.output:
        write_json(args.output, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
