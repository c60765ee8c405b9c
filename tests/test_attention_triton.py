"""The Triton wide-head flash attention (optimization/attention_triton.py) and its ``triton_wide`` backend.

The kernel runs on the GPU when there is one, else on CPU tensors under Triton's interpreter, switched on before
Triton is imported: here, or, when an earlier test module imported Triton, in a child pytest process of this
file.  Kernel tests pass fixed tiles (autotuning times CUDA launches), small enough for the interpreter, that
divide neither the query nor the key length.  Expectation: F.scaled_dot_product_attention of the same
(rounded) inputs in float32 within rel 1e-2 for half inputs, and no further from it than the matmul_chunked
backend (float32 scores and softmax, half probabilities: the yardstick for half-precision attention).

Where ``auto`` sends 512-wide heads and what happens when the kernel is missing, does not fit the GPU or fails
at run time is tested without Triton and without a GPU, on a mocked CUDA device.
"""
from __future__ import annotations

import logging
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from triton_interpreter import (DEVICE, choose_interpreter, compute_as_the_gpu, kernel_module,
                                run_in_fresh_interpreter, skip_unless_kernels_run_here)

from src.optimization import attention_dispatch

pytestmark = pytest.mark.usefixtures("single_thread")

choose_interpreter()

NO_TRITON = "Triton is not installed: the wide-head attention kernel is optional (CUDA only)"
HALF_TOLERANCE = 1e-2
YARDSTICK_MARGIN = 1.2  # times matmul_chunked's error (see test_matches_float32_attention)
HOPPER_SHARED_MEMORY = 232448   # bytes per block an H100 / H200 grants a kernel
CONSUMER_SHARED_MEMORY = 101376  # an RTX 4090's



@pytest.fixture(scope="module")
def wide():
    """The attention_triton module (imports Triton)."""
    return kernel_module("attention_triton", NO_TRITON, runnable=False)


@pytest.fixture(scope="module")
def kernels(wide):
    """The module, its kernel compiled for the GPU or run by the interpreter."""
    skip_unless_kernels_run_here()
    if DEVICE == "cuda":
        yield wide
        return
    with pytest.MonkeyPatch.context() as patch:
        compute_as_the_gpu(patch, bf16_dot=True, bf16_rounding=True, loop_bounds=True)
        yield wide


def _qkv(batch, heads, q_len, k_len, head_dim, *, dtype=torch.bfloat16, scale=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, head_dim, generator=generator) * scale
    k = torch.randn(batch, heads, k_len, head_dim, generator=generator) * scale
    v = torch.randn(batch, heads, k_len, head_dim, generator=generator)
    return tuple(t.to(DEVICE, dtype) for t in (q, k, v))


def _float32_reference(q, k, v) -> torch.Tensor:
    """SDPA of the same (rounded) inputs in float32: the error measures the kernel, not the input dtype."""
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float())


def _matmul_chunked_error(q, k, v, reference) -> float:
    return rel_err(attention_dispatch.attention(q, k, v, backend="matmul_chunked"), reference)


# (batch, heads, q_len, k_len, head_dim) and tiles (block_m, block_n, slice, warps, stages)
CASES = {
    "one_query_300_keys": ((2, 1, 1, 300, 64), (16, 32, 128, 4, 2)),        # slice wider than the head
    "one_key": ((2, 1, 45, 1, 128), (32, 16, 128, 4, 2)),
    "pieces_of_64_partial_slice": ((2, 2, 70, 45, 192), (32, 16, 128, 4, 2)),  # 3 pieces; slice 2 half past
    "vae_head_two_slices": ((2, 1, 130, 97, 512), (64, 32, 256, 4, 2)),
    "vae_head_four_slices": ((1, 1, 50, 200, 512), (16, 64, 128, 4, 2)),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape, tiles", CASES.values(), ids=CASES.keys())
def test_matches_float32_attention(kernels, shape, tiles, dtype):
    q, k, v = _qkv(*shape, dtype=dtype)
    out = kernels.wide_attention(q, k, v, tiles=kernels.AttentionTiles(*tiles))
    assert out.shape == q.shape and out.dtype == dtype
    reference = _float32_reference(q, k, v)
    error = rel_err(out, reference)
    assert error <= HALF_TOLERANCE
    # As accurate as the two-GEMM path: both round the probabilities and the output once (here ~0.9 of its
    # error; the margin leaves room for the sampling spread of the one-query case's 128 outputs).  With one
    # key both are exact.
    assert error <= YARDSTICK_MARGIN * _matmul_chunked_error(q, k, v, reference)


def test_large_logits_keep_their_softmax(kernels):
    """Logits with a spread of ~±100 (a trained VAE's mid-block has them): the running maximum must rescale
    the partial sums exactly, or the output drifts far beyond bf16 rounding."""
    q, k, v = _qkv(2, 1, 90, 150, 512, scale=4.0, seed=3)
    out = kernels.wide_attention(q, k, v, tiles=kernels.AttentionTiles(32, 32, 256, 4, 2))
    reference = _float32_reference(q, k, v)
    assert rel_err(out, reference) <= HALF_TOLERANCE
    assert rel_err(out, reference) <= YARDSTICK_MARGIN * _matmul_chunked_error(q, k, v, reference)


def test_strided_views_give_the_contiguous_result(kernels):
    # (batch, seq, heads, head_dim) projections viewed as (batch, heads, seq, head_dim), k and v slices of
    # one buffer: the kernel reads them through their strides, without copies.
    tiles = kernels.AttentionTiles(16, 16, 128, 4, 2)
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(2, 40, 3, 128, generator=generator).to(DEVICE, torch.bfloat16).transpose(1, 2)
    kv = torch.randn(2, 3, 33, 2 * 128, generator=generator).to(DEVICE, torch.bfloat16)
    k, v = kv[..., :128], kv[..., 128:]
    out = kernels.wide_attention(q, k, v, tiles=tiles)
    expected = kernels.wide_attention(q.contiguous(), k.contiguous(), v.contiguous(), tiles=tiles)
    assert torch.equal(out, expected)
    assert rel_err(out, _float32_reference(q, k, v)) <= HALF_TOLERANCE


def test_bad_inputs_are_rejected_with_what_to_change(kernels):
    tiles = kernels.AttentionTiles(16, 16, 128, 4, 2)
    q, k, v = _qkv(1, 1, 8, 8, 128)
    cases = [
        ("bfloat16/float16", (q.float(), k.float(), v.float())),
        ("multiple of 64", _qkv(1, 1, 8, 8, 96)),
        ("multiple of 64 up to 512", _qkv(1, 1, 8, 8, 576)),
        ("like q", (q, k[:, :, :4], v)),
        (r"\(batch, heads, seq, head_dim\)", (q[0], k[0], v[0])),
        ("no keys", (q, k[:, :, :0], v[:, :, :0])),
    ]
    for message, inputs in cases:
        with pytest.raises(kernels.WideAttentionError, match=message):
            kernels.wide_attention(*inputs, tiles=tiles)
    with pytest.raises(ValueError, match="powers of two"):
        kernels.wide_attention(q, k, v, tiles=kernels.AttentionTiles(24, 16, 128, 4, 2))
    if DEVICE == "cpu":
        with pytest.raises(kernels.WideAttentionError, match="pass tiles="):
            kernels.wide_attention(q, k, v)


@pytest.mark.skipif(DEVICE != "cuda", reason="autotuning times CUDA launches")
def test_autotuned_kernel_on_the_vae_head(kernels):
    q, k, v = _qkv(1, 1, 1000, 1000, 512)
    out = kernels.wide_attention(q, k, v)
    assert kernels.tuned_tiles() in kernels.usable_tiles(512, kernels._shared_memory_limit(q.device))
    reference = _float32_reference(q, k, v)
    assert rel_err(out, reference) <= YARDSTICK_MARGIN * _matmul_chunked_error(q, k, v, reference)


AUTOTUNE_PROBE = r"""
import json, sys
import torch, triton
from src.optimization import attention_triton as kernels
seen = []
triton.knobs.autotuning.listener = lambda **info: seen.append(bool(info["cache_hit"]))
generator = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 1, 1000, 512, generator=generator).to("cuda", torch.bfloat16) for _ in range(3))
kernels.wide_attention(q, k, v)
print(json.dumps({"cache_hits": seen, "tiles": list(kernels.tuned_tiles())}))
"""


def test_autotune_results_are_kept_on_disk_where_triton_can(wide):
    version = tuple(int(part) for part in wide.triton.__version__.split(".")[:2])
    assert wide.AUTOTUNE_CACHE == (version >= (3, 4))


@pytest.mark.skipif(DEVICE != "cuda", reason="autotuning times CUDA launches")
def test_autotuned_choice_is_loaded_from_disk_by_a_later_process(wide, tmp_path):
    import json
    import os
    import subprocess
    from pathlib import Path

    if not wide.AUTOTUNE_CACHE:
        pytest.skip(f"Triton {wide.triton.__version__} cannot keep autotuning results on disk")
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "triton")}
    runs = []
    for _ in range(2):
        child = subprocess.run([sys.executable, "-c", AUTOTUNE_PROBE], cwd=Path(__file__).resolve().parents[1],
                               env=env, capture_output=True, text=True, timeout=600)
        assert child.returncode == 0, child.stderr
        runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
    assert runs[0]["cache_hits"] == [False] and runs[1]["cache_hits"] == [True]
    assert runs[0]["tiles"] == runs[1]["tiles"]


# ---------------------------------------------------------------------------------------------------
# Launch configurations and the GPUs they fit (plain Python: no kernel runs)
# ---------------------------------------------------------------------------------------------------


def test_shared_memory_estimate_and_pruning(wide):
    tiles = wide.AttentionTiles
    # Triton 3.5 compiling for sm_90 reports exactly these (the query block, then two or three stages of a
    # key block and a value slice).
    assert wide.shared_memory_bytes(tiles(64, 32, 256, 4, 2), 512) == 160 << 10
    assert wide.shared_memory_bytes(tiles(128, 32, 256, 8, 2), 512) == 224 << 10
    assert wide.shared_memory_bytes(tiles(64, 32, 128, 4, 3), 192) == 84 << 10
    on_hopper = wide.usable_tiles(512, HOPPER_SHARED_MEMORY)
    assert len(on_hopper) >= 6 and {t.slice for t in on_hopper} >= {128, 256}
    assert all(wide.shared_memory_bytes(t, 512) <= HOPPER_SHARED_MEMORY for t in on_hopper)
    assert wide.usable_tiles(512, CONSUMER_SHARED_MEMORY) == []
    # Narrow heads: no slice wider than the head but the narrowest.
    assert {t.slice for t in wide.usable_tiles(64, HOPPER_SHARED_MEMORY)} == {128}


def test_unsupported_reason_names_the_limit(wide, monkeypatch):
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(wide, "_shared_memory_of_gpu", lambda index: HOPPER_SHARED_MEMORY)
    assert wide.unsupported_reason(gpu, 512) is None
    assert "multiple of 64" in wide.unsupported_reason(gpu, 352)
    assert "up to 512" in wide.unsupported_reason(gpu, 640)
    monkeypatch.setattr(wide, "_shared_memory_of_gpu", lambda index: CONSUMER_SHARED_MEMORY)
    assert wide.unsupported_reason(gpu, 512) == ("needs 160 KiB of shared memory per block at head_dim 512, "
                                                 "this GPU has 99 KiB")
    assert wide.unsupported_reason(gpu, 128) is None


# ---------------------------------------------------------------------------------------------------
# The triton_wide backend in attention_dispatch, on a mocked CUDA device (no Triton or GPU needed)
# ---------------------------------------------------------------------------------------------------

GPU = torch.device("cuda", 0)


@pytest.fixture
def mocked_gpu(monkeypatch):
    """A Hopper GPU as far as backend resolution can tell; returns a setter for whether Triton imports and
    what its kernel module reports."""
    monkeypatch.setattr(attention_dispatch, "_BACKENDS", dict(attention_dispatch._BACKENDS))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    attention_dispatch.clear_backend_cache()

    def set_triton(installed: bool, unsupported: str | None = None, kernel=None):
        # sys.modules entries decide what importing gives: None makes the import fail as if not installed.
        monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton") if installed else None)
        fake = types.SimpleNamespace(unsupported_reason=lambda device, head_dim: unsupported, wide_attention=kernel)
        monkeypatch.setattr(attention_dispatch, "_load_attention_triton", lambda: fake)
        attention_dispatch.clear_backend_cache()

    yield set_triton
    attention_dispatch.clear_backend_cache()


def _resolved(name: str, head_dim: int = 512, dtype=torch.bfloat16) -> str:
    like_q = types.SimpleNamespace(device=GPU, dtype=dtype, shape=(1, 1, 32640, head_dim))
    return attention_dispatch.resolve_backend(name, like_q)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == attention_dispatch.__name__ and r.levelno >= logging.WARNING]


def test_auto_picks_the_triton_kernel_for_wide_half_heads_when_triton_imports(mocked_gpu, caplog):
    mocked_gpu(installed=True)
    with caplog.at_level(logging.WARNING, logger=attention_dispatch.__name__):
        assert _resolved("auto") == "triton_wide"
        assert _resolved("auto", dtype=torch.float16) == "triton_wide"
        assert _resolved("auto", dtype=torch.float32) == "sdpa_efficient"  # the kernel takes half inputs only
        assert _resolved("triton_wide") == "triton_wide"
    assert _warnings(caplog) == []


def test_auto_keeps_matmul_chunked_without_triton(mocked_gpu, caplog):
    mocked_gpu(installed=False)
    with caplog.at_level(logging.WARNING, logger=attention_dispatch.__name__):
        assert _resolved("auto") == "matmul_chunked"
        assert _warnings(caplog) == []  # auto's choice is silent
        assert _resolved("triton_wide") == "matmul_chunked"
    (message,) = _warnings(caplog)
    assert "'triton_wide' requested, using 'matmul_chunked'" in message and "triton is not installed" in message


def test_auto_keeps_matmul_chunked_where_the_kernel_does_not_fit(mocked_gpu, caplog):
    mocked_gpu(installed=True, unsupported="needs 160 KiB of shared memory per block")
    with caplog.at_level(logging.WARNING, logger=attention_dispatch.__name__):
        assert _resolved("auto") == "matmul_chunked"
        assert _warnings(caplog) == []
    reasons = attention_dispatch.available_backends(GPU, torch.bfloat16, 512)
    assert reasons["triton_wide"] == "needs 160 KiB of shared memory per block"
    assert reasons["matmul_chunked"] is None


def test_a_kernel_that_cannot_be_set_up_leaves_matmul_chunked(mocked_gpu, monkeypatch):
    mocked_gpu(installed=True)

    def cannot_load():
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    monkeypatch.setattr(attention_dispatch, "_load_attention_triton", cannot_load)
    assert _resolved("auto") == "matmul_chunked"
    assert attention_dispatch.available_backends(GPU, torch.bfloat16, 512)["triton_wide"] == (
        "its Triton kernel cannot be set up (RuntimeError: Failed to find C compiler. Please specify via CC "
        "environment variable.)")


def test_too_wide_heads_and_old_gpus_do_not_get_the_kernel(mocked_gpu, monkeypatch):
    mocked_gpu(installed=True)
    assert attention_dispatch.available_backends(GPU, torch.bfloat16, 576)["triton_wide"] == \
        "supports head_dim up to 512, got 576"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    attention_dispatch.clear_backend_cache()
    assert _resolved("auto") == "matmul_chunked"


def test_a_failing_kernel_falls_back_to_matmul_chunked_once(mocked_gpu, caplog):
    calls = []

    def broken(q, k, v):
        calls.append(q.shape)
        raise RuntimeError("PTX assembly failed\nsecond line")

    mocked_gpu(installed=True, kernel=broken)
    q, k, v = _qkv(1, 1, 24, 30, 512)
    key = ("auto", GPU, q.dtype, 512)
    assert _resolved("auto") == "triton_wide"
    with caplog.at_level(logging.WARNING, logger=attention_dispatch.__name__):
        out = attention_dispatch._run_with_fallback(attention_dispatch._BACKENDS["triton_wide"], key, q, k, v)
        assert _resolved("auto") == "matmul_chunked"  # remembered: the kernel is not tried again
    assert len(calls) == 1
    (message,) = _warnings(caplog)
    assert "'triton_wide'" in message and "RuntimeError: PTX assembly failed" in message
    assert "second line" not in message and "using 'matmul_chunked'" in message
    assert torch.equal(out, attention_dispatch._matmul_query_chunks(q, k, v))


def test_kernels_in_a_fresh_interpreter():
    run_in_fresh_interpreter(__file__, NO_TRITON, "not fresh_interpreter and not autotuned")
