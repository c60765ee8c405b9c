"""Joint window attention of video and text tokens (README §4.6).

Each window attends over [its video tokens; all text tokens of its sample].  Windows are batched by shape
(see :mod:`.window_plan`): one gather, one rope table and one attention call per group.  Video outputs go
back to their token positions; a text token's output is the mean over its sample's windows.
"""
from __future__ import annotations

import torch
from torch import nn

from ...optimization import matrix_ops
from .config import NaDiTConfig
from .normalization import RMSNorm
from .rope import WindowRope
from .streams import StreamPair
from .window_plan import WindowPlan


class JointWindowAttention(nn.Module):
    """q/k/v projections, q/k RMSNorm, window rope, batched window attention and output projections."""

    def __init__(self, config: NaDiTConfig, shared: bool):
        super().__init__()
        dim, inner = config.vid_dim, config.inner_dim
        self.heads, self.head_dim = config.heads, config.head_dim
        self.proj_qkv = StreamPair(lambda: nn.Linear(dim, 3 * inner, bias=False), shared)
        self.proj_out = StreamPair(lambda: nn.Linear(inner, dim), shared)
        self.norm_q = StreamPair(lambda: RMSNorm(config.head_dim, config.norm_eps), shared)
        self.norm_k = StreamPair(lambda: RMSNorm(config.head_dim, config.norm_eps), shared)
        self.rope = WindowRope(config)

    def _qkv(self, x: torch.Tensor, video: bool) -> torch.Tensor:
        """(tokens, dim) → (tokens, 3, heads, head_dim) with q and k normalised, with one stream's weights."""
        pick = StreamPair.video if video else StreamPair.text
        q, k, v = pick(self.proj_qkv)(x).unflatten(-1, (3, self.heads, self.head_dim)).unbind(1)
        return torch.stack([pick(self.norm_q)(q), pick(self.norm_k)(k), v], dim=1)

    def forward(self, vid: torch.Tensor, txt: torch.Tensor, plan: WindowPlan,
                video_queries_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend; returns projected (video, text) outputs, text None with ``video_queries_only``.

        ``video_queries_only`` (the 3B's last block): text serves only as keys/values, so its queries,
        output and text mean are skipped.
        """
        tokens = torch.cat([self._qkv(vid, video=True), self._qkv(txt, video=False)])   # rows of [video; text]
        video_outputs = []
        text_sum = None if video_queries_only else vid.new_zeros((txt.shape[0], self.heads * self.head_dim),
                                                                 dtype=torch.float32)
        for group in plan.groups:
            windows, video_length = group.token_index.shape[0], group.video_length
            q, k, v = tokens[group.token_index].unbind(2)          # each (windows, seq, heads, head_dim)
            if video_queries_only:
                q = q[:, :video_length]
            q = self.rope(q, group.shape, group.text_length)
            k = self.rope(k, group.shape, group.text_length)
            out = matrix_ops.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            out = out.transpose(1, 2).flatten(2)                  # (windows, queries, heads·head_dim)
            video_outputs.append(out[:, :video_length].reshape(windows * video_length, -1))
            if text_sum is not None:
                text_sum.index_add_(0, group.text_rows, out[:, video_length:].reshape(-1, out.shape[-1]).float())

        windowed = video_outputs[0] if len(video_outputs) == 1 else torch.cat(video_outputs)
        vid_out = self.proj_out.video()(windowed[plan.video_order])
        if text_sum is None:
            return vid_out, None
        txt_out = (text_sum * plan.text_weight[:, None]).to(vid.dtype)
        return vid_out, self.proj_out.text()(txt_out)
