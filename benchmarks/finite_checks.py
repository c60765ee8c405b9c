"""Cost of the finiteness checks (src/pipeline/finite.py) at full size: the weights check of a freshly loaded
3B/7B DiT and the VAE, and the per-batch check of a decoded 33-frame 1080p batch.

    PYTHONPATH=. python benchmarks/finite_checks.py --device cuda --output docs/results/finite_checks.json
    PYTHONPATH=. python benchmarks/finite_checks.py --device cpu --models 3b   # weights kept on the host

Each check is timed after one warm-up call (median of --repeat runs, synchronised).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from src.benchmark.random_weights import random_dit, random_vae
from src.benchmark.results import device_name
from src.benchmark.timer import cuda_time
from src.pipeline.finite import check_batch, check_weights


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", nargs="+", default=["3b", "7b", "vae"])
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float8_e4m3fn"))
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--output", type=Path)
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    rows = []
    for name in args.models:
        model = (random_vae(device, torch.bfloat16) if name == "vae"
                 else random_dit(name, device, torch.bfloat16))
        if dtype == torch.float8_e4m3fn and name != "vae":  # the fp8 files' storage: weights of the Linears
            for module in model.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.data = module.weight.data.to(dtype)
        size = sum(t.numel() * t.element_size() for t in model.parameters())
        seconds = cuda_time(lambda: check_weights(model, name), device, args.repeat, warmup=1)
        rows.append({"check": f"weights {name} ({args.dtype if name != 'vae' else 'bfloat16'})",
                     "gb": round(size / 1e9, 2), "seconds": round(seconds, 4)})
        print(json.dumps(rows[-1]), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    frames = torch.rand(33, 3, 1080, 1920, device=device)
    seconds = cuda_time(lambda: check_batch(frames, "decode", 0, 33), device, args.repeat, warmup=1)
    rows.append({"check": "decoded batch 33x1080p float32", "gb": round(frames.numel() * 4 / 1e9, 2),
                 "seconds": round(seconds, 4)})
    print(json.dumps(rows[-1]), flush=True)
    if args.output:
        args.output.write_text(json.dumps({"device": device_name(device), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
