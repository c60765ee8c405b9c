"""How long the CLI's writers take to write upscaled frames, and how much of it hides behind compute.

33 frames of 1920x1080 (the reference job's output) are written as a PNG sequence and as an mp4 through
``src.pipeline.media``'s writers, the way the CLI writes them: float32 (N, H, W, 3) tensors in [0, 1].  The
content is the bundled example image resized to 1080p, panned a few pixels per frame, plus a little grain
(sigma 3 levels): upscaled frames carry detail, and a smooth bicubic enlargement alone would make PNG look
far cheaper than it is.  The mp4 cases need PyAV and are left out without it.

``--overlap`` also runs the chunked case: the clip arrives in four chunks, each "computed" by a sleep of
``--compute_s`` (a GPU leaves the CPU free while it works), and the wall time is compared with compute +
write done one after the other.  ``--baseline REV`` runs the same cases, interleaved, with the writers of
an earlier commit (``git show REV:src/pipeline/media.py``, or a copy of that file given by its path), so
that a busy machine slows both alike.

    PYTHONPATH=. python benchmarks/write_speed.py --overlap --baseline 82eba63 --json docs/results/write_speed.json

Runs on any machine (CPU only); the numbers depend on the core count, so say which machine gave them.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

from src.pipeline import media

ROOT = Path(__file__).resolve().parents[1]


def make_frames(count: int, height: int, width: int) -> torch.Tensor:
    image = next(media.iter_chunks(ROOT / "assets" / "example_image.png", 0))  # (1, h, w, 3) in [0, 1]
    big = torch.nn.functional.interpolate(image.permute(0, 3, 1, 2), size=(height, width), mode="bicubic",
                                          align_corners=False)
    frames = torch.cat([big.roll(4 * i, dims=-1) for i in range(count)])  # a slow pan: every frame differs
    grain = torch.randn(frames.shape, generator=torch.Generator().manual_seed(0)) * (3 / 255)
    return (frames + grain).clamp_(0, 1).permute(0, 2, 3, 1).contiguous()


def load_baseline(rev: str) -> types.ModuleType:
    """The media module of commit ``rev`` (or of a file of that name), beside the current one."""
    if Path(rev).is_file():
        source, name = Path(rev).read_text(), "media_baseline"
    else:
        source = subprocess.run(["git", "show", f"{rev}:src/pipeline/media.py"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
        name = f"media_{rev}"
    module = types.ModuleType(name)
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, name, "exec"), module.__dict__)
    return module


def _kwargs(cls, **wanted):
    """The options this version of the writer accepts (older writers have fewer)."""
    names = inspect.signature(cls).parameters
    return {k: v for k, v in wanted.items() if k in names}


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir())
    return path.stat().st_size


def write_once(module, kind: str, frames: torch.Tensor, folder: Path, chunk: int = 0, compute_s: float = 0.0,
               **options) -> dict:
    target = folder / ("out.mp4" if kind == "mp4" else "frames")
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    cls = module.VideoWriter if kind == "mp4" else module.PngWriter
    options = _kwargs(cls, **options)
    writer = cls(target, 24.0, **options) if kind == "mp4" else cls(target, **options)
    step = chunk or frames.shape[0]
    start, cpu = time.perf_counter(), time.process_time()
    for first in range(0, frames.shape[0], step):
        if compute_s:
            time.sleep(compute_s)  # the next chunk being computed
        writer.write(frames[first:first + step])
    writer.close()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"writer": module.__name__, "kind": kind, "seconds": round(seconds, 3), "cpu_s": round(cpu, 3),
            "frames_per_s": round(frames.shape[0] / seconds, 2), "mb": round(_size(target) / 1e6, 2),
            "chunk": chunk, "compute_s_per_chunk": compute_s, "options": options}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--width", type=int, default=1920)
    p.add_argument("--height", type=int, default=1080)
    p.add_argument("--repeat", type=int, default=2, help="runs per case; the fastest is reported")
    p.add_argument("--overlap", action="store_true", help="also time chunks written while the next computes")
    p.add_argument("--compute_s", type=float, default=1.5, help="compute time per chunk in --overlap")
    p.add_argument("--baseline", help="also time the writers of this commit")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    frames = make_frames(args.frames, args.height, args.width)
    try:
        import av  # noqa: F401
        kinds = ("png", "mp4")
    except ImportError:
        print("PyAV is not installed: the mp4 cases are left out", flush=True)
        kinds = ("png",)
    modules = ([load_baseline(args.baseline)] if args.baseline else []) + [media]
    cases = [("png", {"compress_level": 1}), ("png", {"compress_level": 6}), ("mp4", {}),
             ("mp4", {"thread_type": "SLICE"})]
    chunk = max(1, -(-args.frames // 4))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, options in [case for case in cases if case[0] in kinds]:
            for module in modules:
                cls = module.VideoWriter if kind == "mp4" else module.PngWriter
                if options and not _kwargs(cls, **options) and options != {"compress_level": 6}:
                    continue  # an older writer without the option: timed at its defaults only
                runs = [write_once(module, kind, frames, Path(tmp), **options) for _ in range(args.repeat)]
                results.append(min(runs, key=lambda r: r["seconds"]))
                print(json.dumps(results[-1]), flush=True)
        if args.overlap:
            for kind in kinds:
                for module in modules:
                    alone = write_once(module, kind, frames, Path(tmp))["seconds"]  # default options
                    run = write_once(module, kind, frames, Path(tmp), chunk=chunk, compute_s=args.compute_s)
                    run["compute_s_total"] = round(-(-args.frames // chunk) * args.compute_s, 3)
                    run["serial_s"] = round(alone + run["compute_s_total"], 3)  # compute, then write
                    results.append(run)
                    print(json.dumps(run), flush=True)
    if args.json:
        info = {"cpu_count": os.cpu_count(), "torch": torch.__version__, "frames": args.frames,
                "size": f"{args.width}x{args.height}", "baseline": args.baseline, "results": results}
        Path(args.json).write_text(json.dumps(info, indent=1) + "\n")


if __name__ == "__main__":
    main()
