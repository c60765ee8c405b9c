"""Generate the small example clip shipped in assets/ (procedural, so the pack carries no third-party media).

A soft low-resolution scene: a gradient sky, drifting circles and a striped band, blurred and slightly noisy
so that restoration has something to do.  Run: python tools/make_example_clip.py
"""
from __future__ import annotations

import math
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

WIDTH, HEIGHT, FRAMES, FPS = 256, 144, 21, 12


def frame(i: int) -> np.ndarray:
    y = torch.linspace(0, 1, HEIGHT).view(-1, 1).expand(HEIGHT, WIDTH)
    x = torch.linspace(0, 1, WIDTH).view(1, -1).expand(HEIGHT, WIDTH)
    img = torch.stack([0.25 + 0.5 * y, 0.45 + 0.3 * x, 0.85 - 0.4 * y])
    phase = i / FRAMES
    for cx, cy, r, color in ((0.3 + 0.4 * phase, 0.45, 0.16, (0.9, 0.3, 0.2)),
                             (0.75 - 0.3 * phase, 0.6, 0.1, (0.2, 0.8, 0.3))):
        mask = (((x - cx) * WIDTH / HEIGHT) ** 2 + (y - cy) ** 2 < r * r).float()
        img = img * (1 - mask) + torch.tensor(color).view(3, 1, 1) * mask
    band = (y > 0.8).float() * (0.5 + 0.5 * torch.sign(torch.sin(60 * x + 6 * math.pi * phase)))
    img = img * (1 - 0.5 * (y > 0.8).float()) + 0.5 * band
    img = F.avg_pool2d(img[None], 3, stride=1, padding=1, count_include_pad=False)[0]  # soften
    img = img + 0.02 * torch.randn(img.shape, generator=torch.Generator().manual_seed(i))
    return (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def main(path: Path = Path(__file__).resolve().parents[1] / "assets" / "example_clip.mp4") -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"crf": "18"}
        for i in range(FRAMES):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame(i), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
