"""SeedVR2's causal video VAE: 8x space, 4x time, 16 latent channels, with temporal slicing and tiling.

``encode`` and ``decode`` run without autograd and compute in the parameters' dtype (float32 or bf16):
inputs of any floating dtype and device are cast and moved chunk by chunk on entry.  They always return
float32 tensors, on ``output_device`` (default: the parameters' device).
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import nn

from .config import VAEConfig
from .decoder import Decoder3D
from .encoder import Encoder3D
from .errors import VAEInputError
from .banded import BandPlan, run_banded
from .temporal_slicing import CausalMemory, ChunkFn, run_sliced
from .tiling import check_tiling

LOGVAR_RANGE = (-30.0, 20.0)
DEFAULT_TILE_OVERLAP = 128

Device = Union[torch.device, str, None]
# ``executor(model, direction, chunk, memory, band_plan)``: one causal chunk ("encode" or "decode") computed
# in place of the plain forward.
ChunkExecutor = Callable[["VideoAutoencoder", str, torch.Tensor, Optional[CausalMemory], Optional[BandPlan]],
                         torch.Tensor]


class VideoAutoencoder(nn.Module):
    """Encoder and decoder of the released checkpoint (state-dict keys ``encoder.*``, ``decoder.*``).

    Temporal slicing (on by default) runs the clip in the released causal chunks (``[0, 5)`` then 4 frames
    at a time when encoding, latent ``[0, 2)`` then 1 at a time when decoding); every causal convolution
    carries its last input frames to the next chunk, so the result equals the unsliced one.  Spatial tiling
    (``tile_size`` in video pixels, or a full ``band_plan``) bounds memory further with the same result: the
    frame runs layer by layer in exact row bands of about ``tile_size²`` pixels (:mod:`.banded`).

    ``executor``: None runs every causal chunk through the plain encoder/decoder (banded when tiled); set
    (by ``optimization.vae_optimizer.optimize_vae``), it computes them instead: the same result, faster and
    in less memory.
    """

    def __init__(self, config: Optional[VAEConfig] = None) -> None:
        super().__init__()
        self.config = config if config is not None else VAEConfig.released()
        self.encoder = Encoder3D(self.config)
        self.decoder = Decoder3D(self.config)
        self.executor: Optional[ChunkExecutor] = None

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.conv_in.weight.device

    @torch.no_grad()
    def encode(
        self,
        video: torch.Tensor,
        *,
        temporal_slicing: bool = True,
        tile_size: Optional[int] = None,
        tile_overlap: int = DEFAULT_TILE_OVERLAP,
        output_device: Device = None,
        band_plan: Optional[BandPlan] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior ``(mean, logvar)`` of a video (B, 3, T = 4n+1, H, W) in [-1, 1], each
        (B, 16, n+1, H/8, W/8) float32; logvar is clamped to [-30, 20]."""
        self._check_video(video)
        config = self.config
        latent_frames = (video.shape[2] - 1) // config.temporal_downsample_factor + 1
        step = config.slicing_sample_min_size if temporal_slicing else None
        out_device = torch.device(output_device) if output_device is not None else self.device

        plan = self._band_plan(video, tile_size, tile_overlap, band_plan)
        run_chunk = self._chunk_runner("encode", plan)
        moments = run_sliced(run_chunk, video, step=step, out_frames=latent_frames, out_device=out_device)
        mean, logvar = moments.split(config.latent_channels, dim=1)
        return mean, logvar.clamp_(*LOGVAR_RANGE)

    @torch.no_grad()
    def decode(
        self,
        z: torch.Tensor,
        *,
        temporal_slicing: bool = True,
        tile_size: Optional[int] = None,
        tile_overlap: int = DEFAULT_TILE_OVERLAP,
        output_device: Device = None,
        output_dtype: torch.dtype = torch.float32,
        band_plan: Optional[BandPlan] = None,
    ) -> torch.Tensor:
        """Video (B, 3, 4(t-1)+1, 8h, 8w) in ``output_dtype``, not clamped, from a raw VAE latent (B, 16, t, h, w)
        (convert DiT latents with ``from_dit_latent`` first).  The last convolution computes in the model's
        dtype, so ``output_dtype=model.dtype`` loses nothing and halves the result's memory for a bf16 model."""
        self._check_latent(z)
        config = self.config
        video_frames = (z.shape[2] - 1) * config.temporal_downsample_factor + 1
        step = config.slicing_sample_min_size // config.temporal_downsample_factor if temporal_slicing else None
        out_device = torch.device(output_device) if output_device is not None else self.device

        plan = self._band_plan(z, tile_size, tile_overlap, band_plan, scale=config.spatial_downsample_factor)
        run_chunk = self._chunk_runner("decode", plan)
        return run_sliced(run_chunk, z, step=step, out_frames=video_frames, out_device=out_device,
                          out_dtype=output_dtype)

    def _chunk_runner(self, direction: str, plan: Optional[BandPlan]) -> ChunkFn:
        """How each causal chunk is computed: by the executor when one is set, else banded (with a plan) or
        by the plain encoder/decoder."""
        executor = self.executor
        if executor is not None:
            return lambda chunk, memory: executor(self, direction, chunk, memory, plan)
        if plan is not None:
            # Bands are moved to the device one at a time: the chunk stays where it is.
            return lambda chunk, memory: run_banded(self, direction, chunk, memory, plan)
        return self._encode_chunk if direction == "encode" else self._decode_chunk

    def _encode_chunk(self, chunk: torch.Tensor, memory: Optional[CausalMemory]) -> torch.Tensor:
        return self.encoder(chunk.to(device=self.device, dtype=self.dtype), memory)

    def _decode_chunk(self, chunk: torch.Tensor, memory: Optional[CausalMemory]) -> torch.Tensor:
        return self.decoder(chunk.to(device=self.device, dtype=self.dtype), memory)

    def _band_plan(self, source: torch.Tensor, tile_size: Optional[int], tile_overlap: int,
                   band_plan: Optional[BandPlan], scale: int = 1) -> Optional[BandPlan]:
        """The banded plan for ``source`` (None: run untiled).  A ``tile_size`` covering the whole frame runs
        untiled; ``tile_overlap`` is only validated (bands are exact, nothing is blended)."""
        if band_plan is not None:
            return band_plan
        if tile_size is None:
            return None
        check_tiling(tile_size, tile_overlap, self.config.spatial_downsample_factor)
        if source.shape[3] * scale <= tile_size and source.shape[4] * scale <= tile_size:
            return None
        return BandPlan.from_tile_size(tile_size)

    def _check_video(self, video: torch.Tensor) -> None:
        channels = self.config.in_channels
        time_factor = self.config.temporal_downsample_factor
        space_factor = self.config.spatial_downsample_factor
        if not isinstance(video, torch.Tensor) or video.ndim != 5 or not video.is_floating_point():
            got = f"shape {tuple(video.shape)}, {video.dtype}" if isinstance(video, torch.Tensor) else type(video).__name__
            raise VAEInputError(
                f"VAE encode expects a floating video tensor (B, {channels}, T, H, W) in [-1, 1], got {got}. "
                f"For a single image (B, {channels}, H, W) add the time axis: image.unsqueeze(2)."
            )
        b, c, t, h, w = video.shape
        if c != channels:
            raise VAEInputError(f"VAE encode expects {channels} channels on dim 1 (B, C, T, H, W), got {c}.")
        if t % time_factor != 1:
            padded = max(t - 1 + time_factor - 1, 0) // time_factor * time_factor + 1
            raise VAEInputError(
                f"VAE encode needs {time_factor}n+1 frames (1, 5, 9, ...), got T={t}. The pipeline pads a clip to "
                f"the next valid length by repeating its last frame (here to {padded})."
            )
        if h % space_factor or w % space_factor or h == 0 or w == 0:
            raise VAEInputError(
                f"VAE encode needs height and width that are positive multiples of {space_factor}, got {h}x{w}; "
                f"crop or pad the frames (e.g. to {h // space_factor * space_factor}x{w // space_factor * space_factor})."
            )

    def _check_latent(self, z: torch.Tensor) -> None:
        channels = self.config.latent_channels
        if not isinstance(z, torch.Tensor) or z.ndim != 5 or not z.is_floating_point():
            got = f"shape {tuple(z.shape)}, {z.dtype}" if isinstance(z, torch.Tensor) else type(z).__name__
            raise VAEInputError(
                f"VAE decode expects a floating latent (B, {channels}, t, h, w), got {got}. DiT latents are "
                f"channels-last (t, h, w, {channels}): permute(3, 0, 1, 2).unsqueeze(0) and apply from_dit_latent."
            )
        if z.shape[1] != channels:
            raise VAEInputError(
                f"VAE decode expects {channels} latent channels on dim 1 (B, C, t, h, w), got shape {tuple(z.shape)}."
            )
        if min(z.shape[2:]) < 1:
            raise VAEInputError(f"VAE decode got an empty latent of shape {tuple(z.shape)}.")
