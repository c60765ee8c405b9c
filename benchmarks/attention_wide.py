"""The VAE mid-block's attention (one 512-wide head over a frame's H·W positions, bf16): the Triton flash-attention
kernel (optimization/attention_triton.py, backend ``triton_wide``) against ``matmul_chunked`` and SDPA's
memory-efficient kernel, at one 1080p latent frame (32640 positions) and one 4K image (129600).

    PYTHONPATH=. python benchmarks/attention_wide.py --output attention_wide.json

Per shape and kernel: median ms (src/benchmark/timer.py's cuda_time), TFLOP/s (4·q_len·k_len·head_dim: the two
products, not the slices' recomputation), the first call's seconds (compiling and autotuning), the relative L2
error against a float32 reference (TF32 off, computed in query slices) and, for the Triton kernel, the
configuration autotuning chose.  A failing kernel is recorded, not fatal.  About a minute on an H100.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from src.benchmark.kernels import error_row, parse_args, run_shapes, time_call
from src.optimization import attention_dispatch
from src.optimization.attention_triton import tuned_tiles, wide_attention

SHAPES = {"1080p frame": (1, 1, 32640, 512), "4K image": (1, 1, 129600, 512)}
REFERENCE_SCORE_ELEMENTS = 1 << 28  # one query slice's float32 scores: 1 GiB


def float32_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ/√d) v in float32 without TF32, a slice of queries at a time (all scores would not fit)."""
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        batch, heads, q_len, head_dim = q.shape
        rows = max(1, REFERENCE_SCORE_ELEMENTS // k.shape[2])
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        for b in range(batch):
            for h in range(heads):
                keys_t, values = k[b, h].float().T, v[b, h].float()
                for start in range(0, q_len, rows):
                    scores = q[b, h, start:start + rows].float() @ keys_t * head_dim ** -0.5
                    out[b, h, start:start + rows] = torch.softmax(scores, dim=-1) @ values
                    del scores
        return out
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32


def rel_l2(result: torch.Tensor, reference: torch.Tensor) -> float:
    difference = torch.linalg.vector_norm(result.float() - reference, dtype=torch.float64)
    return (difference / torch.linalg.vector_norm(reference, dtype=torch.float64)).item()


def matmul_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return attention_dispatch.attention(q, k, v, backend="matmul_chunked")


def sdpa_efficient(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


# The Triton kernel is called directly, not through attention_dispatch, whose fallback would hide a failure.
KERNELS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "triton_wide": wide_attention, "matmul_chunked": matmul_chunked, "sdpa_efficient": sdpa_efficient,
}


def measure_shape(shape: tuple[int, int, int, int], device: torch.device) -> dict:
    generator = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(shape, device=device, dtype=torch.bfloat16, generator=generator) for _ in range(3))
    flops = 4 * shape[0] * shape[1] * shape[2] * shape[2] * shape[3]
    reference = float32_reference(q, k, v)
    rows = {"shape": list(shape), "flops": flops}
    for label, kernel in KERNELS.items():
        try:
            rows[label], out = time_call(lambda kernel=kernel: kernel(q, k, v), flops, device)
        except Exception as error:  # a compile or launch failure: keep the other kernels
            rows[label] = error_row(error)
            continue
        rows[label]["rel_l2_vs_float32"] = rel_l2(out, reference)
        if label == "triton_wide":
            rows[label]["tiles"] = tuned_tiles()._asdict()
        del out
    return rows


def print_shape(name: str, rows: dict) -> None:
    print(f"\n{name} {rows['shape']}  ({rows['flops'] / 1e12:.2f} TFLOP)", flush=True)
    print(f"  {'kernel':<16}{'ms':>9}{'TFLOP/s':>9}{'first s':>9}{'rel fp32':>10}  tiles")
    for label in KERNELS:
        row = rows[label]
        if "error" in row:
            print(f"  {label:<16}{row['error']}")
            continue
        tiles = " ".join(f"{key}={value}" for key, value in row.get("tiles", {}).items())
        print(f"  {label:<16}{row['ms']:>9.2f}{row['tflops']:>9.0f}{row['first_call_s']:>9.1f}"
              f"{row['rel_l2_vs_float32']:>10.2e}  {tiles}".rstrip())


def main(argv=None) -> int:
    args = parse_args(__doc__.split("\n\n")[0], argv)
    return run_shapes(SHAPES.items(), measure_shape, print_shape, args.output)


if __name__ == "__main__":
    raise SystemExit(main())
