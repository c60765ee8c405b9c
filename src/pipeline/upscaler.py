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
import os
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator

import torch

from ..distributed import clip_parallel
from ..models.video_vae_v3.banded import BandPlan
from ..optimization import apply, stable_memory, vae_optimizer
from ..optimization.switches import env_switch
from . import memory_plan, timing
from .batching import Batch, blend_overlap, pad_temporal, padded_length, plan_batches, prepend_mirrored
from .color_correction import color_correct
from .devices import resolve_device
from .finite import NonFiniteError, check_batch, input_scale
from .frames import crop, from_model_range, pad_to_multiple, resize_frames, target_size, to_model_range
from .model_manager import ManagedModel, ModelManager, compute_dtype, default_manager, dit_working_bytes
from ..progress import Progress, checkpoint, reporting
from .restoration import (
    RandomDraws, VAETiling, condition_latent, decode_latent, dit_velocity, draw_randoms, encode_posterior,
    restore_latent,
)
from .settings import SEED_LIMIT, DiTSpec, SettingsError, UpscaleSettings, VAESpec
from .text_embeddings import text_embeddings
from .tile_debug import band_boxes, draw_tiles, tile_boxes

log = logging.getLogger("seedvr2")

SPATIAL_FACTOR, TEMPORAL_FACTOR, GRID = 8, 4, 16
OOM_TILE_SIZES = (512, 256)  # VAE tile sizes tried, in order, when a batch does not fit untiled
MEMORY_PRESSURE_TO_CLEAR = 0.75  # used fraction of device or host memory above which phases clear caches
PREFETCH_DIT_ENV = "SEEDVR2_PREFETCH_DIT"  # 0: load the DiT after the encode (see _Runner._prefetch_dit)
PREFETCH_MARGIN_BYTES = 2 << 30


class UpscaleError(RuntimeError):
    """The run could not finish; the message says why and what to change."""


# A GPU's allocator raises torch.OutOfMemoryError, the CPU's a RuntimeError naming the failed allocation.
OUT_OF_MEMORY = (torch.OutOfMemoryError, RuntimeError)
HOST_MEMORY_SHARE = 0.9   # of the available host RAM that a run may plan to fill


def _reraise_unless_out_of_memory(exc: BaseException) -> None:
    if isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc):
        return
    raise exc


def host_bytes_needed(frames: int, geometry: "ClipGeometry", channels: int, batch_frames: int,
                      settings: UpscaleSettings, vae_device: str) -> int:
    """Host RAM a run of ``frames`` output frames needs beyond the models: the float32 output (where the
    offload device keeps it on the host) and, when the VAE runs on the CPU, a batch's frames three times
    (resized input, decoded, colour-corrected)."""
    needed = 0
    if _storage_device(settings.offload_device).type == "cpu":
        needed += frames * geometry.height * geometry.width * channels * 4
    if torch.device(resolve_device(vae_device)).type == "cpu":
        height, width = geometry.padded
        needed += 3 * batch_frames * height * width * 3 * 4
    return needed


CHUNK_MEMORY_CAP = 4 << 30  # host RAM for the command line's frame buffers, at most (see auto_chunk_frames)
CHUNK_MEMORY_SHARE = 0.25  # of the available host RAM, below that cap


def chunk_memory_budget() -> int:
    """Host RAM the command line's default chunk may fill: ``SEEDVR2_CHUNK_MEMORY_MB`` if set, else a quarter
    of the available RAM, at most 4 GiB (at least 256 MiB)."""
    override = os.environ.get("SEEDVR2_CHUNK_MEMORY_MB", "").strip()
    if override:
        try:
            megabytes = float(override)
        except ValueError:
            raise SettingsError(f"SEEDVR2_CHUNK_MEMORY_MB must be a number of megabytes, got {override!r}.") from None
        if megabytes <= 0:
            raise SettingsError(f"SEEDVR2_CHUNK_MEMORY_MB must be positive, got {override!r}.")
        return int(megabytes * 2**20)
    memory = stable_memory.host_memory()
    available = memory[0] if memory is not None else CHUNK_MEMORY_CAP * 4
    return int(min(CHUNK_MEMORY_CAP, max(256 << 20, available * CHUNK_MEMORY_SHARE)))


def stream_frame_bytes(in_height: int, in_width: int, channels: int, settings: UpscaleSettings) -> int:
    """Host bytes per frame of a chunk: its float32 output, its float32 input (the source of the batches
    still to run) and the reader's uint8 frames.  The writers convert to uint8 frame by frame, so writing adds
    no chunk-sized buffer."""
    out_h, out_w = target_size(in_height, in_width, settings.resolution, settings.max_resolution)
    return out_h * out_w * channels * 4 + in_height * in_width * channels * (4 + 1)


def auto_chunk_frames(in_height: int, in_width: int, channels: int, settings: UpscaleSettings,
                      budget: int | None = None) -> int:
    """Frames per chunk for the command line's default: as many as fit ``budget`` bytes of host RAM
    (:func:`chunk_memory_budget`), a whole number of batch steps, at least one batch.

    What a stream holds at once is then about ``budget`` plus ``batch_size + temporal_overlap`` frames,
    whatever the clip's length (frames are yielded as soon as they are final).
    """
    budget = chunk_memory_budget() if budget is None else budget
    per_frame = stream_frame_bytes(in_height, in_width, channels, settings)
    step = settings.batch_size - settings.temporal_overlap
    frames = budget // per_frame
    return max(settings.batch_size, frames // step * step)


def check_host_memory(needed: int, what: str) -> None:
    """Refuse, before any model is loaded, a run whose buffers cannot fit the available host RAM (a huge
    resolution otherwise fails later with a raw allocator error, or is killed by the OS)."""
    memory = stable_memory.host_memory()
    if memory is None or needed <= memory[0] * HOST_MEMORY_SHARE:
        return
    raise SettingsError(
        f"{what} needs about {needed / 2**30:.1f} GB of host RAM, and {memory[0] / 2**30:.1f} GB are available. "
        f"Lower resolution (or set max_resolution), upscale fewer frames per run (the command line streams long "
        f"videos in chunks), or free memory."
    )


@dataclass(frozen=True)
class ClipGeometry:
    """Sizes of one run: the output frame size and the padded size the models see."""

    height: int
    width: int

    @property
    def padded(self) -> tuple[int, int]:
        return (-(-self.height // GRID) * GRID, -(-self.width // GRID) * GRID)


def check_images(images: torch.Tensor, scale: float | None = None) -> float:
    """Check the frames' shape and values; returns the divisor that brings them to [0, 1] (see
    :func:`finite.input_scale`: NaN/Inf refused, 0..255 frames converted)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (3, 4):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise SettingsError(f"frames must be a (frames, height, width, 3 or 4) tensor, got {shape}.")
    if images.shape[0] == 0:
        raise SettingsError("there are no frames to upscale (the input batch is empty).")
    return input_scale(images, scale)


def upscale(images: torch.Tensor, dit: DiTSpec, vae: VAESpec, settings: UpscaleSettings, *,
            progress: Progress | None = None, manager: ModelManager | None = None) -> torch.Tensor:
    """Upscale ``images`` (N, H, W, C) in [0, 1] (C = 3 or 4); returns (N, H', W', C) float32 in [0, 1].

    The result is the buffer the batches were written into: no copy of the output is ever made, so host
    memory stays at the output's size plus one batch.
    """
    settings.validate()
    scale = check_images(images)
    frames, height, width, channels = images.shape
    geometry = ClipGeometry(*target_size(height, width, settings.resolution, settings.max_resolution))
    check_host_memory(host_bytes_needed(frames, geometry, channels, padded_length(min(settings.batch_size, frames)),
                                        settings, vae.device),
                      f"the output of {frames} frame(s) at {geometry.width}x{geometry.height}")
    runner = _Runner(dit, vae, settings, progress or Progress(), manager or default_manager())
    runner.input_scale = scale
    try:
        return runner.run_clip(images, prepend=settings.prepend_frames)
    finally:
        runner.close()


def upscale_stream(chunks: Iterable[torch.Tensor], dit: DiTSpec, vae: VAESpec, settings: UpscaleSettings, *,
                   progress: Progress | None = None, manager: ModelManager | None = None) -> Iterator[torch.Tensor]:
    """Upscale a clip that arrives in chunks, yielding finished frames as soon as they are final.

    The result is the whole-clip result, frame by frame: the clip is cut into exactly the batches
    :func:`upscale` would use (batch k covers frames ``[k·step, k·step + batch_size)`` of the clip with its
    prepended frames, ``step = batch_size − temporal_overlap``; the last one ends with the clip) and they
    are blended in the same order.  Chunks only decide which batches go through the encode → DiT → decode
    phases together: every batch whose frames have all arrived.  Host memory holds the frames of the
    batches still to run, the ``temporal_overlap`` frames of output waiting for the next batch's blend,
    and one chunk's output, as long as the caller drops each yielded tensor before asking for the next.
    Every frame read is yielded exactly once (checked).
    """
    settings.validate()
    progress = progress or Progress()
    manager = manager or default_manager()
    runner = _Runner(dit, vae, settings, progress, manager)
    stream = _BatchStream(runner, settings)
    written = 0
    try:
        for out in stream.run(chunks):
            written += out.shape[0]
            yield out
            del out  # a consumer that drops each result holds one chunk's output at a time
    finally:
        runner.close()
    if written != stream.received and runner.parallel.writes_output:
        raise UpscaleError(f"internal error: {stream.received} frame(s) were read but {written} written; "
                           f"please report this with your batch_size, temporal_overlap and chunk size.")


class _BatchStream:
    """The whole-clip batch plan, run as its frames arrive.

    Indices are those of the *extended* clip (``prepend_frames`` mirrored frames, then the clip).
    ``source`` holds the extended frames from ``base`` on (the frames of the batches still to run);
    ``tail`` the output frames ``[emitted, emitted + len(tail))`` that a later batch still blends into.
    """

    def __init__(self, runner: "_Runner", settings: UpscaleSettings):
        self.runner, self.settings = runner, settings
        self.prepend = settings.prepend_frames
        self.step = settings.batch_size - settings.temporal_overlap
        self.received = 0                        # clip frames read
        self.head: list[torch.Tensor] = []       # frames kept until the prepended ones can be mirrored
        self.source: torch.Tensor | None = None
        self.base = 0
        self.next_batch = 0
        self.emitted = self.prepend              # extended index of the next frame to yield
        self.tail: torch.Tensor | None = None
        self.geometry: ClipGeometry | None = None
        self.frame_shape: tuple[int, ...] | None = None

    def run(self, chunks: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Feed every chunk, then finish.  A chunk is only referenced by the source once added (no second
        copy of a chunk's input while its batches run)."""
        for chunk in chunks:
            ready = self.add(chunk)
            del chunk
            if ready:
                yield from self._run(ready, final=False)
        yield from self.finish()

    def feed(self, chunk: torch.Tensor) -> Iterator[torch.Tensor]:
        """Add a chunk and run the batches it completes."""
        ready = self.add(chunk)
        if ready:
            yield from self._run(ready, final=False)

    def add(self, chunk: torch.Tensor) -> tuple[Batch, ...]:
        """Take a chunk's frames; returns the batches whose frames have now all arrived."""
        self.runner.input_scale = check_images(chunk, None if self.frame_shape is None else self.runner.input_scale)
        if self.frame_shape is None:
            self.frame_shape = tuple(chunk.shape[1:])
            height, width = target_size(chunk.shape[1], chunk.shape[2], self.settings.resolution,
                                        self.settings.max_resolution)
            self.geometry = ClipGeometry(height, width)
            # Held at once: a chunk's output, the overlap carried to the next and a batch's frames.
            held = chunk.shape[0] + self.settings.batch_size + self.settings.temporal_overlap
            check_host_memory(host_bytes_needed(held, self.geometry, chunk.shape[-1],
                                                padded_length(self.settings.batch_size), self.settings,
                                                self.runner.vae_spec.device),
                              f"a chunk of {chunk.shape[0]} frame(s) at {width}x{height}")
        elif tuple(chunk.shape[1:]) != self.frame_shape:
            raise SettingsError(f"frame {self.received} is {tuple(chunk.shape[1:])} (height, width, channels), "
                                f"unlike the first frames {self.frame_shape}: every frame must have one size.")
        self.received += chunk.shape[0]
        if self.source is None:
            self.head.append(chunk)
            if self.received <= self.prepend:
                return ()  # the mirrored frames need frames 1 … prepend_frames
            self._start(torch.cat(self.head))
        else:
            self.source = torch.cat([self.source, chunk])
        total = self.base + self.source.shape[0]
        first = self.next_batch
        while self.next_batch * self.step + self.settings.batch_size <= total:  # full batches: in every plan
            self.next_batch += 1
        if self.next_batch == first:
            return ()
        plan = plan_batches(total - self.prepend, self.settings.batch_size, self.settings.temporal_overlap,
                            self.settings.uniform_batch_size, self.prepend)
        return plan.batches[first:self.next_batch]

    def finish(self) -> Iterator[torch.Tensor]:
        """The end of the clip: the batches left (the last one ends with the clip), then the held frames."""
        if self.received == 0:
            raise SettingsError("there are no frames to upscale (the input is empty).")
        if self.source is None:
            self._start(torch.cat(self.head))  # a clip shorter than prepend_frames + 1
        plan = plan_batches(self.received, self.settings.batch_size, self.settings.temporal_overlap,
                            self.settings.uniform_batch_size, self.prepend)
        rest = plan.batches[self.next_batch:]
        self.next_batch = len(plan.batches)
        if rest:
            yield from self._run(rest, final=True)
        elif self.tail is not None and self.tail.shape[0]:
            yield from self._emit(self.tail, self.emitted)
        self.tail = None

    def _start(self, frames: torch.Tensor) -> None:
        self.head = []
        self.source = prepend_mirrored(frames, self.prepend) if self.prepend else frames

    def _run(self, batches: tuple[Batch, ...], final: bool) -> Iterator[torch.Tensor]:
        start, stop = self.emitted, batches[-1].stop
        out, held = None, 0
        if self.runner.parallel.writes_output:   # other processes of a parallel run send their frames here
            out = torch.empty((max(stop - start, 0), self.geometry.height, self.geometry.width,
                               self.frame_shape[-1]), dtype=torch.float32,
                              device=_storage_device(self.settings.offload_device))
            held = 0 if self.tail is None else self.tail.shape[0]
            if held:
                out[:held] = self.tail
        for written in self.runner.run_batches(self.source, self.base, batches, self.geometry, out, start, held):
            # Frames before the next batch's start are final as soon as this batch is written: the writer
            # encodes them while the later batches decode.
            # (RGBA waits for the end: its alpha phase must not run inside the decode phase.)
            if out is not None and written + 1 < len(batches) and self.frame_shape[-1] != 4:
                ready = min(batches[written + 1].start, stop)
                if ready > self.emitted:
                    yield from self._emit(out[self.emitted - start:ready - start], self.emitted)
        # Frames before the next batch's start are final; with the clip's end, all of them.
        done = stop if final else max(min(batches[-1].start + self.step, stop), start)
        if out is None:
            self.emitted = done
        else:
            self.tail = out[done - start:].clone() if done < stop else None
            if done > self.emitted:
                yield from self._emit(out[self.emitted - start:done - start], self.emitted)
        # Keep the source frames of the batches still to come.
        keep_from = self.next_batch * self.step
        if keep_from > self.base:
            self.source = self.source[keep_from - self.base:].clone()
            self.base = keep_from

    def _emit(self, frames: torch.Tensor, start: int) -> Iterator[torch.Tensor]:
        if frames.shape[0] == 0:
            return
        if self.frame_shape[-1] == 4:
            alpha = self.source[start - self.base:start - self.base + frames.shape[0], ..., 3:]
            self.runner.alpha_phase(alpha, frames)
        self.emitted = start + frames.shape[0]
        yield frames


class _Runner:
    """Holds the models and settings of one run (one or more chunks)."""

    def __init__(self, dit: DiTSpec, vae: VAESpec, settings: UpscaleSettings, progress: Progress,
                 manager: ModelManager):
        self.dit_spec, self.vae_spec, self.settings = dit, vae, settings
        self.progress, self.manager = progress, manager
        self.dit: ManagedModel | None = None
        self.vae: ManagedModel | None = None
        self._random_draws: dict[tuple[int, int, int], RandomDraws] = {}
        self.input_scale = 1.0   # 255 for frames given in 0..255 (see check_images)
        self._base = 0           # extended index of the current source's first frame (for messages)
        self.parallel = clip_parallel.current(settings.parallel)
        self.memory: memory_plan.MemoryPlan | None = None  # the VRAM planner's choices for this clip
        self._dit_loading: Future | None = None  # the DiT loading on a side thread while the VAE encodes

    # ----------------------------------------------------------------------------------------- models
    def _vae(self, direction: str, batches: tuple[Batch, ...], geometry: ClipGeometry) -> ManagedModel:
        """The VAE on its device, with room made for the phase's activations (other models may move out)."""
        if self.vae is None:
            self.vae = self.manager.vae(self.vae_spec)
            _optimize(self.vae, self.vae_spec)
        frames = max(batch.padded_length for batch in batches)
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
        runtime = vae_optimizer.runtime_of(model)
        if runtime is None:
            return 0
        height, width = geometry.padded
        return vae_optimizer.estimate_peak_bytes(model.config, direction, height, width, frames=frames,
                                                 dtype=model.dtype, piece_bytes=runtime.piece_bytes,
                                                 fused_norm=runtime.compile_norm)

    def _dit(self, latent_shapes: list[tuple[int, int, int]] = ()) -> ManagedModel:
        """The DiT on its device, with room made for the activations of the largest of ``latent_shapes``."""
        if self.dit is None:
            loading, self._dit_loading = self._dit_loading, None
            with timing.span("wait_dit_load"):
                self.dit = loading.result() if loading is not None else self.manager.dit(self.dit_spec)
            _optimize(self.dit, self.dit_spec)
        config = getattr(self.dit.model, "config", None)
        required = dit_working_bytes(config, latent_shapes, self.dit.dtype) if config and latent_shapes else 0
        self.dit.activate(memory_required=required)
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
        out = None
        if self.parallel.writes_output:   # the other processes of a parallel run send their frames to rank 0
            out = torch.empty((num_frames, height, width, channels), dtype=torch.float32,
                              device=_storage_device(settings.offload_device))
        if settings.enable_debug:
            log.info("SeedVR2: %d frame(s) %dx%d -> %dx%d in %d batch(es) of up to %d", num_frames, in_w, in_h,
                     width, height, len(plan.batches), settings.batch_size)
        for _ in self.run_batches(extended, 0, plan.batches, geometry, out, plan.prepend_frames):
            pass
        if channels == 4 and out is not None:
            self.alpha_phase(frames[..., 3:], out)
        return out

    def run_batches(self, source: torch.Tensor, base: int, batches: tuple[Batch, ...], geometry: ClipGeometry,
                    out: torch.Tensor | None, out_start: int, held: int = 0) -> Iterator[int]:
        """Encode, restore and decode ``batches`` (extended-clip indices), writing into ``out``; yields the
        index (in ``batches``) of each batch as soon as it is written.

        ``source`` holds the extended clip's frames from index ``base`` on, ``out`` its output frames from
        ``out_start`` on (batch frames before ``out_start`` are dropped: prepended frames); its first ``held``
        frames already hold the earlier batches' results that these batches blend with.  ``out`` is None on
        the processes of a parallel run other than rank 0, which send their batches' frames there.
        """
        if self.memory is None:
            self._plan_memory(geometry, batches)
        if base:
            batches = tuple(replace(batch, start=batch.start - base, stop=batch.stop - base) for batch in batches)
        self._base = base
        source = source[..., :3]
        parallel = self.parallel.resolve(len(batches))
        # Maps the result's pages while the GPU encodes.
        prefault = stable_memory.HostPrefault(out[held:]) if out is not None else None
        # The inner loops (VAE chunks, pieces and bands, DiT blocks) report to this run's progress.
        try:
            with reporting(self.progress):
                with self._phase("encode", self.vae_spec):
                    latents = self._encode_phase(source, batches, geometry, parallel)
                if parallel.mode == "windows":
                    latents = parallel.share_latents(latents, clip_parallel.communication_device())
                with self._phase("upscale", self.dit_spec):
                    latents = self._upscale_phase(latents, batches, parallel)
                if prefault is not None:
                    prefault.wait()
                with self._phase("decode", self.vae_spec):
                    yield from self._decode_phase(latents, source, batches, geometry, out, out_start - base,
                                                  parallel)
        finally:
            if prefault is not None:
                prefault.wait()  # an interrupted run leaves no thread behind

    def alpha_phase(self, alpha: torch.Tensor, out: torch.Tensor) -> None:
        with reporting(self.progress), self._phase("postprocess", self.vae_spec):
            self._alpha_phase(alpha, out)

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
        """The batch's frames resized to the output size, (n, 3, H', W') in [0, 1], on ``device``.

        Computed twice per batch on purpose: in the encode phase as the VAE's input, and in the decode phase
        as the colour correction's reference.  All batches of a run are encoded before any is decoded, so
        keeping the first result would hold every batch's output-size pixels (as much memory as the output)
        through the DiT phase; resizing the same frames again on the same device gives the same pixels.
        """
        frames = extended[batch.start:batch.stop].to(device, non_blocking=True).permute(0, 3, 1, 2).float()
        if self.input_scale != 1.0:
            frames = frames / self.input_scale
        return resize_frames(frames, (geometry.height, geometry.width))

    def _check(self, tensor: torch.Tensor, phase: str, batch: Batch) -> None:
        """Stop before a NaN/Inf batch result spreads into the output (see :mod:`finite`)."""
        first = max(batch.start + self._base - self.settings.prepend_frames, 0)
        check_batch(tensor, phase, first, batch.length)

    def _encode_phase(self, extended: torch.Tensor, batches: tuple[Batch, ...], geometry: ClipGeometry,
                      parallel: clip_parallel.ClipParallel) -> list[torch.Tensor | None]:
        """Condition latents of the batches this process encodes (None for the others')."""
        settings, progress = self.settings, self.progress
        progress.start_phase("encode", len(batches))
        vae = self._vae("encode", batches, geometry)
        latents = []
        for index, batch in enumerate(batches):
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
            self._check(cond, "VAE encode", batch)
            latents.append(cond.to(self._latent_store(vae.device)))
            del video, pixels
            progress.advance()
        return latents

    def _upscale_phase(self, conds: list[torch.Tensor | None], batches: tuple[Batch, ...],
                       parallel: clip_parallel.ClipParallel) -> list[torch.Tensor | None]:
        settings, progress = self.settings, self.progress
        progress.start_phase("upscale", len(conds))
        if self.vae is not None:
            self.vae.park()
        dit = self._dit([tuple(cond.shape[:3]) for cond in conds if cond is not None])
        positive, negative = text_embeddings(dit.device, dit.dtype, getattr(dit.model, "file_conditioning", None),
                                             Path(str(dit.info.get("path", "the DiT file"))).name)
        model = dit.model
        apply.configure_dit(model, self.dit_spec, None if self.memory is None else self.memory.dit_chunk_rows)
        if parallel.mode == "windows":
            from ..distributed.window_parallel import WindowParallelDiT
            model = WindowParallelDiT(model)
        model_fn = dit_velocity(model, positive, negative)
        results = []
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
            except OUT_OF_MEMORY as exc:
                _reraise_unless_out_of_memory(exc)
                raise UpscaleError(_oom_advice("upscale (DiT)", self.dit_spec)) from exc
            self._check(x0, "DiT upscale", batches[index])
            results.append(x0.to(self._latent_store(dit.device)))
            conds[index] = None  # free the condition as soon as it is used
            progress.advance()
        return results

    def _decode_phase(self, latents: list[torch.Tensor | None], extended: torch.Tensor, batches: tuple[Batch, ...],
                      geometry: ClipGeometry, out: torch.Tensor | None, out_start: int,
                      parallel: clip_parallel.ClipParallel) -> Iterator[int]:
        """Decode this process's batches; rank 0 (``out``) writes them all, in order, cross-fading overlaps,
        and yields each batch's index once it is written."""
        settings, progress = self.settings, self.progress
        progress.start_phase("decode", len(latents))
        if self.dit is not None:
            self.dit.park()
        vae = self._vae("decode", batches, geometry)
        for index, (batch, latent) in enumerate(zip(batches, latents)):
            progress.check_interrupt()
            if not parallel.owns(index):
                if out is not None:   # decoded by another process, written here in clip order
                    frames = parallel.receive_frames(parallel.owner(index), clip_parallel.communication_device())
                    _write_batch(out, frames, batch, out_start)
                progress.advance()
                if out is not None:
                    yield index
                continue
            latent = latent.to(vae.device)
            decoded = self._with_oom_retry("decode", lambda tiling: decode_latent(vae.model, latent, tiling),
                                           self._tiling("decode"), batch.padded_length)
            latents[index] = None
            with progress.section("postprocess"), timing.accumulate("postprocess"):
                checkpoint(1.0)
                frames = crop(decoded[: batch.length], geometry.height, geometry.width).float()
                del decoded
                style = to_model_range(self._batch_pixels(extended, batch, geometry, vae.device))
                frames = color_correct(frames, style, settings.color_correction)
                self._check(frames, "VAE decode and colour correction", batch)
                self._draw_tile_debug(frames, geometry)
                frames = from_model_range(frames.clamp_(-1, 1)).permute(0, 2, 3, 1)
                checkpoint(1.0)
                if out is None:
                    parallel.send_frames(frames, clip_parallel.communication_device())
                else:
                    _write_batch(out, frames, batch, out_start)
            progress.advance()
            if out is not None:
                yield index

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
            source = alpha[start:stop].to(device).permute(0, 3, 1, 2).float() / self.input_scale
            refined = upscale_alpha(source, guide, tuple(guide.shape[-2:]))
            out[start:stop, ..., 3:] = refined.permute(0, 2, 3, 1).to(out.device)
            progress.advance()

    # ----------------------------------------------------------------------------------------- helpers
    def _draws(self, latent_shape: tuple[int, int, int]) -> RandomDraws:
        """The random draws of a batch with this latent shape, on the CPU.  Every batch is seeded alike, so
        batches of one shape share them: drawn once per run (a noticeable CPU cost at 1080p), while the
        first batch's encode runs on the GPU, instead of once per batch and phase with the GPU waiting."""
        if latent_shape not in self._random_draws:
            self._random_draws[latent_shape] = draw_randoms(self.settings.seed, latent_shape, "cpu")
        return self._random_draws[latent_shape]

    def _tiling(self, direction: str) -> VAETiling:
        spec = self.vae_spec
        if self.memory is not None:
            bands = (self.memory.encode if direction == "encode" else self.memory.decode).bands
            return VAETiling(bands=bands)
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
        except OUT_OF_MEMORY as exc:
            _reraise_unless_out_of_memory(exc)
            _release_cached_memory()
        for attempt in self._retry_tilings(what, tiling, frames):
            log.warning("SeedVR2: out of memory during VAE %s with tile size %s; retrying with %d px tiles.",
                        what, tiling.tile_size or "none", attempt.tile_size)
            try:
                return run(attempt)
            except OUT_OF_MEMORY as exc:
                _reraise_unless_out_of_memory(exc)
                _release_cached_memory()
            tiling = attempt
        raise UpscaleError(_oom_advice(f"VAE {what}", self.vae_spec))

    def _retry_tilings(self, what: str, tiling: VAETiling, frames: int) -> list[VAETiling]:
        """Smaller tilings to try after an out-of-memory error, largest first."""
        sizes = list(OOM_TILE_SIZES)
        model = self.vae.model
        runtime = vae_optimizer.runtime_of(model)
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

    def _plan_memory(self, geometry: ClipGeometry, batches: tuple[Batch, ...]) -> None:
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
        runtime = vae_optimizer.runtime_of(model)
        height, width = geometry.padded
        frames = max(batch.padded_length for batch in batches)
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

    ``out[0]`` is extended frame ``prepend``: the prepended frames, or in a stream the frames already
    yielded; batch frames before it are dropped.

    The frames are made contiguous where they are (the GPU) so the transfer into the output is dense
    (staged through pinned memory when it crosses from a GPU to host memory); only the few overlapping
    frames are blended element by element.
    """
    frames = frames.contiguous()
    first = max(prepend - batch.start, 0)          # frames that fall into the prepended (dropped) part
    blended = max(batch.overlap - first, 0)
    start = batch.start + first - prepend
    if blended:
        blend_overlap(out[start:start + blended, ..., :3], frames[first:first + blended],
                      batch.blend_weights[first:first + blended])
    rest = frames[first + blended:]
    with timing.accumulate("host_copy"):
        stable_memory.copy_to_host(out[start + blended:start + blended + rest.shape[0], ..., :3], rest)


def _parameter_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def _input_noise(settings: UpscaleSettings, video: torch.Tensor) -> torch.Tensor:
    """Pixel noise of strength ``input_noise_scale`` (0.025·s standard deviation in [-1, 1] units)."""
    generator = torch.Generator("cpu").manual_seed((int(settings.seed) + 1) % SEED_LIMIT)  # 2^64 − 1 wraps to 0
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
    with timing.span(f"optimize_{managed.kind}", sync=managed.device):
        apply.optimize_model(managed, spec)
    managed.info["optimized"] = True


__all__ = ["NonFiniteError", "UpscaleError", "auto_chunk_frames", "upscale", "upscale_stream"]
