"""Hand-written Triton kernels for the DiT's elementwise passes: q/k RMSNorm + rope, modulated RMSNorm, SwiGLU.

Between its GEMMs a plain DiT block runs a chain of small PyTorch ops, each one pass over a 0.4-1.5 GB
tensor at 1080p: unflatten/cat copies of q, k and v, per-head RMSNorm, rope (float32 temporaries), the
modulation's RMSNorm then addcmul, SiLU then mul.  Each kernel here reads its inputs once, computes in
float32 and writes its output once, rounded once to the activation dtype (the plain chain rounds after
every op, so half-precision results differ from it within one rounding step).

Sizes and strides are runtime arguments: every kernel compiles once per dtype and head_dim (or width
rounded up to a power of two), never per resolution.  Offsets are int64: a 300k-row qkv output has over
2**31 elements.

This module imports Triton; :mod:`.fused_kernels` imports it only when it is about to use the kernels.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Iterator, Sequence

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Elements of one q (and of one k, one v) tile: 16 (token, head) rows of head_dim 128.
QKV_TILE_ELEMENTS = 2048
QKV_WARPS = 4
# Elements of one modulated-RMSNorm tile: four rows of width 2560/3072 (rounded up to 4096), so each
# program reads its sample's scale and shift once per four rows.
NORM_TILE_ELEMENTS = 16384
NORM_WARPS = 8
SILU_MUL_BLOCK = 4096
SILU_MUL_WARPS = 8

# One stream's q/k/v input: (its qkv projection output (rows, 3·heads·head_dim), norm_q weight, norm_k weight).
QKVStream = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@triton.jit
def _normalize_and_rotate(x, weight, cos, sin, eps, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """RMSNorm of every row of ``x`` [BLOCK_H, BLOCK_D] (float32 statistics) times ``weight``, then each
    channel pair (2i, 2i+1) rotated by (cos, sin) [BLOCK_H, BLOCK_D // 2]; float32."""
    x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)
    x = x * rstd[:, None] * weight[None, :]
    x0, x1 = tl.split(tl.reshape(x, (BLOCK_H, BLOCK_D // 2, 2)))
    return tl.reshape(tl.join(x0 * cos - x1 * sin, x1 * cos + x0 * sin), (BLOCK_H, BLOCK_D))


@triton.jit
def _qkv_norm_rope_kernel(
    qkv_ptr, q_weight_ptr, k_weight_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr,
    head_rows, qkv_row_stride, first_row, table_rows, pairs, eps,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """q and k of BLOCK_H (token, head) rows of one stream normalised and rotated, v copied, into the
    (rows, heads, head_dim) outputs from global row ``first_row`` on."""
    head_row = tl.program_id(0).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    token, head = head_row // HEADS, head_row % HEADS
    channel = tl.arange(0, BLOCK_D)
    in_head = channel < HEAD_DIM
    inside = (head_row < head_rows)[:, None] & in_head[None, :]
    # A token's row of the projection holds [q heads | k heads | v heads].
    source = qkv_ptr + token[:, None] * qkv_row_stride + (head * HEAD_DIM)[:, None] + channel[None, :]
    target = (first_row * HEADS + head_row)[:, None] * HEAD_DIM + channel[None, :]

    # The table covers the first ``table_rows`` global rows and ``pairs`` channel pairs: the rest stays put.
    pair = tl.arange(0, BLOCK_D // 2)
    table_row = first_row + token
    rotated = (table_row < table_rows)[:, None] & (pair < pairs)[None, :]
    table_at = table_row[:, None] * pairs + pair[None, :]
    cos = tl.load(cos_ptr + table_at, mask=rotated, other=1.0)
    sin = tl.load(sin_ptr + table_at, mask=rotated, other=0.0)

    q_weight = tl.load(q_weight_ptr + channel, mask=in_head, other=0.0).to(tl.float32)
    k_weight = tl.load(k_weight_ptr + channel, mask=in_head, other=0.0).to(tl.float32)
    q = tl.load(source, mask=inside, other=0.0)
    k = tl.load(source + HEADS * HEAD_DIM, mask=inside, other=0.0)
    v = tl.load(source + 2 * HEADS * HEAD_DIM, mask=inside, other=0.0)
    q = _normalize_and_rotate(q, q_weight, cos, sin, eps, HEAD_DIM, BLOCK_H, BLOCK_D)
    k = _normalize_and_rotate(k, k_weight, cos, sin, eps, HEAD_DIM, BLOCK_H, BLOCK_D)
    tl.store(q_ptr + target, q.to(q_ptr.dtype.element_ty), mask=inside)
    tl.store(k_ptr + target, k.to(k_ptr.dtype.element_ty), mask=inside)
    tl.store(v_ptr + target, v.to(v_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _modulated_rms_norm_kernel(
    x_ptr, scale_ptr, shift_ptr, out_ptr, rows, dim, x_row_stride, eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``rms_norm(x)·scale + shift`` of BLOCK_R rows of one sample (``scale``, ``shift``: that sample's
    (dim,) vectors), float32 statistics; ``out`` is (rows, dim) contiguous."""
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    column = tl.arange(0, BLOCK_D)
    in_row = column < dim
    inside = (row < rows)[:, None] & in_row[None, :]
    x = tl.load(x_ptr + row[:, None] * x_row_stride + column[None, :], mask=inside, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / dim + eps)
    scale = tl.load(scale_ptr + column, mask=in_row, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + column, mask=in_row, other=0.0).to(tl.float32)
    out = x * rstd[:, None] * scale[None, :] + shift[None, :]
    tl.store(out_ptr + row[:, None] * dim + column[None, :], out.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _gated_residual_kernel(
    residual_ptr, update_ptr, gate_ptr, out_ptr, rows, dim, residual_row_stride, update_row_stride,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``residual + update·gate`` of BLOCK_R rows of one sample (``gate``: that sample's (dim,) vector), in
    float32; ``out`` is (rows, dim) contiguous."""
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    column = tl.arange(0, BLOCK_D)
    in_row = column < dim
    inside = (row < rows)[:, None] & in_row[None, :]
    residual = tl.load(residual_ptr + row[:, None] * residual_row_stride + column[None, :], mask=inside, other=0.0)
    update = tl.load(update_ptr + row[:, None] * update_row_stride + column[None, :], mask=inside, other=0.0)
    gate = tl.load(gate_ptr + column, mask=in_row, other=0.0).to(tl.float32)
    out = residual.to(tl.float32) + update.to(tl.float32) * gate[None, :]
    tl.store(out_ptr + row[:, None] * dim + column[None, :], out.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, elements, BLOCK: tl.constexpr):
    """``SiLU(gate)·up`` of one block of contiguous elements, in float32."""
    offset = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offset < elements
    gate = tl.load(gate_ptr + offset, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offset, mask=inside, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + offset, out.to(out_ptr.dtype.element_ty), mask=inside)


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------


def _on_device(tensor: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else nullcontext()


def _row_tile(dim: int, tile_elements: int) -> tuple[int, int]:
    """(rows, padded width) of a tile of whole rows of width ``dim``, about ``tile_elements`` in all."""
    block_d = triton.next_power_of_2(dim)
    return max(1, tile_elements // block_d), block_d


def _samples(lengths: Sequence[int]) -> Iterator[tuple[int, int, int]]:
    """(sample, first row, rows) of every sample with rows, for kernels launched once per sample."""
    start = 0
    for sample, length in enumerate(lengths):
        if length:
            yield sample, start, length
        start += length


def _same_device_and_dtype(tensors: Sequence[torch.Tensor]) -> bool:
    first = tensors[0]
    return first.dtype in SUPPORTED_DTYPES and all(
        t.device == first.device and t.dtype == first.dtype for t in tensors
    )


def qkv_norm_rope_supported(streams: Sequence[QKVStream], cos: torch.Tensor, sin: torch.Tensor, heads: int,
                            eps: float) -> bool:
    """Whether :func:`qkv_norm_rope` takes these arguments: projections of one supported dtype and device
    with unit channel stride and a (3, heads, head_dim) row of even head_dim, head_dim-long weights, and a
    (table rows, pairs) float32 table of at most head_dim / 2 pairs and at most all rows."""
    projections = [qkv for qkv, _, _ in streams]
    if not projections or not _same_device_and_dtype(projections):
        return False
    head_dim = streams[0][1].numel()
    rows = sum(qkv.shape[0] for qkv in projections)
    return (
        head_dim > 0 and head_dim % 2 == 0
        and all(qkv.dim() == 2 and qkv.shape[1] == 3 * heads * head_dim and qkv.stride(1) == 1 for qkv in projections)
        and all(w.numel() == head_dim and w.device == qkv.device for qkv, q_w, k_w in streams for w in (q_w, k_w))
        and cos.dtype == sin.dtype == torch.float32 and cos.dim() == 2 and cos.shape == sin.shape
        and cos.device == sin.device == projections[0].device
        and 2 * cos.shape[1] <= head_dim and cos.shape[0] <= rows
    )


def qkv_norm_rope(streams: Sequence[QKVStream], cos: torch.Tensor, sin: torch.Tensor, heads: int, eps: float, *,
                  tile_elements: int = QKV_TILE_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (rows of all streams in order, heads, head_dim) from the streams' qkv projections: q and k
    RMSNorm'd per head with their stream's weights, then rotated by ``cos``/``sin`` at their global row (rows
    beyond the table and channels beyond its pairs unrotated), as JointWindowAttention's plain path; one
    launch per stream.  Arguments as :func:`qkv_norm_rope_supported` accepts them (CPU tensors run under
    Triton's interpreter, for tests).  ``tile_elements``: (token, head) rows x head_dim of one tile."""
    first = streams[0][0]
    head_dim = streams[0][1].numel()
    rows = sum(qkv.shape[0] for qkv, _, _ in streams)
    q, k, v = (torch.empty((rows, heads, head_dim), dtype=first.dtype, device=first.device) for _ in range(3))
    cos, sin = cos.contiguous(), sin.contiguous()
    block_d = triton.next_power_of_2(head_dim)
    block_h = max(1, tile_elements // block_d)
    first_row = 0
    with _on_device(first):
        for qkv, q_weight, k_weight in streams:
            head_rows = qkv.shape[0] * heads
            if head_rows:
                _qkv_norm_rope_kernel[(triton.cdiv(head_rows, block_h),)](
                    qkv, q_weight.contiguous(), k_weight.contiguous(), cos, sin, q, k, v,
                    head_rows, qkv.stride(0), first_row, cos.shape[0], cos.shape[1], eps,
                    HEADS=heads, HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=QKV_WARPS,
                )
            first_row += qkv.shape[0]
    return q, k, v


def modulated_rms_norm_supported(x: torch.Tensor, eps: float, scale: torch.Tensor, shift: torch.Tensor,
                                 lengths: Sequence[int]) -> bool:
    """Whether :func:`modulated_rms_norm` takes these arguments: ``x`` (rows, dim) of a supported dtype with
    unit channel stride, ``scale``/``shift`` (samples, dim) on its device, ``lengths`` summing to rows."""
    return (
        x.dtype in SUPPORTED_DTYPES and x.dim() == 2 and x.stride(1) == 1
        and all(t.device == x.device and t.dim() == 2 and t.shape == (len(lengths), x.shape[1])
                for t in (scale, shift))
        and sum(lengths) == x.shape[0]
    )


def modulated_rms_norm(x: torch.Tensor, eps: float, scale: torch.Tensor, shift: torch.Tensor,
                       lengths: Sequence[int], *, tile_elements: int = NORM_TILE_ELEMENTS) -> torch.Tensor:
    """``rms_norm(x, eps)·scale[b] + shift[b]`` for the rows of each sample b (consecutive ``lengths``), as
    ``Modulation.modulate(rms_norm(x, eps), ...)``; one launch per sample.  Arguments as
    :func:`modulated_rms_norm_supported` accepts them (CPU tensors run under Triton's interpreter)."""
    rows, dim = x.shape
    out = torch.empty((rows, dim), dtype=x.dtype, device=x.device)
    scale, shift = scale.contiguous(), shift.contiguous()
    block_r, block_d = _row_tile(dim, tile_elements)
    with _on_device(x):
        for sample, start, length in _samples(lengths):
            _modulated_rms_norm_kernel[(triton.cdiv(length, block_r),)](
                x[start:], scale[sample], shift[sample], out[start:], length, dim, x.stride(0), eps,
                BLOCK_R=block_r, BLOCK_D=block_d, num_warps=NORM_WARPS,
            )
    return out


def gated_residual_supported(residual: torch.Tensor, update: torch.Tensor, gate: torch.Tensor,
                             lengths: Sequence[int]) -> bool:
    """Whether :func:`gated_residual` takes these arguments: ``residual`` and ``update`` (rows, dim) of one
    supported dtype and device with unit channel stride, ``gate`` (samples, dim) there, ``lengths`` summing to
    rows."""
    return (
        _same_device_and_dtype([residual, update]) and residual.dim() == 2 and residual.shape == update.shape
        and residual.stride(1) == 1 and update.stride(1) == 1
        and gate.device == residual.device and gate.dim() == 2 and gate.shape == (len(lengths), residual.shape[1])
        and sum(lengths) == residual.shape[0]
    )


def gated_residual(residual: torch.Tensor, update: torch.Tensor, gate: torch.Tensor, lengths: Sequence[int], *,
                   tile_elements: int = NORM_TILE_ELEMENTS) -> torch.Tensor:
    """``residual + update·gate[b]`` for the rows of each sample b (consecutive ``lengths``), as
    ``Modulation.add_gated``; one launch per sample, a new (rows, dim) tensor.  Arguments as
    :func:`gated_residual_supported` accepts them (CPU tensors run under Triton's interpreter)."""
    rows, dim = residual.shape
    out = torch.empty((rows, dim), dtype=residual.dtype, device=residual.device)
    gate = gate.contiguous()
    block_r, block_d = _row_tile(dim, tile_elements)
    with _on_device(residual):
        for sample, start, length in _samples(lengths):
            _gated_residual_kernel[(triton.cdiv(length, block_r),)](
                residual[start:], update[start:], gate[sample], out[start:], length, dim, residual.stride(0),
                update.stride(0), BLOCK_R=block_r, BLOCK_D=block_d, num_warps=NORM_WARPS,
            )
    return out


def silu_mul_supported(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether :func:`silu_mul` takes these arguments: contiguous tensors of one shape, device and supported
    dtype."""
    return (_same_device_and_dtype([gate, up]) and gate.shape == up.shape
            and gate.is_contiguous() and up.is_contiguous())


def silu_mul(gate: torch.Tensor, up: torch.Tensor, *, block: int = SILU_MUL_BLOCK) -> torch.Tensor:
    """``F.silu(gate) * up`` (the SwiGLU MLP's hidden activation) in one pass, rounded once."""
    out = torch.empty_like(up)
    elements = up.numel()
    if elements:
        with _on_device(up):
            _silu_mul_kernel[(triton.cdiv(elements, block),)](gate, up, out, elements, BLOCK=block,
                                                               num_warps=SILU_MUL_WARPS)
    return out
