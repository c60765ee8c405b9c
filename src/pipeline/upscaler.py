"""The upscaler: frames in, restored frames out, in four phases over the clip's batches.

1. encode   — every batch is resized (shortest edge = resolution), padded to the 16-pixel grid and to 4n+1
              frames, and encoded by the VAE into a condition latent;
2. upscale  — one DiT evaluation per batch turns noise + condition into the clean latent;
3. decode   — the VAE decodes each latent; the frames are trimmed, cropped, colour-corrected against the
              resized input, blended with the previous batch's overlap and written to the output;
4. postprocess — the alpha channel of RGBA input is upscaled separately (it never enters the VAE).

Phases run over all batches before the next begins, so only one model needs to be on the GPU at a time.
The output is written in place into one float32 tensor: host memory stays at the output's size plus one
batch.  Every batch is seeded identically, so a frame's result does not depend on its batch's position.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from ..optimization import fused_kernels, matrix_ops, stable_memory, vae_optimizer
from .batching import Batch, BatchPlan, overlap_weights, pad_temporal, plan_batches, prepend_mirrored
from .color_correction import color_correct
from .devices import resolve_device
from .frames import crop, from_model_range, pad_to_multiple, resize_frames, target_size, to_model_range
from .model_manager import ManagedModel, ModelManager, default_manager, dit_working_bytes
from .progress import Progress, checkpoint, reporting
from .restoration import (
    RandomDraws, VAETiling, condition_latent, decode_latent, dit_velocity, draw_randoms, encode_posterior,
    restore_latent,
)
from .settings import DiTSpec, SettingsError, UpscaleSettings, VAESpec
from .text_embeddings import text_embeddings
from .tile_debug import draw_tiles, tile_boxes

log = logging.getLogger("seedvr2")

SPATIAL_FACTOR, TEMPORAL_FACTOR, GRID = 8, 4, 16
OOM_TILE_SIZES = (512, 256)  # VAE tile sizes tried, in order, when a batch does not fit untiled
MEMORY_PRESSURE_TO_CLEAR = 0.75  # used fraction of device or host memory above which phases clear caches


class UpscaleError(RuntimeError):
    """The run could not finish; the message says why and what to change."""


@dataclass(frozen=True)
class ClipGeometry:
    """Sizes of one run: the output frame size and the padded size the models see."""

    height: int
    width: int

    @property
    def padded(self) -> tuple[int, int]:
        return (-(-self.height // GRID) * GRID, -(-self.width // GRID) * GRID)


def check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (3, 4):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise SettingsError(f"frames must be a (frames, height, width, 3 or 4) tensor, got {shape}.")
    if images.shape[0] == 0:
        raise SettingsError("there are no frames to upscale (the input batch is empty).")


def upscale(images: torch.Tensor, dit: DiTSpec, vae: VAESpec, settings: UpscaleSettings, *,
            progress: Progress | None = None, manager: ModelManager | None = None) -> torch.Tensor:
    """Upscale ``images`` (N, H, W, C) in [0, 1] (C = 3 or 4); returns (N, H', W', C) float32 in [0, 1].

    The result is the buffer the batches were written into: no copy of the output is ever made, so host
    memory stays at the output's size plus one batch.
    """
    settings.validate()
    check_images(images)
    runner = _Runner(dit, vae, settings, progress or Progress(), manager or default_manager())
    try:
        return runner.run_clip(images, prepend=settings.prepend_frames)
    finally:
        runner.close()


def upscale_stream(chunks: Iterable[torch.Tensor], dit: DiTSpec, vae: VAESpec, settings: UpscaleSettings, *,
                   progress: Progress | None = None, manager: ModelManager | None = None) -> Iterator[torch.Tensor]:
    """Upscale a clip that arrives in chunks, yielding finished frames as soon as they are final.

    Consecutive chunks share ``temporal_overlap`` frames: the tail of each chunk's output is held back and
    cross-faded with the head of the next, exactly like batches inside a chunk.
    """
    settings.validate()
    progress = progress or Progress()
    manager = manager or default_manager()
    runner = _Runner(dit, vae, settings, progress, manager)
    overlap = settings.temporal_overlap
    tail_in: torch.Tensor | None = None
    tail_out: torch.Tensor | None = None
    first = True
    try:
        for chunk in chunks:
            check_images(chunk)
            clip = chunk if tail_in is None else torch.cat([tail_in, chunk])
            out = runner.run_clip(clip, prepend=settings.prepend_frames if first else 0)
            first = False
            if tail_out is not None:
                head = tail_out.shape[0]
                weights = overlap_weights(head).view(-1, 1, 1, 1)
                out[:head] = tail_out * weights + out[:head] * (1 - weights)
            keep = min(overlap, out.shape[0] - 1) if overlap else 0
            tail_in = chunk[chunk.shape[0] - keep:] if keep else None
            if keep:
                tail_out = out[out.shape[0] - keep:].clone()
                out = out[: out.shape[0] - keep]
            else:
                tail_out = None
            yield out
        if tail_out is not None:
            yield tail_out
    finally:
        runner.close()


class _Runner:
    """Holds the models and settings of one run (one or more chunks)."""

    def __init__(self, dit: DiTSpec, vae: VAESpec, settings: UpscaleSettings, progress: Progress,
                 manager: ModelManager):
        self.dit_spec, self.vae_spec, self.settings = dit, vae, settings
        self.progress, self.manager = progress, manager
        self.dit: ManagedModel | None = None
        self.vae: ManagedModel | None = None
        self._random_draws: dict[tuple[int, int, int], RandomDraws] = {}

    # ----------------------------------------------------------------------------------------- models
    def _vae(self, direction: str, plan: BatchPlan, geometry: ClipGeometry) -> ManagedModel:
        """The VAE on its device, with room made for the phase's activations (other models may move out)."""
        if self.vae is None:
            self.vae = self.manager.vae(self.vae_spec)
            _optimize(self.vae, self.vae_spec)
        frames = max(batch.padded_length for batch in plan.batches)
        required = self._vae_activation_bytes(direction, frames, geometry)
        self.vae.activate(memory_required=required)
        self._make_room(required)
        return self.vae

    def _make_room(self, required: int) -> None:
        """Outside ComfyUI (which does this itself), move a resident DiT to the CPU when the VAE phase's
        activations would not fit next to it; it comes back for the next DiT phase."""
        dit, device = self.dit, self.vae.device
        if required <= 0 or device.type != "cuda" or dit is None or dit.patcher is not None:
            return
        free, _total = torch.cuda.mem_get_info(device)
        if free < required and dit.resident_on(device):
            log.info("SeedVR2: moving the DiT to the CPU during the VAE phase (needs %.1f GB, %.1f GB free).",
                     required / 2**30, free / 2**30)
            dit.park(torch.device("cpu"))

    def _vae_activation_bytes(self, direction: str, frames: int, geometry: ClipGeometry) -> int:
        """Estimated activation memory of one VAE batch (0 when unknown: the plain path has no estimate)."""
        model = self.vae.model
        runtime = getattr(model, "runtime", None)
        if runtime is None:
            return 0
        height, width = geometry.padded
        return vae_optimizer.estimate_peak_bytes(model.config, direction, height, width, frames=frames,
                                                 dtype=model.dtype, piece_bytes=runtime.piece_bytes,
                                                 fused_norm=runtime.compile_norm)

    def _dit(self, latent_shapes: list[tuple[int, int, int]]) -> ManagedModel:
        """The DiT on its device, with room made for the activations of the largest of ``latent_shapes``."""
        if self.dit is None:
            self.dit = self.manager.dit(self.dit_spec)
            _optimize(self.dit, self.dit_spec)
        config = getattr(self.dit.model, "config", None)
        required = dit_working_bytes(config, latent_shapes, self.dit.dtype) if config and latent_shapes else 0
        self.dit.activate(memory_required=required)
        return self.dit

    def close(self) -> None:
        self.manager.finish(self.dit, self.vae)
        self.dit = self.vae = None

    # ----------------------------------------------------------------------------------------- clip
    def run_clip(self, frames: torch.Tensor, prepend: int) -> torch.Tensor:
        settings = self.settings
        num_frames, in_h, in_w, channels = frames.shape
        height, width = target_size(in_h, in_w, settings.resolution, settings.max_resolution)
        geometry = ClipGeometry(height, width)
        plan = plan_batches(num_frames, settings.batch_size, settings.temporal_overlap,
                            settings.uniform_batch_size, prepend)
        rgb = frames[..., :3]
        extended = prepend_mirrored(rgb, prepend) if prepend else rgb
        out = torch.empty((num_frames, height, width, channels), dtype=torch.float32,
                          device=_storage_device(settings.offload_device))
        prefault = stable_memory.HostPrefault(out)  # maps the result's pages while the GPU encodes
        if settings.enable_debug:
            log.info("SeedVR2: %d frame(s) %dx%d -> %dx%d in %d batch(es) of up to %d", num_frames, in_w, in_h,
                     width, height, len(plan.batches), settings.batch_size)

        # The inner loops (VAE chunks, pieces and tiles, DiT blocks) report to this run's progress.
        try:
            with reporting(self.progress):
                with self._phase("encode", self.vae_spec):
                    latents = self._encode_phase(extended, plan, geometry)
                with self._phase("upscale", self.dit_spec):
                    latents = self._upscale_phase(latents, plan)
                prefault.wait()
                with self._phase("decode", self.vae_spec):
                    self._decode_phase(latents, extended, plan, geometry, out)
                if channels == 4:
                    with self._phase("postprocess", self.vae_spec):
                        self._alpha_phase(frames[..., 3:], out)
        finally:
            prefault.wait()  # an interrupted run leaves no thread behind
        return out

    @contextmanager
    def _phase(self, name: str, spec) -> Iterator[None]:
        """Run a phase in the memory manager's context (caches returned around it, peak recorded) when memory
        is tight or when debugging (``enable_debug``, SEEDVR2_DEBUG_MEMORY=1; then its time and memory are
        logged).  Otherwise nothing is cleared: a garbage collection and re-allocation cost real time."""
        device = torch.device(resolve_device(spec.device))
        debug = self.settings.enable_debug or stable_memory.debug_memory_enabled()
        if not debug and stable_memory.memory_pressure(device) < MEMORY_PRESSURE_TO_CLEAR:
            yield
            return
        start = time.perf_counter()
        with stable_memory.memory_efficient_context(device, name) as memory:
            yield
        if self.settings.enable_debug:
            log.info("SeedVR2: %s took %.2f s; %s", name, time.perf_counter() - start, memory)

    def _batch_pixels(self, extended: torch.Tensor, batch: Batch, geometry: ClipGeometry,
                      device: torch.device) -> torch.Tensor:
        """The batch's frames resized to the output size, (n, 3, H', W') in [0, 1], on ``device``."""
        frames = extended[batch.start:batch.stop].to(device, non_blocking=True).permute(0, 3, 1, 2).float()
        return resize_frames(frames, (geometry.height, geometry.width))

    def _encode_phase(self, extended: torch.Tensor, plan: BatchPlan, geometry: ClipGeometry) -> list[torch.Tensor]:
        settings, progress = self.settings, self.progress
        progress.start_phase("encode", len(plan.batches))
        vae = self._vae("encode", plan, geometry)
        latents = []
        for index, batch in enumerate(plan.batches):
            progress.check_interrupt()
            pixels = self._batch_pixels(extended, batch, geometry, vae.device)
            video = to_model_range(pad_to_multiple(pixels, GRID))
            video = pad_temporal(video, batch.padded_length, mode="mirror")
            if settings.input_noise_scale > 0:
                video = video + _input_noise(settings, video)
            video = video.transpose(0, 1)  # (3, T, H, W)
            latent_shape = ((video.shape[1] - 1) // TEMPORAL_FACTOR + 1, video.shape[2] // SPATIAL_FACTOR,
                            video.shape[3] // SPATIAL_FACTOR)
            posterior = self._with_oom_retry("encode", lambda tiling: encode_posterior(vae.model, video, tiling),
                                             self._tiling("encode"), batch.padded_length)
            cond = condition_latent(*posterior, self._draws(latent_shape).eps)
            del posterior
            latents.append(cond.to(self._latent_store(vae.device)))
            del video, pixels
            progress.advance()
        return latents

    def _upscale_phase(self, conds: list[torch.Tensor], plan: BatchPlan) -> list[torch.Tensor]:
        settings, progress = self.settings, self.progress
        progress.start_phase("upscale", len(conds))
        if self.vae is not None:
            self.vae.park()
        dit = self._dit([tuple(cond.shape[:3]) for cond in conds])
        positive, negative = text_embeddings(dit.device, dit.dtype)
        model_fn = dit_velocity(dit.model, positive, negative)
        backend = self.dit_spec.attention_mode if self.dit_spec.enable_optimizations else matrix_ops.PLAIN
        results = []
        with matrix_ops.attention_backend(backend), fused_kernels.fused(self.dit_spec.enable_optimizations):
            for index, cond in enumerate(conds):
                progress.check_interrupt()
                cond = cond.to(dit.device)
                draws = self._draws(tuple(cond.shape[:3]))
                try:
                    x0 = restore_latent(model_fn, cond, draws, latent_noise_scale=settings.latent_noise_scale)
                except torch.OutOfMemoryError as exc:
                    raise UpscaleError(_oom_advice("upscale (DiT)", self.dit_spec)) from exc
                results.append(x0.to(self._latent_store(dit.device)))
                conds[index] = None  # free the condition as soon as it is used
                progress.advance()
        return results

    def _decode_phase(self, latents: list[torch.Tensor], extended: torch.Tensor, plan: BatchPlan,
                      geometry: ClipGeometry, out: torch.Tensor) -> None:
        settings, progress = self.settings, self.progress
        progress.start_phase("decode", len(latents))
        if self.dit is not None:
            self.dit.park()
        vae = self._vae("decode", plan, geometry)
        for index, (batch, latent) in enumerate(zip(plan.batches, latents)):
            progress.check_interrupt()
            latent = latent.to(vae.device)
            decoded = self._with_oom_retry("decode", lambda tiling: decode_latent(vae.model, latent, tiling),
                                           self._tiling("decode"), batch.padded_length)
            latents[index] = None
            with progress.section("postprocess"):
                checkpoint(1.0)
                frames = crop(decoded[: batch.length], geometry.height, geometry.width).float()
                del decoded
                style = to_model_range(self._batch_pixels(extended, batch, geometry, vae.device))
                frames = color_correct(frames, style, settings.color_correction)
                self._draw_tile_debug(frames, geometry)
                frames = from_model_range(frames.clamp_(-1, 1)).permute(0, 2, 3, 1)
                checkpoint(1.0)
                _write_batch(out, frames, batch, plan.prepend_frames)
            progress.advance()

    def _alpha_phase(self, alpha: torch.Tensor, out: torch.Tensor) -> None:
        from .alpha import upscale_alpha

        progress = self.progress
        step = max(1, self.settings.batch_size)
        progress.start_phase("postprocess", -(-alpha.shape[0] // step))
        device = self.vae.device if self.vae is not None else torch.device("cpu")
        for start in range(0, alpha.shape[0], step):
            progress.check_interrupt()
            stop = min(start + step, alpha.shape[0])
            guide = out[start:stop, ..., :3].to(device).permute(0, 3, 1, 2)
            source = alpha[start:stop].to(device).permute(0, 3, 1, 2).float()
            refined = upscale_alpha(source, guide, tuple(guide.shape[-2:]))
            out[start:stop, ..., 3:] = refined.permute(0, 2, 3, 1).to(out.device)
            progress.advance()

    # ----------------------------------------------------------------------------------------- helpers
    def _draws(self, latent_shape: tuple[int, int, int]) -> RandomDraws:
        """The random draws of a batch with this latent shape, on the CPU.  Every batch is seeded alike, so
        batches of one shape share them: drawn once per run (about 0.1 s of CPU time at 1080p), while the
        first batch's encode runs on the GPU, instead of once per batch and phase with the GPU waiting."""
        if latent_shape not in self._random_draws:
            self._random_draws[latent_shape] = draw_randoms(self.settings.seed, latent_shape, "cpu")
        return self._random_draws[latent_shape]

    def _tiling(self, direction: str) -> VAETiling:
        spec = self.vae_spec
        if direction == "encode" and spec.encode_tiled:
            return VAETiling(spec.encode_tile_size, spec.encode_tile_overlap)
        if direction == "decode" and spec.decode_tiled:
            return VAETiling(spec.decode_tile_size, spec.decode_tile_overlap)
        return VAETiling()

    def _with_oom_retry(self, what: str, run, tiling: VAETiling, frames: int):
        """Run a VAE step; on out-of-memory retry with tiles that fit the free memory (then smaller ones)
        before giving up with advice."""
        try:
            return run(tiling)
        except torch.OutOfMemoryError:
            _release_cached_memory()
        for attempt in self._retry_tilings(what, tiling, frames):
            log.warning("SeedVR2: out of memory during VAE %s with tile size %s; retrying with %d px tiles.",
                        what, tiling.tile_size or "none", attempt.tile_size)
            try:
                return run(attempt)
            except torch.OutOfMemoryError:
                _release_cached_memory()
            tiling = attempt
        raise UpscaleError(_oom_advice(f"VAE {what}", self.vae_spec))

    def _retry_tilings(self, what: str, tiling: VAETiling, frames: int) -> list[VAETiling]:
        """Smaller tilings to try after an out-of-memory error, largest first."""
        sizes = list(OOM_TILE_SIZES)
        model = self.vae.model
        runtime = getattr(model, "runtime", None)
        if runtime is not None and model.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(model.device)
            try:
                sizes.insert(0, vae_optimizer.choose_tile_size(
                    free, config=model.config, direction=what, frames=frames, dtype=model.dtype,
                    piece_bytes=runtime.piece_bytes, fused_norm=runtime.compile_norm))
            except vae_optimizer.TileSizeError:
                pass
        limit = tiling.tile_size or 1 << 30
        sizes = sorted({size for size in sizes if size < limit}, reverse=True)
        return [VAETiling(size, min(tiling.tile_overlap, size // 4) // 8 * 8) for size in sizes]

    def _draw_tile_debug(self, frames: torch.Tensor, geometry: ClipGeometry) -> None:
        """Outline the VAE tiles of the direction the loader's ``tile_debug`` names, if it is tiled."""
        direction = self.vae_spec.tile_debug
        tiling = self._tiling(direction) if direction in ("encode", "decode") else VAETiling()
        if tiling.tile_size is not None:
            draw_tiles(frames, tile_boxes(geometry.padded, tiling.tile_size, tiling.tile_overlap), direction)

    def _latent_store(self, device: torch.device) -> torch.device:
        """Latents wait between phases on the offload device (they are small), else where they are."""
        return _storage_device(self.settings.offload_device, default=device)


def _write_batch(out: torch.Tensor, frames: torch.Tensor, batch: Batch, prepend: int) -> None:
    """Write a batch's frames (N, H, W, 3; extended-clip indices) into the output, cross-fading the overlap.

    The frames are made contiguous where they are (the GPU) so the transfer into the output is dense
    (staged through pinned memory when it crosses from a GPU to host memory); only the few overlapping
    frames are blended element by element.
    """
    frames = frames.contiguous()
    first = max(prepend - batch.start, 0)          # frames that fall into the prepended (dropped) part
    blended = max(batch.overlap - first, 0)
    start = batch.start + first - prepend
    if blended:
        weights = batch.blend_weights[first:first + blended].view(-1, 1, 1, 1).to(out.device)
        head = frames[first:first + blended].to(out.device)
        target = out[start:start + blended, ..., :3]
        target.mul_(weights).add_(head * (1.0 - weights))
    rest = frames[first + blended:]
    stable_memory.copy_to_host(out[start + blended:start + blended + rest.shape[0], ..., :3], rest)


def _input_noise(settings: UpscaleSettings, video: torch.Tensor) -> torch.Tensor:
    """Pixel noise of strength ``input_noise_scale`` (0.025·s standard deviation in [-1, 1] units)."""
    generator = torch.Generator("cpu").manual_seed(int(settings.seed) + 1)
    noise = torch.randn(video.shape, generator=generator)
    return noise.to(video) * (0.025 * settings.input_noise_scale)


def _storage_device(name: str, default: torch.device | None = None) -> torch.device:
    if name in ("none", "", None):
        return default if default is not None else torch.device("cpu")
    return torch.device(resolve_device(name, offload=True))


def _release_cached_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _oom_advice(phase: str, spec) -> str:
    hints = ["lower batch_size or resolution"]
    if isinstance(spec, VAESpec):
        hints.insert(0, "enable encode_tiled/decode_tiled with a smaller tile size")
    else:
        hints.insert(0, "set blocks_to_swap (with offload_device cpu) or use an fp8/GGUF model")
    return f"Out of GPU memory during {phase}. Try to " + ", or ".join(hints) + ". Your workflow is unchanged."


def _optimize(managed: ManagedModel, spec) -> None:
    """Apply the optimization package's switches to a freshly loaded model (once per model)."""
    if managed.info.get("optimized") or not (spec.enable_optimizations or spec.compile is not None):
        return
    from ..optimization import apply

    apply.optimize_model(managed, spec)
    managed.info["optimized"] = True


__all__ = ["UpscaleError", "upscale", "upscale_stream"]
