#!/usr/bin/env python3
"""Low-VRAM runs under emulated budgets: the VRAM planner's plans, their peaks, times and exactness.

    python benchmarks/vram_budget.py --output docs/results/vram_budget.json

On one GPU, with ``torch.cuda.set_per_process_memory_fraction`` capping PyTorch's allocator at each budget
and random full-size weights (3B DiT and VAE in bf16, kept in pinned host memory between phases):

* ``pipeline``: 33 frames 640x360 -> 1080p through the real pipeline, unconstrained twice (its run-to-run
  difference) and with ``vram_budget`` 16, 12 and 8 GiB under the matching cap: time, peak allocated and
  reserved memory, the plan, and the difference of the output to the unconstrained one;
* ``decode``: the VAE decode alone at 1088x1920 of 33 and of 121 frames under a 5 GiB cap (ComfyUI core's
  VAE: 5.33 GiB at 1088p), in the planner's bands: peak and time;
* ``image``: one 2048x1152 image -> 7680x4320 through the pipeline under a 24 GiB cap.

``--smoke`` runs everything at toy sizes on the golden tiny models' architecture (any device; on the CPU
without caps, e.g. ``--smoke --device cpu --budgets 0.012 --decode-budget 0.01``), to check the script.  Everything goes to stdout as it finishes and to ``--output`` (JSON) at the end.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.benchmark.job import PrebuiltManager, pattern_clip  # noqa: E402
from src.benchmark.random_weights import random_dit, random_vae  # noqa: E402
from src.benchmark.results import device_name, write_json  # noqa: E402
from src.models.dit import NaDiTConfig  # noqa: E402
from src.models.video_vae_v3 import VAEConfig  # noqa: E402
from src.optimization import stable_memory  # noqa: E402
from src.optimization.vae_optimizer import optimize_vae  # noqa: E402
from src.pipeline import memory_plan  # noqa: E402
from src.pipeline.model_manager import compute_dtype  # noqa: E402
from src.pipeline.settings import DiTSpec, UpscaleSettings, VAESpec  # noqa: E402
from src.pipeline.upscaler import upscale  # noqa: E402

GIB = 2**30
SECTIONS = ("pipeline", "decode", "image")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    p.add_argument("--budgets", default="16,12,8", help="pipeline budgets in GiB")
    p.add_argument("--decode-budget", type=float, default=5.0)
    p.add_argument("--image-budget", type=float, default=24.0)
    p.add_argument("--long-frames", type=int, default=121, help="frames of the long decode (flat-peak check)")
    p.add_argument("--smoke", action="store_true", help="toy sizes and models, to check the script")
    p.add_argument("--device", default="cuda")
    p.add_argument("--output", default=None)
    return p.parse_args(argv)


class BudgetManager(PrebuiltManager):
    """Prebuilt models waiting on the CPU; tells the planner the DiT's size and installs the BlockSwap a
    (planned) DiT spec asks for."""

    def __init__(self, dit, vae, device):
        super().__init__(dit, vae, device, offload=torch.device("cpu"))
        self.swap = None

    def dit_facts(self, spec):
        model = self.models["dit"]
        return model.config, sum(p.numel() * p.element_size() for p in model.parameters())

    def dit(self, spec):
        if spec.blocks_to_swap and self.swap is None:
            self.swap = stable_memory.BlockSwap(self.models["dit"].blocks, spec.blocks_to_swap, self.device, "cpu")
        return super().dit(spec)

    def release(self):
        if self.swap is not None:
            self.swap.remove()
            self.swap = None
        for model in self.models.values():
            stable_memory.offload(model, "cpu", pin_memory=self.device.type == "cuda")


class Cap:
    """The allocator capped at ``budget`` GiB (None: uncapped) inside the block, peaks recorded."""

    def __init__(self, device, budget):
        self.device, self.budget = device, budget

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(1.0 if self.budget is None else
                                                       min(1.0, self.budget * GIB / total), self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self.start
        self.allocated = torch.cuda.max_memory_allocated(self.device) / GIB if self.device.type == "cuda" else 0.0
        self.reserved = torch.cuda.max_memory_reserved(self.device) / GIB if self.device.type == "cuda" else 0.0
        if self.device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, self.device)
        return False


def difference(a, b) -> dict:
    a, b = a.double(), b.double()
    return {"max_abs": (a - b).abs().max().item(), "rel": ((a - b).norm() / b.norm()).item()}


class PlanLog(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        if "memory plan" in record.getMessage():
            self.lines.append(record.getMessage())


def run_pipeline(manager, images, resolution, batch, budget, device, plans):
    dit = DiTSpec(model="dit", device=str(device))
    vae = VAESpec(model="vae", device=str(device))
    settings = UpscaleSettings(resolution=resolution, batch_size=batch, seed=42, vram_budget=budget or 0.0)
    plans.lines.clear()
    with Cap(device, budget) as cap:
        out = upscale(images, dit, vae, settings, manager=manager)
    manager.release()
    result = {"budget_gib": budget, "seconds": cap.seconds, "peak_allocated_gib": cap.allocated,
              "peak_reserved_gib": cap.reserved, "plan": plans.lines[-1] if plans.lines else None}
    print(json.dumps(result), flush=True)
    return out, result


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    plans = PlanLog()
    logging.getLogger("seedvr2").addHandler(plans)
    device = torch.device(args.device if torch.cuda.is_available() or args.device == "cpu" else "cpu")
    dtype = compute_dtype(device)
    sections = [s for s in args.sections.split(",") if s]
    if args.smoke:
        # The golden tiny 3B's architecture (see tests/conftest.py for where it lives).
        golden = Path(__file__).resolve().parents[2] / "shared" / "golden" / "dit3b_config.json"
        dit_config = NaDiTConfig.from_kwargs(json.loads(golden.read_text())["kwargs"])
        vae_config = VAEConfig(block_out_channels=(8, 16, 32, 32), norm_num_groups=4)
        sizes = {"in": (32, 18), "resolution": 64, "decode": (64, 112), "image_in": (64, 36), "image_out": 144}
        frames, long_frames = 5, 13
    else:
        dit_config, vae_config = NaDiTConfig.released("3b"), VAEConfig.released()
        sizes = {"in": (640, 360), "resolution": 1080, "decode": (1088, 1920), "image_in": (2048, 1152),
                 "image_out": 4320}
        frames, long_frames = 33, args.long_frames
    dit = random_dit(dit_config, device, dtype)
    vae = random_vae(device, dtype, config=vae_config)
    optimize_vae(vae)
    manager = BudgetManager(dit, vae, device)
    manager.release()  # everything starts in pinned host memory
    results = {"device": device_name(device), "torch": torch.__version__}
    budgets = [float(b) for b in args.budgets.split(",") if b]

    if "pipeline" in sections:
        images = pattern_clip(frames, *sizes["in"])
        reference, first = run_pipeline(manager, images, sizes["resolution"], frames, None, device, plans)
        again, second = run_pipeline(manager, images, sizes["resolution"], frames, None, device, plans)
        rows = {"unconstrained": [first, second], "run_to_run": difference(again, reference)}
        for budget in budgets:
            out, row = run_pipeline(manager, images, sizes["resolution"], frames, budget, device, plans)
            row["vs_unconstrained"] = difference(out, reference)
            rows[f"{budget:g}"] = row
            print(json.dumps({"budget": budget, "vs_unconstrained": row["vs_unconstrained"]}), flush=True)
        results["pipeline"] = rows

    if "decode" in sections:
        height, width = sizes["decode"]
        rows = {}
        budget = None if device.type != "cuda" else args.decode_budget
        # One plan (made for the longer clip) for both lengths, so that their peaks compare like for like.
        plan = memory_plan.plan_memory(
            int((budget or 1e9) * GIB), vae_config=vae_config, vae_dtype=dtype,
            vae_weight_bytes=sum(p.numel() * p.element_size() for p in vae.parameters()), height=height,
            width=width, frames=long_frames, channels_last=vae.executor.runtime.channels_last, decode_to_host=True)
        for count in (frames, long_frames):
            latent = torch.randn(1, 16, (count - 1) // 4 + 1, height // 8, width // 8, generator=torch.Generator()
                                 .manual_seed(3)).to(dtype)
            stable_memory.offload(vae, device)
            with Cap(device, budget) as cap:
                out = vae.decode(latent.to(device), output_dtype=dtype, band_plan=plan.decode.bands,
                                 output_device="cpu")
            del out
            stable_memory.offload(vae, "cpu", pin_memory=device.type == "cuda")
            rows[str(count)] = {"frames": count, "seconds": cap.seconds, "peak_allocated_gib": cap.allocated,
                                "peak_reserved_gib": cap.reserved, "plan": plan.summary()}
            print(json.dumps(rows[str(count)]), flush=True)
        results["decode"] = rows

    if "image" in sections:
        images = pattern_clip(1, *sizes["image_in"])
        budget = None if device.type != "cuda" else args.image_budget
        _out, row = run_pipeline(manager, images, sizes["image_out"], 1, budget, device, plans)
        results["image"] = row

    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.output, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
