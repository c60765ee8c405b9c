"""The SeedVR2 NaDiT (3B and 7B) on packed batches (README §2, §4)."""
from __future__ import annotations

import torch
from torch import nn

from . import graph_breaks
from ...progress import checkpoint
from .block import NaDiTBlock
from .config import NaDiTConfig
from .embedding import TimeEmbedding
from .modulation import ATTN_SLOT, Modulation
from .normalization import RMSNorm
from .packing import PackedLayout
from .patch import PatchIn, PatchOut
from .rope import rope_frequencies, rotary_rows
from .window_plan import WindowPlanCache


class NaDiT(nn.Module):
    """Native-resolution diffusion transformer; the module tree reproduces the released state-dict keys.

    Computes in the parameters' dtype (RMSNorm statistics, rope and the sinusoidal time features in
    float32); returns float32.  Its only data-dependent state is the window-plan cache (index tensors on the
    compute device), owned by the instance so that it goes with the model; :meth:`release_caches` empties it.
    """

    def __init__(self, config: NaDiTConfig):
        super().__init__()
        self.config = config
        dim = config.vid_dim
        self.vid_in = PatchIn(config.vid_in_channels, dim, config.patch_size)
        self.txt_in = nn.Linear(config.txt_in_dim, config.txt_dim)
        self.emb_in = TimeEmbedding(hidden_dim=max(config.vid_dim, config.txt_dim), output_dim=config.emb_dim)
        self.blocks = nn.ModuleList(NaDiTBlock(config, layer) for layer in range(config.num_layers))
        self.vid_out_norm = RMSNorm(dim, config.norm_eps) if config.vid_out_norm else None
        self.vid_out_ada = Modulation(dim, ("out",), with_gate=False) if config.vid_out_norm else None
        self.vid_out = PatchOut(config.vid_out_channels, dim, config.patch_size)
        self.window_plans = WindowPlanCache()

    def release_caches(self) -> None:
        """Drop the cached window plans (called when the model is parked or dropped)."""
        plans = self.__dict__.get("window_plans")  # absent while nn.Module.__init__ runs
        if plans is not None:
            plans.clear()

    def _apply(self, fn, *args, **kwargs):
        # Every move (.to(), .cuda(), ComfyUI's unload) goes through nn.Module._apply; the plans would stay
        # on the old device, so they go.  Arguments are passed through whatever this torch's signature is.
        self.release_caches()
        return super()._apply(fn, *args, **kwargs)

    @property
    def compute_dtype(self) -> torch.dtype:
        """Activation dtype: that of the norm weights, which weight quantization never replaces."""
        return self.blocks[0].attn.norm_q.video().weight.dtype

    def rope_frequency_buffers(self) -> dict[str, torch.Tensor]:
        """Recomputed float32 constants for every ``blocks.N.attn.rope.rope.freqs`` key (CPU tensors)."""
        freqs = rope_frequencies(self.config, device="cpu")
        return {f"blocks.{i}.attn.rope.rope.freqs": freqs.clone() for i in range(self.config.num_layers)}

    def forward(self, vid: torch.Tensor, txt: torch.Tensor, vid_shape: torch.Tensor, txt_shape: torch.Tensor,
                timestep: torch.Tensor) -> torch.Tensor:
        """Velocity (Σ T·H·W, vid_out_channels) float32 for packed latents, text and per-sample timesteps."""
        config = self.config
        layout = PackedLayout.from_shapes(vid_shape, txt_shape, config.patch_size)
        timestep = self._check_inputs(vid, txt, timestep, layout)
        dtype = self.compute_dtype

        x_vid = self.vid_in(vid.to(dtype), layout)
        x_txt = self.txt_in(txt.to(dtype))
        # (B, d, slot, role): slots (attn, mlp), roles (shift, scale, gate); see modulation.py.
        time = self.emb_in(timestep, dtype).unflatten(-1, (config.vid_dim, 2, 3))
        plans = self._window_plans(layout, vid.device)
        for number, block in enumerate(self.blocks):
            checkpoint(number / len(self.blocks))  # an interrupt lands between blocks
            x_vid, x_txt = block(x_vid, x_txt, time, layout, plans[block.window, block.window_method])

        if self.vid_out_norm is not None:
            # The original output modulation reuses the attention slot's shift and scale of E.
            x_vid = self.vid_out_ada.modulate(self.vid_out_norm(x_vid), time[:, :, ATTN_SLOT], "out",
                                              layout.video_lengths)
        return self.vid_out(x_vid, layout).float()

    @graph_breaks.eager
    def _window_plans(self, layout: PackedLayout, device: torch.device) -> dict:
        """The window plan (with its rotary tables) of every distinct layer windowing: pure Python on the
        integer shapes, cached, and kept out of any compiled graph."""
        plans = {}
        for block in self.blocks:
            key = (block.window, block.window_method)
            if key not in plans:
                plans[key] = plan = self.window_plans.get(layout, *key, device)
                rotary_rows(self.config.rope_type, self.config.rope_axis_dim, plan)
        return plans

    def _check_inputs(self, vid: torch.Tensor, txt: torch.Tensor, timestep: torch.Tensor,
                      layout: PackedLayout) -> torch.Tensor:
        """Validate packed tensor sizes against the layout; returns the timestep as (B,) float32."""
        config = self.config
        latent_rows = sum(layout.video_lengths) * config.patch_size[1] * config.patch_size[2]
        if vid.ndim != 2 or vid.shape != (latent_rows, config.vid_in_channels):
            raise ValueError(f"vid must be ({latent_rows}, {config.vid_in_channels}) = (Σ T·H·W of vid_shape, "
                             f"latent + condition + mask channels), got {tuple(vid.shape)}")
        text_rows = sum(layout.text_lengths)
        if txt.ndim != 2 or txt.shape != (text_rows, config.txt_in_dim):
            raise ValueError(f"txt must be ({text_rows}, {config.txt_in_dim}) = (Σ text lengths of txt_shape, "
                             f"text embedding width), got {tuple(txt.shape)}")
        timestep = torch.as_tensor(timestep, device=vid.device).reshape(-1).float()
        if timestep.numel() == 1:
            timestep = timestep.expand(layout.num_samples)
        if timestep.numel() != layout.num_samples:
            raise ValueError(f"timestep must hold one value per sample ({layout.num_samples}), "
                             f"got {timestep.numel()}")
        return timestep
