"""Memory management: phase hygiene and reports, whole-model offload, and BlockSwap.

* :func:`memory_efficient_context` wraps a big phase (VAE encode, DiT, VAE decode): caches are cleared
  before and after, the peak is recorded, and ``SEEDVR2_DEBUG_MEMORY=1`` logs one line per phase.
* :func:`memory_report` / :func:`memory_pressure` read free/total device memory and host RAM (psutil if
  installed, else ``/proc/meminfo``).
* :func:`offload` moves a whole model between phases, leaving blocks managed by a BlockSwap alone; a model
  that came to the GPU from pinned memory goes back to that copy without a transfer, while its weights
  are unchanged.
* :func:`copy_to_host` writes GPU results into ordinary (pageable) host tensors through two small pinned
  buffers, the GPU's copy of one chunk overlapping the host's copy of the previous one.
* :class:`HostPrefault` touches the pages of a fresh host result tensor on a background thread while the
  GPU is busy, so the copies into it later do not stop at every page.
* :class:`BlockSwap` keeps the last N transformer blocks in (pinned) host memory and copies each to the
  GPU just for its own forward, on a side stream while the block before it computes.
"""
from __future__ import annotations

import atexit
import gc
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .switches import env_switch

logger = logging.getLogger(__name__)

DEBUG_MEMORY_ENV = "SEEDVR2_DEBUG_MEMORY"
GIB = 1024 ** 3


# ---------------------------------------------------------------------------------------------------
# Reading memory
# ---------------------------------------------------------------------------------------------------


def _parse_meminfo(text: str) -> tuple[int, int] | None:
    kib = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            kib[name] = int(fields[0])
    if "MemTotal" not in kib:
        return None
    available = kib.get("MemAvailable", kib.get("MemFree", 0))  # MemAvailable needs Linux 3.14+
    return available * 1024, kib["MemTotal"] * 1024


def host_memory() -> tuple[int, int] | None:
    """(available, total) bytes of host RAM from psutil, else ``/proc/meminfo``; None where neither exists."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        memory = psutil.virtual_memory()
        return memory.available, memory.total
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            return _parse_meminfo(meminfo.read())
    except OSError:
        return None


def device_memory(device: torch.device | str) -> tuple[int, int] | None:
    """(free, total) bytes of ``device``; the CPU's memory is the host's.  None where unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)
    if device.type == "mps" and hasattr(torch.mps, "recommended_max_memory"):
        total = torch.mps.recommended_max_memory()
        return max(total - torch.mps.driver_allocated_memory(), 0), total
    if device.type == "cpu":
        return host_memory()
    return None


@dataclass(frozen=True)
class MemoryReport:
    """A snapshot of device and host memory in bytes; None where the platform does not tell."""

    label: str
    device: str
    device_free: int | None
    device_total: int | None
    allocated: int | None        # held by live PyTorch tensors on the device (CUDA, MPS)
    reserved: int | None         # held by PyTorch's caching allocator (CUDA)
    peak_allocated: int | None   # highest `allocated` since the last reset_peak_memory (CUDA)
    host_available: int | None
    host_total: int | None

    @property
    def device_used_fraction(self) -> float | None:
        if not self.device_total or self.device_free is None:
            return None
        return 1.0 - self.device_free / self.device_total

    @property
    def host_used_fraction(self) -> float | None:
        if not self.host_total or self.host_available is None:
            return None
        return 1.0 - self.host_available / self.host_total

    def __str__(self) -> str:
        def gib(value: int | None) -> str:
            return "?" if value is None else f"{value / GIB:.2f}"

        parts = [f"{self.label}: {self.device}"]
        if self.device_total is not None and self.device_free is not None:
            parts.append(f"used {gib(self.device_total - self.device_free)}/{gib(self.device_total)} GiB")
        if self.allocated is not None:
            parts.append(f"(tensors {gib(self.allocated)}, cached {gib(self.reserved)}, "
                         f"peak {gib(self.peak_allocated)} GiB)")
        if self.host_total is not None and self.host_available is not None and self.device != "cpu":
            parts.append(f"| RAM used {gib(self.host_total - self.host_available)}/{gib(self.host_total)} GiB")
        return " ".join(parts)


def memory_report(device: torch.device | str, label: str = "") -> MemoryReport:
    """Snapshot of ``device`` and host memory now."""
    device = torch.device(device)
    free_total = device_memory(device)
    host = host_memory()
    allocated = reserved = peak = None
    if device.type == "cuda":
        allocated = torch.cuda.memory_allocated(device)
        reserved = torch.cuda.memory_reserved(device)
        peak = torch.cuda.max_memory_allocated(device)
    elif device.type == "mps":
        allocated = torch.mps.current_allocated_memory()
    return MemoryReport(
        label=label, device=str(device),
        device_free=free_total[0] if free_total else None, device_total=free_total[1] if free_total else None,
        allocated=allocated, reserved=reserved, peak_allocated=peak,
        host_available=host[0] if host else None, host_total=host[1] if host else None)


def memory_pressure(device: torch.device | str) -> float:
    """The larger used fraction (0 to 1) of ``device`` memory and host RAM; 0 where neither is known."""
    report = memory_report(device)
    fractions = [f for f in (report.device_used_fraction, report.host_used_fraction) if f is not None]
    return max(fractions, default=0.0)


def clear_memory(device: torch.device | str | None = None) -> None:
    """Collect garbage and return cached allocator blocks of ``device`` (all accelerators if None).

    A no-op for the CPU: there is no allocator cache to return, and a full collection costs real time.
    """
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cpu":
        return
    gc.collect()
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        torch.cuda.empty_cache()
    if torch.backends.mps.is_available() and (device is None or device.type == "mps"):
        torch.mps.empty_cache()


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new peak measurement on ``device`` (CUDA; a no-op elsewhere).

    Before CUDA is initialised nothing has been allocated and the counters start at zero with it, while
    PyTorch's reset raises "Invalid device argument" (its allocator has no devices yet): nothing to do then.
    """
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats(device)


def debug_memory_enabled() -> bool:
    """True when ``SEEDVR2_DEBUG_MEMORY`` is 1/true/yes/on."""
    return env_switch(DEBUG_MEMORY_ENV, default=False)


@dataclass
class PhaseMemory:
    """What one phase did to memory: snapshots at its start and end, and its peak (CUDA)."""

    label: str
    before: MemoryReport
    after: MemoryReport | None = None
    peak_allocated: int | None = None

    def __str__(self) -> str:
        peak = "" if self.peak_allocated is None else f"peak {self.peak_allocated / GIB:.2f} GiB; "
        return f"memory {self.label}: {peak}before [{self.before}]; after [{self.after}]"


@contextmanager
def memory_efficient_context(device: torch.device | str, label: str = "phase") -> Iterator[PhaseMemory]:
    """Clear caches around a big phase and record its peak; logs one line with ``SEEDVR2_DEBUG_MEMORY=1``."""
    device = torch.device(device)
    clear_memory(device)
    reset_peak_memory(device)
    phase = PhaseMemory(label, before=memory_report(device, "start"))
    try:
        yield phase
    finally:
        cuda_used = device.type == "cuda" and torch.cuda.is_initialized()
        phase.peak_allocated = torch.cuda.max_memory_allocated(device) if cuda_used else None
        clear_memory(device)  # also after a failure: an OOM leaves the most behind
        phase.after = memory_report(device, "end")
        if debug_memory_enabled():
            logger.info("%s", phase)


# ---------------------------------------------------------------------------------------------------
# Device-to-host results
# ---------------------------------------------------------------------------------------------------

# A copy from the GPU straight into pageable memory goes through the driver's own staging, one small
# piece at a time, and faults in every fresh page on the way: 1.4 GB/s for the 820 MB result of a 33-frame
# 1080p job on an H100 (0.6 s).  Through pinned chunks the GPU copies at PCIe speed while the host's
# multi-threaded copy of the previous chunk runs.
STAGING_CHUNK_BYTES = 32 << 20
_staging: list[torch.Tensor] = []  # two pinned chunks, allocated on first use and kept


def _staging_buffers() -> list[torch.Tensor]:
    if not _staging:
        _staging.extend(torch.empty(STAGING_CHUNK_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2))
    return _staging


def copy_to_host(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for a CUDA ``src`` and a host ``dst`` of the same shape and dtype, staged through
    pinned chunks along the first dimension; any other pair (or a pinned ``dst``) is copied directly."""
    row_bytes = src[0].numel() * src.element_size() if src.ndim and src.shape[0] else 0
    staged = (src.is_cuda and dst.device.type == "cpu" and not dst.is_pinned() and src.dtype == dst.dtype
              and src.shape == dst.shape and 0 < row_bytes <= STAGING_CHUNK_BYTES
              and src.numel() * src.element_size() > STAGING_CHUNK_BYTES)
    if not staged:
        dst.copy_(src)
        return
    src = src.contiguous()
    buffers = _staging_buffers()
    rows = STAGING_CHUNK_BYTES // row_bytes
    stream = torch.cuda.current_stream(src.device)  # where copy_ enqueues the transfers
    events = [torch.cuda.Event(), torch.cuda.Event()]
    pending: tuple[torch.Tensor, torch.Tensor, torch.cuda.Event] | None = None
    for index, start in enumerate(range(0, src.shape[0], rows)):
        part = src[start:start + rows]
        stage = buffers[index % 2][:part.numel() * part.element_size()].view(part.dtype).view(part.shape)
        stage.copy_(part, non_blocking=True)
        events[index % 2].record(stream)
        if pending is not None:  # the host copies the previous chunk while this one crosses the bus
            pending[2].synchronize()
            pending[0].copy_(pending[1])
        pending = (dst[start:start + rows], stage, events[index % 2])
    pending[2].synchronize()
    pending[0].copy_(pending[1])


class HostPrefault:
    """Fault in every page of a fresh host tensor on a background thread; :meth:`wait` before writing to it.

    A fresh ``torch.empty`` of host memory is only reserved address space: the first write to each 4 KiB page
    stops in the kernel to map it.  For the 820 MB result of a 33-frame 1080p job that is ~0.2 s of the
    post-process spent in page faults (0.23 s against 0.07 s for a copy into touched pages, on the CI's
    cores).  Touching one value per page while the GPU encodes takes that off the critical path.  The
    values written are zeros; the tensor is uninitialised memory to the caller either way.
    """

    PAGE_BYTES = 4096

    def __init__(self, tensor: torch.Tensor) -> None:
        self._thread: threading.Thread | None = None
        if tensor.device.type != "cpu" or tensor.is_pinned() or not tensor.is_contiguous() or tensor.numel() == 0:
            return  # pinned memory is mapped when allocated; GPU memory has no host pages
        step = max(1, self.PAGE_BYTES // tensor.element_size())
        self._thread = start_background("seedvr2-prefault", _touch_pages, tensor.view(-1)[::step])

    def wait(self) -> None:
        """Return once every page is mapped (at once if there was nothing to do)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def _touch_pages(pages: torch.Tensor) -> None:
    # A tensor made under inference mode (ComfyUI runs nodes so) may only be written to under it, and the
    # mode is per thread: take the tensor's own.
    with torch.inference_mode(torch.is_inference(pages)):
        pages.zero_()


# ---------------------------------------------------------------------------------------------------
# Background threads
# ---------------------------------------------------------------------------------------------------

_BACKGROUND: set[threading.Thread] = set()
_BACKGROUND_LOCK = threading.Lock()
_FAILED_ONCE: set[str] = set()
EXIT_JOIN_SECONDS = 30.0


def start_background(name: str, work: Callable[..., None], *args: object) -> threading.Thread:
    """Run ``work(*args)`` on a named daemon thread that never prints a traceback: a failure is logged once per
    name (background work only speeds things up; the caller does the work itself if it matters) and every
    such thread still running at interpreter exit is joined first (a thread still inside PyTorch when the
    interpreter tears down aborts the process)."""

    def run() -> None:
        try:
            work(*args)
        except BaseException as error:  # noqa: BLE001 - reported once, never raised into the thread's hook
            if name not in _FAILED_ONCE:
                _FAILED_ONCE.add(name)
                logger.warning("SeedVR2: background work %s failed (%s: %s); continuing without it.",
                               name, type(error).__name__, error)
        finally:
            with _BACKGROUND_LOCK:
                _BACKGROUND.discard(threading.current_thread())

    thread = threading.Thread(target=run, name=name, daemon=True)
    with _BACKGROUND_LOCK:
        _BACKGROUND.add(thread)
    thread.start()
    return thread


def background_threads() -> list[threading.Thread]:
    """The background threads started here that are still running."""
    with _BACKGROUND_LOCK:
        return [thread for thread in _BACKGROUND if thread.is_alive()]


def join_background(timeout: float = EXIT_JOIN_SECONDS) -> None:
    """Wait (up to ``timeout`` seconds in all) for every background thread started here to end."""
    deadline = time.monotonic() + timeout
    for thread in background_threads():
        thread.join(max(0.0, deadline - time.monotonic()))


atexit.register(join_background)


# ---------------------------------------------------------------------------------------------------
# Moving weights
# ---------------------------------------------------------------------------------------------------

_SWAP_MANAGED: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # modules whose weights a BlockSwap owns
_ALIGNMENT = 256  # bytes: every packed tensor starts where a fresh CUDA allocation would


def _aligned(nbytes: int) -> int:
    return (nbytes + _ALIGNMENT - 1) // _ALIGNMENT * _ALIGNMENT


def _resolve_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} was requested but CUDA is not available; use 'cpu' or install a "
                             f"CUDA build of PyTorch.")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def _outside_swap(module: nn.Module) -> Iterator[nn.Module]:
    if module in _SWAP_MANAGED:
        return
    yield module
    for child in module.children():
        yield from _outside_swap(child)


@dataclass
class _HostCopy:
    """The pinned host tensor a GPU weight was copied from, and how to tell that the weight is unchanged."""

    host: torch.Tensor
    data_ptr: int  # the GPU tensor's: assigning new data (``param.data = ...``) moves it
    version: int   # the GPU tensor's version counter: any in-place write through it increments it

    @classmethod
    def of(cls, host: torch.Tensor, tensor: torch.Tensor) -> "_HostCopy | None":
        """The record for ``tensor`` (just copied from ``host``), or None where an in-place write could not be
        told: inference tensors (weights moved inside ComfyUI's inference mode) keep no version counter, so
        theirs are copied again each time."""
        if tensor.is_inference():
            return None
        return cls(host, tensor.data_ptr(), tensor._version)

    def still_matches(self, tensor: torch.Tensor) -> bool:
        return (not tensor.is_inference() and tensor.data_ptr() == self.data_ptr
                and tensor._version == self.version and tensor.stride() == self.host.stride())


# GPU weight -> its pinned host copy.  Weak keys by identity: a dropped model takes its entries (and pinned
# memory) along.
_HOST_COPIES: "WeakIdKeyDictionary" = WeakIdKeyDictionary()


def offload(model: nn.Module, device: torch.device | str, pin_memory: bool = False) -> nn.Module:
    """Move every parameter and buffer of ``model`` to ``device``, leaving BlockSwap-managed blocks alone.

    With ``pin_memory`` a move to the CPU lands in pinned memory, so the next move to the GPU is a fast
    asynchronous copy.  That pinned copy is kept while the weights are on the GPU (pinned memory freed by
    PyTorch stays in its host cache anyway), so moving them back, unchanged, is free: a DiT offloaded between
    phases skips the transfer back each time (3.3 GB, 0.06 s on an H100's PCIe; 16 GB for the 7B in bf16).  A
    weight written in place or given new data since is copied again.  Use this instead of ``model.to()``
    while a BlockSwap is installed.
    """
    device = _resolve_device(device)
    pin = pin_memory and device.type == "cpu" and torch.cuda.is_available()
    copied_from_gpu = False
    for module in _outside_swap(model):
        for _, tensor in itertools.chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False)):
            if tensor.device == device and (not pin or tensor.is_pinned()):
                continue
            kept = _HOST_COPIES.pop(tensor, None)
            if pin and kept is not None and kept.still_matches(tensor):
                tensor.data = kept.host
                continue
            if pin:
                # Same strides as the source, so layouts such as channels_last_3d survive the round trip.
                moved = torch.empty_strided(tensor.size(), tensor.stride(), dtype=tensor.dtype, pin_memory=True)
                moved.copy_(tensor.detach(), non_blocking=True)
                copied_from_gpu |= tensor.is_cuda
            else:
                # Only a pinned source makes an asynchronous copy safe (the host-to-GPU direction).
                source = tensor.detach()
                moved = source.to(device, non_blocking=source.is_pinned())
            if device.type == "cuda" and tensor.is_pinned():
                host = tensor.data
                tensor.data = moved
                record = _HostCopy.of(host, tensor)
                if record is not None:
                    _HOST_COPIES[tensor] = record
            else:
                tensor.data = moved
    if copied_from_gpu:
        torch.cuda.synchronize()  # the asynchronous copies into pinned memory must land before anyone reads them
    return model


def _host_buffer(nbytes: int, device: torch.device, pin: bool) -> torch.Tensor:
    if pin:
        try:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        except RuntimeError as error:  # page-locked memory is limited on some systems (WSL, containers)
            logger.warning("BlockSwap: cannot pin %d MiB of host memory (%s); using pageable memory, transfers "
                           "will not overlap with compute", nbytes >> 20, error)
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


class PackedWeights:
    """Every parameter and buffer of one module packed into one flat byte buffer on the offload device.

    Between uses the module's tensors are views into that buffer; :meth:`attach` points them into a
    buffer on the main device, :meth:`detach` back.  One buffer means one copy per transfer.
    """

    def __init__(self, module: nn.Module, name: str, offload_device: torch.device, pin_memory: bool):
        self.name = name
        self.tensors = self.packable_tensors(module, name)
        self.offsets: list[int] = []
        self.original_devices = [tensor.device for tensor in self.tensors]
        size = 0
        for tensor in self.tensors:
            self.offsets.append(size)
            size += _aligned(tensor.numel() * tensor.element_size())
        self.nbytes = size
        self.host = _host_buffer(size, offload_device, pin_memory)
        for tensor, view in zip(self.tensors, self._views(self.host)):
            view.copy_(tensor.detach())
            tensor.data = view  # frees the module's own storage

    @staticmethod
    def packable_tensors(module: nn.Module, name: str) -> list[torch.Tensor]:
        """The distinct parameters and buffers of ``module``; raises if one cannot be packed."""
        tensors, seen = [], set()
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            if type(tensor) not in (torch.Tensor, nn.Parameter) or tensor.is_meta:
                raise ValueError(
                    f"BlockSwap needs loaded, plain tensors, but {name} holds a "
                    f"{'meta' if tensor.is_meta else type(tensor).__name__} tensor; load the weights "
                    f"(or dequantize them) before installing BlockSwap, or set blocks_to_swap to 0.")
            tensors.append(tensor)
        return tensors

    def _views(self, buffer: torch.Tensor) -> Iterator[torch.Tensor]:
        for tensor, offset in zip(self.tensors, self.offsets):
            nbytes = tensor.numel() * tensor.element_size()
            yield buffer[offset:offset + nbytes].view(tensor.dtype).view(tensor.shape)

    def attach(self, buffer: torch.Tensor) -> None:
        """Point the module's tensors into ``buffer`` (a copy of the packed bytes)."""
        for tensor, view in zip(self.tensors, self._views(buffer)):
            tensor.data = view

    def detach(self) -> None:
        """Point the module's tensors back into the offload buffer."""
        self.attach(self.host)

    def restore(self) -> None:
        """Give every tensor its own storage again, on the device it had before packing."""
        for tensor, view, device in zip(self.tensors, self._views(self.host), self.original_devices):
            tensor.data = view.to(device, copy=True)


class _BlockingTransfers:
    """Copies on the calling thread, used where there is no asynchronous copy engine (CPU, MPS)."""

    prefetch = False

    def __init__(self, device: torch.device):
        self.device = device
        self.buffers: list[torch.Tensor | None] = [None, None]

    def load(self, weights: PackedWeights, slot: int) -> None:
        self.buffers[slot] = weights.host.to(self.device)  # no copy at all when the devices are the same

    def buffer_for_compute(self, slot: int) -> torch.Tensor:
        return self.buffers[slot]

    def release(self, slot: int) -> None:
        self.buffers[slot] = None

    def drop_buffers(self) -> None:
        self.buffers = [None, None]

    def synchronize(self) -> None:
        pass


class _StreamedTransfers:
    """Copies on a side CUDA stream into two device slots, ordered against compute by events.

    A copy into a slot waits for the compute that last read it (``free``); compute waits for the copy
    into its slot (``ready``).  Two slots bound the device memory of swapped blocks to two blocks.
    """

    prefetch = True

    def __init__(self, device: torch.device, slot_bytes: int):
        self.device = device
        self.slot_bytes = slot_bytes
        self.stream = torch.cuda.Stream(device)
        self.drop_buffers()

    def _buffer(self, slot: int) -> torch.Tensor:
        if self.buffers[slot] is None:
            compute = torch.cuda.current_stream(self.device)
            buffer = torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device)
            buffer.record_stream(self.stream)  # the allocator must not reuse it before the copy stream is done
            # Fresh memory may still be read by compute queued earlier: the first copy waits for it.
            self.stream.wait_stream(compute)
            self.buffers[slot] = buffer
        return self.buffers[slot]

    def load(self, weights: PackedWeights, slot: int) -> None:
        buffer = self._buffer(slot)
        with torch.cuda.stream(self.stream):
            if self.free[slot] is not None:
                self.stream.wait_event(self.free[slot])
            buffer[:weights.nbytes].copy_(weights.host, non_blocking=True)
            self.ready[slot] = torch.cuda.Event()
            self.ready[slot].record(self.stream)

    def buffer_for_compute(self, slot: int) -> torch.Tensor:
        torch.cuda.current_stream(self.device).wait_event(self.ready[slot])
        return self.buffers[slot]

    def release(self, slot: int) -> None:
        self.free[slot] = torch.cuda.Event()
        self.free[slot].record(torch.cuda.current_stream(self.device))

    def drop_buffers(self) -> None:
        self.buffers: list[torch.Tensor | None] = [None, None]
        self.ready: list[torch.cuda.Event | None] = [None, None]
        self.free: list[torch.cuda.Event | None] = [None, None]

    def synchronize(self) -> None:
        self.stream.synchronize()


class BlockSwap:
    """Keeps the last ``blocks_to_swap`` blocks in offload memory; each visits the main device for its forward.

    Why the last blocks: a forward runs the resident blocks first, so the copy of the first swapped block
    overlaps their compute and no forward starts by waiting for a transfer (swapping the first blocks
    would make every call begin with a blocking copy).

    On CUDA the swapped weights live in pinned host memory, block i+1 is copied on a side stream while
    block i computes, and the two device slots they use are freed after the forward, so swapping saves
    about ``blocks_to_swap - 2`` blocks at the forward's peak and all of them between forwards.
    Elsewhere (CPU, MPS) each block is copied just before it runs; with ``main_device == offload_device``
    nothing is copied at all and the model computes exactly as without BlockSwap.  ``swap_io`` modules
    (embeddings, output head) are kept offloaded the same way and copied when called.

    Installed with forward pre/post hooks; :meth:`remove` (or leaving a ``with`` block) restores the
    modules.  Move the rest of the model with :func:`offload`, which leaves swapped blocks alone.
    """

    def __init__(self, blocks: nn.ModuleList, blocks_to_swap: int, main_device: torch.device | str,
                 offload_device: torch.device | str, swap_io: Sequence[nn.Module] = (), pin_memory: bool = True):
        if blocks_to_swap < 0:
            raise ValueError(f"blocks_to_swap must be 0 or more (got {blocks_to_swap}).")
        count = min(blocks_to_swap, len(blocks))
        if count < blocks_to_swap:
            logger.info("BlockSwap: the model has %d blocks; swapping all of them, not %d", len(blocks), blocks_to_swap)
        self.main_device = _resolve_device(main_device)
        self.offload_device = _resolve_device(offload_device)
        self.swapped_indices = tuple(range(len(blocks) - count, len(blocks)))
        modules = [blocks[i] for i in self.swapped_indices] + list(swap_io)
        for module in modules:
            if module in _SWAP_MANAGED:
                raise ValueError(f"{type(module).__name__} is already managed by another BlockSwap; remove() that "
                                 f"one first.")

        streamed = self.main_device.type == "cuda" and self.main_device != self.offload_device
        pin = pin_memory and streamed and self.offload_device.type == "cpu"
        names = [f"block {i}" for i in self.swapped_indices] + [type(m).__name__ for m in swap_io]
        for module, name in zip(modules, names):
            PackedWeights.packable_tensors(module, name)  # check them all before changing any
        packed = []
        for module, name in zip(modules, names):
            packed.append(PackedWeights(module, name, self.offload_device, pin))
            # After one refusal, do not ask (and warn) again.
            pin = pin and (packed[-1].nbytes == 0 or packed[-1].host.is_pinned())
        self._blocks, self._io = packed[:count], packed[count:]
        self._modules = modules
        _SWAP_MANAGED.update(modules)
        slot_bytes = max((weights.nbytes for weights in self._blocks), default=0)
        self._transfers = (_StreamedTransfers(self.main_device, slot_bytes) if streamed
                           else _BlockingTransfers(self.main_device))
        self._slot_owner: list[int | None] = [None, None]   # which swapped block each slot holds
        self._active_slot: int | None = None                 # the slot of the block running now
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._install_hooks(blocks)
        if count or self._io:
            how = ("copied on a side stream while the block before it runs" if streamed
                   else "nothing is copied: both devices are the same" if self.main_device == self.offload_device
                   else "copied just before it runs")
            logger.info("BlockSwap: %d of %d blocks (%d MiB each) and %d I/O modules live on %s%s; %s",
                        count, len(blocks), slot_bytes >> 20, len(self._io), self.offload_device,
                        " (pinned)" if pin else "", how)

    def _install_hooks(self, blocks: nn.ModuleList) -> None:
        def hook(action: Callable[[], None]) -> Callable[..., None]:
            @torch.compiler.disable  # weight transfers stay eager even inside a compiled model
            def run(module: nn.Module, *hook_args: object) -> None:
                action()

            return run

        if self.swapped_indices and self._transfers.prefetch and self.swapped_indices[0] > 0:
            resident_before = blocks[self.swapped_indices[0] - 1]
            self._handles.append(resident_before.register_forward_pre_hook(hook(lambda: self._load(0))))
        for position, index in enumerate(self.swapped_indices):
            self._handles.append(blocks[index].register_forward_pre_hook(
                hook(lambda p=position: self._before_block(p))))
            self._handles.append(blocks[index].register_forward_hook(
                hook(lambda p=position: self._after_block(p)), always_call=True))
        for weights, module in zip(self._io, self._modules[len(self._blocks):]):
            self._handles.append(module.register_forward_pre_hook(
                hook(lambda w=weights: w.attach(w.host.to(self.main_device, non_blocking=True)))))
            self._handles.append(module.register_forward_hook(hook(weights.detach), always_call=True))

    def _load(self, position: int) -> int:
        slot = 1 if self._active_slot == 0 else 0  # never the slot of the block that is running
        self._transfers.load(self._blocks[position], slot)
        self._slot_owner[slot] = position
        return slot

    def _before_block(self, position: int) -> None:
        slot = self._slot_owner.index(position) if position in self._slot_owner else self._load(position)
        self._blocks[position].attach(self._transfers.buffer_for_compute(slot))
        self._active_slot = slot
        if self._transfers.prefetch and position + 1 < len(self._blocks):
            self._load(position + 1)

    def _after_block(self, position: int) -> None:
        self._blocks[position].detach()
        slot, self._active_slot = self._active_slot, None
        if slot is not None:
            self._transfers.release(slot)
            self._slot_owner[slot] = None
        if position == len(self._blocks) - 1:
            # The forward is past its last swapped block: give the slots back until the next one.
            self._transfers.drop_buffers()
            self._slot_owner = [None, None]

    def remove(self) -> None:
        """Remove the hooks and give every swapped tensor its own storage on its original device again."""
        if not self._handles and not self._modules:
            return
        for handle in self._handles:
            handle.remove()
        self._transfers.synchronize()
        self._transfers.drop_buffers()
        for weights in (*self._blocks, *self._io):
            weights.restore()
        for module in self._modules:
            _SWAP_MANAGED.discard(module)
        self._handles, self._modules, self._blocks, self._io = [], [], [], []

    def __enter__(self) -> BlockSwap:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()
