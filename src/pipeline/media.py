"""Reading and writing frames for the command line: video files (PyAV), images, folders, PNG sequences.

Frames travel as float32 tensors ``(N, H, W, C)`` in [0, 1], C = 3 (RGB) or 4 (RGBA), like ComfyUI's IMAGE.
Videos are read in chunks so that a long clip never has to sit in memory at once.
"""
from __future__ import annotations

from dataclasses import dataclass
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


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """[0, 1] float frames to uint8 (round half to even, like the reference)."""
    return frames.clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()


class VideoWriter:
    """Write RGB frames to an H.264 mp4 incrementally (even sizes; odd ones are padded by one pixel)."""

    def __init__(self, path: str | Path, fps: float, crf: int = 12):
        import av

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self.path), "w")
        self._fps = fps if fps > 0 else 24.0
        self._crf = crf
        self._stream = None

    def write(self, frames: torch.Tensor) -> None:
        import av

        array = to_uint8(frames[..., :3])
        if self._stream is None:
            from fractions import Fraction

            h, w = array.shape[1:3]
            self._stream = self._container.add_stream("libx264", rate=Fraction(self._fps).limit_denominator(1001))
            self._stream.width, self._stream.height = w + w % 2, h + h % 2
            self._stream.pix_fmt = "yuv420p"
            self._stream.options = {"crf": str(self._crf), "preset": "medium"}
        h, w = self._stream.height, self._stream.width
        for frame in array:
            if frame.shape[:2] != (h, w):
                frame = np.pad(frame, ((0, h - frame.shape[0]), (0, w - frame.shape[1]), (0, 0)), mode="edge")
            for packet in self._stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                self._container.mux(packet)

    def close(self) -> None:
        if self._stream is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)
        self._container.close()


class PngWriter:
    """Write frames as numbered PNGs into a folder (RGBA kept), or one PNG for a single image."""

    def __init__(self, path: str | Path, single: bool = False):
        self.path = Path(path)
        self.single = single
        self.count = 0
        (self.path.parent if single else self.path).mkdir(parents=True, exist_ok=True)

    def write(self, frames: torch.Tensor) -> None:
        from PIL import Image

        for frame in to_uint8(frames):
            target = self.path if self.single else self.path / f"{self.count:06d}.png"
            Image.fromarray(frame).save(target)
            self.count += 1

    def close(self) -> None:
        pass
