"""ComfyUI's SeedVR2 file formats on the GPU: a full-size random-weight DiT saved in each Comfy-Org layout
(fp16, fp8_e4m3fn, int8_convrot, mxfp8, nvfp4), loaded through the pack's loader, and its DiT step of the
1080p job (33 frames of 640x360 -> 1920x1080, one latent batch) timed, with the peak VRAM and the error
against the fp16 file's output.

Rows: each format as it loads by default (fp8 weight-only, int8/mxfp8/nvfp4 dequantized at load off
Blackwell), plus ``fp8_e4m3fn+fp8mm`` (the loader's quantization=fp8_e4m3fn: FP8 matmuls with the file's
scales) and ``int8_convrot+int8mm`` (SEEDVR2_INT8_MATMUL=1: int8 matmuls).  Run from the repo root:

    PYTHONPATH=. python benchmarks/comfy_formats.py --output docs/results/comfy_formats_h100.json

(about 10 minutes for the 3B on an H100; ``--formats`` runs a subset, ``--frames`` a shorter clip.)
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from src.benchmark.job import dit_inputs, job_geometry
from src.benchmark.random_weights import random_dit
from src.benchmark.results import write_json
from src.benchmark.timer import cuda_time
from src.optimization.quantized_load import load_dit
from src.optimization import comfy_quant, dit_fused_modules, attention_dispatch
from tools import comfy_quantize as tool

ROWS = ("fp16", "fp8_e4m3fn", "fp8_e4m3fn+fp8mm", "int8_convrot", "int8_convrot+int8mm", "mxfp8", "nvfp4")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="3b", choices=["3b", "7b"])
    p.add_argument("--formats", default=",".join(ROWS), help=f"comma-separated rows out of {', '.join(ROWS)}")
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--input-size", default="640x360")
    p.add_argument("--resolution", type=int, default=1080)
    p.add_argument("--workdir", default=None, help="where the files are written (default: a temporary folder)")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


class _OnDevice(dict):
    """CPU tensors handed to the encoder one at a time on the GPU (the encoders work where the tensor is)."""

    def __init__(self, state: dict, device: torch.device):
        super().__init__(state)
        self.device = device

    def items(self):
        for key, value in super().items():
            yield key, value.to(self.device)


def _file_for(fmt: str, state: dict, layers: list[str], conditioning, workdir: Path, device) -> Path:
    path = workdir / f"seedvr2_bench_{fmt}.safetensors"
    if not path.exists():
        tensors, _ = tool.convert(_OnDevice(state, device), fmt, conditioning=conditioning, layers=layers,
                                  keep_reference=False)
        save_file(tensors, str(path))
        del tensors
        torch.cuda.empty_cache()
    return path


def _row(args, row, state, layers, emb, workdir, device, geometry, reference, results):
    """Encode, save, load and time one row; returns the fp16 output (the reference for the others)."""
    fmt, _, variant = row.partition("+")
    started = time.perf_counter()
    path = _file_for(fmt, state, layers, (emb["pos"], emb["neg"]), workdir, device)
    encode_s = time.perf_counter() - started
    os.environ.pop(comfy_quant.INT8_SWITCH, None)
    if variant == "int8mm":
        os.environ[comfy_quant.INT8_SWITCH] = "1"
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    dit = load_dit(path, device=device, dtype=torch.bfloat16,
                   quantization="fp8_e4m3fn" if variant == "fp8mm" else "disabled")
    torch.cuda.synchronize(device)
    load_s = time.perf_counter() - started
    weights_gb = torch.cuda.memory_allocated(device) / 2**30
    inputs = dit_inputs(geometry, dit.config, device)
    txt = dit.file_conditioning["positive"].to(device, torch.float32)
    call_args = (inputs[0], txt, inputs[2], torch.tensor([[txt.shape[0]]]), inputs[4])
    attention_dispatch.use_backend(dit, "auto")
    dit_fused_modules.attach_fused_kernels(dit)
    with torch.no_grad():
        step_s = cuda_time(lambda: dit(*call_args), device, repeat=5)
        out = dit(*call_args).float()
    peak_gb = torch.cuda.max_memory_allocated(device) / 2**30
    if reference is None:
        reference = out
    error = ((out - reference).norm() / reference.norm()).item()
    results["rows"][row] = {
        "file_gb": path.stat().st_size / 1e9, "encode_s": encode_s, "load_s": load_s, "dit_step_s": step_s,
        "weights_gb": weights_gb, "peak_gb": peak_gb, "rel_err_vs_fp16": error,
        "layers": sorted({type(m).__name__ for m in dit.modules() if "Linear" in type(m).__name__}),
    }
    print(f"{row:22s} file {path.stat().st_size / 1e9:5.2f} GB  load {load_s:6.1f} s  DiT step {step_s:6.3f} s  "
          f"weights {weights_gb:5.1f} GiB  peak {peak_gb:5.1f} GiB  rel. err. vs fp16 {error:.2e}", flush=True)
    del dit, out
    return reference


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda:0")
    rows = [r for r in args.formats.split(",") if r]
    geometry = job_geometry(args.input_size, args.resolution, args.frames)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="seedvr2_formats_"))
    workdir.mkdir(parents=True, exist_ok=True)
    repo = Path(__file__).resolve().parents[1]
    emb = load_file(str(repo / "assets" / "text_embeddings.safetensors"))
    # The weights: generated on the GPU in float32, kept on the CPU, encoded layer by layer on the GPU.
    model = random_dit(args.model, device, torch.float32)
    state = {k: v.cpu() for k, v in model.state_dict().items() if not k.endswith("rope.freqs")}
    del model
    torch.cuda.empty_cache()
    layers = tool.linear_layers(state)
    results = {"device": torch.cuda.get_device_name(device), "model": args.model, "frames": args.frames,
               "latent": list(geometry.latent), "rows": {}}
    reference = None
    for row in ["fp16", *[r for r in rows if r != "fp16"]]:
        try:
            reference = _row(args, row, state, layers, emb, workdir, device, geometry, reference, results)
        except Exception as exc:  # one failing format must not cost the others
            results["rows"][row] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(f"{row:22s} failed: {type(exc).__name__}: {exc}", flush=True)
            torch.cuda.empty_cache()
        if args.output:
            write_json(args.output, results)
    os.environ.pop(comfy_quant.INT8_SWITCH, None)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
