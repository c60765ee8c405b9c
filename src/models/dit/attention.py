"""Joint window attention of video and text tokens (README §4.6).

Each window attends over [its video tokens; all text tokens of its sample].  Windows are batched by shape
(see :mod:`.window_plan`): q and k are rotated once per token, then one gather and one attention call
per group.  Video outputs go
back to their token positions; a text token's output is the mean over its sample's windows.
"""
from __future__ import annotations

import torch
from torch import nn

from ...optimization.attention_dispatch import PLAIN, attention
from . import graph_breaks
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
        # Name of the attention_dispatch kernel that computes the attention (any of them gives softmax(q kᵀ/√d) v).
        self.attention_backend = PLAIN

    def _qkv(self, vid: torch.Tensor, txt: torch.Tensor, plan: WindowPlan) -> tuple[torch.Tensor, ...]:
        """q, k, v for the rows of [video; text], each (rows, heads, head_dim); q and k normalised and rotated."""
        return self._norm_and_rotate(self.proj_qkv.video()(vid), self.proj_qkv.text()(txt), plan)

    def _norm_and_rotate(self, qkv_vid: torch.Tensor, qkv_txt: torch.Tensor,
                         plan: WindowPlan) -> tuple[torch.Tensor, ...]:
        """q, k, v from the two streams' qkv projections: per-stream q/k RMSNorm, then the window rope."""
        shape = (3, self.heads, self.head_dim)
        q_vid, k_vid, v_vid = qkv_vid.unflatten(-1, shape).unbind(1)
        q_txt, k_txt, v_txt = qkv_txt.unflatten(-1, shape).unbind(1)
        q = torch.cat([self.norm_q.video()(q_vid), self.norm_q.text()(q_txt)])
        k = torch.cat([self.norm_k.video()(k_vid), self.norm_k.text()(k_txt)])
        v = torch.cat([v_vid, v_txt])
        return self.rope(q, plan), self.rope(k, plan), v

    def forward(self, vid: torch.Tensor, txt: torch.Tensor, plan: WindowPlan,
                video_queries_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend; returns projected (video, text) outputs, text None with ``video_queries_only``.

        ``video_queries_only`` (the 3B's last block): text serves only as keys/values, so its output and
        text mean are skipped.
        """
        q, k, v = self._qkv(vid, txt, plan)
        windowed, text_mean = self._attend_windows(q, k, v, plan, txt.shape[0], video_queries_only)
        vid_out = self.proj_out.video()(windowed)
        if text_mean is None:
            return vid_out, None
        return vid_out, self.proj_out.text()(text_mean)

    @graph_breaks.eager
    def _attend_windows(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: WindowPlan, text_rows: int,
                        video_queries_only: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of every window group: (video outputs in token order, text mean or None).

        Kept out of compiled graphs: its loop over the plan's groups would unroll differently for every
        windowing, while the per-token work around it is the same in every layer.
        """
        inner = self.heads * self.head_dim
        windowed = q.new_empty((plan.video_offset.shape[0], inner))
        text_sum = None if video_queries_only else q.new_zeros((text_rows, inner), dtype=torch.float32)
        for group in plan.groups:
            windows, video_length = group.token_index.shape[0], group.video_length
            index = group.token_index
            queries = index[:, :video_length] if video_queries_only else index
            out = attention(q[queries].transpose(1, 2), k[index].transpose(1, 2), v[index].transpose(1, 2),
                            backend=self.attention_backend)
            out = out.transpose(1, 2)                                 # (windows, queries, heads, head_dim)
            # Scattered straight from the strided output: one pass, no contiguous copy first.
            windowed.view(-1, self.heads, self.head_dim).index_put_(
                (group.video_rows.view(windows, video_length),), out[:, :video_length])
            if text_sum is not None:
                text_sum.index_add_(0, group.text_rows, out[:, video_length:].reshape(-1, inner).float())
        if text_sum is None:
            return windowed, None
        return windowed, self.text_mean(text_sum, plan).to(q.dtype)

    def text_mean(self, text_sum: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
        """Each text row's mean over its sample's windows, from the float32 sum over the windows attended here.

        A separate step so that an executor which splits a layer's windows across processes can add up the
        partial sums (src/distributed/) before the mean is taken.
        """
        return text_sum * plan.text_weight[:, None]
