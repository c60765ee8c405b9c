"""A Triton flash-attention forward kernel for wide heads (head_dim up to 512): the VAE mid-block's one head.

PyTorch's fused SDPA kernels stop at head_dim 256.  This kernel (FlashAttention-2) never writes the scores:
per block of queries it walks the keys with an online softmax in float32, and splits the wide output into
column slices that each recompute the scores, because a 512-wide float32 accumulator does not fit registers.
Numerics are flash attention's (float32 statistics and accumulation, rounded once); launch configurations are
autotuned per (head_dim, dtype).  CPU tensors run under Triton's interpreter (``TRITON_INTERPRET=1``, for
tests) with explicit ``tiles``.  This module imports Triton; ``attention_dispatch`` imports it only when the
``triton_wide`` backend runs.  Design notes: docs/performance.md.
"""
from __future__ import annotations

import functools
import inspect
import math
import os
from contextlib import nullcontext
from typing import NamedTuple

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
HEAD_DIM_STEP = 64  # head_dim must be a multiple of it (the narrowest piece S is accumulated over)
MAX_HEAD_DIM = 512
LOG2_E = math.log2(math.e)


class WideAttentionError(ValueError):
    """Inputs the wide-head attention kernel cannot take; the message says what to change."""


class AttentionTiles(NamedTuple):
    """One launch configuration: query and key block sizes, output columns per program, warps, stages."""

    block_m: int
    block_n: int
    slice: int
    num_warps: int
    num_stages: int


# Autotuning candidates, tried per (head_dim, dtype).  The query block stays in shared memory (BLOCK_M x
# head_dim: 64 KiB at 64 x 512) beside num_stages buffers of key and value blocks (see shared_memory_bytes;
# Hopper allows 227 KiB per block), and the BLOCK_M x SLICE float32 accumulator stays in registers (128 per
# thread at most).  At head_dim 512 the first seven fit a Hopper GPU, compiled for sm_90 without spilling
# (the 512-wide slice, which computes S once instead of two or four times, spills 72 bytes); the last
# serves narrower heads.  Candidates that do not fit the GPU at hand are pruned before compiling.
CANDIDATE_TILES = (
    AttentionTiles(64, 32, 256, 4, 2),
    AttentionTiles(64, 32, 256, 4, 3),
    AttentionTiles(64, 32, 128, 4, 3),
    AttentionTiles(64, 64, 128, 4, 2),
    AttentionTiles(128, 32, 256, 8, 2),
    AttentionTiles(128, 32, 128, 8, 2),
    AttentionTiles(64, 32, 512, 8, 2),
    AttentionTiles(128, 128, 128, 8, 2),
)


@triton.jit
def _wide_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,
    q_stride_b, q_stride_h, q_stride_s,
    k_stride_b, k_stride_h, k_stride_s,
    v_stride_b, v_stride_h, v_stride_s,
    out_stride_b, out_stride_h, out_stride_s,
    heads, q_len, k_len, scale_log2,
    HEAD_DIM: tl.constexpr, PIECE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SLICE: tl.constexpr,
):
    """softmax(scale · q kᵀ) v for one block of queries and one slice of output columns of one (batch, head)."""
    # One flat grid, query blocks fastest: programs running side by side read the same keys and values.
    query_blocks = tl.cdiv(q_len, BLOCK_M)
    slices: tl.constexpr = (HEAD_DIM + SLICE - 1) // SLICE
    program = tl.program_id(0)
    query_block = program % query_blocks
    column_slice = (program // query_blocks) % slices
    batch_head = program // (query_blocks * slices)
    # int64 before multiplying: offsets pass 2**31 elements from the 33rd (batch, head) of 130k x 512 on.
    batch, head = (batch_head // heads).to(tl.int64), (batch_head % heads).to(tl.int64)
    q_at = q_ptr + batch * q_stride_b + head * q_stride_h
    k_at = k_ptr + batch * k_stride_b + head * k_stride_h
    v_at = v_ptr + batch * v_stride_b + head * v_stride_h

    rows = query_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < q_len
    piece_columns = tl.arange(0, PIECE)
    # The query block, as head_dim / PIECE pieces of (BLOCK_M, PIECE), loaded once for every key block.
    q_rows = q_at + rows.to(tl.int64)[:, None] * q_stride_s
    q_pieces = ()
    for piece in tl.static_range(HEAD_DIM // PIECE):
        q_pieces = q_pieces + (tl.load(q_rows + piece * PIECE + piece_columns[None, :], mask=row_valid[:, None],
                                       other=0.0),)

    columns = column_slice * SLICE + tl.arange(0, SLICE)
    column_valid = columns < HEAD_DIM  # the last slice may reach past head_dim (e.g. 192 in 128-wide slices)
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    accumulator = tl.zeros([BLOCK_M, SLICE], tl.float32)
    for key_start in range(0, k_len, BLOCK_N):
        keys = key_start + tl.arange(0, BLOCK_N)
        key_valid = keys < k_len
        k_rows = k_at + keys.to(tl.int64)[:, None] * k_stride_s
        scores = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for piece in tl.static_range(HEAD_DIM // PIECE):
            k_piece = tl.load(k_rows + piece * PIECE + piece_columns[None, :], mask=key_valid[:, None], other=0.0)
            scores = tl.dot(q_pieces[piece], tl.trans(k_piece), scores)
        # Scores in base 2: exp2(x·scale·log2 e) = exp(x·scale).  Keys past the end weigh nothing.
        scores = tl.where(key_valid[None, :], scores * scale_log2, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        rescale = tl.math.exp2(row_max - new_max)  # 0 on the first block (row_max = -inf)
        probabilities = tl.math.exp2(scores - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(probabilities, axis=1)
        v_block = tl.load(v_at + keys.to(tl.int64)[:, None] * v_stride_s + columns[None, :],
                          mask=key_valid[:, None] & column_valid[None, :], other=0.0)
        accumulator = accumulator * rescale[:, None]
        accumulator = tl.dot(probabilities.to(v_block.dtype), v_block, accumulator)
        row_max = new_max

    out = accumulator / row_sum[:, None]
    out_at = out_ptr + batch * out_stride_b + head * out_stride_h + rows.to(tl.int64)[:, None] * out_stride_s
    tl.store(out_at + columns[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_valid[:, None] & column_valid[None, :])


# ---------------------------------------------------------------------------------------------------
# Autotuning
# ---------------------------------------------------------------------------------------------------


def _config(tiles: AttentionTiles) -> triton.Config:
    return triton.Config({"BLOCK_M": tiles.block_m, "BLOCK_N": tiles.block_n, "SLICE": tiles.slice},
                         num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def _tiles(config: triton.Config) -> AttentionTiles:
    meta = config.kwargs
    return AttentionTiles(meta["BLOCK_M"], meta["BLOCK_N"], meta["SLICE"], config.num_warps, config.num_stages)


def shared_memory_bytes(tiles: AttentionTiles, head_dim: int, element_size: int = 2) -> int:
    """Estimated shared memory of a launch: the resident query block plus ``num_stages`` key and value blocks."""
    key_value_stage = tiles.block_n * (head_dim + tiles.slice) * element_size
    return tiles.block_m * head_dim * element_size + tiles.num_stages * key_value_stage


def usable_tiles(head_dim: int, shared_memory_limit: int) -> list[AttentionTiles]:
    """The candidates worth compiling for ``head_dim`` on a GPU with ``shared_memory_limit`` bytes per block:
    those that fit, with no slice wider than head_dim but the narrowest (a wider one computes masked columns)."""
    fitting = [t for t in CANDIDATE_TILES if shared_memory_bytes(t, head_dim) <= shared_memory_limit]
    narrowest = min(t.slice for t in CANDIDATE_TILES)
    return [t for t in fitting if t.slice <= max(head_dim, narrowest)]


def _shared_memory_limit(device: torch.device) -> int:
    return _shared_memory_of_gpu(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _shared_memory_of_gpu(index: int) -> int:
    # What Triton compares a compiled kernel's shared memory with (the opt-in maximum per block).
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def unsupported_reason(device: torch.device, head_dim: int) -> str | None:
    """Why the autotuned kernel cannot take heads of ``head_dim`` on ``device`` (a CUDA GPU), or None."""
    if head_dim % HEAD_DIM_STEP or not 0 < head_dim <= MAX_HEAD_DIM:
        return f"needs head_dim a multiple of {HEAD_DIM_STEP} up to {MAX_HEAD_DIM}, got {head_dim}"
    limit = _shared_memory_limit(device)
    if not usable_tiles(head_dim, limit):
        needed = min(shared_memory_bytes(tiles, head_dim) for tiles in CANDIDATE_TILES)
        return (f"needs {needed >> 10} KiB of shared memory per block at head_dim {head_dim}, this GPU has "
                f"{limit >> 10} KiB")
    return None


def _prune(configs: list, named_args: dict, **kwargs) -> list:
    usable = usable_tiles(kwargs["HEAD_DIM"], _shared_memory_limit(named_args["q_ptr"].device))
    return [config for config in configs if _tiles(config) in usable]


def _quick_bench(kernel_call, quantiles):
    # Triton's default (25 ms of warm-up and 100 ms of runs per candidate) would make the first call slow.
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


# Triton 3.4+ keeps autotuning results on disk beside its compiled kernels (keyed by the kernel's source, the
# GPU, the tuning key and the candidates): later processes load the choice instead of compiling and timing
# every candidate again.  The key holds no sequence length, so a new resolution reuses the choice too.
# Older Tritons tune once per process.
AUTOTUNE_CACHE = "cache_results" in inspect.signature(triton.autotune).parameters

_tuned_kernel = triton.autotune(
    configs=[_config(tiles) for tiles in CANDIDATE_TILES],
    key=["HEAD_DIM"],  # Triton adds the tensors' dtypes
    prune_configs_by={"early_config_prune": _prune},
    do_bench=_quick_bench,
    **({"cache_results": True} if AUTOTUNE_CACHE else {}),
)(_wide_attention_kernel)


def tuned_tiles() -> AttentionTiles | None:
    """The tiles autotuning chose for the most recent autotuned :func:`wide_attention` call (None before)."""
    config = getattr(_tuned_kernel, "best_config", None)
    return None if config is None else _tiles(config)


# ---------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tiles: AttentionTiles | None) -> None:
    """Raise :class:`WideAttentionError` saying what to change when the inputs are outside the kernel's."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise WideAttentionError(f"q, k and v must be (batch, heads, seq, head_dim); got shapes {tuple(q.shape)}, "
                                 f"{tuple(k.shape)}, {tuple(v.shape)}")
    batch, heads, _, head_dim = q.shape
    if k.shape[:2] != (batch, heads) or k.shape[3] != head_dim or v.shape != k.shape:
        raise WideAttentionError(f"k and v must be ({batch}, {heads}, key_len, {head_dim}) like q; got "
                                 f"{tuple(k.shape)} and {tuple(v.shape)}")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise WideAttentionError(f"q, k and v must share one dtype of bfloat16/float16; got {q.dtype}, {k.dtype}, "
                                 f"{v.dtype} (cast them, or use the matmul_chunked backend)")
    if head_dim % HEAD_DIM_STEP or not 0 < head_dim <= MAX_HEAD_DIM:
        raise WideAttentionError(f"head_dim must be a multiple of {HEAD_DIM_STEP} up to {MAX_HEAD_DIM}; got {head_dim}")
    if k.shape[2] == 0 and q.shape[2] > 0:
        raise WideAttentionError("key_len is 0: softmax over no keys is undefined")
    if k.device != q.device or v.device != q.device:
        raise WideAttentionError(f"q, k and v must be on one device; got {q.device}, {k.device}, {v.device}")
    if not q.is_cuda and not _interpreted():
        raise WideAttentionError("wide_attention runs on CUDA tensors (CPU tensors only under Triton's "
                                 "interpreter, TRITON_INTERPRET=1)")
    if not q.is_cuda and tiles is None:
        raise WideAttentionError("pass tiles= under Triton's interpreter: autotuning times CUDA launches")
    if q.is_cuda and tiles is None and (reason := unsupported_reason(q.device, head_dim)) is not None:
        raise WideAttentionError(f"wide_attention {reason}: use the matmul_chunked attention backend")
    if tiles is not None and (tiles.block_m & (tiles.block_m - 1) or tiles.block_n & (tiles.block_n - 1)
                              or tiles.slice & (tiles.slice - 1) or min(tiles.block_m, tiles.block_n) < 16):
        raise WideAttentionError(f"tiles {tiles}: block_m, block_n and slice must be powers of two, blocks >= 16")


def _on_device(tensor: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else nullcontext()


def wide_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                   tiles: AttentionTiles | None = None) -> torch.Tensor:
    """softmax(q kᵀ / √head_dim) v for (batch, heads, seq, head_dim) bf16/fp16 tensors (q_len may differ from
    key_len; head_dim a multiple of 64 up to 512), no mask.  ``tiles``: a fixed launch configuration instead
    of autotuning (required under Triton's interpreter).  Returns a new tensor shaped like q."""
    _check_inputs(q, k, v, tiles)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    piece = head_dim & -head_dim  # the largest power of two dividing head_dim
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    arguments = (
        q, k, v, out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        heads, q_len, k_len, head_dim ** -0.5 * LOG2_E,
    )

    def programs(block_m: int, slice_width: int) -> int:
        count = triton.cdiv(q_len, block_m) * triton.cdiv(head_dim, slice_width) * batch * heads
        if count >= 2**31:  # the kernel's flat program id is an int32
            raise WideAttentionError(f"{batch * heads} (batch, head) pairs of {q_len} queries need {count} programs, "
                                     "more than 2**31: split the batch")
        return count

    with _on_device(q):
        if tiles is None:
            _tuned_kernel[lambda meta: (programs(meta["BLOCK_M"], meta["SLICE"]),)](
                *arguments, HEAD_DIM=head_dim, PIECE=piece)
        else:
            _wide_attention_kernel[(programs(tiles.block_m, tiles.slice),)](
                *arguments, HEAD_DIM=head_dim, PIECE=piece, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
                SLICE=tiles.slice, num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return out
