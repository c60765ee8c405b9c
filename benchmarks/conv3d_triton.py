"""Causal 3x3x3 VAE convolutions: cuDNN against the Triton implicit GEMM (src/optimization/conv3d_triton.py) in
bf16 and in fp8 (e4m3), at the full-size shapes of a 1080p decode.

    PYTHONPATH=. python benchmarks/conv3d_triton.py --output conv3d_triton.json

Per shape: cuDNN exactly as VAERuntime._convolve calls it (torch.cudnn_convolution, channels_last_3d bf16),
the Triton kernel in bf16, in fp8 (quantizing x timed apart) and in fp8 with the tensor core's own
accumulation over all of K, each autotuned.  Each: median ms (src/benchmark/timer.py's cuda_time),
TFLOP/s (2·M·N·K), the first call's seconds (compiling and autotuning), relative L2 error against the cuDNN
output and against a float32 F.conv3d (TF32 off) of the top 16 rows.  Triton failures are recorded, not
fatal.  About 2-3 minutes on an H100; the JSON is rewritten after every shape.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from src.benchmark.kernels import error_row, parse_args, run_shapes, time_call
from src.benchmark.timer import cuda_time
from src.optimization.conv3d_triton import conv3d_causal, quantize_input_fp8, tuned_tiles, weight_matrix
from src.optimization.vae_fp8 import quantize_weight_fp8

LAST = torch.channels_last_3d
REFERENCE_ROWS = 16  # output rows compared with the float32 convolution


class Shape(NamedTuple):
    channels: int
    out_channels: int
    frames: int  # new frames; x holds 2 look-back frames more
    height: int
    width: int

    @property
    def name(self) -> str:
        return f"{self.channels}->{self.out_channels} {self.frames}x{self.height}x{self.width}"

    @property
    def flops(self) -> int:
        return 2 * self.frames * self.height * self.width * self.out_channels * 27 * self.channels


SHAPES = (
    Shape(128, 128, 4, 1088, 1920),
    Shape(256, 256, 4, 544, 960),
    Shape(512, 512, 2, 272, 480),
    Shape(256, 128, 4, 1088, 1920),
)


def rel_l2(result: torch.Tensor, reference: torch.Tensor) -> float:
    """||result - reference|| / ||reference||, one frame at a time in float32 (whole outputs are GBs)."""
    difference = total = 0.0
    for frame in range(reference.shape[2]):
        expected = reference[:, :, frame].float()
        difference += (result[:, :, frame].float() - expected).square().sum().item()
        total += expected.square().sum().item()
    return math.sqrt(difference / total)


def float32_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.conv3d in float32 without TF32 of the top REFERENCE_ROWS output rows (one input row more below, so
    the kept rows see their real neighbours)."""
    allow_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        rows = x[:, :, :, :REFERENCE_ROWS + 1].float()
        return F.conv3d(rows, weight.float(), None, 1, (0, 1, 1))[:, :, :, :REFERENCE_ROWS]
    finally:
        torch.backends.cudnn.allow_tf32 = allow_tf32


def measure_shape(shape: Shape, device: torch.device) -> dict:
    generator = torch.Generator(device).manual_seed(0)
    x = torch.randn(1, shape.channels, shape.frames + 2, shape.height, shape.width, device=device,
                    dtype=torch.bfloat16, generator=generator).contiguous(memory_format=LAST)
    # Weights ~ N(0, 1/fan_in), as the VAE's: outputs of unit scale.
    weight = (torch.randn(shape.out_channels, shape.channels, 3, 3, 3, device=device, generator=generator)
              / math.sqrt(27 * shape.channels)).to(torch.bfloat16).contiguous(memory_format=LAST)
    reference = float32_reference(x, weight)
    cudnn = torch.backends.cudnn

    def cudnn_call():
        return torch.cudnn_convolution(x, weight, [0, 1, 1], [1, 1, 1], [1, 1, 1], 1, cudnn.benchmark,
                                       cudnn.deterministic, cudnn.allow_tf32)

    rows, outputs = {}, {}
    rows["cudnn"], outputs["cudnn"] = time_call(cudnn_call, shape.flops, device)
    matrix = weight_matrix(weight)
    out = torch.empty_like(outputs["cudnn"])
    variants = {"triton_bf16": lambda: conv3d_causal(x, matrix, out=out)}
    try:
        x_fp8, x_scale = quantize_input_fp8(x)
        matrix_fp8, weight_scale = quantize_weight_fp8(matrix)
        rows["fp8_quantize_x"] = {"ms": cuda_time(lambda: quantize_input_fp8(x), device) * 1e3}
        out_fp8, out_fast = torch.empty_like(out), torch.empty_like(out)
        variants["triton_fp8"] = lambda: conv3d_causal(x_fp8, matrix_fp8, out=out_fp8,
                                                       fp8_scales=(x_scale, weight_scale))
        variants["triton_fp8_fast_accumulation"] = lambda: conv3d_causal(
            x_fp8, matrix_fp8, out=out_fast, fp8_scales=(x_scale, weight_scale), fp8_fast_accumulation=True)
    except Exception as error:  # fp8 missing from this torch build or device
        rows["fp8_quantize_x"] = error_row(error)
    for label, call in variants.items():
        try:
            rows[label], outputs[label] = time_call(call, shape.flops, device)
        except Exception as error:  # a compile or launch failure: keep the other variants
            rows[label] = error_row(error)
            continue
        rows[label]["tiles"] = tuned_tiles()._asdict()
    for label, output in outputs.items():
        rows[label]["rel_l2_vs_cudnn"] = rel_l2(output, outputs["cudnn"]) if label != "cudnn" else 0.0
        rows[label]["rel_l2_vs_float32"] = rel_l2(output[:, :, :, :REFERENCE_ROWS], reference)
    return {"flops": shape.flops, "cudnn_benchmark": cudnn.benchmark, **rows}


def print_shape(name: str, rows: dict) -> None:
    print(f"\n{name}  ({rows['flops'] / 1e12:.2f} TFLOP)", flush=True)
    print(f"  {'variant':<30}{'ms':>8}{'TFLOP/s':>9}{'first s':>9}{'rel cuDNN':>11}{'rel fp32':>10}  tiles")
    for label, row in rows.items():
        if not isinstance(row, dict):
            continue
        if "error" in row:
            print(f"  {label:<30}{row['error']}")
        elif "tflops" not in row:
            print(f"  {label:<30}{row['ms']:>8.2f}")
        else:
            tiles = row.get("tiles")
            tiles = "" if tiles is None else " ".join(f"{k}={v}" for k, v in tiles.items())
            print(f"  {label:<30}{row['ms']:>8.2f}{row['tflops']:>9.0f}{row['first_call_s']:>9.1f}"
                  f"{row['rel_l2_vs_cudnn']:>11.2e}{row['rel_l2_vs_float32']:>10.2e}  {tiles}")


def main(argv=None) -> int:
    args = parse_args(__doc__.split("\n\n")[0], argv)
    return run_shapes(((shape.name, shape) for shape in SHAPES), measure_shape, print_shape, args.output)


if __name__ == "__main__":
    raise SystemExit(main())
