"""Reading and writing frames for the command line: video files (PyAV), images, folders, PNG sequences.

Frames travel as float32 tensors ``(N, H, W, C)`` in [0, 1], C = 3 (RGB) or 4 (RGBA), like ComfyUI's IMAGE.
Videos are read in chunks so that a long clip never has to sit in memory at once; outputs are written on a
background thread into a partial sibling that takes the final name only when complete.
"""
from __future__ import annotations

import logging
import os
import queue
import re
import secrets
import shutil
import signal
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".gif"}


class MediaError(ValueError):
    """An input cannot be read or an output cannot be written; the message says why."""


@dataclass(frozen=True)
class MediaInfo:
    """What the CLI needs to know about an input before processing it."""

    kind: str            # "video", "image" or "sequence"
    frames: int          # number of frames (0 if the container does not say; then counted while reading)
    fps: float
    width: int
    height: int
    has_alpha: bool


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).float().div_(255.0)


def _image_paths(folder: Path) -> list[Path]:
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise MediaError(f"{folder}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))}).")
    return paths


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            mode = "RGBA" if ("A" in img.getbands() or "transparency" in img.info) else "RGB"
            return np.asarray(img.convert(mode))
    except OSError as exc:
        raise MediaError(f"{path}: cannot read image ({exc}).") from exc


def probe(path: str | Path) -> MediaInfo:
    """Describe an input: a video file, an image file, or a folder of images (a sequence)."""
    path = Path(path)
    if not path.exists():
        raise MediaError(f"{path}: no such file or folder.")
    if path.is_dir():
        paths = _image_paths(path)
        first = _read_image(paths[0])
        return MediaInfo("sequence", len(paths), 0.0, first.shape[1], first.shape[0], first.shape[2] == 4)
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        img = _read_image(path)
        return MediaInfo("image", 1, 0.0, img.shape[1], img.shape[0], img.shape[2] == 4)
    if suffix in VIDEO_SUFFIXES:
        import av

        try:
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                fps = float(stream.average_rate or stream.guessed_rate or 24)
                return MediaInfo("video", int(stream.frames or 0), fps, stream.width, stream.height, False)
        except (av.error.FFmpegError, IndexError) as exc:
            raise MediaError(f"{path}: cannot open as a video ({exc}).") from exc
    raise MediaError(
        f"{path}: unsupported input type {suffix!r}; give a video ({', '.join(sorted(VIDEO_SUFFIXES))}), "
        f"an image, or a folder of images."
    )


def iter_chunks(path: str | Path, chunk: int, skip: int = 0, limit: int = 0) -> Iterator[torch.Tensor]:
    """Yield ``(n, H, W, C)`` float tensors of at most ``chunk`` frames (0 = everything at once).

    ``skip`` frames are dropped from the start and at most ``limit`` frames (0 = all) are read.
    """
    path = Path(path)
    info = probe(path)
    chunk = chunk if chunk > 0 else 1 << 62
    if info.kind == "video":
        frames = _iter_video_frames(path)
    elif info.kind == "image":
        frames = iter([_read_image(path)])
    else:
        frames = (_read_image(p) for p in _image_paths(path))
    buffer: list[np.ndarray] = []
    taken = 0
    for index, frame in enumerate(frames):
        if index < skip:
            continue
        if limit and taken >= limit:
            break
        if buffer and frame.shape != buffer[0].shape:
            raise MediaError(f"{path}: frame {index} has size {frame.shape}, unlike the first {buffer[0].shape}.")
        buffer.append(frame)
        taken += 1
        if len(buffer) == chunk:
            yield _to_tensor(np.stack(buffer))
            buffer = []
    if buffer:
        yield _to_tensor(np.stack(buffer))
    elif taken == 0:
        raise MediaError(f"{path}: no frames to process (skip={skip}, limit={limit}).")


def _iter_video_frames(path: Path) -> Iterator[np.ndarray]:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            yield frame.to_ndarray(format="rgb24")


# --------------------------------------------------------------------------------------------------- writing
# Writers never leave a complete-looking file under the final name: frames go to a hidden sibling marked
# ".partial-" (a file for an mp4 or an image, a folder for a PNG sequence) that is renamed into place only
# when everything was written; an interrupt or a failure removes it.  Encoding runs on a background thread
# fed through a short queue, so the pipeline computes the next chunk meanwhile.

FRAME_NAME = re.compile(r"\d{6}\.png")  # the names of a PNG sequence written here
# zlib level 1: 2.4x less CPU than Pillow's default 6 for files ~15 % larger on upscaled frames with grain
# (docs/performance.md, "Writing the output").
PNG_COMPRESS_LEVEL = 1
# Chunks the writer holds (being written or waiting); ``write`` waits while it holds this many.  With 1, host
# memory holds at most the chunk being written and the one being computed.
QUEUE_CHUNKS = 1
_BAND_ELEMENTS = 1 << 16   # floats converted at a time: the uint8 conversion's temporaries stay ~256 KB
_JOIN_TIMEOUT_S = 60.0     # how long an abort waits for the writer thread to finish its current frame
_CONTAINERS = {".mov": "mov", ".mkv": "matroska"}  # other suffixes get mp4
_DONE = object()

log = logging.getLogger("seedvr2")


def frame_to_uint8(frame: torch.Tensor, out: np.ndarray | None = None) -> np.ndarray:
    """One (H, W, C) frame in [0, 1] to uint8 levels ``round(255 * clip(x, 0, 1))``, round half to even.

    Converted in bands of rows through a small float buffer, so a frame costs its uint8 result and a few
    hundred KB, whatever its size; ``out`` (H, W, C) uint8 is filled when given.
    """
    frame = frame.detach()
    if frame.device.type != "cpu":
        frame = frame.to("cpu", torch.float32)  # one frame at a time
    height, width, channels = frame.shape
    if out is None:
        out = np.empty((height, width, channels), np.uint8)
    rows = max(1, min(height, _BAND_ELEMENTS // max(1, width * channels)))
    scratch = np.empty((rows, width, channels), np.float32)
    for top in range(0, height, rows):
        band = frame[top:top + rows]
        source = (band if band.dtype == torch.float32 else band.float()).numpy()
        work = scratch[: source.shape[0]]
        # x * 255 clipped to [0, 255] equals clip(x, 0, 1) * 255 in float32, and rint rounds half to even
        np.multiply(source, 255.0, out=work)
        np.clip(work, 0.0, 255.0, out=work)
        np.rint(work, out=work)
        out[top:top + source.shape[0]] = work
    return out


def _check_frames(frames: torch.Tensor) -> None:
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or frames.shape[-1] not in (3, 4):
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise MediaError(f"frames to write must be a (frames, height, width, 3 or 4) tensor, got {shape}.")


def _cause(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _check_target(final: Path, folder: bool) -> None:
    """Refuse a target that cannot be written or replaced without losing something."""
    if folder:
        if final.exists() and not final.is_dir():
            raise MediaError(f"{final}: exists and is not a folder; give a folder for PNG frames.")
        if final.is_dir():
            others = sorted(p.name for p in final.iterdir() if not FRAME_NAME.fullmatch(p.name))
            if others:
                shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
                raise MediaError(f"{final}: the output folder holds other files ({shown}); it would be replaced "
                                 f"by the PNG frames. Choose a new or empty folder.")
    elif final.is_dir():
        raise MediaError(f"{final}: is a folder; give a file name for the output (or --output_format png for "
                         f"PNG frames in a folder).")


def check_output(target: str | Path, source: str | Path, folder: bool) -> Path:
    """Refuse, before any work, an output that is, contains or would replace the input; returns the
    output's resolved path.  ``folder``: the output is a folder of PNG frames."""
    final, src = Path(target).resolve(), Path(source).resolve()
    same = final == src or (final.exists() and src.exists() and os.path.samefile(final, src))
    if same:
        raise MediaError(f"{target}: the output is the input ({source}); it would be overwritten. "
                         f"Give another --output.")
    if folder and final in src.parents:
        raise MediaError(f"{target}: the output folder contains the input ({source}); it would be replaced. "
                         f"Give another --output.")
    _check_target(final, folder)
    return final


def _partial_sibling(final: Path, token: str) -> Path:
    """A hidden sibling that says it is incomplete; it keeps the suffix, so it still says what it holds."""
    return final.with_name(f".{final.stem}.partial-{token}{final.suffix}")


class _Writer:
    """What every writer shares: the partial sibling renamed into place on success, and the writer thread.

    ``write`` hands a chunk to the writer thread (it waits only while the writer holds ``QUEUE_CHUNKS``
    chunks) and re-raises, as a MediaError, anything that thread hit; the tensor must not be changed after it
    was handed over.  ``close`` finishes the file and renames it into place; ``abort`` (or leaving a
    ``with`` block through an exception) drops everything written.  Subclasses implement ``_start`` (create
    the partial output for the first chunk), ``_encode``, ``_finish`` (flush and close) and ``_discard``.
    """

    folder = False

    def __init__(self, path: str | Path, *, background: bool = True):
        self.path = Path(path)
        self.final = self.path.resolve()
        _check_target(self.final, self.folder)
        self.count = 0             # frames handed to the writer
        self.busy_seconds = 0.0    # time spent converting, encoding and writing (on the writer thread)
        self.wait_seconds = 0.0    # time callers waited for the writer (a full queue, close)
        self._token = f"{os.getpid()}-{secrets.token_hex(3)}"
        self._partial: Path | None = None
        self._background = background
        self._queue: queue.Queue = queue.Queue()
        self._slots = threading.Semaphore(QUEUE_CHUNKS)  # released when the writer is done with a chunk
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._state = "open"

    # ------------------------------------------------------------------------------------------ public
    def write(self, frames: torch.Tensor) -> None:
        if self._state != "open":
            raise MediaError(f"{self.final}: the output is already {self._state}.")
        self._raise_failure()
        _check_frames(frames)
        self.count += frames.shape[0]
        if not self._background:
            try:
                self._consume(frames)
            except Exception as exc:
                self._error = exc
                self._raise_failure()
            except BaseException:  # an interrupt stays an interrupt
                self.abort()
                raise
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="seedvr2-writer", daemon=True)
            self._thread.start()
        self._put(frames)

    def close(self) -> None:
        """Finish the output and rename it into place (MediaError naming the path and the cause if not)."""
        if self._state != "open":
            return
        try:
            if self._thread is not None:
                self._queue.put(_DONE)
                self._join()
            elif self._error is None and self._partial is not None:
                self._finish()
            self._raise_failure()
            if self._partial is None:
                raise MediaError(f"{self.final}: no frames were written.")
            self._commit()
        except BaseException as exc:
            self.abort()
            if isinstance(exc, (MediaError, KeyboardInterrupt, SystemExit)):
                raise
            raise self._as_media_error(exc) from exc
        self._state = "closed"

    def abort(self) -> None:
        """Drop the output: stop the writer thread and remove the partial file or folder."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._stop.set()
        if self._thread is not None:
            self._drain()
            self._queue.put_nowait(_DONE)
            self._thread.join(_JOIN_TIMEOUT_S)
            if self._thread.is_alive():
                log.warning("SeedVR2: the writer thread did not stop; %s is left behind (incomplete).",
                            self._partial)
                return
        try:
            self._discard()
        except Exception as exc:  # the cleanup of a failed write must not hide its cause
            log.warning("SeedVR2: could not remove the incomplete output %s (%s).", self._partial, _cause(exc))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

    # ------------------------------------------------------------------------------------------ thread
    def _put(self, frames: torch.Tensor) -> None:
        start = time.perf_counter()
        while not self._slots.acquire(timeout=0.1):  # short waits: an interrupt is handled meanwhile
            if self._error is not None or not self._thread.is_alive():
                self._raise_failure()
        self._queue.put(frames)
        self.wait_seconds += time.perf_counter() - start

    def _join(self) -> None:
        start = time.perf_counter()
        while self._thread.is_alive():  # short joins: an interrupt is handled while waiting
            self._thread.join(0.1)
        self.wait_seconds += time.perf_counter() - start

    def _drain(self) -> None:
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass

    def _work(self) -> None:
        try:
            while not self._stop.is_set():
                item = self._queue.get()
                if item is _DONE or self._stop.is_set():
                    break
                self._consume(item)
                del item
                self._slots.release()
            if not self._stop.is_set() and self._partial is not None:
                self._finish()
        except BaseException as exc:
            self._error = exc  # a caller waiting for a slot sees it
            self._drain()

    def _consume(self, frames: torch.Tensor) -> None:
        start = time.perf_counter()
        if self._partial is None:
            self._start(frames)
        self._encode(frames)
        self.busy_seconds += time.perf_counter() - start

    # ------------------------------------------------------------------------------------------ errors
    def _as_media_error(self, exc: BaseException) -> MediaError:
        if isinstance(exc, MediaError):
            return exc
        return MediaError(f"{self.final}: cannot write the output ({_cause(exc)}); nothing was written "
                          f"under that name.")

    def _raise_failure(self) -> None:
        if self._error is None:
            return
        exc = self._error
        self.abort()
        raise self._as_media_error(exc) from exc

    # ------------------------------------------------------------------------------------------ files
    def _commit(self) -> None:
        os.replace(self._partial, self.final)

    def _start(self, frames: torch.Tensor) -> None:
        raise NotImplementedError

    def _encode(self, frames: torch.Tensor) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def _discard(self) -> None:
        raise NotImplementedError


class VideoWriter(_Writer):
    """RGB frames to an H.264 file (yuv420p; odd sizes padded by one edge pixel), encoded on a background
    thread by x264's own threads (``threads`` 0: as many as x264 picks for the cores).  ``thread_type``
    FRAME encodes whole frames in parallel; PyAV's default, SLICE, gives x264's sliced threads, which x264
    calls low-latency but lower-efficiency (``sliced_threads=1`` in the options it writes into the file)."""

    def __init__(self, path: str | Path, fps: float, crf: int = 12, preset: str = "medium", threads: int = 0,
                 thread_type: str = "FRAME", *, background: bool = True):
        super().__init__(path, background=background)
        self._fps = fps if fps > 0 else 24.0
        self._crf, self._preset, self._threads, self._thread_type = crf, preset, threads, thread_type
        self._container = self._stream = self._buffer = None

    def _start(self, frames: torch.Tensor) -> None:
        import av

        height, width = frames.shape[1:3]
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self._partial = _partial_sibling(self.final, self._token)
        self._partial.touch()  # FFmpeg creates the file only with the first packet, x264's look-ahead later
        self._container = av.open(str(self._partial), "w", format=_CONTAINERS.get(self.final.suffix.lower(), "mp4"))
        stream = self._container.add_stream("libx264", rate=Fraction(self._fps).limit_denominator(1001))
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(self._crf), "preset": self._preset}
        stream.codec_context.thread_count = self._threads
        stream.codec_context.thread_type = self._thread_type
        self._stream = stream
        self._buffer = np.empty((stream.height, stream.width, 3), np.uint8)

    def _encode(self, frames: torch.Tensor) -> None:
        import av

        height, width = frames.shape[1:3]
        buffer = self._buffer
        if (height + height % 2, width + width % 2) != buffer.shape[:2]:
            raise MediaError(f"{self.final}: a chunk of {width}x{height} frames follows frames of another size.")
        for frame in frames:
            if self._stop.is_set():
                return
            frame_to_uint8(frame[..., :3], buffer[:height, :width])
            buffer[height:, :width] = buffer[height - 1:height, :width]  # odd sizes: repeat the edge
            buffer[:, width:] = buffer[:, width - 1:width]
            for packet in self._stream.encode(av.VideoFrame.from_ndarray(buffer, format="rgb24")):
                self._container.mux(packet)

    def _finish(self) -> None:
        for packet in self._stream.encode():
            self._container.mux(packet)
        container, self._container = self._container, None
        container.close()

    def _discard(self) -> None:
        if self._container is not None:
            container, self._container = self._container, None
            try:
                container.close()
            except Exception:  # a full disk fails here too; the file goes anyway
                pass
        if self._partial is not None:
            self._partial.unlink(missing_ok=True)


class PngWriter(_Writer):
    """Frames as numbered PNGs (``000000.png``, ...) in a folder, or one PNG for a single image; RGBA kept.

    Frames are converted and compressed by a pool of ``workers`` threads (zlib runs without the GIL).  A
    folder is written as a hidden ``.<name>.partial-...`` sibling and renamed into place; an existing output
    folder is replaced only if it holds nothing but such frames.
    """

    def __init__(self, path: str | Path, single: bool = False, compress_level: int = PNG_COMPRESS_LEVEL,
                 workers: int = 0, *, background: bool = True):
        self.folder = not single
        super().__init__(path, background=background)
        self.single = single
        self._level = compress_level
        self._workers = workers or min(8, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque = deque()
        self._local = threading.local()
        self._written = 0

    def _start(self, frames: torch.Tensor) -> None:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self._partial = _partial_sibling(self.final, self._token)
        if not self.single:
            self._partial.mkdir()
        self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="seedvr2-png")

    def _encode(self, frames: torch.Tensor) -> None:
        if self.single and self._written + frames.shape[0] > 1:
            raise MediaError(f"{self.final}: one image was expected but {self._written + frames.shape[0]} frames "
                             f"came; give a folder for several frames.")
        for frame in frames:
            if self._stop.is_set():
                return
            target = self._partial if self.single else self._partial / f"{self._written:06d}.png"
            self._pending.append(self._pool.submit(self._save, frame, target))
            self._written += 1
            while len(self._pending) > 2 * self._workers:  # bounded: a few frames in flight
                self._pending.popleft().result()
        while self._pending:  # the chunk is written before its slot is given back
            self._pending.popleft().result()

    def _save(self, frame: torch.Tensor, target: Path) -> None:
        from PIL import Image

        if self._stop.is_set():
            return
        buffer = getattr(self._local, "buffer", None)
        if buffer is None or buffer.shape != tuple(frame.shape):
            buffer = self._local.buffer = np.empty(tuple(frame.shape), np.uint8)
        frame_to_uint8(frame, buffer)
        Image.fromarray(buffer).save(target, format="PNG", compress_level=self._level)

    def _finish(self) -> None:
        while self._pending:
            self._pending.popleft().result()
        self._pool.shutdown()

    def _commit(self) -> None:
        if self.single or not self.final.exists():
            os.replace(self._partial, self.final)
            return
        _check_target(self.final, folder=True)  # a previous output of frames only; checked again just now
        old = self.final.with_name(f".{self.final.name}.old-{self._token}")
        os.replace(self.final, old)
        os.replace(self._partial, self.final)
        shutil.rmtree(old, ignore_errors=True)

    def _discard(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pending.clear()
        if self._partial is None:
            return
        if self.single:
            self._partial.unlink(missing_ok=True)
        else:
            shutil.rmtree(self._partial, ignore_errors=True)


@contextmanager
def terminate_raises() -> Iterator[None]:
    """While active, SIGTERM and SIGHUP end the program like Ctrl-C does (an exception, exit status 128 + the
    signal), so a writer's ``with`` block drops its partial output; signals someone chose to ignore stay
    ignored.  Outside the main thread it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, _frame):
        raise SystemExit(128 + signum)

    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        number = getattr(signal, name, None)
        if number is not None and signal.getsignal(number) is signal.SIG_DFL:
            previous[number] = signal.signal(number, _raise)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
