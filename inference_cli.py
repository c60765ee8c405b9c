#!/usr/bin/env python3
"""Upscale a video, an image, or a folder of images (a PNG sequence) with SeedVR2, without ComfyUI.

The parameters are those of the ComfyUI nodes.  Weights are looked up in --model_dir and released files
are downloaded there on first use.  Long videos are read --chunk_size frames at a time and run through
the whole clip's batch plan as the frames arrive, so memory stays bounded whatever the clip length and
the frames equal those of a run over the whole clip at once.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

# Only light modules before the arguments are parsed: --help must not wait for torch.
from src.models import registry
from src.options import ATTENTION_MODES, COLOR_CORRECTIONS, PARALLEL_MODES, QUANTIZATION_MODES, VAE_QUANTIZATIONS
from src.pipeline import timing

log = logging.getLogger("seedvr2")

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130
DEFAULT_MODEL_DIR = "models/SEEDVR2"
VIDEO_OUTPUT_SUFFIXES = (".mp4", ".mov", ".mkv")
OUTPUT_FORMATS = ("auto", "mp4", "png")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's layout and shows each option's default: "off" for switches, none where the help
    text says itself what happens without the option."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if isinstance(action, argparse._StoreTrueAction):  # noqa: SLF001 - argparse has no public name for it
            return f"{text} (default: off)"
        if action.default is None:
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """A usage error is one line too (argparse prints the whole usage first)."""
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see {self.prog} --help)\n")


def _one_of(choices) -> str:
    return "one of: " + ", ".join(choices)


def _released_models() -> str:
    rows = []
    for info in registry.KNOWN_MODELS:
        what = "VAE" if info.kind == "vae" else f"{info.size.upper()} DiT{' (sharp)' if info.sharp else ''}"
        rows.append(f"  {info.filename:<62} {what}, {info.precision}, from {info.repo}")
    return "\n".join(rows)


def _epilog() -> str:
    return f"""\
released models (--dit_model / --vae_model; a missing one is downloaded into --model_dir on first
use from the Hugging Face Hub and SHA-256 checked; with the defaults the first run downloads
{registry.DEFAULT_DIT} and {registry.DEFAULT_VAE}, about 4 GB):
{_released_models()}
  Any other .safetensors / .gguf file in --model_dir, or a path to one, works too.

examples:
  python inference_cli.py clip.mp4 --resolution 720 --output clip_720p.mp4
  python inference_cli.py photo.png --resolution 2160 --dit_model seedvr2_ema_7b_fp16.safetensors
  python inference_cli.py frames/ --output upscaled_frames/ --batch_size 1
  python inference_cli.py long.mp4 --chunk_size 97 --batch_size 33 --temporal_overlap 3
  python inference_cli.py clip.mp4 --blocks_to_swap 16 --dit_offload_device cpu --vae_decode_tile_size 1024
      (less VRAM: part of the DiT waits in host memory, the VAE decodes in tiles)

offline: set HF_HUB_OFFLINE=1 to never download; a missing file is then reported with its address.
exit status: 0 done, 1 failed while running (out of memory, disk full, ...), 2 unusable input, setting or
model file, 130 interrupted.  --debug adds full tracebacks."""


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="inference_cli.py", description=__doc__.split("\n\n")[0],
                                epilog=_epilog(), formatter_class=_HelpFormatter)
    io = p.add_argument_group("input and output")
    io.add_argument("input", help="a video file, an image, or a folder of images (read in name order)")
    io.add_argument("--output", help="where to write: a .mp4/.mov/.mkv file gets a video, a .png file one image, "
                                     "anything else a folder of numbered PNG frames (default: next to the input, "
                                     "named <input>_seedvr2)")
    io.add_argument("--output_format", choices=OUTPUT_FORMATS, default="auto", metavar="FORMAT",
                    help="auto: from --output's suffix, else mp4 for a video and PNG for images; "
                         + _one_of(OUTPUT_FORMATS))
    io.add_argument("--skip_first_frames", type=int, default=0, metavar="N", help="input frames to skip at the start")
    io.add_argument("--load_cap", type=int, default=0, metavar="N", help="process at most N frames (0 = all)")
    io.add_argument("--chunk_size", type=_chunk_size, default="auto", metavar="N",
                    help="frames read and processed at a time: auto = as many as fit a quarter of the free RAM "
                         "(at most 4 GiB, or SEEDVR2_CHUNK_MEMORY_MB), so memory stays bounded for any length; "
                         "0 = the whole clip at once; the frames are the same either way")

    models = p.add_argument_group("models")
    models.add_argument("--model_dir", default=DEFAULT_MODEL_DIR, metavar="DIR",
                        help="folder holding the weights; missing released files are downloaded into it "
                             "(relative to the current folder)")
    models.add_argument("--dit_model", default=registry.DEFAULT_DIT, metavar="FILE",
                        help="DiT weights: a released name (see below), a file in --model_dir, or a path to a file")
    models.add_argument("--vae_model", default=registry.DEFAULT_VAE, metavar="FILE",
                        help="VAE weights: the released name, a file in --model_dir, or a path to a file")

    up = p.add_argument_group("upscaling")
    up.add_argument("--resolution", type=int, default=1080, metavar="PX",
                    help="length of the output's shortest edge in pixels (the aspect ratio is kept)")
    up.add_argument("--max_resolution", type=int, default=0, metavar="PX",
                    help="cap on the output's longest edge in pixels (0 = no cap)")
    up.add_argument("--batch_size", type=int, default=5, metavar="N",
                    help="frames processed together for temporal consistency; 4n+1 (1, 5, 9, ... 33) avoids padding; "
                         "use 1 for unrelated images; more frames need more memory")
    up.add_argument("--uniform_batch_size", action="store_true",
                    help="pad the last batch to --batch_size so every batch has the same shape (helps torch.compile)")
    up.add_argument("--temporal_overlap", type=int, default=0, metavar="N",
                    help="frames shared and blended by consecutive batches and chunks, to hide jumps at their "
                         "boundaries; must be smaller than --batch_size")
    up.add_argument("--prepend_frames", type=int, default=0, metavar="N",
                    help="mirrored frames added before the first one and removed afterwards; steadies the start")
    up.add_argument("--color_correction", choices=COLOR_CORRECTIONS, default="lab", metavar="MODE",
                    help="match the output's colours to the input: lab is robust, none keeps the model's colours; "
                         + _one_of(COLOR_CORRECTIONS))
    up.add_argument("--input_noise_scale", type=float, default=0.0, metavar="X",
                    help="noise added to the input frames before encoding, 0 to 1; can reduce artifacts on very "
                         "clean or very compressed inputs")
    up.add_argument("--latent_noise_scale", type=float, default=0.0, metavar="X",
                    help="noise mixed into the encoded input, 0 to 1: more invents more detail, with less fidelity")
    up.add_argument("--seed", type=int, default=42, help="seed of the diffusion noise; the same seed and settings "
                                                         "give the same result")

    run = p.add_argument_group("devices, memory and speed")
    run.add_argument("--device", default="auto",
                     help="where the models run: auto (the best GPU, else the CPU), cpu, cuda:N or mps")
    run.add_argument("--attention_mode", choices=ATTENTION_MODES, default="auto", metavar="MODE",
                     help="the DiT's attention kernel: auto picks the fastest installed one; a kernel that is not "
                          "installed or cannot run here falls back (to sdpa unless it names another) with one log "
                          "line; " + _one_of(ATTENTION_MODES))
    run.add_argument("--quantization", choices=QUANTIZATION_MODES, default="disabled", metavar="MODE",
                     help="the DiT's weights: disabled uses the file as it is; fp8_e4m3fn: fp8 matmuls on "
                          "Ada/Hopper/Blackwell, weight-only elsewhere; fp4_experimental: 4-bit weights, any GPU; "
                          "fp4_scaled / fp4_scaled_fast: FP4 matmuls on Blackwell, fp8 elsewhere; gguf: a .gguf "
                          "file (which always runs as gguf); " + _one_of(QUANTIZATION_MODES))
    run.add_argument("--vae_quantization", choices=VAE_QUANTIZATIONS, default="disabled", metavar="MODE",
                     help="fp8_e4m3fn: the VAE's convolutions after each GroupNorm and in the decoder's upsamplers "
                          "in fp8 (faster, less memory, not exact); disabled is exact; " + _one_of(VAE_QUANTIZATIONS))
    run.add_argument("--no_optimizations", action="store_true",
                     help="run the plain reference path: PyTorch SDPA and eager ops, no fused kernels or fp8 compute")
    run.add_argument("--blocks_to_swap", type=int, default=0, metavar="N",
                     help="DiT blocks kept on --dit_offload_device and brought in one at a time (3B has 32, 7B 36): "
                          "less VRAM, slower; needs --dit_offload_device")
    run.add_argument("--dit_offload_device", default="none", metavar="DEVICE",
                     help="where the DiT waits while the VAE runs, and where swapped blocks live: none (stays on "
                          "its device), cpu, cuda:N")
    run.add_argument("--vae_offload_device", default="none", metavar="DEVICE",
                     help="where the VAE waits while the DiT runs: none (stays on its device), cpu, cuda:N")
    run.add_argument("--vae_encode_tile_size", type=int, default=0, metavar="PX",
                     help="encode each frame in tiles of this size in pixels, to bound memory (0 = no tiling; "
                          "tiles are not exact)")
    run.add_argument("--vae_decode_tile_size", type=int, default=0, metavar="PX",
                     help="decode in tiles of this size in pixels (0 = no tiling; tiles are not exact)")
    run.add_argument("--vae_tile_overlap", type=int, default=128, metavar="PX",
                     help="overlap of neighbouring tiles in pixels, blended to hide seams")
    run.add_argument("--vram_budget", type=float, default=0.0, metavar="GIB",
                     help="GPU memory in GiB the run plans for (VAE bands, DiT chunks, offloading, BlockSwap are "
                          "chosen to fit; 0 = what the GPU has free)")
    run.add_argument("--gpus", type=int, default=1, metavar="N",
                     help="run on N GPUs of this machine, one process each (started through torchrun; a command "
                          "started by torchrun itself is recognised); the frames equal a one-GPU run's")
    run.add_argument("--parallel", choices=PARALLEL_MODES, default="auto", metavar="MODE",
                     help="how several GPUs share the clip: " + _one_of(PARALLEL_MODES) + "; batches = each GPU "
                          "takes whole batches, windows = every DiT step split across the GPUs by attention "
                          "window (for clips of fewer batches than GPUs), auto = batches when there are enough")
    run.add_argument("--debug", action="store_true",
                     help="log model, memory and timing details of every phase, and print full tracebacks")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


class InputError(ValueError):
    """A command-line argument cannot be used; the message says why."""


def _chunk_size(text: str):
    """--chunk_size: 'auto' or a number of frames (0 = the whole clip)."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number of frames, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 'auto' or 0 or more frames, got {value}")
    return value


def model_request(value: str, model_dir: str) -> tuple[str, list[Path]]:
    """``(name, folders)`` to look a --dit_model / --vae_model value up with: a bare name is looked up in
    ``model_dir``, a path (with a folder part) in its own folder, so a released name there is downloaded
    next to it."""
    path = Path(value).expanduser()
    if path.is_absolute() or len(path.parts) > 1:
        path = Path(os.path.abspath(path))
        if path.is_dir():
            raise InputError(f"{path} is a folder; give a weights file.")
        return path.name, [path.parent]
    return value, [Path(os.path.abspath(Path(model_dir).expanduser()))]


def output_writer(args, info):
    from src.pipeline import media

    source = Path(args.input)
    fmt = args.output_format
    if fmt == "auto":
        if args.output:
            fmt = "mp4" if Path(args.output).suffix.lower() in VIDEO_OUTPUT_SUFFIXES else "png"
        else:
            fmt = "mp4" if info.kind == "video" else "png"
    if args.output:
        target = Path(args.output)
    elif fmt == "mp4":
        target = source.with_name(f"{source.stem}_seedvr2.mp4")
    elif info.kind == "image":
        target = source.with_name(f"{source.stem}_seedvr2.png")
    else:
        target = source.with_name(f"{source.stem}_seedvr2")
    single = fmt == "png" and info.kind == "image" and target.suffix.lower() == ".png"
    media.check_output(target, source, folder=fmt == "png" and not single)  # never overwrite the input
    if fmt == "mp4":
        return media.VideoWriter(target, info.fps or 24.0), target
    return media.PngWriter(target, single=single), target


def expected_frames(info, args) -> int:
    """How many frames the run will read (0 when the container does not say)."""
    if not info.frames:
        return args.load_cap
    frames = max(info.frames - args.skip_first_frames, 0)
    return min(frames, args.load_cap) if args.load_cap else frames


def run(args: argparse.Namespace, console) -> int:
    """The upscale itself; errors propagate to :func:`main`, which reports them."""
    from src.models import download

    source = Path(args.input)
    if not source.exists():
        raise InputError(f"{os.path.abspath(source)}: no such file or folder.")
    # Weights first: a missing file is reported before anything heavy is imported or read.
    plan = download.find_models([model_request(args.dit_model, args.model_dir),
                                 model_request(args.vae_model, args.model_dir)])

    from src.pipeline import media
    from src.pipeline.console import ConsoleProgress
    from src.pipeline.model_manager import ModelManager
    from src.pipeline.settings import DiTSpec, UpscaleSettings, VAESpec
    from src.pipeline.upscaler import upscale_stream
    timing.mark("imports_done")

    info = media.probe(source)
    # Every setting is checked before a download or any heavy work; the specs get their files afterwards.
    optimized = not args.no_optimizations
    dit = DiTSpec(model="", device=args.device, offload_device=args.dit_offload_device,
                  blocks_to_swap=args.blocks_to_swap, attention_mode=args.attention_mode,
                  quantization=args.quantization, enable_optimizations=optimized)
    vae = VAESpec(model="", device=args.device, offload_device=args.vae_offload_device,
                  encode_tiled=args.vae_encode_tile_size > 0, encode_tile_size=args.vae_encode_tile_size or 1024,
                  encode_tile_overlap=args.vae_tile_overlap, decode_tiled=args.vae_decode_tile_size > 0,
                  decode_tile_size=args.vae_decode_tile_size or 1024, decode_tile_overlap=args.vae_tile_overlap,
                  enable_optimizations=optimized, quantization=args.vae_quantization)
    settings = UpscaleSettings(
        seed=args.seed, resolution=args.resolution, max_resolution=args.max_resolution, batch_size=args.batch_size,
        uniform_batch_size=args.uniform_batch_size, color_correction=args.color_correction,
        temporal_overlap=args.temporal_overlap, prepend_frames=args.prepend_frames,
        input_noise_scale=args.input_noise_scale, latent_noise_scale=args.latent_noise_scale,
        offload_device="cpu", enable_debug=args.debug, parallel=args.parallel,
        vram_budget=args.vram_budget,
    )
    settings.validate()
    from src.pipeline.devices import device_name_problem

    devices = (("--device", args.device, False), ("--dit_offload_device", args.dit_offload_device, True),
               ("--vae_offload_device", args.vae_offload_device, True))
    for flag, value, offload in devices:
        if (problem := device_name_problem(value, offload=offload)) is not None:
            raise InputError(f"{flag}: {problem}")
    if args.gpus < 1:
        raise InputError(f"--gpus must be at least 1 (got {args.gpus}).")
    rank = _join_parallel_run(args, dit, vae)
    if rank is not None:
        dit, vae = replace(dit, device=args.device), replace(vae, device=args.device)
    chunk_size = args.chunk_size
    if chunk_size == "auto":   # as many frames as fit the host-memory bound (upscaler.auto_chunk_frames)
        from src.pipeline.upscaler import auto_chunk_frames

        chunk_size = auto_chunk_frames(info.height, info.width, 4 if info.has_alpha else 3, settings)
        if info.frames > chunk_size:
            log.info("processing %d frames at a time (--chunk_size auto)", chunk_size)
    # The output is checked (it is never the input) before anything is downloaded or loaded.
    writer, target = output_writer(args, info) if not rank else (_NoWriter(), None)
    dit_path, vae_path = plan.fetch()
    log.debug("DiT: %s; VAE: %s", dit_path, vae_path)
    dit, vae = replace(dit, model=str(dit_path)), replace(vae, model=str(vae_path))
    phases = ("encode", "upscale", "decode", "postprocess") if info.has_alpha else ("encode", "upscale", "decode")
    progress = ConsoleProgress(source.name, expected_frames(info, args), console, phases=phases)
    start, written = time.perf_counter(), 0
    try:
        # The output takes its name only when complete: an error, Ctrl-C or SIGTERM drops it.  The writer
        # encodes each chunk on its own thread (converting a frame at a time) while the next is computed.
        with media.terminate_raises(), writer:
            chunks = media.iter_chunks(args.input, chunk_size, skip=args.skip_first_frames, limit=args.load_cap)
            chunks = timing.timed_iter(chunks, "read_input")
            for frames in upscale_stream(progress.chunks(chunks), dit, vae, settings, progress=progress,
                                         manager=ModelManager()):
                writer.write(frames)
                timing.mark("first_output_frame")
                written += frames.shape[0]
                del frames  # the writer keeps what it needs; held here, it would double a chunk in memory
            timing.mark("computed")
        # The writer's own thread encoded and wrote; the pipeline waited only for a full queue and the close.
        timing.add("write", getattr(writer, "busy_seconds", 0.0))
        timing.add("write_wait", getattr(writer, "wait_seconds", 0.0))
        progress.finish()
    finally:
        progress.close()
        timing.mark("output_closed")
    seconds = time.perf_counter() - start
    if target is None:
        return 0   # another process of a parallel run wrote the file
    log.info("wrote %d frame(s) to %s in %.1f s (%.2f frames/s)", written, target.absolute(), seconds,
             written / max(seconds, 1e-9))
    return 0


class _NoWriter:
    """The writer of a parallel run's processes other than rank 0, which receive no frames."""

    def write(self, frames) -> None:
        raise RuntimeError("only rank 0 of a parallel run writes frames")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False


def _join_parallel_run(args, dit, vae) -> int | None:
    """Under torchrun: join the process group, use this process's GPU; returns the rank (None alone)."""
    from src.distributed import launch

    info = launch.from_environment()
    if info is None:
        return None
    device = launch.join(info)
    if args.device != "auto" and not args.device.startswith("cuda") and device != "cpu":
        raise InputError(f"--device {args.device}: a multi-GPU run places each process on its own GPU")
    args.device = device
    if info.rank:
        logging.getLogger("seedvr2").setLevel(logging.WARNING)   # rank 0 speaks for the run
    import atexit
    atexit.register(launch.leave)
    return info.rank


def main(argv=None) -> int:
    timing.mark("cli_main")  # SEEDVR2_TIMING_JSON=file: phase timings since process start (see timing.py)
    args = parse_args(argv)
    if args.gpus > 1:
        from src.distributed import launch

        if launch.from_environment() is None:   # start the N processes; each one runs this script again
            return launch.relaunch(args.gpus, [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    from src.pipeline.console import console_logging

    with console_logging(debug=args.debug) as console:
        try:
            return run(args, console)
        except BaseException as exc:  # noqa: BLE001 - every failure ends as one line and an exit status
            if isinstance(exc, SystemExit):
                raise
            code, message = describe_failure(exc, debug=args.debug)
            if args.debug and not isinstance(exc, KeyboardInterrupt):
                console.write("".join(traceback.format_exception(exc)).rstrip())
            log.error("error: %s", message)
            return code


def describe_failure(exc: BaseException, debug: bool = False) -> tuple[int, str]:
    """Exit status and a one-line message for an exception that ended the run."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted."
    text = " ".join(str(exc).split())
    if _is_out_of_memory(exc):
        sentences = re.split(r"(?<=\.)\s+", text)
        return EXIT_FAILED, (
            f"out of memory ({' '.join(sentences[:3]) or type(exc).__name__}). Lower --resolution or "
            f"--batch_size, keep part of the DiT in host memory (--blocks_to_swap 16 --dit_offload_device cpu), "
            f"decode in tiles (--vae_decode_tile_size 1024), or process fewer frames at a time (--chunk_size)."
        )
    ours = type(exc).__module__.split(".")[0] == "src" or isinstance(exc, InputError)
    message = text if ours and text else f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    if isinstance(exc, OSError) and not text:
        message = f"{type(exc).__name__} (errno {exc.errno})"
    from src.models.download import ModelFileError

    bad_input = isinstance(exc, (ValueError, ModelFileError)) and not isinstance(exc, UnicodeError)
    if not ours and not debug and not isinstance(exc, OSError):
        message += " (run with --debug for the full traceback)"
    return (EXIT_BAD_INPUT if bad_input else EXIT_FAILED), message


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")  # an allocator error can only come from torch once it is imported
    if torch is None:
        return False
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)) if t)
    if oom_types and isinstance(exc, oom_types):
        return True
    # CPU and MPS allocators raise a plain RuntimeError.
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        words in text.lower() for words in ("out of memory", "not enough memory", "can't allocate memory"))


def _exit_now(code: int) -> None:
    """End the process once the output file is complete and closed, skipping the interpreter's teardown of
    CUDA, tensors and modules, which the user would otherwise wait for: the operating system frees it all."""
    timing.finish()
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()   # a multi-GPU run's process leaves its group first
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit_now(main())
