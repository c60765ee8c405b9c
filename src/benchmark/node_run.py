#!/usr/bin/env python3
r"""Run the upscaler node the way ComfyUI runs it, without ComfyUI, in this (fresh) process; for the wall benchmark.

    SEEDVR2_TIMING_JSON=t.json python src/benchmark/node_run.py --pack . --input clip.mp4 \
        --dit seedvr2_ema_3b_fp16.safetensors --queues 2

The pack folder is imported as ComfyUI imports a custom node (``spec_from_file_location`` on its
``__init__.py``, registered under the folder's path), after ``import torch`` as in ComfyUI's start-up.  Each
"queue" calls the two loader nodes and the upscaler node through their ``FUNCTION`` under
``torch.inference_mode()``, as ComfyUI's executor does; loaders are asked to cache their models, so the
second queue shows what a user waits for once models are resident.  Models are found in ``./models/SEEDVR2``
(run it from the folder holding them).  The input clip is decoded before the first queue (ComfyUI's video
loader node would do that); with ``--save`` each queue's result is written as an mp4, like a save node.

Run by path, not as a module: it must not import this repository's ``src`` a second time under another name.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pack", required=True, help="the node pack's folder (holds __init__.py)")
    p.add_argument("--input", required=True, help="video or image file fed to the IMAGE input")
    p.add_argument("--dit", default="seedvr2_ema_3b_fp16.safetensors")
    p.add_argument("--vae", default="ema_vae_fp16.safetensors")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--resolution", type=int, default=1080)
    p.add_argument("--batch-size", type=int, default=33)
    p.add_argument("--quantization", default="disabled", help="the DiT loader's quantization")
    p.add_argument("--vae-quantization", default="disabled")
    p.add_argument("--attention", default="auto")
    p.add_argument("--queues", type=int, default=2)
    p.add_argument("--no-cache", action="store_true", help="loaders do not cache their models")
    p.add_argument("--save", default=None, help="write each queue's result to this mp4 (queue number appended)")
    p.add_argument("--summary", default=None, help="write per-queue seconds and pack-import facts (JSON)")
    return p.parse_args(argv)


def import_pack(folder: str):
    """Import the pack like ComfyUI's ``load_custom_node`` does for a folder."""
    folder = os.path.abspath(folder)
    name = folder.replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return name, module


def call_node(cls, **inputs):
    """ComfyUI's call: an instance's FUNCTION with the inputs as keyword arguments; the first output."""
    return getattr(cls(), cls.FUNCTION)(**inputs)[0]


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    import torch  # ComfyUI has imported torch long before it loads custom nodes

    torch_done = time.perf_counter()
    name, pack = import_pack(args.pack)
    import_done = time.perf_counter()
    facts = {"torch_import_s": torch_done - started, "pack_import_s": import_done - torch_done,
             "triton_imported_by_pack": "triton" in sys.modules,
             "cuda_initialised_by_pack": torch.cuda.is_initialized(),
             "nodes": sorted(pack.NODE_CLASS_MAPPINGS)}
    timing = importlib.import_module(f"{name}.src.pipeline.timing")
    media = importlib.import_module(f"{name}.src.pipeline.media")
    timing.mark("torch_imported_and_pack_loaded")
    timing.TIMELINE.info.update(facts)
    nodes = pack.NODE_CLASS_MAPPINGS

    with timing.span("read_input"):
        image = next(iter(media.iter_chunks(args.input, 0)))
    cache = not args.no_cache
    offload = "cpu" if cache else "none"
    queues = []
    for number in range(1, args.queues + 1):
        begin = time.perf_counter()
        with timing.span(f"queue{number}"), torch.inference_mode():
            dit = call_node(nodes["SeedVR2LoadDiTModel"], model=args.dit, device=args.device, offload_device=offload,
                            cache_model=cache, attention_mode=args.attention, quantization=args.quantization)
            vae = call_node(nodes["SeedVR2LoadVAEModel"], model=args.vae, device=args.device, offload_device=offload,
                            cache_model=cache, quantization=args.vae_quantization)
            result = call_node(nodes["SeedVR2VideoUpscaler"], image=image, dit=dit, vae=vae, seed=42,
                               resolution=args.resolution, max_resolution=0, batch_size=args.batch_size,
                               uniform_batch_size=False, color_correction="lab")
        seconds = time.perf_counter() - begin
        timing.mark(f"queue{number}_done")
        entry = {"queue": number, "seconds": seconds, "frames": int(result.shape[0]),
                 "output_size": [int(result.shape[2]), int(result.shape[1])]}
        if args.save:
            target = f"{os.path.splitext(args.save)[0]}_{number}.mp4"
            with timing.span(f"queue{number}_save"):
                writer = media.VideoWriter(target, 24.0)
                writer.write(result)
                writer.close()
            entry["saved_s"] = time.perf_counter() - begin - seconds
        queues.append(entry)
        del result
    facts["queues"] = queues
    timing.TIMELINE.info["queues"] = queues
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(facts, f, indent=1)
    print(json.dumps(facts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
