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
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from ..distributed import clip_parallel
from ..models.video_vae_v3.banded import BandPlan
from ..optimization import dit_chunking, fused_kernels, matrix_ops, stable_memory, vae_optimizer
from ..optimization.switches import env_switch
from . import memory_plan
from .batching import Batch, BatchPlan, overlap_weights, pad_temporal, plan_batches, prepend_mirrored
from .color_correction import color_correct
from .devices import resolve_device
from .frames import crop, from_model_range, pad_to_multiple, resize_frames, target_size, to_model_range
from .model_manager import ManagedModel, ModelManager, compute_dtype, default_manager
from . import timing
from .progress import Progress
from .restoration import (
    RandomDraws, VAETiling, condition_latent, decode_latent, dit_velocity, draw_randoms, encode_posterior,
    restore_latent,
)
from .settings import DiTSpec, SettingsError, UpscaleSettings, VAESpec
from .text_embeddings import text_embeddings
from .tile_debug import band_boxes, draw_tiles, tile_boxes

log = logging.getLogger("seedvr2")

SPATIAL_FACTOR, TEMPORAL_FACTOR, GRID = 8, 4, 16
OOM_TILE_SIZES = (512, 256)  # VAE tile sizes tried, in order, when a batch does not fit untiled
PREFETCH_DIT_ENV = "SEEDVR2_PREFETCH_DIT"  # 0: load the DiT after the encode (see _Runner._prefetch_dit)
PREFETCH_MARGIN_BYTES = 2 << 30
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
            if out is None:   # another process of a parallel run writes the frames
                tail_in = chunk[chunk.shape[0] - min(overlap, chunk.shape[0] - 1):] if overlap else None
                continue
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
        self.parallel = clip_parallel.current(settings.parallel)
        self.memory: memory_plan.MemoryPlan | None = None  # the VRAM planner's choices for this clip
        self._dit_loading: Future | None = None  # the DiT loading on a side thread while the VAE encodes

    # ----------------------------------------------------------------------------------------- models
    def _vae(self, direction: str, plan: BatchPlan, geometry: ClipGeometry) -> ManagedModel:
        """The VAE on its device, with room made for the phase's activations (other models may move out)."""
        if self.vae is None:
            self.vae = self.manager.vae(self.vae_spec)
            _optimize(self.vae, self.vae_spec)
        frames = max(batch.padded_length for batch in plan.batches)
        required = self._vae_activation_bytes(direction, frames, geometry)
        if self.memory is not None and self.memory.dit_off_during_vae and self.dit is not None \
                and self.dit.patcher is None and self.dit.resident_on(self.vae.device):
            self.dit.park(torch.device("cpu"))  # the plan: both do not fit the budget together
        self.vae.activate(memory_required=required)
        self._make_room(required)
        if direction == "encode":
            self._prefetch_dit(required)
        return self.vae

    def _prefetch_dit(self, vae_required: int) -> None:
        """Start loading the DiT on a side thread (and CUDA stream) while the VAE encodes, when its weights fit
        beside the encode's activations with room to spare; the upscale phase waits for it.  Reading the file
        and copying it to the GPU then overlap the encode instead of following it."""
        if self.dit is not None or self._dit_loading is not None or not env_switch(PREFETCH_DIT_ENV, True):
            return
        device = self.vae.device
        if device.type != "cuda" or torch.device(resolve_device(self.dit_spec.device)) != device:
            return
        needed = self.manager.dit_weight_bytes(self.dit_spec)
        if needed is None:
            return
        free, _total = torch.cuda.mem_get_info(device)
        if free < vae_required + needed + PREFETCH_MARGIN_BYTES:
            return
        inference = torch.is_inference_mode_enabled()  # ComfyUI runs nodes in inference mode: so does the thread
        compute_stream = torch.cuda.current_stream(device)
        future: Future = Future()

        def load() -> None:
            try:
                stream = torch.cuda.Stream(device)
                with torch.inference_mode(inference), torch.cuda.stream(stream):
                    managed = self.manager.dit(self.dit_spec)
                    stream.synchronize()
                    # The weights were allocated on the side stream; the allocator must not hand their memory
                    # out again, once freed, before the compute stream's kernels reading them are done.  (Inside
                    # the inference mode: record_stream counts as an in-place use of inference tensors.)
                    for tensor in (*managed.model.parameters(), *managed.model.buffers()):
                        if tensor.is_cuda:
                            tensor.record_stream(compute_stream)
                future.set_result(managed)
            except BaseException as exc:  # re-raised where the DiT is needed
                future.set_exception(exc)

        self._dit_loading = future
        threading.Thread(target=load, name="seedvr2-dit-load", daemon=True).start()

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
        if self.memory is not None:
            phase = self.memory.encode if direction == "encode" else self.memory.decode
            return max(0, phase.peak - _parameter_bytes(model))
        runtime = getattr(model, "runtime", None)
        if runtime is None:
            return 0
        height, width = geometry.padded
        return vae_optimizer.estimate_peak_bytes(model.config, direction, height, width, frames=frames,
                                                 dtype=model.dtype, piece_bytes=runtime.piece_bytes,
                                                 fused_norm=runtime.compile_norm)

    def _dit(self) -> ManagedModel:
        if self.dit is None:
            loading, self._dit_loading = self._dit_loading, None
            with timing.span("wait_dit_load"):
                self.dit = loading.result() if loading is not None else self.manager.dit(self.dit_spec)
            _optimize(self.dit, self.dit_spec)
        self.dit.activate()
        return self.dit

    def close(self) -> None:
        if self._dit_loading is not None:  # the run stopped before the DiT was needed: release it too
            loading, self._dit_loading = self._dit_loading, None
            try:
                self.dit = self.dit or loading.result()
            except Exception:  # the run's own error is the one to report
                pass
        self.manager.finish(self.dit, self.vae)
        self.dit = self.vae = None

    # ----------------------------------------------------------------------------------------- clip
    def run_clip(self, frames: torch.Tensor, prepend: int) -> torch.Tensor | None:
        """The clip's restored frames; None on the processes of a parallel run other than rank 0."""
        settings = self.settings
        num_frames, in_h, in_w, channels = frames.shape
        height, width = target_size(in_h, in_w, settings.resolution, settings.max_resolution)
        geometry = ClipGeometry(height, width)
        plan = plan_batches(num_frames, settings.batch_size, settings.temporal_overlap,
                            settings.uniform_batch_size, prepend)
        rgb = frames[..., :3]
        extended = prepend_mirrored(rgb, prepend) if prepend else rgb
        parallel = self.parallel.resolve(len(plan.batches))
        out = None
        if parallel.writes_output:
            out = torch.empty((num_frames, height, width, channels), dtype=torch.float32,
                              device=_storage_device(settings.offload_device))
            prefault = stable_memory.HostPrefault(out)  # maps the result's pages while the GPU encodes
        if settings.enable_debug:
            log.info("SeedVR2: %d frame(s) %dx%d -> %dx%d in %d batch(es) of up to %d", num_frames, in_w, in_h,
                     width, height, len(plan.batches), settings.batch_size)
        self._plan_memory(geometry, plan)

        with self._phase("encode", self.vae_spec):
            latents = self._encode_phase(extended, plan, geometry, parallel)
        if parallel.mode == "windows":
            latents = parallel.share_latents(latents, clip_parallel.communication_device())
        with self._phase("upscale", self.dit_spec):
            latents = self._upscale_phase(latents, plan, parallel)
        if out is not None:
            prefault.wait()
        with self._phase("decode", self.vae_spec):
            self._decode_phase(latents, extended, plan, geometry, out, parallel)
        if channels == 4 and out is not None:
            with self._phase("postprocess", self.vae_spec):
                self._alpha_phase(frames[..., 3:], out)
        return out

    @contextmanager
    def _phase(self, name: str, spec) -> Iterator[None]:
        """Run a phase in the memory manager's context (caches returned around it, peak recorded) when memory
        is tight or when debugging (``enable_debug``, SEEDVR2_DEBUG_MEMORY=1; then its time and memory are
        logged).  Otherwise nothing is cleared: a garbage collection and re-allocation cost real time."""
        device = torch.device(resolve_device(spec.device))
        debug = self.settings.enable_debug or stable_memory.debug_memory_enabled()
        if not debug and stable_memory.memory_pressure(device) < MEMORY_PRESSURE_TO_CLEAR:
            with timing.span(name, sync=device):
                yield
            return
        start = time.perf_counter()
        with stable_memory.memory_efficient_context(device, name) as memory, timing.span(name, sync=device):
            yield
        if self.settings.enable_debug:
            log.info("SeedVR2: %s took %.2f s; %s", name, time.perf_counter() - start, memory)

    def _batch_pixels(self, extended: torch.Tensor, batch: Batch, geometry: ClipGeometry,
                      device: torch.device) -> torch.Tensor:
        """The batch's frames resized to the output size, (n, 3, H', W') in [0, 1], on ``device``."""
        frames = extended[batch.start:batch.stop].to(device, non_blocking=True).permute(0, 3, 1, 2).float()
        return resize_frames(frames, (geometry.height, geometry.width))

    def _encode_phase(self, extended: torch.Tensor, plan: BatchPlan, geometry: ClipGeometry,
                      parallel: clip_parallel.ClipParallel) -> list[torch.Tensor | None]:
        """Condition latents of the batches this process encodes (None for the others')."""
        settings, progress = self.settings, self.progress
        progress.start_phase("encode", len(plan.batches))
        vae = self._vae("encode", plan, geometry)
        latents = []
        for index, batch in enumerate(plan.batches):
            progress.check_interrupt()
            if not parallel.owns(index):
                latents.append(None)
                progress.advance()
                continue
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

    def _upscale_phase(self, conds: list[torch.Tensor | None], plan: BatchPlan,
                       parallel: clip_parallel.ClipParallel) -> list[torch.Tensor | None]:
        settings, progress = self.settings, self.progress
        progress.start_phase("upscale", len(conds))
        if self.vae is not None:
            self.vae.park()
        dit = self._dit()
        positive, negative = text_embeddings(dit.device, dit.dtype, getattr(dit.model, "file_conditioning", None),
                                             Path(str(dit.info.get("path", "the DiT file"))).name)
        model = dit.model
        if parallel.mode == "windows":
            from ..distributed.window_parallel import WindowParallelDiT
            model = WindowParallelDiT(model)
        model_fn = dit_velocity(model, positive, negative)
        backend = self.dit_spec.attention_mode if self.dit_spec.enable_optimizations else matrix_ops.PLAIN
        results = []
        chunks = None if self.memory is None else self.memory.dit_chunk_rows
        with matrix_ops.attention_backend(backend), fused_kernels.fused(self.dit_spec.enable_optimizations), \
                dit_chunking.token_chunks(chunks):
            for index, cond in enumerate(conds):
                progress.check_interrupt()
                if not parallel.restores(index):
                    results.append(None)
                    progress.advance()
                    continue
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

    def _decode_phase(self, latents: list[torch.Tensor | None], extended: torch.Tensor, plan: BatchPlan,
                      geometry: ClipGeometry, out: torch.Tensor | None,
                      parallel: clip_parallel.ClipParallel) -> None:
        """Decode this process's batches; rank 0 (``out``) writes them all, in order, cross-fading overlaps."""
        settings, progress = self.settings, self.progress
        progress.start_phase("decode", len(latents))
        if self.dit is not None:
            self.dit.park()
        vae = self._vae("decode", plan, geometry)
        for index, (batch, latent) in enumerate(zip(plan.batches, latents)):
            progress.check_interrupt()
            if not parallel.owns(index):
                if out is not None:   # decoded by another process, written here in clip order
                    frames = parallel.receive_frames(parallel.owner(index), clip_parallel.communication_device())
                    _write_batch(out, frames, batch, plan.prepend_frames)
                progress.advance()
                continue
            latent = latent.to(vae.device)
            decoded = self._with_oom_retry("decode", lambda tiling: decode_latent(vae.model, latent, tiling),
                                           self._tiling("decode"), batch.padded_length)
            latents[index] = None
            with progress.section("postprocess"), timing.accumulate("postprocess"):
                frames = crop(decoded[: batch.length], geometry.height, geometry.width).float()
                del decoded
                style = to_model_range(self._batch_pixels(extended, batch, geometry, vae.device))
                frames = color_correct(frames, style, settings.color_correction)
                self._draw_tile_debug(frames, geometry)
                frames = from_model_range(frames.clamp_(-1, 1)).permute(0, 2, 3, 1)
                if out is None:
                    parallel.send_frames(frames, clip_parallel.communication_device())
                else:
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
        if self.memory is not None:
            bands = (self.memory.encode if direction == "encode" else self.memory.decode).bands
            return VAETiling(bands=bands)
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
        # Exact bands of that size, their activations in host memory on a GPU: less memory than the same
        # bands kept on the GPU, the same output.
        resident = 0 if model.device.type == "cuda" else None
        return [VAETiling(size, min(tiling.tile_overlap, size // 4) // 8 * 8,
                          bands=BandPlan.from_tile_size(size, resident_bytes=resident)) for size in sizes]

    def _draw_tile_debug(self, frames: torch.Tensor, geometry: ClipGeometry) -> None:
        """Outline the VAE tiles of the direction the loader's ``tile_debug`` names, if it is tiled."""
        direction = self.vae_spec.tile_debug
        tiling = self._tiling(direction) if direction in ("encode", "decode") else VAETiling()
        if tiling.bands is not None:
            draw_tiles(frames, band_boxes(geometry.padded, tiling.bands), direction)
        elif tiling.tile_size is not None:
            draw_tiles(frames, tile_boxes(geometry.padded, tiling.tile_size, tiling.tile_overlap), direction)

    def _plan_memory(self, geometry: ClipGeometry, plan: BatchPlan) -> None:
        """Plan the run for the VRAM budget (``vram_budget``, or what the GPU has free): VAE bands, DiT token
        chunks, BlockSwap, the DiT's offloading; log the plan and its predicted peaks.  Only on a GPU, or
        where a budget is given."""
        settings, spec = self.settings, self.vae_spec
        device = torch.device(resolve_device(spec.device))
        if device.type != "cuda" and not settings.vram_budget:
            return
        if self.vae is None:
            self.vae = self.manager.vae(spec)
            _optimize(self.vae, spec)
        model = self.vae.model
        runtime = getattr(model, "runtime", None)
        height, width = geometry.padded
        frames = max(batch.padded_length for batch in plan.batches)
        if settings.vram_budget:
            budget = int(settings.vram_budget * memory_plan.GIB)
        else:
            budget = memory_plan.default_budget(device) + self._resident_bytes(device)
        untiled = None
        if runtime is not None:
            untiled = {direction: vae_optimizer.estimate_peak_bytes(
                model.config, direction, height, width, frames=frames, dtype=model.dtype,
                piece_bytes=runtime.piece_bytes, fused_norm=runtime.compile_norm) for direction in ("encode", "decode")}
        user = {"encode": spec.encode_tile_size ** 2 if spec.encode_tiled else None,
                "decode": spec.decode_tile_size ** 2 if spec.decode_tiled else None}
        dit_config, dit_bytes = self._dit_facts()
        try:
            self.memory = memory_plan.plan_memory(
                budget, vae_config=model.config, vae_dtype=model.dtype, vae_weight_bytes=_parameter_bytes(model),
                height=height, width=width, frames=frames, untiled_peaks=untiled,
                channels_last=runtime is not None and runtime.channels_last, user_bands=user,
                dit_config=dit_config, dit_dtype=compute_dtype(device), dit_weight_bytes=dit_bytes,
                dit_blocks=0 if dit_config is None else dit_config.num_layers, text_tokens=memory_plan.TEXT_TOKENS,
                user_blocks_to_swap=self.dit_spec.blocks_to_swap)
        except memory_plan.BudgetError as exc:
            raise UpscaleError(f"{exc} Your workflow is unchanged.") from exc
        log.info(self.memory.summary())
        if self.dit is None:
            self.dit_spec = memory_plan.with_swap(self.dit_spec, self.memory)

    def _resident_bytes(self, device: torch.device) -> int:
        """Bytes our own models hold on ``device`` now (they are part of what the run may use)."""
        return sum(_parameter_bytes(managed.model) for managed in (self.dit, self.vae)
                   if managed is not None and managed.patcher is None and managed.resident_on(device))

    def _dit_facts(self):
        """(config, weight bytes) of the DiT, read from its file's header when it is not loaded yet; (None, 0)
        when unknown (the plan then covers the VAE only)."""
        if self.dit is not None:
            return self.dit.model.config, _parameter_bytes(self.dit.model)
        try:
            return self.manager.dit_facts(self.dit_spec)
        except Exception as exc:  # a file the loader will report on properly; plan without the DiT
            log.debug("SeedVR2: memory plan without the DiT (%s)", exc)
            return None, 0

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
    with timing.accumulate("host_copy"):
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


def _parameter_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


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

    with timing.span(f"optimize_{managed.kind}", sync=managed.device):
        apply.optimize_model(managed, spec)
    managed.info["optimized"] = True


__all__ = ["UpscaleError", "upscale", "upscale_stream"]
