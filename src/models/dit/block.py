"""One NaDiT block (README §4.5): two streams, joint window attention, per-stream MLPs, modulation."""
from __future__ import annotations

import torch
from torch import nn

from .attention import JointWindowAttention
from .config import NaDiTConfig
from .mlp import make_mlp
from .modulation import ATTN_SLOT, MLP_SLOT, Modulation
from .normalization import rms_norm
from .packing import PackedLayout
from .streams import StreamPair
from .window_plan import WindowPlan


class NaDiTBlock(nn.Module):
    """Pre-norm block: modulated RMSNorm → attention → gated residual, then the same around the MLP."""

    def __init__(self, config: NaDiTConfig, layer: int):
        super().__init__()
        shared = not config.has_separate_weights(layer)
        self.video_only = config.is_video_only(layer)
        self.eps = config.norm_eps
        self.window = tuple(config.window[layer])
        self.window_method = config.window_method[layer]
        self.attn = JointWindowAttention(config, shared)
        self.mlp = StreamPair(lambda: make_mlp(config), shared, self.video_only)
        self.ada = StreamPair(lambda: Modulation(config.vid_dim, ("attn", "mlp")), shared, self.video_only)

    def forward(self, vid: torch.Tensor, txt: torch.Tensor, time: torch.Tensor, layout: PackedLayout,
                plan: WindowPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Update (video, text) tokens; ``time`` is the (B, d, 2, 3) per-sample time embedding and ``plan``
        this layer's window plan (built by the model, outside the block, so a compiled block holds tensor
        work only)."""
        vid_lengths, txt_lengths = layout.video_lengths, layout.text_lengths
        attn_time, mlp_time = time[:, :, ATTN_SLOT], time[:, :, MLP_SLOT]
        vid_ada = self.ada.video()

        vid_in = vid_ada.modulate_normalized(vid, self.eps, attn_time, "attn", vid_lengths)
        if self.video_only:
            # Unmodulated text only provides keys and values for the video queries; it is not updated.
            vid_attn, _ = self.attn(vid_in, rms_norm(txt, self.eps), plan, video_queries_only=True)
        else:
            txt_in = self.ada.text().modulate_normalized(txt, self.eps, attn_time, "attn", txt_lengths)
            vid_attn, txt_attn = self.attn(vid_in, txt_in, plan)
            txt = self._mlp_update(self.ada.text().add_gated(txt, txt_attn, attn_time, "attn", txt_lengths),
                                   mlp_time, txt_lengths, video=False)
        vid = self._mlp_update(vid_ada.add_gated(vid, vid_attn, attn_time, "attn", vid_lengths),
                               mlp_time, vid_lengths, video=True)
        return vid, txt

    def _mlp_update(self, x: torch.Tensor, mlp_time: torch.Tensor, lengths: tuple[int, ...],
                    video: bool) -> torch.Tensor:
        """``x + gate·MLP(modulate(RMSNorm(x)))`` with one stream's weights."""
        pick = StreamPair.video if video else StreamPair.text
        ada, mlp = pick(self.ada), pick(self.mlp)
        update = mlp(ada.modulate_normalized(x, self.eps, mlp_time, "mlp", lengths))
        return ada.add_gated(x, update, mlp_time, "mlp", lengths)
