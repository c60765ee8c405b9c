#!/usr/bin/env python3
"""SeedVR2 benchmark: attention backends, compile overhead, memory stability and a full upscale job.

    python performance_test.py --model 3b --test-frames 33 --output results.json

With no weights file the full-size model is built with random weights (the default), so the benchmark runs
anywhere.  The end-to-end job is the real pipeline (the same code the nodes run), timed per phase with the
optimizations on and off in one run; it reports time, peak VRAM, effective TFLOP/s, the ratio to the FLOP
floor, and how far the optimized output is from the plain one.  Results print as a table and go to JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from src.benchmark import wall
from src.benchmark.flops import dit_flops, vae_flops
from src.benchmark.job import PrebuiltManager, dit_inputs, job_geometry, pattern_clip
from src.benchmark.random_weights import random_dit, random_vae
from src.benchmark.results import device_name, write_json
from src.benchmark.timer import cuda_time, event_time, peak_gb, reset_peak, sync
from src.optimization import attention_dispatch
from src.options import VAE_QUANTIZATIONS
from src.pipeline.model_manager import compute_dtype
from src.progress import Progress
from src.pipeline.settings import CompileSettings, DiTSpec, UpscaleSettings, VAESpec
from src.pipeline.upscaler import upscale

PHASES = ("encode", "upscale", "decode", "postprocess")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="3b", help="'3b', '7b' (random weights) or a DiT weights file")
    p.add_argument("--vae", default=None, help="VAE weights file (default: random full-size VAE)")
    p.add_argument("--test-frames", type=int, default=33, help="frames of the end-to-end clip")
    p.add_argument("--input-size", default="640x360", help="WxH of the input clip")
    p.add_argument("--resolution", type=int, default=1080, help="target shortest edge")
    p.add_argument("--batch-size", type=int, default=0, help="frames per batch (0 = all test frames)")
    p.add_argument("--iterations", type=int, default=3, help="timed repetitions of each job")
    p.add_argument("--sections", default="attention,compile,e2e",
                   help="comma list of: attention, compile, e2e, precision, vae_conv, vae_norm, profile, wall (the real "
                        "entry points in fresh processes: what users wait for)")
    p.add_argument("--attention", default="auto", help="attention_mode of the optimized run")
    p.add_argument("--quantization", default="disabled", help="quantization of the optimized run")
    p.add_argument("--vae-quantization", default="disabled", choices=VAE_QUANTIZATIONS,
                   help="VAE quantization of the profile section's run")
    p.add_argument("--compile", action="store_true", help="torch.compile in the optimized run")
    p.add_argument("--variants", default="plain,optimized",
                   help="end-to-end runs, in order: plain, optimized, compiled (optimized with the DiT blocks "
                        "compiled, as the compile settings node does), offload (optimized, the DiT moved to the "
                        "CPU while the VAE runs), lowvram (offload, plus VAE encode and decode in tiles of "
                        "--lowvram-tile px: for 16 GB GPUs), swapN (optimized with N DiT blocks "
                        "swapped to pinned host memory), fp8 (optimized with fp8 matmuls; changes the model, "
                        "so put it after the bf16 DiT variants), fp8vae (optimized with the VAE's resnet "
                        "convolutions in fp8; before fp8), fp8all (fp8 DiT and fp8 VAE), fp8all_offload (fp8all "
                        "with the DiT offloaded to the CPU during the VAE phases)")
    p.add_argument("--decode-tile", type=int, default=0, help="VAE decode tile size (0 = untiled)")
    p.add_argument("--encode-tile", type=int, default=0, help="VAE encode tile size (0 = untiled)")
    p.add_argument("--dit-offload", default="none", help="DiT offload device between phases")
    p.add_argument("--lowvram-tile", type=int, default=1088,
                   help="VAE tile size of the lowvram variant (1088: a 1080p frame in two tiles side by side)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="bf16 matmul peak (0 = measure it)")
    p.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    p.add_argument("--wall-dir", default=os.environ.get("SEEDVR2_WALL_DIR", "/tmp/seedvr2-wall"),
                   help="wall section: weights (random, written once), inputs and caches; reused between runs")
    p.add_argument("--wall-runs", default=",".join(wall.DEFAULT_RUNS),
                   help="wall section: runs in order, of " + ", ".join(wall.ALL_RUNS))
    p.add_argument("--wall-out", default=None, help="wall section: logs, timings, outputs (default WALL_DIR/out)")
    p.add_argument("--incumbent", default=os.environ.get("SEEDVR2_INCUMBENT_DIR"),
                   help="wall section: the incumbent pack's source folder, run on the same files")
    p.add_argument("--image-size", default="1280x720", help="wall section: WxH of the test image")
    p.add_argument("--image-resolution", type=int, default=2160, help="wall section: the image's target edge")
    p.add_argument("--long-frames", type=int, default=121, help="wall section: frames of the long clip")
    p.add_argument("--wall-timeout", type=float, default=600, help="wall section: seconds per process")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    p.add_argument("--verbose", action="store_true", help="log the pipeline's messages (model moves, retries)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------- timing
class PhaseRecorder(Progress):
    """Times each pipeline phase (and the post-process sections) with device synchronisation."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: dict[str, float] = {p: 0.0 for p in PHASES}
        self.peaks: dict[str, float] = {p: 0.0 for p in PHASES}
        self._phase, self._start = None, 0.0

    def _close(self) -> None:
        if self._phase is not None:
            sync(self.device)
            self.times[self._phase] += time.perf_counter() - self._start
            self.peaks[self._phase] = max(self.peaks[self._phase], peak_gb(self.device))

    def start_phase(self, phase: str, total: int) -> None:
        self._close()
        reset_peak(self.device)
        self._phase, self._start = phase, time.perf_counter()

    def finish(self) -> None:
        self._close()
        self._phase = None
        # The decode phase contains the post-process sections; report them apart.
        self.times["decode"] -= self.times["postprocess"]

    @contextlib.contextmanager
    def section(self, name: str):
        sync(self.device)
        start = time.perf_counter()
        yield
        sync(self.device)
        self.times[name] += time.perf_counter() - start
        self.peaks[name] = max(self.peaks[name], peak_gb(self.device))


def measure_peak_tflops(device: torch.device) -> float:
    """bf16 matmul rate of this device (8192³, median of 10)."""
    if device.type != "cuda":
        return 0.0
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    return 2 * 8192**3 / event_time(lambda: a @ b, repeat=10) / 1e12


# --------------------------------------------------------------------------------------------- models
def build_models(args, device):
    dtype = compute_dtype(device)
    if args.model in ("3b", "7b"):
        dit = random_dit(args.model, device, dtype)
    else:
        from src.optimization.quantized_load import load_dit

        dit = load_dit(args.model, device=device, dtype=dtype, quantization=args.quantization)
    if args.vae is None:
        vae = random_vae(device, dtype)
    else:
        from src.models.load import load_vae

        vae = load_vae(args.vae, device=device, dtype=dtype)
    return dit, vae


# --------------------------------------------------------------------------------------------- sections
def section_attention(args, device, dit_config) -> dict:
    """Every available backend on the DiT's window batch and the VAE's single-head attention."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    geometry = job_geometry(args.input_size, args.resolution, args.test_frames)
    from src.models.dit.windows import partition_windows

    t, h, w = geometry.latent
    grid = (t, h // 2, w // 2)
    windows = partition_windows(grid, dit_config.window[0], dit_config.window_method[0])
    sizes = sorted({math.prod(b - a for a, b in w) for w in windows})
    window_tokens = max(sizes) + 58
    shapes = {
        "dit_windows": (len(windows), dit_config.heads, window_tokens, dit_config.head_dim),
        "vae_mid": (1, 1, h * w, 512),
    }
    results = {}
    for label, shape in shapes.items():
        q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
        flops = 4 * shape[0] * shape[1] * shape[2] ** 2 * shape[3]
        reference = None
        reference = attention_dispatch.attention(q, k, v, backend=attention_dispatch.PLAIN).float()
        plain = cuda_time(lambda: attention_dispatch.attention(q, k, v, backend=attention_dispatch.PLAIN), device, repeat=5)
        rows = {"shape": list(shape), "plain_s": plain}
        if label == "dit_windows":
            # What the incumbent does: one SDPA call per window in a Python loop.
            def per_window():
                for i in range(shape[0]):
                    torch.nn.functional.scaled_dot_product_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1])
            rows["per_window_loop_s"] = cuda_time(per_window, device, repeat=3)
        for name, reason in attention_dispatch.available_backends(device, dtype, shape[-1]).items():
            if reason is not None:
                rows[name] = {"available": False, "reason": reason}
                continue
            try:
                out = attention_dispatch.attention(q, k, v, backend=name).float()
                seconds = cuda_time(lambda: attention_dispatch.attention(q, k, v, backend=name), device, repeat=5)
            except Exception as exc:  # report and continue: the benchmark surveys every backend
                rows[name] = {"available": False, "reason": f"{type(exc).__name__}: {exc}"[:200]}
                continue
            err = ((out - reference).norm() / reference.norm()).item()
            rows[name] = {"available": True, "seconds": seconds, "speedup_vs_plain": plain / seconds,
                          "tflops": flops / seconds / 1e12, "rel_err_vs_plain": err}
        results[label] = rows
    return results


def run_job(args, device, dit, vae, variant: str, iterations: int) -> dict:
    """Time the real pipeline on the test clip for one variant (see --variants)."""
    optimized = variant != "plain"
    geometry = job_geometry(args.input_size, args.resolution, args.test_frames)
    clip = pattern_clip(args.test_frames, geometry.in_w, geometry.in_h)
    batch = args.batch_size or args.test_frames
    compile_settings = CompileSettings() if (variant == "compiled" or (optimized and args.compile)) else None
    swap = int(variant[4:]) if variant.startswith("swap") else 0
    if variant in ("fp8", "fp8all", "fp8all_offload"):  # a DiT quantized by an earlier variant has no Linear left
        from src.optimization.linear_quantization import quantize_linears

        print(quantize_linears(dit, "fp8_e4m3fn", compute_dtype=compute_dtype(device), device=device).summary())
    dit_offload = "cpu" if variant in ("offload", "lowvram", "fp8all_offload") else args.dit_offload
    vae_quantization = "fp8_e4m3fn" if variant in ("fp8vae", "fp8all", "fp8all_offload") else "disabled"
    dit_spec = DiTSpec(model=str(args.model), device=str(device), attention_mode=args.attention if optimized else "sdpa",
                       enable_optimizations=optimized, compile=compile_settings, offload_device=dit_offload)
    decode_tile, encode_tile = (args.lowvram_tile,) * 2 if variant == "lowvram" else (args.decode_tile, args.encode_tile)
    vae_spec = VAESpec(model="vae", device=str(device), enable_optimizations=optimized, compile=compile_settings,
                       decode_tiled=decode_tile > 0, decode_tile_size=decode_tile or 1024,
                       encode_tiled=encode_tile > 0, encode_tile_size=encode_tile or 1024,
                       quantization=vae_quantization)
    settings = UpscaleSettings(resolution=args.resolution, batch_size=batch, color_correction="lab", seed=42)
    manager = PrebuiltManager(dit, vae, device)
    block_swap = None
    if swap:
        from src.optimization.stable_memory import BlockSwap

        block_swap = BlockSwap(dit.blocks, swap, device, "cpu")
    runs, output = [], None
    try:
        for _ in range(iterations + 1):  # the first run warms up (and compiles when asked)
            recorder = PhaseRecorder(device)
            reset_peak(device)
            start = time.perf_counter()
            output = upscale(clip, dit_spec, vae_spec, settings, progress=recorder, manager=manager)
            sync(device)
            recorder.finish()
            runs.append({"total_s": time.perf_counter() - start, "times": dict(recorder.times),
                         "peaks_gb": dict(recorder.peaks), "peak_gb": max(recorder.peaks.values())})
            print(f"{variant} run {len(runs)}{' (warm-up)' if len(runs) == 1 else ''}: {runs[-1]['total_s']:.2f} s, "
                  + ", ".join(f"{p} {recorder.times[p]:.2f} s" for p in PHASES), flush=True)
    finally:
        if block_swap is not None:
            block_swap.remove()
        if compile_settings is not None:
            from src.optimization import torch_compile

            torch_compile.uncompile(dit)  # the next variant runs what it names
    warmup, timed = runs[0], runs[1:]
    summary = {"warmup_total_s": warmup["total_s"], "runs": timed}
    for phase in PHASES:
        summary[phase] = {"seconds": statistics.median(r["times"][phase] for r in timed),
                          "peak_gb": max(r["peaks_gb"][phase] for r in timed)}
    summary["gpu_seconds"] = sum(summary[p]["seconds"] for p in PHASES)
    summary["peak_gb"] = max(r["peak_gb"] for r in timed)
    summary["peak_gb_stdev"] = statistics.pstdev(r["peak_gb"] for r in timed)
    summary["total_s_stdev"] = statistics.pstdev(r["total_s"] for r in timed)
    return summary, output


def section_e2e(args, device, dit, vae, peak_tflops) -> dict:
    g = job_geometry(args.input_size, args.resolution, args.test_frames)
    flops = {"upscale": dit_flops(dit.config, g.latent)}
    flops["encode"], flops["decode"] = vae_flops(vae.config, g.frames, g.pad_h, g.pad_w)
    total_flops = sum(flops.values())
    result = {"output_size": [g.out_w, g.out_h], "frames": args.test_frames, "flops_tflop": {k: v / 1e12 for k, v in flops.items()},
              "floor_seconds": total_flops / (peak_tflops * 1e12) if peak_tflops else None}
    outputs = {}
    for label in [v.strip() for v in args.variants.split(",") if v.strip()]:
        try:
            summary, outputs[label] = run_job(args, device, dit, vae, label, args.iterations)
        except Exception as exc:  # report the failure and measure the remaining variants
            import traceback

            traceback.print_exc()
            result[f"{label}_error"] = f"{type(exc).__name__}: {exc}"[:500]
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        for phase, phase_flops in flops.items():
            seconds = summary[phase]["seconds"]
            summary[phase]["tflops"] = phase_flops / seconds / 1e12 if seconds else None
            if peak_tflops:
                summary[phase]["ratio_to_floor"] = seconds / (phase_flops / (peak_tflops * 1e12))
        summary["tflops"] = total_flops / summary["gpu_seconds"] / 1e12
        result[label] = summary
    if "plain" in outputs:
        b = outputs["plain"].float()
        for label, out in outputs.items():
            if label == "plain":
                continue
            a = out.float()
            result[f"{label}_vs_plain"] = {"rel_l2": ((a - b).norm() / b.norm()).item(),
                                           "max_abs_levels": ((a - b).abs().max() * 255).item(),
                                           "mean_abs_levels": ((a - b).abs().mean() * 255).item(),
                                           "speedup": result["plain"]["gpu_seconds"] / result[label]["gpu_seconds"]}
    return result


def section_vae_conv(args, device) -> dict:
    """The VAE's dominant kernel, a 3x3x3 convolution at full output resolution, in several layouts."""
    geometry = job_geometry(args.input_size, args.resolution, args.test_frames)
    pad_h, pad_w = geometry.pad_h, geometry.pad_w
    dtype = torch.bfloat16
    results = {}
    for channels, scale, frames in ((128, 1, 4), (256, 2, 4), (512, 4, 2)):
        h, w = pad_h // scale, pad_w // scale
        x = torch.randn(1, channels, frames + 2, h, w, device=device, dtype=dtype)
        conv = torch.nn.Conv3d(channels, channels, 3, padding=(0, 1, 1)).to(device, dtype)
        flops = 2 * channels * channels * 27 * frames * h * w
        row = {}
        with torch.no_grad():
            row["ncdhw"] = cuda_time(lambda: conv(x), device, repeat=5)
            x_cl = x.to(memory_format=torch.channels_last_3d)
            conv_cl = conv.to(memory_format=torch.channels_last_3d)
            row["channels_last_3d"] = cuda_time(lambda: conv_cl(x_cl), device, repeat=5)
            # The same convolution as three 2-D convolutions over time taps (frames folded into the batch).
            w2 = conv.weight.permute(2, 0, 1, 3, 4).contiguous()  # (kt, out, in, 3, 3)
            frames_nhwc = x[0].transpose(0, 1).contiguous(memory_format=torch.channels_last)  # (T+2, C, H, W)

            def taps():
                out = torch.nn.functional.conv2d(frames_nhwc[0:frames], w2[0], padding=1)
                out += torch.nn.functional.conv2d(frames_nhwc[1:frames + 1], w2[1], padding=1)
                out += torch.nn.functional.conv2d(frames_nhwc[2:frames + 2], w2[2], padding=1)
                return out
            row["conv2d_taps_nhwc"] = cuda_time(taps, device, repeat=5)
        results[f"c{channels}_{w}x{h}x{frames}"] = {k: {"seconds": v, "tflops": flops / v / 1e12} for k, v in row.items()}
        del x, x_cl, conv, conv_cl, frames_nhwc
    return results


def section_vae_norm(args, device) -> dict:
    """The VAE's GroupNorm+SiLU kernel (with a folded convolution bias) at the job's three widest levels,
    compiled for dynamic and for static shapes, against PyTorch's F.group_norm frame by frame."""
    from src.optimization.vae_optimizer import normalize_into

    geometry = job_geometry(args.input_size, args.resolution, args.test_frames)
    dtype = compute_dtype(device)
    results = {}
    for channels, scale, frames in ((128, 1, 2), (256, 2, 2), (512, 8, 5)):
        h, w = geometry.pad_h // scale, geometry.pad_w // scale
        x = torch.randn(1, channels, frames, h, w, device=device, dtype=dtype).contiguous(
            memory_format=torch.channels_last_3d)
        out = torch.empty_like(x)
        weight, bias, shift = (torch.randn(channels, device=device, dtype=dtype) for _ in range(3))
        reference = torch.stack([torch.nn.functional.silu(torch.nn.functional.group_norm(
            x[:, :, t].float() + shift.float().view(1, -1, 1, 1), 32, weight.float(), bias.float(), 1e-6))
            for t in range(frames)], dim=2)
        row = {}
        with torch.no_grad():
            for label, dynamic in (("compiled_dynamic", True), ("compiled_static", False)):
                torch._dynamo.reset()
                kernel = torch.compile(normalize_into, dynamic=dynamic, fullgraph=True)
                start = time.perf_counter()
                kernel(x, weight, bias, out, 32, 1e-6, True, shift)
                sync(device)
                compile_s = time.perf_counter() - start
                seconds = cuda_time(lambda: kernel(x, weight, bias, out, 32, 1e-6, True, shift), device, repeat=5)
                row[label] = {"seconds": seconds, "compile_s": compile_s,
                              "gb_per_s": 3 * x.numel() * x.element_size() / seconds / 1e9,  # read twice, write once
                              "rel_err": ((out.float() - reference).norm() / reference.norm()).item()}
            row["eager_group_norm_per_frame"] = {"seconds": cuda_time(lambda: [torch.nn.functional.silu(
                torch.nn.functional.group_norm(x[:, :, t] + shift.view(1, -1, 1, 1), 32, weight, bias, 1e-6))
                for t in range(frames)], device, repeat=5)}
        results[f"c{channels}_{w}x{h}x{frames}"] = row
        del x, out, reference
    torch._dynamo.reset()
    return results


class ProfiledPhases(PhaseRecorder):
    """A PhaseRecorder that also marks each phase (and the post-process sections) as a profiler range."""

    def __init__(self, device: torch.device):
        super().__init__(device)
        self._range = None

    def _close(self) -> None:
        super()._close()
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None

    def start_phase(self, phase: str, total: int) -> None:
        super().start_phase(phase, total)
        self._range = torch.profiler.record_function(f"phase:{phase}")
        self._range.__enter__()

    @contextlib.contextmanager
    def section(self, name: str):
        with super().section(name), torch.profiler.record_function(f"phase:{name}"):
            yield


def kernel_breakdown(events, phases: tuple[str, ...], top: int = 12) -> dict:
    """Per phase: GPU-busy seconds (sum of kernel and copy times), the top kernels by time, and the top
    operators by the GPU time of the kernels they launched themselves (which op a generic kernel serves).

    An event belongs to the innermost ``phase:`` range whose host interval contains its start; the recorder
    synchronises at every phase boundary, so no kernel of one phase runs inside another's interval."""
    ranges = sorted(((e.time_range.start, e.time_range.end, e.name[6:]) for e in events
                     if e.name.startswith("phase:")), key=lambda r: r[1] - r[0])
    kernels: dict[str, dict[str, float]] = {p: {} for p in phases}
    ops: dict[str, dict[str, float]] = {p: {} for p in phases}
    for e in events:
        if e.name.startswith("phase:"):
            continue
        phase = next((name for lo, hi, name in ranges if lo <= e.time_range.start <= hi), None)
        if phase not in kernels:
            continue
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[phase][e.name] = kernels[phase].get(e.name, 0.0) + e.time_range.elapsed_us() / 1e6
        else:
            own = getattr(e, "self_device_time_total", 0.0) / 1e6
            if own > 0:
                ops[phase][e.name] = ops[phase].get(e.name, 0.0) + own

    def ranked(table: dict[str, float], total: float) -> list[dict]:
        rows = sorted(table.items(), key=lambda kv: -kv[1])[:top]
        return [{"name": name[:90], "seconds": sec, "share": sec / total if total else 0.0} for name, sec in rows]

    result = {}
    for phase in phases:
        busy = sum(kernels[phase].values())
        result[phase] = {"gpu_busy_s": busy, "top": ranked(kernels[phase], busy), "top_ops": ranked(ops[phase], busy)}
    return result


def section_profile(args, device, dit, vae) -> dict:
    """Where the optimized job's GPU time goes (the DiT blocks compiled with --compile): one profiled run of
    the real pipeline, with each phase's wall time, the time its GPU was busy (the difference is host
    overhead and synchronisation) and its top kernels."""
    from torch.profiler import ProfilerActivity, profile

    geometry = job_geometry(args.input_size, args.resolution, args.test_frames)
    clip = pattern_clip(args.test_frames, geometry.in_w, geometry.in_h)
    dit_spec = DiTSpec(model=str(args.model), device=str(device), attention_mode=args.attention,
                       enable_optimizations=True, offload_device=args.dit_offload,
                       compile=CompileSettings() if args.compile else None)
    vae_spec = VAESpec(model="vae", device=str(device), enable_optimizations=True, quantization=args.vae_quantization)
    settings = UpscaleSettings(resolution=args.resolution, batch_size=args.batch_size or args.test_frames,
                               color_correction="lab", seed=42)
    manager = PrebuiltManager(dit, vae, device)
    try:
        upscale(clip, dit_spec, vae_spec, settings, progress=PhaseRecorder(device), manager=manager)  # warm-up
        recorder = ProfiledPhases(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            upscale(clip, dit_spec, vae_spec, settings, progress=recorder, manager=manager)
            recorder.finish()
    finally:
        if dit_spec.compile is not None:
            from src.optimization import torch_compile

            torch_compile.uncompile(dit)  # later sections run the DiT they name
    breakdown = kernel_breakdown(prof.events(), PHASES)
    for phase in PHASES:
        row = breakdown[phase]
        row["wall_s"] = recorder.times[phase]
        print(f"\nProfile {phase}: wall {row['wall_s']:.3f} s (profiled), GPU busy {row['gpu_busy_s']:.3f} s")
        for title in ("top", "top_ops"):
            print(f" {'kernels' if title == 'top' else 'operators'}:")
            for k in row[title]:
                print(f"  {k['seconds'] * 1e3:>9.1f} ms {k['share'] * 100:>5.1f}%  {k['name']}")
    return breakdown


def section_compile(args, device, dit) -> dict:
    """Cold compile time of the DiT's repeated block at the job's token count."""
    from src.optimization import dit_chunking, dit_fused_modules, torch_compile

    inputs = dit_inputs(job_geometry(args.input_size, args.resolution, args.test_frames), dit.config, device)
    # Earlier sections' pipeline runs leave their choices on the model; this one times the plain modules.
    dit_fused_modules.detach_fused_kernels(dit)
    dit_chunking.use_token_chunks(dit, None)
    previous = dit.blocks[0].attn.attention_backend   # later sections run the DiT with their own choice
    attention_dispatch.use_backend(dit, args.attention)
    eager = cuda_time(lambda: dit(*inputs), device, repeat=3)
    torch_compile.compile_repeated_blocks(dit, CompileSettings())
    sync(device)
    start = time.perf_counter()
    dit(*inputs)
    sync(device)
    first = time.perf_counter() - start
    compiled = cuda_time(lambda: dit(*inputs), device, repeat=3)
    torch_compile.uncompile(dit)
    attention_dispatch.use_backend(dit, previous)
    return {"eager_s": eager, "first_call_s": first, "compiled_s": compiled,
            "compile_overhead_s": first - compiled, "speedup": eager / compiled}


def section_precision(args, device) -> dict:
    """bf16 against float32 for the full-size 3B DiT (1080p latent) and VAE (5 frames at 1080p)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    result = {}
    geometry = job_geometry(args.input_size, args.resolution, args.test_frames)
    pad_h, pad_w = geometry.pad_h, geometry.pad_w
    dit32 = random_dit(args.model if args.model in ("3b", "7b") else "3b", device, torch.float32)
    inputs = dit_inputs(geometry, dit32.config, device)
    with torch.no_grad():
        ref = dit32(*inputs)
        dit16 = dit32.to(torch.bfloat16)
        del dit32
        reset_peak(device)
        attention_dispatch.use_backend(dit16, attention_dispatch.PLAIN)
        seconds = cuda_time(lambda: dit16(*inputs), device, repeat=3)
        out = dit16(*inputs)
    result["dit"] = {"latent": list(geometry.latent), "rel_l2": ((out - ref).norm() / ref.norm()).item(),
                     "bf16_seconds": seconds, "bf16_peak_gb": peak_gb(device)}
    del dit16, ref, out
    torch.cuda.empty_cache() if device.type == "cuda" else None
    # fp32 activations of the full-resolution decoder levels are large: check the VAE at half size.
    vae32 = random_vae(device, torch.float32)
    vae_h, vae_w = pad_h // 2 // 16 * 16, pad_w // 2 // 16 * 16
    video = pattern_clip(5, vae_w, vae_h).permute(3, 0, 1, 2)[None].to(device) * 2 - 1
    with torch.no_grad():
        mean32, _ = vae32.encode(video)
        dec32 = vae32.decode(mean32)
        vae16 = vae32.to(torch.bfloat16)
        reset_peak(device)
        mean16, _ = vae16.encode(video)
        dec16 = vae16.decode(mean32)
    result["vae"] = {"frames": 5, "size": [vae_w, vae_h],
                     "encode_rel_l2": ((mean16 - mean32).norm() / mean32.norm()).item(),
                     "decode_rel_l2": ((dec16 - dec32).norm() / dec32.norm()).item(),
                     "bf16_peak_gb": peak_gb(device)}
    torch.backends.cuda.matmul.allow_tf32 = True
    return result


def section_wall(args) -> dict:
    """What users wait for: the CLI, the node and the incumbent's CLI in fresh processes (src/benchmark/wall.py)."""
    root = Path(args.wall_dir)
    width, height = (int(v) for v in args.input_size.lower().split("x"))
    image_w, image_h = (int(v) for v in args.image_size.lower().split("x"))
    config = wall.WallConfig(
        root=root, out=Path(args.wall_out) if args.wall_out else root / "out", model=args.model, vae=args.vae,
        frames=args.test_frames, size=(width, height), resolution=args.resolution,
        batch_size=args.batch_size or args.test_frames, image_size=(image_w, image_h),
        image_resolution=args.image_resolution, long_frames=args.long_frames, device=args.device,
        incumbent=Path(args.incumbent) if args.incumbent else None, timeout=args.wall_timeout)
    runs = [r.strip() for r in args.wall_runs.split(",") if r.strip()]
    return wall.run_all(config, runs)


# --------------------------------------------------------------------------------------------- report
def print_table(results: dict) -> None:
    e2e = results.get("e2e")
    if e2e:
        print(f"\nEnd-to-end: {e2e['frames']} frames -> {e2e['output_size'][0]}x{e2e['output_size'][1]}, "
              f"FLOPs (TFLOP) " + ", ".join(f"{k} {v:.0f}" for k, v in e2e["flops_tflop"].items()))
        header = f"{'run':<10}" + "".join(f"{p:>14}" for p in PHASES) + f"{'total':>10}{'peak GB':>9}{'TFLOP/s':>9}"
        print(header)
        for label, r in e2e.items():
            if not (isinstance(r, dict) and "gpu_seconds" in r):
                continue
            cells = "".join(f"{r[p]['seconds']:>8.2f}s/{r[p]['peak_gb']:>4.1f}G" for p in PHASES)
            print(f"{label[:10]:<10}{cells}{r['gpu_seconds']:>9.2f}s{r['peak_gb']:>9.1f}{r['tflops']:>9.0f}")
        for key, o in e2e.items():
            if key.endswith("_vs_plain"):
                print(f"{key}: speedup {o['speedup']:.2f}x, rel {o['rel_l2']:.2e}, "
                      f"max {o['max_abs_levels']:.1f} levels, mean {o['mean_abs_levels']:.3f} levels")
        if e2e.get("floor_seconds"):
            print(f"FLOP floor {e2e['floor_seconds']:.2f}s at {results['peak_tflops']:.0f} TFLOP/s")
    att = results.get("attention")
    if att:
        for label, rows in att.items():
            print(f"\nAttention {label} {rows['shape']}: plain {rows['plain_s'] * 1e3:.2f} ms"
                  + (f", per-window loop {rows['per_window_loop_s'] * 1e3:.2f} ms" if "per_window_loop_s" in rows else ""))
            for name, row in rows.items():
                if isinstance(row, dict) and row.get("available"):
                    print(f"  {name:<16}{row['seconds'] * 1e3:>9.2f} ms {row['speedup_vs_plain']:>6.2f}x "
                          f"{row['tflops']:>6.0f} TFLOP/s err {row['rel_err_vs_plain']:.1e}")
    if "compile" in results:
        c = results["compile"]
        print(f"\nCompile: eager {c['eager_s']:.2f}s, first call {c['first_call_s']:.1f}s, compiled {c['compiled_s']:.2f}s "
              f"(overhead {c['compile_overhead_s']:.1f}s, {c['speedup']:.2f}x)")
    if "wall" in results:
        wall.print_wall(results["wall"])
    for key in ("precision", "vae_conv", "vae_norm"):
        if key in results:
            print(f"\n{key}:", json.dumps(results[key], indent=1))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = torch.device(args.device)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    results = {"args": vars(args), "device": device_name(device), "torch": torch.__version__}
    if set(sections) - {"wall"}:
        results["peak_tflops"] = args.peak_tflops or measure_peak_tflops(device)
    if "wall" in sections:
        results["wall"] = section_wall(args)
    if "precision" in sections:
        results["precision"] = section_precision(args, device)
    if "vae_conv" in sections:
        results["vae_conv"] = section_vae_conv(args, device)
    if "vae_norm" in sections:
        results["vae_norm"] = section_vae_norm(args, device)
    if {"attention", "compile", "e2e", "profile"} & set(sections):
        dit, vae = build_models(args, device)
        if "attention" in sections:
            results["attention"] = section_attention(args, device, dit.config)
        if "e2e" in sections:
            results["e2e"] = section_e2e(args, device, dit, vae, results["peak_tflops"])
        if "profile" in sections:
            results["profile"] = section_profile(args, device, dit, vae)
        if "compile" in sections:
            results["compile"] = section_compile(args, device, dit)
    print_table(results)
    if args.output:
        write_json(args.output, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
