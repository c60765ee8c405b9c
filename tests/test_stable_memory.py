"""Memory manager: reports, phase context, offload and BlockSwap (CPU here; CUDA tests run where available)."""
from __future__ import annotations

import logging
import os

import pytest
import torch
from torch import nn

from src.optimization import stable_memory
from src.optimization.stable_memory import (
    DEBUG_MEMORY_ENV,
    BlockSwap,
    MemoryReport,
    PhaseMemory,
    host_memory,
    memory_efficient_context,
    memory_pressure,
    memory_report,
    offload,
)

LOGGER = stable_memory.__name__
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def meminfo_kib(field: str) -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field} missing from /proc/meminfo")


# --- reports -----------------------------------------------------------------------------------------


def test_meminfo_parsing_reads_available_and_total():
    text = "MemTotal:       16384000 kB\nMemFree:          100000 kB\nMemAvailable:    8192000 kB\nFoo: bar\n"
    assert stable_memory._parse_meminfo(text) == (8192000 * 1024, 16384000 * 1024)
    assert stable_memory._parse_meminfo("MemTotal: 1000 kB\nMemFree: 10 kB\n") == (10 * 1024, 1000 * 1024)
    assert stable_memory._parse_meminfo("nothing useful") is None


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="Linux only")
def test_host_memory_matches_the_kernel():
    available, total = host_memory()
    assert total == meminfo_kib("MemTotal") * 1024
    assert 0 < available <= total


def test_cpu_report_is_sane():
    report = memory_report("cpu", "probe")
    assert isinstance(report, MemoryReport) and report.label == "probe" and report.device == "cpu"
    assert report.host_total > 0 and 0 < report.host_available <= report.host_total
    assert report.device_total == report.host_total  # the CPU's memory is the host's
    assert report.allocated is None and report.peak_allocated is None  # PyTorch does not count CPU tensors
    assert 0.0 <= report.host_used_fraction < 1.0
    assert 0.0 <= memory_pressure("cpu") < 1.0
    assert "GiB" in str(report) and str(report).startswith("probe: cpu used")


def test_phase_context_logs_one_line_only_when_debugging(monkeypatch, caplog):
    monkeypatch.delenv(DEBUG_MEMORY_ENV, raising=False)
    with caplog.at_level(logging.INFO, logger=LOGGER), memory_efficient_context("cpu", "vae encode") as phase:
        torch.ones(1000).sum()
    assert [r for r in caplog.records if r.name == LOGGER] == []
    assert isinstance(phase, PhaseMemory) and phase.before.label == "start" and phase.after.label == "end"

    monkeypatch.setenv(DEBUG_MEMORY_ENV, "1")
    with caplog.at_level(logging.INFO, logger=LOGGER), memory_efficient_context("cpu", "dit"):
        pass
    records = [r for r in caplog.records if r.name == LOGGER]
    assert len(records) == 1 and records[0].getMessage().startswith("memory dit:")


def test_phase_context_finishes_its_report_when_the_phase_fails():
    with pytest.raises(RuntimeError, match="phase failed"), memory_efficient_context("cpu", "decode") as phase:
        raise RuntimeError("phase failed")
    assert phase.after is not None


class FakeCuda:
    """torch.cuda as seen before and after its lazy initialisation, with the real reset's failure mode."""

    def __init__(self, initialised: bool):
        self.initialised, self.resets = initialised, []

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: self.initialised)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", self.reset)
        monkeypatch.setattr(torch.cuda, "mem_get_info", self.mem_get_info)
        for name in ("memory_allocated", "memory_reserved", "max_memory_allocated"):
            monkeypatch.setattr(torch.cuda, name, lambda device=None: 3 << 30 if self.initialised else 0)

    def reset(self, device=None):
        if not self.initialised:  # what PyTorch's caching allocator says before CUDA is initialised
            raise RuntimeError("Invalid device argument : did you call init?")
        self.resets.append(torch.device(device))

    def mem_get_info(self, device=None):
        self.initialised = True  # reading the free memory initialises CUDA, as the real call does
        return 60 << 30, 80 << 30


@pytest.mark.parametrize("debug_env", ["1", None])
def test_phase_context_on_cuda_before_cuda_is_initialised(monkeypatch, caplog, debug_env):
    # The --debug crash: the first phase's context reset CUDA's peak counters before anything had
    # initialised CUDA (the path also runs without --debug when memory is 75 % used).
    fake = FakeCuda(initialised=False)
    fake.install(monkeypatch)
    if debug_env:
        monkeypatch.setenv(DEBUG_MEMORY_ENV, debug_env)
    else:
        monkeypatch.delenv(DEBUG_MEMORY_ENV, raising=False)
    with caplog.at_level(logging.INFO, logger=LOGGER), memory_efficient_context("cuda", "encode") as phase:
        pass
    assert fake.resets == []
    assert phase.before.device_total == 80 << 30 and phase.after is not None
    assert phase.peak_allocated == 3 << 30  # CUDA was initialised during the phase: its peak is read
    assert bool(debug_env) == any(r.getMessage().startswith("memory encode:") for r in caplog.records)


def test_phase_context_resets_the_peak_once_cuda_is_initialised(monkeypatch):
    fake = FakeCuda(initialised=True)
    fake.install(monkeypatch)
    with memory_efficient_context("cuda:0", "decode") as phase:
        pass
    assert fake.resets == [torch.device("cuda:0")] and phase.peak_allocated == 3 << 30
    stable_memory.reset_peak_memory("cpu")
    assert fake.resets == [torch.device("cuda:0")]


# --- BlockSwap on the CPU ------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.register_buffer("offset", torch.linspace(-1, 1, dim))
        self.seen_weight_pointers: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_weight_pointers.append(self.proj.weight.data_ptr())
        return x + torch.tanh(self.proj(self.norm(x))) + self.offset


class Model(nn.Module):
    def __init__(self, dim: int = 12, depth: int = 6):
        super().__init__()
        self.embed = nn.Linear(5, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def make_model(depth: int = 6, dim: int = 12) -> Model:
    torch.manual_seed(3)
    model = Model(dim=dim, depth=depth)
    with torch.no_grad():
        for block in model.blocks:
            block.norm.weight.add_(torch.randn_like(block.norm.weight) * 0.1)
            block.offset.mul_(torch.rand(()))
    return model


def inputs() -> torch.Tensor:
    return torch.randn(7, 5, generator=torch.Generator().manual_seed(11))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def hook_counts(module: nn.Module) -> tuple[int, int]:
    return len(module._forward_pre_hooks), len(module._forward_hooks)


def test_blockswap_on_cpu_keeps_outputs_identical_and_restores_everything():
    model = make_model()
    with torch.no_grad():
        expected = model(inputs())
    before = snapshot(model)
    parameters_before = [id(p) for p in model.parameters()]

    swap = BlockSwap(model.blocks, 3, "cpu", "cpu", swap_io=[model.embed, model.head])
    assert swap.swapped_indices == (3, 4, 5)  # the last blocks: the first swapped copy overlaps resident compute
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(model(inputs()), expected, rtol=0, atol=0)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0, msg=name)

    swap.remove()
    assert [id(p) for p in model.parameters()] == parameters_before
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0, msg=name)
    for module in model.modules():
        assert hook_counts(module) == (0, 0)
    # Restored tensors own their storage again instead of viewing the packed buffer.
    pointers = {p.untyped_storage().data_ptr() for p in model.blocks[3:].parameters()}
    assert len(pointers) == len(list(model.blocks[3:].parameters()))
    swap.remove()  # a second remove is harmless


def test_swapped_weights_live_in_one_packed_buffer_per_block():
    model = make_model()
    swap = BlockSwap(model.blocks, 2, "cpu", "cpu")
    for position, index in enumerate(swap.swapped_indices):
        packed = swap._blocks[position]
        base = packed.host.untyped_storage().data_ptr()
        block = model.blocks[index]
        for tensor in (*block.parameters(), *block.buffers()):
            assert tensor.untyped_storage().data_ptr() == base
            assert (tensor.data_ptr() - base) % 256 == 0
    resident = model.blocks[0].proj.weight.untyped_storage().data_ptr()
    assert resident != swap._blocks[0].host.untyped_storage().data_ptr()
    swap.remove()


class RecordingPrefetchTransfers(stable_memory._BlockingTransfers):
    """The CUDA path's schedule on the CPU: prefetching into two slots, each load a real copy."""

    prefetch = True

    def __init__(self, device):
        super().__init__(device)
        self.events: list[tuple] = []

    def load(self, weights, slot):
        self.events.append(("load", weights.name, slot))
        self.buffers[slot] = weights.host.clone()

    def buffer_for_compute(self, slot):
        self.events.append(("compute", slot))
        return self.buffers[slot]

    def release(self, slot):
        self.events.append(("release", slot))
        super().release(slot)

    def drop_buffers(self):
        self.events.append(("drop",))
        super().drop_buffers()


def test_prefetch_schedule_alternates_two_slots_one_block_ahead(monkeypatch):
    monkeypatch.setattr(stable_memory, "_BlockingTransfers", RecordingPrefetchTransfers)
    model = make_model(depth=6)
    with torch.no_grad():
        expected = model(inputs())
    swap = BlockSwap(model.blocks, 3, "cpu", "cpu")
    events = swap._transfers.events
    for block in model.blocks:
        block.seen_weight_pointers.clear()
    with torch.no_grad():
        torch.testing.assert_close(model(inputs()), expected, rtol=0, atol=0)
    assert events == [
        ("load", "block 3", 0),                                  # while resident block 2 runs
        ("compute", 0), ("load", "block 4", 1), ("release", 0),  # block 3; block 4 copied meanwhile
        ("compute", 1), ("load", "block 5", 0), ("release", 1),  # block 4; block 5 into the freed slot
        ("compute", 0), ("release", 0), ("drop",),               # block 5, then the slots are given back
    ]
    host_pointers = {packed.host.data_ptr() for packed in swap._blocks}
    for index in swap.swapped_indices:
        assert model.blocks[index].seen_weight_pointers[0] not in host_pointers  # computed from a slot copy
    events.clear()
    with torch.no_grad():
        torch.testing.assert_close(model(inputs()), expected, rtol=0, atol=0)
    assert len(events) == 10, "every forward repeats the same schedule"
    swap.remove()


@pytest.mark.parametrize("prefetch", [False, True])
def test_blockswap_survives_a_failing_block(prefetch, monkeypatch):
    if prefetch:
        monkeypatch.setattr(stable_memory, "_BlockingTransfers", RecordingPrefetchTransfers)
    model = make_model()
    with torch.no_grad():
        expected = model(inputs())
    swap = BlockSwap(model.blocks, 3, "cpu", "cpu")

    def broken_forward(x):
        raise RuntimeError("block failed")

    with torch.no_grad():
        model.blocks[4].forward = broken_forward  # the middle swapped block, its successor already prefetched
        with pytest.raises(RuntimeError, match="block failed"):
            model(inputs())
        del model.blocks[4].forward
        for _ in range(2):
            torch.testing.assert_close(model(inputs()), expected, rtol=0, atol=0)
    swap.remove()
    with torch.no_grad():
        torch.testing.assert_close(model(inputs()), expected, rtol=0, atol=0)


def test_blockswap_arguments_are_checked():
    model = make_model(depth=4)
    with pytest.raises(ValueError, match="blocks_to_swap must be 0 or more"):
        BlockSwap(model.blocks, -1, "cpu", "cpu")
    swap = BlockSwap(model.blocks, 36, "cpu", "cpu")  # the UI allows more than a 3B model has
    assert swap.swapped_indices == (0, 1, 2, 3)
    with pytest.raises(ValueError, match="already managed by another BlockSwap"):
        BlockSwap(model.blocks, 1, "cpu", "cpu")
    swap.remove()
    with BlockSwap(model.blocks, 1, "cpu", "cpu") as again:
        assert again.swapped_indices == (3,)
    with BlockSwap(model.blocks, 0, "cpu", "cpu") as nothing:
        assert nothing.swapped_indices == ()
        assert all(hook_counts(block) == (0, 0) for block in model.blocks)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            BlockSwap(model.blocks, 1, "cuda", "cpu")


class MixedDtypes(nn.Module):
    """What quantized blocks hold: fp8 and raw-byte weights, half-precision biases, odd-sized buffers."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(5)
        self.fp8 = nn.Parameter(torch.randn(3, 5, generator=generator).to(torch.float8_e4m3fn), requires_grad=False)
        self.packed = nn.Parameter(torch.randint(0, 255, (7,), dtype=torch.uint8, generator=generator),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.randn(3, generator=generator).to(torch.bfloat16))
        self.register_buffer("scale", torch.tensor(0.5))
        self.register_buffer("index", torch.arange(3))
        self.register_buffer("mask", torch.tensor([True, False, True]), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.fp8.float() * self.scale + self.packed[:5].float() / 255
        return (x @ weight.T + self.bias.float())[:, self.index] * self.mask


def test_blockswap_packs_every_dtype_and_shape_faithfully():
    blocks = nn.ModuleList([MixedDtypes(), MixedDtypes()])
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(2))
    expected = blocks[1](blocks[0](x)[:, [0, 1, 2, 0, 1]])
    before = {name: t.clone() for name, t in blocks.state_dict().items()}
    with BlockSwap(blocks, 2, "cpu", "cpu"):
        torch.testing.assert_close(blocks[1](blocks[0](x)[:, [0, 1, 2, 0, 1]]), expected, rtol=0, atol=0)
        for name, tensor in blocks.state_dict().items():
            assert tensor.dtype == before[name].dtype and torch.equal(tensor, before[name]), name
    for name, tensor in blocks.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert blocks[0].mask.tolist() == [True, False, True]


def test_offload_skips_swapped_blocks_and_copies_nothing_already_in_place():
    model = make_model()
    swap = BlockSwap(model.blocks, 2, "cpu", "cpu")
    pointers = [p.data_ptr() for p in model.parameters()]
    assert offload(model, "cpu") is model
    assert [p.data_ptr() for p in model.parameters()] == pointers
    swapped = {id(m) for block in model.blocks[4:] for m in block.modules()}
    assert [id(m) for m in stable_memory._outside_swap(model)] == [
        id(m) for m in model.modules() if id(m) not in swapped]
    swap.remove()
    assert len(list(stable_memory._outside_swap(model))) == len(list(model.modules()))


# --- CUDA: streamed swapping and pinned offload --------------------------------------------------------


@needs_cuda
def test_streamed_blockswap_matches_a_resident_model_and_bounds_memory():
    model = make_model(depth=8, dim=512).cuda()  # 1 MiB per block
    x = inputs().cuda()
    with torch.no_grad():
        expected = model(x)
    swap = BlockSwap(model.blocks, 5, "cuda", "cpu", swap_io=[model.head])
    offload(model, "cuda")
    for index in swap.swapped_indices:
        assert all(p.device.type == "cpu" and p.is_pinned() for p in model.blocks[index].parameters())
    for block in model.blocks:
        block.seen_weight_pointers.clear()
    block_bytes = swap._blocks[0].nbytes
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(model(x), expected)
    torch.cuda.synchronize()
    # Two slots at most, never the five swapped blocks (plus small activations and the head).
    assert torch.cuda.max_memory_allocated() - resident < 2 * block_bytes + (1 << 20)
    # Swapped blocks computed from two alternating device slots.
    first_forward = [model.blocks[i].seen_weight_pointers[0] for i in swap.swapped_indices]
    assert first_forward[0::2] == [first_forward[0]] * 3 and first_forward[1::2] == [first_forward[1]] * 2
    assert first_forward[0] != first_forward[1]
    for index in swap.swapped_indices:
        assert all(p.device.type == "cpu" for p in model.blocks[index].parameters())
    swap.remove()
    assert all(p.device.type == "cuda" for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


@needs_cuda
def test_offload_round_trip_through_pinned_memory():
    model = make_model().cuda()
    before = snapshot(model)
    offload(model, "cpu", pin_memory=True)
    assert all(p.device.type == "cpu" and p.is_pinned() for p in model.parameters())
    offload(model, "cuda")
    for name, tensor in model.state_dict().items():
        assert tensor.is_cuda
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0)


@needs_cuda
def test_unchanged_weights_go_back_to_their_pinned_copy_and_changed_ones_are_copied():
    model = make_model().cuda()
    offload(model, "cpu", pin_memory=True)
    host = {name: p.data_ptr() for name, p in model.named_parameters()}
    offload(model, "cuda")
    first, second = list(model.parameters())[:2]
    with torch.no_grad():
        first.add_(1.0)                                   # written in place: its host copy is stale
    second.data = second.data.clone()                     # new data: its host copy may be stale
    after = snapshot(model)
    offload(model, "cpu", pin_memory=True)
    for name, p in model.named_parameters():
        assert p.is_pinned() and torch.equal(p, after[name].cpu()), name
        reused = p.data_ptr() == host[name]
        assert reused == (p is not first and p is not second), name
    offload(model, "cuda")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, after[name], rtol=0, atol=0)


def test_a_refused_blockswap_leaves_the_model_untouched():
    model = make_model(depth=4)
    with torch.device("meta"):
        model.blocks[3] = Block(12)
    pointers = [p.data_ptr() for p in model.blocks[:3].parameters()]
    with pytest.raises(ValueError, match="block 3 holds a meta tensor"):
        BlockSwap(model.blocks, 3, "cpu", "cpu")
    assert [p.data_ptr() for p in model.blocks[:3].parameters()] == pointers
    assert all(hook_counts(block) == (0, 0) for block in model.blocks)
    BlockSwap(model.blocks[:3], 2, "cpu", "cpu").remove()  # nothing was registered as managed


# --- results to host memory ------------------------------------------------------------------------------


def test_copy_to_host_copies_directly_between_host_tensors():
    src = torch.randn(5, 4, 3)
    dst = torch.empty(5, 4, 8)[..., :3]  # a strided view, as the RGB channels of an RGBA output
    stable_memory.copy_to_host(dst, src)
    assert torch.equal(dst, src)


@needs_cuda
@pytest.mark.parametrize("frames", [1, 7, 40])
def test_copy_to_host_stages_large_results_through_pinned_chunks(frames, monkeypatch):
    monkeypatch.setattr(stable_memory, "STAGING_CHUNK_BYTES", 3 << 20)
    monkeypatch.setattr(stable_memory, "_staging", [])
    src = torch.randn(frames, 256, 384, 3, device="cuda")  # 1.1 MiB per frame: 2 frames per chunk
    expected = src.cpu()
    out = torch.full((frames, 256, 384, 4), -1.0)
    stable_memory.copy_to_host(out[..., :3], src)
    assert torch.equal(out[..., :3], expected) and (out[..., 3] == -1).all()
    assert (frames * 256 * 384 * 3 * 4 > (3 << 20)) == bool(stable_memory._staging)  # staged only when large


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads resident memory from Linux's /proc")
def test_host_prefault_maps_every_page_of_a_fresh_tensor():
    size = 96 << 20  # far above glibc's largest mmap threshold: a fresh mapping, no page resident yet
    fresh = torch.empty(size, dtype=torch.uint8)
    before = _resident_bytes()
    prefault = stable_memory.HostPrefault(fresh)
    prefault.wait()
    assert _resident_bytes() - before >= 0.95 * size
    prefault.wait()  # a second wait returns at once
    assert fresh.shape == (size,)


def test_host_prefault_leaves_other_tensors_alone():
    strided = torch.ones(4, 8).t()
    stable_memory.HostPrefault(strided).wait()  # not contiguous: nothing to do, and nothing written
    assert torch.equal(strided, torch.ones(8, 4))
    stable_memory.HostPrefault(torch.empty(0)).wait()


def test_host_copies_of_inference_tensors_are_not_kept():
    """Weights moved inside inference mode (ComfyUI runs nodes so) have no version counter: an unchanged
    weight cannot be told from one written in place, so its pinned copy is never reused (the node's second
    queue failed on this with 'Inference tensors do not track version counter')."""
    from src.optimization.stable_memory import _HostCopy

    host = torch.zeros(4)
    with torch.inference_mode():
        weight = torch.ones(4)
    assert _HostCopy.of(host, weight) is None
    normal = torch.ones(4)
    record = _HostCopy.of(host, normal)
    assert record is not None and record.still_matches(normal)
    normal.add_(1)  # an in-place write
    assert not record.still_matches(normal)
    with torch.inference_mode():
        assert not record.still_matches(torch.ones(4))
