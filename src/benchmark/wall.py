"""What users wait for: the real entry points in fresh processes, timed from process start to finished file.

Used by ``performance_test.py --sections wall``.  Each run is a new Python process (the README's CLI
command, the upscaler node driven as ComfyUI drives it, or the incumbent pack's CLI on the same files)
started with ``SEEDVR2_TIMING_JSON`` set, so our processes report their phases (see
:mod:`src.pipeline.timing`); the parent measures the wall time from spawning to exit and the child's peak RSS.
"Cold" runs start with empty Triton / inductor / CUDA caches (a fresh directory, as on a new install);
"warm" runs reuse the directory the cold run filled.

Weights: full-size random checkpoints written once under the released file names into
``<wall dir>/models/SEEDVR2`` (reused by later calls), or given files linked there under those names.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("seedvr2.wall")

REPO = Path(__file__).resolve().parents[2]
DIT_FILES = {"3b": "seedvr2_ema_3b_fp16.safetensors", "7b": "seedvr2_ema_7b_fp16.safetensors"}
VAE_FILE = "ema_vae_fp16.safetensors"
CACHE_VARIABLES = ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "CUDA_CACHE_PATH", "SEEDVR2_COMPILE_CACHE_DIR")

# Runs in the order they execute; each one's caches: "cold" wipes the shared cache folder first, "warm" keeps it.
DEFAULT_RUNS = ("cli_video_cold", "cli_video_warm", "cli_video_warm", "cli_image_warm", "cli_image_warm",
                "node_warm", "incumbent_video", "incumbent_image")
ALL_RUNS = DEFAULT_RUNS + ("cli_long_warm", "cli_video_fp8_warm", "cli_video_7b_warm", "incumbent_video_7b",
                           "node_cold", "cli_image_cold")


@dataclass
class WallConfig:
    root: Path                      # weights, inputs and caches live here (reused between calls)
    out: Path                       # logs, timing files, outputs
    model: str = "3b"               # '3b', '7b' or a DiT weights file
    vae: str | None = None          # a VAE weights file (default: a random full-size one)
    frames: int = 33
    size: tuple[int, int] = (640, 360)
    resolution: int = 1080
    batch_size: int = 33
    image_size: tuple[int, int] = (1280, 720)
    image_resolution: int = 2160
    long_frames: int = 121
    device: str = "cuda:0"
    python: str = sys.executable
    incumbent: Path | None = None
    timeout: float = 600.0
    extra_cli: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- inputs
def models_dir(config: WallConfig) -> Path:
    return config.root / "models" / "SEEDVR2"


def dit_file_name(model: str) -> str:
    if model in DIT_FILES:
        return DIT_FILES[model]
    return DIT_FILES["7b"] if "7b" in Path(model).name.lower() else DIT_FILES["3b"]


def prepare_weights(config: WallConfig, model: str | None = None) -> tuple[Path, Path]:
    """The DiT and VAE files under the released names, written once (random weights) or linked from given files."""
    folder = models_dir(config)
    folder.mkdir(parents=True, exist_ok=True)
    model = model or config.model
    dit = folder / dit_file_name(model)
    vae = folder / VAE_FILE
    if not dit.exists():
        if model in DIT_FILES:
            _write_random_in_child(config, dit, "dit", model)
        else:
            _link(Path(model), dit)
    if not vae.exists():
        if config.vae:
            _link(Path(config.vae), vae)
        else:
            _write_random_in_child(config, vae, "vae", "")
    return dit, vae


def _link(source: Path, target: Path) -> None:
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such weights file")
    target.symlink_to(source.resolve())


def _write_random_in_child(config: WallConfig, target: Path, kind: str, variant: str) -> None:
    """Generate in a child process, so this one never holds a CUDA context (and its memory) during the runs."""
    code = ("import sys; from pathlib import Path; from src.benchmark.wall import _write_random; "
            "_write_random(Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])")
    subprocess.run([config.python, "-c", code, str(target), kind, variant, config.device], cwd=REPO, check=True)


def _write_random(target: Path, kind: str, variant: str, device: str) -> None:
    """A full-size fp16 checkpoint with seeded random weights (generated on the GPU when there is one)."""
    import torch
    from safetensors.torch import save_file

    from .random_weights import random_dit, random_vae

    start = time.perf_counter()
    where = device if device.startswith("cuda") and torch.cuda.is_available() else "cpu"
    model = random_dit(variant, where, torch.float16) if kind == "dit" else random_vae(where, torch.float16)
    state = {key: value.detach().to("cpu").contiguous() for key, value in model.state_dict().items()}
    del model
    staged = target.with_name(target.name + ".part")
    save_file(state, str(staged), metadata={"format": "pt", "seedvr2_random_weights": "1"})
    os.replace(staged, target)
    print("wrote random %s weights %s (%.1f GB) in %.1f s" % (kind, target.name, target.stat().st_size / 1e9,
                                                                time.perf_counter() - start), flush=True)


def synthetic_frames(frames: int, width: int, height: int, seed: int = 0):
    """Moving gradients, edges and fine noise (uint8, (frames, height, width, 3)): content the VAE must work on."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    texture = rng.integers(0, 40, size=(height, width, 3), dtype=np.int16)
    out = np.empty((frames, height, width, 3), dtype=np.uint8)
    for t in range(frames):
        r = 128 + 100 * np.sin((x + 4 * t) / 37.0)
        g = 128 + 100 * np.cos((y - 3 * t) / 23.0)
        b = np.where(((x // 40 + y // 40 + t // 4) % 2) == 0, 200.0, 60.0)
        frame = np.stack([r, g, b], -1).astype(np.int16) + texture - 20
        out[t] = np.clip(frame, 0, 255).astype(np.uint8)
    return out


def prepare_inputs(config: WallConfig) -> dict[str, Path]:
    """The clip, the long clip and the image (written once into ``<root>/inputs``)."""
    import torch
    from PIL import Image

    from ..pipeline import media

    folder = config.root / "inputs"
    folder.mkdir(parents=True, exist_ok=True)
    width, height = config.size
    paths = {"video": folder / f"clip_{config.frames}f_{width}x{height}.mp4",
             "long": folder / f"clip_{config.long_frames}f_{width}x{height}.mp4",
             "image": folder / f"image_{config.image_size[0]}x{config.image_size[1]}.png"}
    for key, frames in (("video", config.frames), ("long", config.long_frames)):
        if not paths[key].exists():
            staged = paths[key].with_name("part_" + paths[key].name)
            writer = media.VideoWriter(staged, 24.0, crf=18)
            writer.write(torch.from_numpy(synthetic_frames(frames, width, height)).float() / 255)
            writer.close()
            os.replace(staged, paths[key])
    if not paths["image"].exists():
        image = synthetic_frames(1, *config.image_size, seed=1)[0]
        Image.fromarray(image).save(paths["image"])
    return paths


def prepare_incumbent_models(config: WallConfig, dit: Path, vae: Path) -> Path:
    """A model folder for the incumbent: hard links to our files (so its clean-up of a file whose hash it does
    not know removes only the link) and its validation cache saying they were checked (random weights do not
    have the released SHA-256; without the entry it would delete the file and try to download)."""
    folder = config.root / "incumbent_models"
    folder.mkdir(parents=True, exist_ok=True)
    cache = {}
    for name, link in ((dit.name, dit), (vae.name, vae)):
        source, target = link.resolve(), folder / name
        if target.exists() and not os.path.samefile(target, source):
            target.unlink()
        if not target.exists():
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
        stat = target.stat()
        cache[target.name] = {"size": stat.st_size, "mtime": stat.st_mtime, "hash": "benchmark-random-weights"}
    (folder / ".validation_cache.json").write_text(json.dumps(cache, indent=2))
    return folder


# --------------------------------------------------------------------------------------------- processes
def cache_env(config: WallConfig, cold: bool) -> dict[str, str]:
    """Cache variables for a run: one shared folder, emptied first for a cold run."""
    folder = config.root / "caches"
    if cold and folder.exists():
        shutil.rmtree(folder)
    env = {}
    for name in CACHE_VARIABLES:
        path = folder / name.lower()
        path.mkdir(parents=True, exist_ok=True)
        env[name] = str(path)
    return env


def run_process(command: list[str], *, env: dict[str, str], cwd: Path, log_path: Path,
                timeout: float) -> dict:
    """Spawn, wait, and return wall seconds, exit status and the child's peak RSS (from wait4's rusage)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        deadline = start + timeout
        status = usage = None
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                os.killpg(process.pid, 9)
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.01)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": round(wall, 3), "returncode": process.returncode, "timed_out": wall > timeout,
            "child_rss_peak_bytes": usage.ru_maxrss * 1024, "log": str(log_path)}


def breakdown(timing: dict, wall: float) -> dict:
    """Where the wall time went, from a child's timing report (seconds since its process start)."""
    marks = timing.get("marks", {})
    spans: dict[str, float] = {}
    for span in timing.get("spans", []):
        spans[span["name"]] = spans.get(span["name"], 0.0) + span["seconds"]
    totals = timing.get("totals", {})
    out = {"startup_s": marks.get("cli_main", marks.get("torch_imported_and_pack_loaded"))}
    if "imports_done" in marks and "cli_main" in marks:
        out["imports_s"] = marks["imports_done"] - marks["cli_main"]
    for name in ("read_input", "load_vae", "load_dit", "optimize_vae", "optimize_dit", "encode", "upscale",
                 "decode", "postprocess"):
        if name in spans:
            out[f"{name}_s"] = spans[name]
    for name in ("read_input", "postprocess", "host_copy", "write", "triton_compile", "triton_cache_load",
                 "triton_autotune", "triton_autotune_cached"):
        if name in totals:
            out[f"{name}_total_s"] = totals[name]
    if "first_output_frame" in marks:
        out["first_output_frame_s"] = marks["first_output_frame"]
    if "output_closed" in marks:
        out["output_closed_s"] = marks["output_closed"]
    if "exit" in marks:
        out["after_exit_hook_s"] = round(wall - marks["exit"], 3)  # interpreter and CUDA teardown
    for key, value in list(out.items()):
        if isinstance(value, float):
            out[key] = round(value, 3)
    return out


# --------------------------------------------------------------------------------------------- runs
def _cli_command(config: WallConfig, source: Path, target: Path, dit: Path, resolution: int,
                 extra: list[str]) -> list[str]:
    return [config.python, str(REPO / "inference_cli.py"), str(source), "--output", str(target),
            "--model_dir", str(models_dir(config)), "--dit_model", dit.name, "--vae_model", VAE_FILE,
            "--resolution", str(resolution), "--batch_size", str(config.batch_size), "--device", config.device,
            *config.extra_cli, *extra]


def _incumbent_command(config: WallConfig, source: Path, target: Path, dit: Path, resolution: int,
                       model_folder: Path) -> list[str]:
    fmt = "mp4" if target.suffix == ".mp4" else "png"
    return [config.python, str(config.incumbent / "inference_cli.py"), str(source), "--output", str(target),
            "--output_format", fmt, "--model_dir", str(model_folder), "--dit_model", dit.name,
            "--resolution", str(resolution), "--batch_size", str(config.batch_size)]


def plan_run(name: str, config: WallConfig, inputs: dict[str, Path]) -> dict:
    """Command, cache state and output of one named run."""
    cold = name.endswith("_cold")
    out = config.out
    extra: list[str] = []
    model = config.model
    if "_7b" in name:
        model = "7b"
    if "fp8" in name:
        extra = ["--quantization", "fp8_e4m3fn", "--vae_quantization", "fp8_e4m3fn", "--dit_offload_device", "cpu"]
    source = inputs["long"] if "_long" in name else inputs["image"] if "image" in name else inputs["video"]
    resolution = config.image_resolution if "image" in name else config.resolution
    dit, _vae = prepare_weights(config, model)
    target = out / (name + (".png" if "image" in name else ".mp4"))
    if name.startswith("incumbent"):
        if config.incumbent is None:
            return {"skipped": "no incumbent source folder (--incumbent / SEEDVR2_INCUMBENT_DIR)"}
        folder = prepare_incumbent_models(config, dit, models_dir(config) / VAE_FILE)
        command = _incumbent_command(config, source, target, dit, resolution, folder)
        return {"command": command, "cold": False, "target": target, "cwd": config.incumbent, "ours": False}
    if name.startswith("node"):
        command = [config.python, str(REPO / "src" / "benchmark" / "node_run.py"), "--pack", str(REPO),
                   "--input", str(source), "--dit", dit.name, "--vae", VAE_FILE, "--device", config.device,
                   "--resolution", str(resolution), "--batch-size", str(config.batch_size), "--queues", "2",
                   "--summary", str(out / f"{name}.summary.json"), "--save", str(out / f"{name}.mp4")]
        return {"command": command, "cold": cold, "target": out / f"{name}.summary.json", "cwd": config.root,
                "ours": True}
    command = _cli_command(config, source, target, dit, resolution, extra)
    return {"command": command, "cold": cold, "target": target, "cwd": config.root, "ours": True}


def run_all(config: WallConfig, runs: list[str]) -> dict:
    config.out.mkdir(parents=True, exist_ok=True)
    inputs = prepare_inputs(config)
    results: dict = {"inputs": {k: str(v) for k, v in inputs.items()}, "runs": []}
    for index, name in enumerate(runs):
        if name not in ALL_RUNS:
            raise ValueError(f"unknown wall run {name!r}; choose from {', '.join(ALL_RUNS)}")
        plan = plan_run(name, config, inputs)
        if "skipped" in plan:
            results["runs"].append({"name": name, **plan})
            continue
        target = plan["target"]
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        timing_path = config.out / f"{index:02d}_{name}.timing.json"
        env = cache_env(config, plan["cold"]) if plan["ours"] else {}
        if plan["ours"]:
            env["SEEDVR2_TIMING_JSON"] = str(timing_path)
        log.info("wall: %s", " ".join(plan["command"]))
        result = run_process(plan["command"], env=env, cwd=plan["cwd"],
                             log_path=config.out / f"{index:02d}_{name}.log", timeout=config.timeout)
        result.update(name=name, cold=plan["cold"], output=str(target), output_exists=target.exists())
        if plan["ours"] and timing_path.exists():
            timing = json.loads(timing_path.read_text())
            result["breakdown"] = breakdown(timing, result["wall_s"])
            result["memory"] = timing.get("memory", {})
            result["info"] = timing.get("info", {})
            if name.startswith("node"):
                result["queues"] = timing.get("info", {}).get("queues")
        log.info("wall: %s %.1f s (exit %d)", name, result["wall_s"], result["returncode"])
        results["runs"].append(result)
    return results


def print_wall(results: dict) -> None:
    print("\nWall time (fresh processes, from spawn to exit):")
    for run in results.get("runs", []):
        if "skipped" in run:
            print(f"  {run['name']:<22} skipped: {run['skipped']}")
            continue
        b = run.get("breakdown", {})
        parts = [f"{k[:-2]} {v:.2f}" for k, v in b.items() if isinstance(v, (int, float))]
        queues = run.get("queues") or []
        q = ", ".join(f"queue{e['queue']} {e['seconds']:.2f}s" for e in queues)
        status = "" if run["returncode"] == 0 and run["output_exists"] else f" FAILED (exit {run['returncode']})"
        vram = run.get("memory", {}).get("cuda_peak_allocated_bytes")
        vram = f"  vram {vram / 2**30:.1f} GiB" if vram else ""
        print(f"  {run['name']:<22} {run['wall_s']:>7.2f} s{status}  rss {run['child_rss_peak_bytes'] / 2**30:.1f} GiB{vram}"
              + (f"  [{q}]" if q else "") + ("\n      " + ", ".join(parts) if parts else ""))
