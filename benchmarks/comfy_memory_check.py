"""GPU check of how our models live under ComfyUI's model management (issue #19).

    python benchmarks/comfy_memory_check.py [--comfyui DIR] [--model 3b] [--frames 5] [--size 640x368] [--json OUT]

With ``--comfyui DIR`` (a ComfyUI source tree; only ``comfy/`` and its imports are used, so ``psutil`` must be
installed) the pack runs inside ComfyUI's real ``comfy.model_management``: the models are wrapped in
ComfyUI's ModelPatcher and placed by ``load_models_gpu``; the check then calls ``unload_all_models`` (what
"Unload models" / ``POST /free`` do) and drops the loader outputs (what ``free_memory`` does through ComfyUI's
cache reset).  Without it, the standalone path is checked (models parked on the CPU, then released).

Released-size models with random weights are written to a temporary folder first (3B fp16: 6.8 GB).
Reported (JSON):

* ``allocated_*``: ``torch.cuda.memory_allocated`` before any model, after the run (cached models resident),
  after ComfyUI's unload, after the loader outputs are gone; the check passes when ``after_unload`` and
  ``after_release`` are within 64 MiB of ``before``;
* ``comfy_logged``: ComfyUI's "loaded completely; U MB usable, L MB loaded" lines against our models' weight
  bytes (L must match within 1 %; U is the memory ComfyUI could give the model, no longer 1e32 MB);
* ``dit_working``: the DiT phase's measured activation peak against ``dit_working_bytes`` (the figure handed
  to ComfyUI as ``memory_required``);
* ``background_threads``: seedvr2 threads still running after the run (must be none).
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import re
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def write_models(folder: Path, variant: str) -> tuple[Path, Path]:
    from safetensors.torch import save_file

    from src.benchmark.random_weights import random_dit, random_vae

    dit_path, vae_path = folder / f"seedvr2_ema_{variant}_fp16.safetensors", folder / "ema_vae_fp16.safetensors"
    dit = random_dit(variant, "cpu", torch.float16)
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(dit_path))
    del dit
    vae = random_vae("cpu", torch.float16)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(vae_path))
    return dit_path, vae_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", help="ComfyUI source tree to run under (its comfy/ package)")
    parser.add_argument("--model", default="3b", choices=("3b", "7b"))
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--size", default="640x368", help="input WIDTHxHEIGHT (the output is 2x)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.comfyui:
        sys.path.insert(0, str(Path(args.comfyui).resolve()))
        import comfy.model_management as comfy_mm  # noqa: F401  (before the pack: it checks for ComfyUI on import)
    sys.path.insert(0, str(REPO))
    from src.optimization import stable_memory
    from src.pipeline import model_manager
    from src.pipeline.settings import DiTSpec, UpscaleSettings, VAESpec
    from src.pipeline.upscaler import upscale

    handler = _Lines()
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    width, height = map(int, args.size.split("x"))
    result: dict = {"comfyui": bool(args.comfyui), "model": args.model, "frames": args.frames, "size": args.size}
    with tempfile.TemporaryDirectory() as folder:
        dit_path, vae_path = write_models(Path(folder), args.model)
        torch.cuda.synchronize()
        gc.collect()
        before = torch.cuda.memory_allocated()
        manager = model_manager.ModelManager()
        offload = "none" if args.comfyui else "cpu"
        dit = DiTSpec(model=str(dit_path), device="cuda:0", cache_model=True, offload_device=offload)
        vae = VAESpec(model=str(vae_path), device="cuda:0", cache_model=True, offload_device=offload)
        frames = torch.rand(args.frames, height, width, 3)
        with torch.inference_mode():  # as ComfyUI runs nodes
            upscale(frames, dit, vae, UpscaleSettings(resolution=2 * min(width, height), batch_size=args.frames),
                    manager=manager)
        torch.cuda.synchronize()
        result["background_threads"] = [t.name for t in stable_memory.background_threads()]
        result["allocated_before"] = before
        result["allocated_after_run"] = torch.cuda.memory_allocated()
        cached = {m.kind: m for m in manager.cached()}
        weights = {kind: model_manager.weight_bytes(m.model) for kind, m in cached.items()}
        result["weight_bytes"] = weights
        if args.comfyui:
            comfy_mm.unload_all_models()
            comfy_mm.soft_empty_cache()
        else:
            for managed in cached.values():
                managed.park()
        gc.collect()
        result["allocated_after_unload"] = torch.cuda.memory_allocated()

        # The DiT's working set: one forward of the run's latent shape, peak above the resident weights.
        dit_model = cached["dit"]
        dit_model.activate()
        from src.pipeline.restoration import dit_velocity
        from src.pipeline.text_embeddings import text_embeddings

        latent = (1 + (args.frames - 1) // 4, -(-2 * height // 16) * 2, -(-2 * width // 16) * 2)
        positive, negative = text_embeddings(dit_model.device, dit_model.dtype)
        velocity = dit_velocity(dit_model.model, positive, negative)
        vid = torch.randn(*latent, 33, device=dit_model.device)
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            velocity(vid, torch.tensor([1000.0], device=dit_model.device), False)
        torch.cuda.synchronize()
        result["dit_working"] = {"latent": latent, "measured": torch.cuda.max_memory_allocated() - resident,
                                 "estimate": model_manager.dit_working_bytes(dit_model.model.config, [latent],
                                                                             dit_model.dtype)}
        del vid, velocity
        if args.comfyui:
            comfy_mm.unload_all_models()
        else:
            dit_model.park(torch.device("cpu"))

        del dit, vae, cached, dit_model  # ComfyUI's cache reset drops the loader outputs the same way
        gc.collect()
        manager.clear()
        gc.collect()
        torch.cuda.empty_cache()
        result["allocated_after_release"] = torch.cuda.memory_allocated()

    logged = [tuple(map(float, found)) for found in
              (re.findall(r"loaded completely; ([0-9.e+]+) MB usable, ([0-9.]+) MB loaded", line)
               for line in handler.lines) for found in found]
    result["comfy_logged"] = [{"usable_mb": usable, "loaded_mb": loaded} for usable, loaded in logged]
    checks = {
        "unload_returns_memory": result["allocated_after_unload"] - before < 64 * MIB,
        "release_returns_memory": result["allocated_after_release"] - before < 64 * MIB,
        "no_background_threads": not result["background_threads"],
    }
    if args.comfyui:
        sizes = [b / MIB for b in weights.values()]
        checks["logged_loaded_is_weight_size"] = bool(logged) and all(
            any(abs(loaded - size) <= 0.01 * size for size in sizes) for _usable, loaded in logged)
        checks["logged_usable_is_real"] = bool(logged) and all(usable < 1e9 for usable, _loaded in logged)
    result["checks"] = checks
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
