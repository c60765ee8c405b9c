"""The chunked safetensors reader gives exactly the tensors of the tensor-by-tensor path (CPU here; the
same code runs with pinned buffers and device copies on CUDA, tested there by tests that load to the GPU)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from conftest import golden_path
from src.models import checkpoint, load, staged_read
from src.models.checkpoint import CheckpointError, float_dtype_rule
from src.models.dit import NaDiT

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class Mixed(nn.Module):
    """Tensors of every storage kind, with odd sizes so that later tensors start at unaligned offsets."""

    def __init__(self):
        super().__init__()
        self.w16 = nn.Parameter(torch.empty(3, 5, dtype=torch.float16))
        self.single = nn.Parameter(torch.empty(7))
        self.wbf = nn.Parameter(torch.empty(2, 3, dtype=torch.bfloat16))
        self.register_buffer("counts", torch.empty(5, dtype=torch.int64))
        self.register_buffer("mask", torch.empty(3, dtype=torch.bool))
        self.register_buffer("fp8", torch.empty(9, dtype=torch.float8_e4m3fn))
        self.register_buffer("empty", torch.empty(0, 4))
        self.register_buffer("late", torch.empty(11))


def _mixed_file(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "mask": torch.tensor([True, False, True]),  # 3 bytes first: every later tensor is misaligned
        "w16": torch.randn(3, 5, generator=generator).half(),
        "single": torch.randn(7, generator=generator),
        "wbf": torch.randn(2, 3, generator=generator).bfloat16(),
        "counts": torch.arange(5) * 10**12,
        "fp8": torch.randn(9, generator=generator).to(torch.float8_e4m3fn),
        "empty": torch.zeros(0, 4),
        "late": torch.randn(11, generator=generator),
        "model.diffusion_model.ignored": torch.ones(2),  # a prefixed key the model does not have
    }
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path))
    return path


def _load_both(build, path, dtype_for, chunk_bytes, overrides={}):
    with torch.device("meta"):
        plain, staged = build(), build()
    checkpoint.materialize(plain, path, device="cpu", dtype_for=dtype_for, overrides=overrides)
    staged_read.materialize(staged, path, device="cpu", dtype_for=dtype_for, overrides=overrides,
                            chunk_bytes=chunk_bytes)
    return plain.state_dict(), staged.state_dict()


def _assert_identical(expected: dict, got: dict):
    assert expected.keys() == got.keys()
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape, key
        assert torch.equal(got[key].view(torch.uint8) if tensor.numel() and tensor.element_size() == 1 else got[key],
                           tensor.view(torch.uint8) if tensor.numel() and tensor.element_size() == 1 else tensor), key


@pytest.mark.parametrize("chunk_bytes", [1, 40, 1 << 20])
def test_every_dtype_and_offset_reads_like_the_plain_path(tmp_path, chunk_bytes):
    path = _mixed_file(tmp_path)
    rule = float_dtype_rule(torch.float32, keep=lambda key, tensor: key == "fp8")
    plain, staged = _load_both(Mixed, path, rule, chunk_bytes)
    _assert_identical(plain, staged)
    assert staged["w16"].dtype == torch.float32 and staged["fp8"].dtype == torch.float8_e4m3fn


def test_chunks_are_contiguous_tensor_aligned_and_bounded(tmp_path):
    entries = staged_read.file_entries(_mixed_file(tmp_path))
    assert [e.begin for e in entries] == sorted(e.begin for e in entries)
    for limit in (1, 16, 40, 10**9):
        chunks = staged_read.plan_chunks(entries, limit)
        assert [e for c in chunks for e in c.entries] == entries
        for chunk in chunks:
            assert chunk.begin == chunk.entries[0].begin and chunk.end == chunk.entries[-1].end
            assert chunk.nbytes <= limit or len(chunk.entries) == 1
    assert len(staged_read.plan_chunks(entries, 10**9)) == 1


def test_golden_dit_loads_bit_identically_through_many_chunks():
    path = golden_path("dit3b_weights.safetensors")
    _, config = load.inspect_dit(path)
    with torch.device("meta"):
        rope = NaDiT(config).rope_frequency_buffers()
    plain, staged = _load_both(lambda: NaDiT(config), path, float_dtype_rule(torch.bfloat16), 64 << 10, rope)
    _assert_identical(plain, staged)


def test_safetensors_files_bound_for_a_gpu_take_the_staged_reader(monkeypatch):
    monkeypatch.delenv(load.STAGED_LOAD_ENV, raising=False)
    assert load.staged("m.safetensors", "cuda:0") and load.staged("M.SAFETENSORS", torch.device("cuda"))
    assert not load.staged("m.safetensors", "cpu")  # the memory map is zero-copy there
    assert not load.staged("m.gguf", "cuda:0") and not load.staged("m.pth", "cuda:0")
    monkeypatch.setenv(load.STAGED_LOAD_ENV, "0")
    assert not load.staged("m.safetensors", "cuda:0")


def test_a_truncated_file_is_named_as_such(tmp_path):
    path = _mixed_file(tmp_path)
    entries = staged_read.file_entries(path)
    chunk = staged_read.plan_chunks(entries, 10**9)[0]
    path.write_bytes(path.read_bytes())  # intact: reads
    buffer = torch.empty(chunk.nbytes, dtype=torch.uint8)
    staged_read._read_into(path, buffer, chunk.begin)
    with open(path, "r+b") as f:
        f.truncate(chunk.end - 5)
    with pytest.raises(CheckpointError, match="truncated"):
        staged_read._read_into(path, buffer, chunk.begin)


@needs_cuda
@pytest.mark.parametrize("chunk_bytes", [40, 1 << 20])
def test_cuda_target_matches_the_plain_path(tmp_path, chunk_bytes):
    path = _mixed_file(tmp_path)
    rule = float_dtype_rule(torch.bfloat16, keep=lambda key, tensor: key == "fp8")
    with torch.device("meta"):
        plain, staged = Mixed(), Mixed()
    checkpoint.materialize(plain, path, device="cuda", dtype_for=rule)
    staged_read.materialize(staged, path, device="cuda", dtype_for=rule, chunk_bytes=chunk_bytes)
    assert all(t.is_cuda for t in staged.state_dict().values())
    _assert_identical({k: v.cpu() for k, v in plain.state_dict().items()},
                      {k: v.cpu() for k, v in staged.state_dict().items()})
