"""Read a safetensors file onto its device at disk or page-cache speed.

The plain path (``safe_open(...).get_tensor`` then ``.to(device, dtype)``) makes, per tensor, a pageable host
copy, maybe a host-side dtype conversion, and a pageable-to-device transfer that the driver stages through
its own small buffers; on a 3B checkpoint that is seconds of single-threaded copying for a file the page cache
already holds.  Here the file is read in large tensor-aligned chunks by a few threads (unbuffered ``readinto``
straight into pinned buffers, the GIL released), each chunk crosses to the GPU in one asynchronous copy, and the
tensors are cut out of it and converted to their storage dtype on the GPU.  Reading chunk n+1 overlaps the
transfer of chunk n; a pinned buffer is reused only once its copy has finished.

For a CPU target the same reader fills the tensors directly (one copy; a conversion only where the dtype
changes).  Only ``materialize``'s contract matters to callers: the same tensors, bit for bit, as
``checkpoint.materialize``.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

from .checkpoint import SAFETENSORS_DTYPES, CheckpointError, _read_safetensors_header, _strip_prefix

CHUNK_BYTES = 64 << 20   # one read and one host-to-device copy; big enough to run both at full speed
BUFFERS = 4              # chunks in flight: read ahead while earlier ones cross to the device
READERS = 4              # threads reading the file (page-cache copies run at a few GB/s per thread)


@dataclass(frozen=True)
class Entry:
    key: str        # prefix-stripped name
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int      # byte offsets in the file
    end: int


@dataclass(frozen=True)
class Chunk:
    begin: int
    end: int
    entries: tuple[Entry, ...]

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def file_entries(path: Path) -> list[Entry]:
    """The tensors of a safetensors file in file order, with absolute byte offsets (header validated)."""
    header, data_start = _read_safetensors_header(path)
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        entries.append(Entry(_strip_prefix(name), SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]),
                             data_start + begin, data_start + end))
    entries.sort(key=lambda e: e.begin)
    return entries


def plan_chunks(entries: list[Entry], chunk_bytes: int = CHUNK_BYTES) -> list[Chunk]:
    """Group consecutive tensors into chunks of at most ``chunk_bytes`` (a larger tensor is a chunk of its own).

    Chunks cover the bytes from their first tensor's start to their last one's end, gaps included, so each
    is one contiguous read."""
    chunks: list[Chunk] = []
    current: list[Entry] = []
    for entry in entries:
        if current and entry.end - current[0].begin > chunk_bytes:
            chunks.append(Chunk(current[0].begin, current[-1].end, tuple(current)))
            current = []
        current.append(entry)
    if current:
        chunks.append(Chunk(current[0].begin, current[-1].end, tuple(current)))
    return chunks


def _read_into(path: Path, buffer: torch.Tensor, offset: int) -> None:
    """Fill the uint8 ``buffer`` from the file at ``offset`` (unbuffered ``readinto``: one copy, GIL released)."""
    view = memoryview(buffer.numpy()).cast("B")
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        done = 0
        while done < len(view):
            count = f.readinto(view[done:])
            if not count:
                raise CheckpointError(f"{path}: the file ended early while reading it: it is truncated. Delete "
                                      f"it and download it again.")
            done += count


def materialize(model: torch.nn.Module, path: Path, *, device: torch.device | str,
                dtype_for: Callable[[str, torch.Tensor], torch.dtype | None],
                overrides: Mapping[str, torch.Tensor] = {}, chunk_bytes: int = CHUNK_BYTES) -> torch.nn.Module:
    """Fill a meta-device ``model`` from a safetensors ``path`` (see :func:`checkpoint.materialize`)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    entries = [e for e in file_entries(path) if e.key in expected and e.key not in overrides]
    state = _read_tensors(path, entries, device, dtype_for, chunk_bytes)
    for key, tensor in overrides.items():
        state[key] = tensor.to(device)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _target_dtype(entry: Entry, dtype_for) -> torch.dtype:
    # The rule looks at a tensor's dtype only; a zero-size stand-in avoids reading anything to ask it.
    return dtype_for(entry.key, torch.empty(0, dtype=entry.dtype)) or entry.dtype


def _as_tensor(raw: torch.Tensor, entry: Entry) -> torch.Tensor:
    """The bytes of one tensor viewed as it is stored (copied first where they are not aligned for the dtype)."""
    if entry.end == entry.begin:
        return torch.empty(entry.shape, dtype=entry.dtype, device=raw.device)
    size = torch.empty(0, dtype=entry.dtype).element_size()
    if raw.data_ptr() % size:
        raw = raw.clone()
    return raw.view(entry.dtype).view(entry.shape)


def _read_tensors(path: Path, entries: list[Entry], device: torch.device, dtype_for,
                  chunk_bytes: int) -> dict[str, torch.Tensor]:
    chunks = plan_chunks(entries, chunk_bytes)
    if not chunks:
        return {}
    cuda = device.type == "cuda"
    largest = max(chunk.nbytes for chunk in chunks)
    slots = min(BUFFERS, len(chunks))
    host = [torch.empty(largest, dtype=torch.uint8, pin_memory=cuda) for _ in range(slots)]
    staging = torch.empty(largest, dtype=torch.uint8, device=device) if cuda else None
    copied = [torch.cuda.Event() if cuda else None for _ in range(slots)]
    stream = torch.cuda.current_stream(device) if cuda else None
    state: dict[str, torch.Tensor] = {}
    with ThreadPoolExecutor(max_workers=min(READERS, slots), thread_name_prefix="seedvr2-read") as pool:
        def read(index: int):
            slot = index % slots
            if copied[slot] is not None:
                copied[slot].synchronize()  # the buffer's previous chunk has reached the device
            chunk = chunks[index]
            _read_into(path, host[slot][:chunk.nbytes], chunk.begin)

        pending = {i: pool.submit(read, i) for i in range(slots)}
        for index, chunk in enumerate(chunks):
            pending.pop(index).result()
            slot = index % slots
            data = host[slot][:chunk.nbytes]
            if cuda:
                gpu = staging[:chunk.nbytes]
                gpu.copy_(data, non_blocking=True)
                copied[slot].record(stream)
                data = gpu
            for entry in chunk.entries:
                raw = data[entry.begin - chunk.begin:entry.end - chunk.begin]
                source = _as_tensor(raw, entry)
                target = torch.empty(entry.shape, dtype=_target_dtype(entry, dtype_for), device=device)
                target.copy_(source)  # on the device: a conversion kernel where the dtype changes
                state[entry.key] = target
            if index + slots < len(chunks):
                pending[index + slots] = pool.submit(read, index + slots)
    if cuda:
        stream.synchronize()  # the pinned buffers and the staging chunk are freed after this
    return state
