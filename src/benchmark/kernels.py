"""What the kernel benchmarks in benchmarks/ share: a kernel timed with its first call (compiling,
autotuning) apart, a failure recorded as a row, and the loop over shapes that prints each and rewrites the
JSON after each, so a crash keeps the shapes already measured.  CUDA only.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterable

import torch

from .results import write_json
from .timer import cuda_time


def parse_args(description: str, argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--output", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def time_call(call: Callable[[], torch.Tensor], flops: int, device: torch.device) -> tuple[dict, torch.Tensor]:
    """``call``'s row (median ms, TFLOP/s, the first call's seconds) and its first output."""
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = call()
    torch.cuda.synchronize(device)
    first_call = time.perf_counter() - start
    seconds = cuda_time(call, device)
    return {"ms": seconds * 1e3, "tflops": flops / seconds / 1e12, "first_call_s": first_call}, out


def error_row(error: Exception) -> dict:
    """A failed kernel's row: the other kernels still run."""
    return {"error": f"{type(error).__name__}: {str(error).strip()[:300]}"}


def run_shapes(shapes: Iterable[tuple[str, object]], measure_shape: Callable[[object, torch.device], dict],
               print_shape: Callable[[str, dict], None], output: str | None) -> int:
    """Measure every (name, shape) on the GPU without autograd, print it, and keep the JSON up to date."""
    import triton  # only its version is recorded; the kernels import it themselves

    device = torch.device("cuda")
    results = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
               "triton": triton.__version__, "shapes": {}}
    start = time.perf_counter()
    for name, shape in shapes:
        with torch.no_grad():
            rows = measure_shape(shape, device)
        results["shapes"][name] = rows
        print_shape(name, rows)
        torch.cuda.empty_cache()
        results["seconds"] = time.perf_counter() - start
        if output:
            write_json(output, results)
    print(f"\n{results['seconds']:.0f} s in all")
    return 0
