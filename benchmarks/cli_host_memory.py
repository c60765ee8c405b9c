"""Peak host RAM (RSS) of the command line against clip length, with the golden tiny models on the CPU.

Shows that the default ``--chunk_size auto`` keeps the peak flat in clip length, while ``--chunk_size 0``
(the whole clip at once) grows with it.  The tiny models run at a small size, so the chunk budget is set
small too (``SEEDVR2_CHUNK_MEMORY_MB``) to make several chunks; the budget rule is the same at 1080p.

    python benchmarks/cli_host_memory.py --frames 40 80 160 320 --output docs/results/cli_host_memory.json

With ``--stand_in`` the models are replaced by a nearest-neighbour upscale inside the same batch plan (the
stream, the reader and the writer are the real ones), so the frame buffers can be measured at a realistic
frame size in little time:

    python benchmarks/cli_host_memory.py --stand_in --frames 50 150 300 --size 320 240 --resolution 480 \
        --budget_mb 64

Each run is a fresh process; its peak RSS is the kernel's (``os.wait4``'s ``ru_maxrss``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("SEEDVR2_GOLDEN_DIR", REPO.parent / "shared" / "golden"))


def write_clip(path: Path, frames: int, width: int, height: int) -> None:
    import av

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(24))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(frames):
            frame = np.roll(base, index, axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# The CLI with the models replaced by a nearest-neighbour upscale written through the real batch writer.
STAND_IN = """
import sys
import torch
sys.path.insert(0, %r)
from src.pipeline import upscaler

def stand_in(self, source, base, batches, geometry, out, out_start, held=0):
    for batch in batches:
        frames = source[batch.start - base:batch.stop - base, ..., :3].permute(0, 3, 1, 2).float()
        frames = torch.nn.functional.interpolate(frames, size=(geometry.height, geometry.width), mode="nearest")
        local = upscaler.replace(batch, start=batch.start - base, stop=batch.stop - base)
        upscaler._write_batch(out, frames.permute(0, 2, 3, 1), local, out_start - base)

upscaler._Runner.run_batches = stand_in
import inference_cli
sys.exit(inference_cli.main(sys.argv[1:]))
""" % str(REPO)


def peak_rss(args: list[str], env: dict, stand_in: bool = False) -> tuple[int, int]:
    """(exit code, peak RSS in bytes) of one CLI run."""
    program = ["-c", STAND_IN] if stand_in else [str(REPO / "inference_cli.py")]
    process = subprocess.Popen([sys.executable, *program, *args], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _pid, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        sys.stderr.write(process.stderr.read().decode(errors="replace")[-2000:])
    return process.returncode, usage.ru_maxrss * 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[40, 80, 160, 320])
    parser.add_argument("--size", type=int, nargs=2, default=[128, 96], metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--resolution", type=int, default=192, help="output shortest edge")
    parser.add_argument("--budget_mb", type=float, default=16, help="SEEDVR2_CHUNK_MEMORY_MB of the auto runs")
    parser.add_argument("--stand_in", action="store_true", help="replace the models by a nearest upscale")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()

    env = {**os.environ, "SEEDVR2_CHUNK_MEMORY_MB": str(args.budget_mb), "OMP_NUM_THREADS": "1"}
    models = ["--dit_model", str(GOLDEN / "dit3b_weights.safetensors"),
              "--vae_model", str(GOLDEN / "vae_weights.safetensors")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for frames in args.frames:
            clip = Path(tmp) / f"clip{frames}.mp4"
            write_clip(clip, frames, *args.size)
            for chunk in ("auto", "0"):
                out = Path(tmp) / f"out{frames}_{chunk}.mp4"
                code, rss = peak_rss([str(clip), "--output", str(out), "--resolution", str(args.resolution),
                                      "--device", "cpu", "--chunk_size", chunk, *models], env, args.stand_in)
                rows.append({"frames": frames, "chunk_size": chunk, "exit": code, "peak_rss_mb": round(rss / 2**20, 1)})
                print(json.dumps(rows[-1]), flush=True)
    if args.output:
        args.output.write_text(json.dumps({"size": args.size, "resolution": args.resolution, "stand_in": args.stand_in,
                                           "budget_mb": args.budget_mb, "runs": rows}, indent=1) + "\n")
    return 0 if all(row["exit"] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
