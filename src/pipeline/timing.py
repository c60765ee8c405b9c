"""A machine-readable timeline of one process: what a user waits for, phase by phase.

Off unless ``SEEDVR2_TIMING_JSON`` names a file; then the CLI (and the benchmark's node driver) write there,
at the end of the run, every recorded span and mark as seconds since the *process* started (read from the
kernel on Linux, so interpreter start-up and imports count), plus the peak host RSS and CUDA memory.  Spans
that end a GPU phase synchronise their stream first, so a phase's end is when its work is done; that costs a
few microseconds per phase and happens only while recording.

Disabled, every call is one attribute check: the pipeline can call it unconditionally.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

ENV_VAR = "SEEDVR2_TIMING_JSON"

_IMPORTED_AT = time.time()


def _process_start_epoch() -> float:
    """Wall-clock time at which this process was started (falls back to this module's import time)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of proc(5); the split starts at field 3
        with open("/proc/uptime", "rb") as f:
            uptime = float(f.read().split()[0])
        ticks = os.sysconf("SC_CLK_TCK")
        # Both clocks are read now: the process's age, subtracted from the current wall-clock time.
        return time.time() - (uptime - start_ticks / ticks)
    except (OSError, ValueError, IndexError, AttributeError):
        return _IMPORTED_AT


class Timeline:
    """Spans, marks and accumulated totals, all in seconds since the process started."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        self.enabled = self.path is not None
        self.origin = _process_start_epoch()
        self._wall_to_perf = time.time() - time.perf_counter()
        self.spans: list[dict] = []
        self.marks: dict[str, float] = {}
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.info: dict = {}
        self._lock = threading.Lock()

    def now(self) -> float:
        """Seconds since the process started."""
        return time.perf_counter() + self._wall_to_perf - self.origin

    def mark(self, name: str) -> None:
        """Record the first time ``name`` happens (later calls keep the first)."""
        if self.enabled:
            self.marks.setdefault(name, self.now())

    def add(self, name: str, seconds: float) -> None:
        if self.enabled:
            with self._lock:
                self.totals[name] = self.totals.get(name, 0.0) + seconds
                self.counts[name] = self.counts.get(name, 0) + 1

    @contextmanager
    def span(self, name: str, *, sync=None, **extra) -> Iterator[None]:
        """Time a block; ``sync`` (a torch device): its current stream is synchronised before the end is taken."""
        if not self.enabled:
            yield
            return
        watch_triton()
        start = self.now()
        try:
            yield
        finally:
            _synchronize(sync)
            end = self.now()
            with self._lock:
                self.spans.append({"name": name, "start": round(start, 4), "end": round(end, 4),
                                   "seconds": round(end - start, 4), "thread": threading.current_thread().name,
                                   **extra})

    @contextmanager
    def accumulate(self, name: str) -> Iterator[None]:
        """Add a block's duration to the total ``name`` (for many small pieces: host copies, writes)."""
        if not self.enabled:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def timed_iter(self, iterable: Iterable, name: str) -> Iterator:
        """Yield from ``iterable``, adding the time spent producing each item to the total ``name``."""
        iterator = iter(iterable)
        while True:
            with self.accumulate(name):
                try:
                    item = next(iterator)
                except StopIteration:
                    return
            yield item

    def report(self) -> dict:
        out = {"process_start_epoch": self.origin, "written_at": round(self.now(), 4), "marks": dict(self.marks),
               "spans": list(self.spans), "totals": {k: round(v, 4) for k, v in self.totals.items()},
               "counts": dict(self.counts), "memory": _memory_report(), "info": dict(self.info)}
        return out

    def write(self, path: str | os.PathLike | None = None) -> Path | None:
        target = Path(path) if path else self.path
        if target is None:
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = target.with_name(target.name + ".part")
        staged.write_text(json.dumps(self.report(), indent=1, default=str))
        os.replace(staged, target)
        return target


def _synchronize(device) -> None:
    if device is None:
        return
    torch = sys.modules.get("torch")
    if torch is None:
        return
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_initialized():
        # This thread's stream only: a load on a side thread must not wait for the encode beside it.
        torch.cuda.current_stream(device).synchronize()


def _memory_report() -> dict:
    """Peak host RSS of this process (VmHWM) and, if CUDA was used, the caching allocator's peaks."""
    report: dict = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    key, value = line.split(":", 1)
                    report[{"VmHWM": "host_rss_peak_bytes", "VmRSS": "host_rss_bytes"}[key]] = \
                        int(value.split()[0]) * 1024
    except OSError:
        pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        report["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        report["cuda_peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
    return report


_TRITON_WATCHED = False
_COMPILING = threading.local()


def watch_triton() -> None:
    """Once Triton is imported (by whatever needs it first), add its compile and autotune times to the totals
    ``triton_compile`` (real compilations), ``triton_cache_load`` (kernels read from Triton's disk cache) and
    ``triton_autotune`` (benchmarking of launch configurations, compiles included).  Uses the hooks of
    ``triton.knobs`` (Triton 3.4+); older Tritons are left alone and the report says so."""
    global _TRITON_WATCHED
    triton = sys.modules.get("triton")
    if _TRITON_WATCHED or triton is None or not TIMELINE.enabled:
        return
    _TRITON_WATCHED = True
    knobs = getattr(triton, "knobs", None)
    runtime = getattr(knobs, "runtime", None)
    if runtime is None or not hasattr(runtime, "jit_post_compile_hook"):
        TIMELINE.info["triton_hooks"] = f"unavailable in triton {getattr(triton, '__version__', '?')}"
        return
    TIMELINE.info["triton_hooks"] = f"triton {getattr(triton, '__version__', '?')}"
    before, after = runtime.jit_cache_hook, runtime.jit_post_compile_hook

    def pre(**kwargs):
        _COMPILING.start, _COMPILING.hit = time.perf_counter(), False
        return before(**kwargs) if before else None

    def post(**kwargs):
        start = getattr(_COMPILING, "start", None)
        if start is not None:
            TIMELINE.add("triton_cache_load" if _COMPILING.hit else "triton_compile", time.perf_counter() - start)
            _COMPILING.start = None
        return after(**kwargs) if after else None

    runtime.jit_cache_hook, runtime.jit_post_compile_hook = pre, post
    compilation = getattr(knobs, "compilation", None)
    if compilation is not None and hasattr(compilation, "listener"):
        previous = compilation.listener

        def compiled(**kwargs):
            _COMPILING.hit = bool(kwargs.get("cache_hit"))
            if previous:
                previous(**kwargs)

        compilation.listener = compiled
    autotuning = getattr(knobs, "autotuning", None)
    if autotuning is not None and hasattr(autotuning, "listener"):
        previous_tuner = autotuning.listener

        def tuned(**kwargs):
            name = "triton_autotune_cached" if kwargs.get("cache_hit") else "triton_autotune"
            TIMELINE.add(name, float(kwargs.get("duration") or 0.0))
            if previous_tuner:
                previous_tuner(**kwargs)

        autotuning.listener = tuned


TIMELINE = Timeline(os.environ.get(ENV_VAR) or None)

span = TIMELINE.span
mark = TIMELINE.mark
accumulate = TIMELINE.accumulate
add = TIMELINE.add
timed_iter = TIMELINE.timed_iter


def finish() -> None:
    """Mark the exit and write the report (once); runs at interpreter exit, or earlier for a fast exit."""
    if TIMELINE.enabled and "exit" not in TIMELINE.marks:
        TIMELINE.mark("exit")
        TIMELINE.write()


if TIMELINE.enabled:  # written at interpreter exit, so early returns and errors are reported too
    import atexit

    atexit.register(finish)


def enabled() -> bool:
    return TIMELINE.enabled


def write() -> Path | None:
    """Write the report to the file ``SEEDVR2_TIMING_JSON`` names (nothing when it is unset)."""
    return TIMELINE.write() if TIMELINE.enabled else None
