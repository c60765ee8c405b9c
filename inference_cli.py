#!/usr/bin/env python3
"""Upscale a video, an image, a folder of images or a PNG sequence with SeedVR2, without ComfyUI.

    python inference_cli.py assets/example_clip.mp4 --resolution 720 --output upscaled.mp4

Same parameters as the ComfyUI nodes.  Weights are looked up in --model_dir (default ./models/SEEDVR2) and
downloaded there on first use.  Long videos are processed in chunks of --chunk_size frames, so memory stays
bounded whatever the clip length; chunks overlap by --temporal_overlap frames, blended like batches.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from src.models import registry
from src.pipeline import media
from src.pipeline.progress import Progress
from src.pipeline.settings import COLOR_CORRECTIONS, VAE_QUANTIZATIONS, DiTSpec, SettingsError, UpscaleSettings, VAESpec

log = logging.getLogger("seedvr2")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("input", help="video file, image, folder of images (PNG sequence)")
    p.add_argument("--output", help="output .mp4, .png, or a folder for PNG frames (default: next to the input)")
    p.add_argument("--output_format", choices=("auto", "mp4", "png"), default="auto")
    p.add_argument("--model_dir", default="models/SEEDVR2", help="folder holding (or receiving) the weights")
    p.add_argument("--dit_model", default=registry.DEFAULT_DIT, help="DiT weights file name or path")
    p.add_argument("--vae_model", default=registry.DEFAULT_VAE, help="VAE weights file name or path")
    p.add_argument("--resolution", type=int, default=1080, help="target shortest edge in pixels")
    p.add_argument("--max_resolution", type=int, default=0, help="cap on the longest edge (0 = none)")
    p.add_argument("--batch_size", type=int, default=5, help="frames per DiT batch (4n+1 is most efficient)")
    p.add_argument("--uniform_batch_size", action="store_true", help="pad the last batch to batch_size")
    p.add_argument("--temporal_overlap", type=int, default=0, help="frames shared (and blended) between batches")
    p.add_argument("--prepend_frames", type=int, default=0, help="mirrored frames prepended to stabilise the start")
    p.add_argument("--color_correction", choices=COLOR_CORRECTIONS, default="lab")
    p.add_argument("--input_noise_scale", type=float, default=0.0)
    p.add_argument("--latent_noise_scale", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda:N or mps")
    p.add_argument("--attention_mode", default="auto")
    p.add_argument("--quantization", default="disabled", help="the DiT's: disabled, fp8_e4m3fn, fp4_*, gguf")
    p.add_argument("--vae_quantization", choices=VAE_QUANTIZATIONS, default="disabled",
                   help="fp8_e4m3fn: the VAE's convolutions after each GroupNorm and in the decoder's upsamplers "
                        "in fp8 (faster, less memory, not exact)")
    p.add_argument("--no_optimizations", action="store_true", help="run the plain reference path")
    p.add_argument("--blocks_to_swap", type=int, default=0)
    p.add_argument("--dit_offload_device", default="none")
    p.add_argument("--vae_offload_device", default="none")
    p.add_argument("--vae_encode_tile_size", type=int, default=0, help="tile size in pixels (0 = no tiling)")
    p.add_argument("--vae_decode_tile_size", type=int, default=0, help="tile size in pixels (0 = no tiling)")
    p.add_argument("--vae_tile_overlap", type=int, default=128)
    p.add_argument("--skip_first_frames", type=int, default=0)
    p.add_argument("--load_cap", type=int, default=0, help="process at most this many frames (0 = all)")
    p.add_argument("--chunk_size", type=_chunk_size, default="auto",
                   help="frames read and processed at a time: auto = as many as fit a quarter of the free RAM "
                        "(at most 4 GiB, or SEEDVR2_CHUNK_MEMORY_MB), 0 = the whole clip at once")
    p.add_argument("--debug", action="store_true")
    return p.parse_args(argv)


def _chunk_size(text: str):
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number of frames, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 'auto' or 0 or more frames, got {value}")
    return value


class ConsoleProgress(Progress):
    """Console progress: one bar per phase (tqdm when installed, log lines otherwise)."""

    def __init__(self, label: str):
        self._label = label
        self._bar = None

    def start_phase(self, phase: str, total: int) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            log.info("%s: %s (%d steps)", self._label, phase, total)
            return
        if self._bar is not None:
            self._bar.close()
        self._bar = tqdm(total=total, desc=f"{self._label} {phase}", leave=False, file=sys.stderr)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def output_writer(args, info: media.MediaInfo):
    source = Path(args.input)
    fmt = args.output_format
    if fmt == "auto":
        if args.output:
            fmt = "mp4" if Path(args.output).suffix.lower() in (".mp4", ".mov", ".mkv") else "png"
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
    if fmt == "mp4":
        return media.VideoWriter(target, info.fps or 24.0), target
    return media.PngWriter(target, single=(info.kind == "image" and target.suffix.lower() == ".png")), target


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(message)s")
    from src.models import download
    from src.pipeline.model_manager import ModelManager
    from src.pipeline.upscaler import upscale_stream

    try:
        info = media.probe(args.input)
        folders = [Path(args.model_dir)]
        dit_path = download.ensure_model(args.dit_model, folders, allow_paths=True)
        vae_path = download.ensure_model(args.vae_model, folders, allow_paths=True)
    except (media.MediaError, RuntimeError, ValueError) as exc:
        log.error("error: %s", exc)
        return 2

    optimized = not args.no_optimizations
    dit = DiTSpec(model=str(dit_path), device=args.device, offload_device=args.dit_offload_device,
                  blocks_to_swap=args.blocks_to_swap, attention_mode=args.attention_mode,
                  quantization=args.quantization, enable_optimizations=optimized)
    try:
        vae = VAESpec(model=str(vae_path), device=args.device, offload_device=args.vae_offload_device,
                      encode_tiled=args.vae_encode_tile_size > 0, encode_tile_size=args.vae_encode_tile_size or 1024,
                      encode_tile_overlap=args.vae_tile_overlap, decode_tiled=args.vae_decode_tile_size > 0,
                      decode_tile_size=args.vae_decode_tile_size or 1024, decode_tile_overlap=args.vae_tile_overlap,
                      enable_optimizations=optimized, quantization=args.vae_quantization)
    except SettingsError as exc:
        log.error("error: %s", exc)
        return 2
    settings = UpscaleSettings(
        seed=args.seed, resolution=args.resolution, max_resolution=args.max_resolution, batch_size=args.batch_size,
        uniform_batch_size=args.uniform_batch_size, color_correction=args.color_correction,
        temporal_overlap=args.temporal_overlap, prepend_frames=args.prepend_frames,
        input_noise_scale=args.input_noise_scale, latent_noise_scale=args.latent_noise_scale,
        offload_device="cpu", enable_debug=args.debug,
    )
    chunk_size = args.chunk_size
    if chunk_size == "auto":
        from src.pipeline.upscaler import auto_chunk_frames

        try:
            settings.validate()
            chunk_size = auto_chunk_frames(info.height, info.width, 4 if info.has_alpha else 3, settings)
        except SettingsError as exc:
            log.error("error: %s", exc)
            return 2
        if info.frames > chunk_size:
            log.info("processing %d frames at a time (--chunk_size auto)", chunk_size)
    writer, target = output_writer(args, info)
    progress = ConsoleProgress(Path(args.input).name)
    start, written = time.perf_counter(), 0
    try:
        chunks = media.iter_chunks(args.input, chunk_size, skip=args.skip_first_frames, limit=args.load_cap)
        for frames in upscale_stream(chunks, dit, vae, settings, progress=progress, manager=ModelManager()):
            writer.write(frames)
            written += frames.shape[0]
            del frames  # held while the next chunk runs, it would double the chunk's output in memory
    except (media.MediaError, ValueError) as exc:
        log.error("error: %s", exc)
        return 2
    finally:
        writer.close()
        progress.close()
    seconds = time.perf_counter() - start
    log.info("wrote %d frame(s) to %s in %.1f s (%.2f frames/s)", written, target, seconds, written / max(seconds, 1e-9))
    return 0


if __name__ == "__main__":
    sys.exit(main())
