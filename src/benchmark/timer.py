"""Timing for performance_test.py and benchmarks/: device synchronisation, the median time of a call (wall
clock or CUDA events) and the allocator's peak."""
from __future__ import annotations

import statistics
import time

import torch


def sync(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op off CUDA): wall-clock times then include it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gb(device: torch.device) -> float:
    """Peak allocated GiB since the last :func:`reset_peak` (0 off CUDA)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def cuda_time(fn, device: torch.device, repeat: int = 10, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` after ``warmup`` untimed calls, each timed call synchronised (wall clock:
    launch overhead included, on any device)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def event_time(fn, repeat: int = 10) -> float:
    """Median seconds of ``fn()`` between two CUDA events on the current stream (GPU time only; CUDA only,
    no warm-up: the caller warms up)."""
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)
