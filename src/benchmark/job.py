"""The job the benchmarks time: a test clip, its sizes on the models' grid, random DiT inputs of that size,
and a model manager that hands the pipeline models the benchmark built instead of loading files."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..pipeline.batching import padded_length
from ..pipeline.frames import target_size
from ..pipeline.model_manager import ManagedModel, ModelManager, compute_dtype


def pattern_clip(frames: int, width: int, height: int) -> torch.Tensor:
    """A smooth moving test pattern (N, H, W, 3) in [0, 1]: smooth, so the colour fix and the VAE see
    content like a real frame's, and moving, so consecutive frames differ."""
    generator = torch.Generator().manual_seed(0)
    base = torch.rand(1, 3, max(2, height // 16), max(2, width // 16), generator=generator)
    base = torch.nn.functional.interpolate(base, size=(height, width), mode="bicubic").clamp(0, 1)
    shift = torch.arange(frames).view(-1, 1, 1, 1) * 2
    clip = torch.stack([torch.roll(base[0], int(s), dims=-1) for s in shift.flatten()])
    return clip.permute(0, 2, 3, 1).contiguous()


@dataclass(frozen=True)
class JobGeometry:
    """Sizes of the benchmark job: output frame, the 16-pixel grid the models see, the 4n+1 frame count."""

    in_w: int
    in_h: int
    out_h: int
    out_w: int
    pad_h: int
    pad_w: int
    frames: int  # test frames padded to 4n+1, as the pipeline pads one batch

    @property
    def latent(self) -> tuple[int, int, int]:
        return (self.frames - 1) // 4 + 1, self.pad_h // 8, self.pad_w // 8


def job_geometry(input_size: str, resolution: int, frames: int) -> JobGeometry:
    """The geometry of ``frames`` input frames of ``input_size`` ("WxH") upscaled to ``resolution``."""
    in_w, in_h = map(int, input_size.split("x"))
    out_h, out_w = target_size(in_h, in_w, resolution)
    return JobGeometry(in_w, in_h, out_h, out_w, -(-out_h // 16) * 16, -(-out_w // 16) * 16,
                       padded_length(frames))


def dit_inputs(geometry: JobGeometry, config, device: torch.device, seed: int = 1) -> tuple:
    """Random packed DiT arguments (vid, txt, vid_shape, txt_shape, timestep) for the job's latent."""
    t, h, w = geometry.latent
    generator = torch.Generator().manual_seed(seed)
    vid = torch.randn(t * h * w, config.vid_in_channels, generator=generator).to(device)
    txt = torch.randn(58, config.txt_in_dim, generator=generator).to(device)
    return vid, txt, torch.tensor([[t, h, w]]), torch.tensor([[58]]), torch.tensor([1000.0], device=device)


class PrebuiltManager(ModelManager):
    """Hands the pipeline models built by the benchmark instead of loading files.

    ``offload``: where a model waits while it is not used; None takes the spec's ``offload_device``.
    """

    def __init__(self, dit, vae, device: torch.device, offload: torch.device | None = None):
        super().__init__()
        self.models = {"dit": dit, "vae": vae}
        self.device = device
        self.offload = offload

    def _managed(self, kind, spec):
        model = self.models[kind]
        offload = self.offload
        if offload is None and spec.offload_device not in ("none", "", None):
            offload = torch.device(spec.offload_device)
        return ManagedModel(kind, (kind,), model, self.device, offload, compute_dtype(self.device), cache=True,
                            info={"config": getattr(model, "config", None)})

    def dit(self, spec):
        return self._managed("dit", spec)

    def vae(self, spec):
        return self._managed("vae", spec)
