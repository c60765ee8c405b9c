"""The NaDiT split across the processes of a ``torch.distributed`` group, each process attending whole windows.

SeedVR2's attention is local: a video token only sees the tokens of its window plus its sample's text.  So a
layer's windows are dealt out to the ranks, and each rank runs the whole block — modulation, q/k/v, norms,
rope, attention, MLP, gated residuals — on the video tokens of its own windows only.  Nothing but two kinds
of data move between ranks:

* the text stream's attention output is a mean over *all* windows of a sample, so each attention layer adds up
  the ranks' partial float32 sums (one all-reduce of ``text tokens × width``, a few hundred kilobytes);
* where consecutive layers window differently (regular / shifted), the video tokens regroup: the ranks
  gather the hidden states once and each takes the rows of its new windows.

Text tokens are few and are computed identically on every rank.  Every token goes through exactly the
operations of the single-process model, so the output equals it up to the summation order of the text means.
Each rank needs the whole model and returns the whole output.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from ..models.dit.model import NaDiT
from ..models.dit.modulation import ATTN_SLOT
from ..models.dit.packing import PackedLayout
from ..models.dit.rope import rotary_rows
from ..models.dit.window_plan import WindowGroup, WindowPlan


@dataclass(frozen=True)
class ShardLayout:
    """The per-sample token counts of one rank's share of a layer: what a block reads of the layout."""

    video_lengths: tuple[int, ...]
    text_lengths: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class Shard:
    """One rank's windows of one layer windowing: its video rows (ascending) and the plan over them."""

    rows: torch.Tensor          # (n,) int64 global video rows owned by this rank
    layout: ShardLayout
    plan: WindowPlan            # indices into [own video rows; all text rows]


def deal_windows(window_sizes: Sequence[int], ranks: int) -> list[int]:
    """Owner rank of each window: largest windows first, each to the rank with the fewest tokens so far.

    Deterministic, so every rank computes the same assignment without talking to the others.
    """
    load = [0] * ranks
    owner = [0] * len(window_sizes)
    for index in sorted(range(len(window_sizes)), key=lambda i: (-window_sizes[i], i)):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        owner[index] = rank
        load[rank] += window_sizes[index]
    return owner


def shard_plan(plan: WindowPlan, layout: PackedLayout, rank: int, ranks: int,
               rope: tuple[str, int]) -> Shard:
    """This rank's part of a layer's window plan, re-indexed to its own rows.

    ``rope`` is (rope type, axis dim): the shard's rotary tables are the rows of the full plan's tables,
    so both are bit-identical.
    """
    device = plan.video_offset.device
    total_video = plan.video_offset.shape[0]
    windows = [(g, w) for g, group in enumerate(plan.groups) for w in range(group.token_index.shape[0])]
    owner = deal_windows([plan.groups[g].video_length for g, _ in windows], ranks)
    mine: dict[int, list[int]] = {}
    for (g, w), r in zip(windows, owner):
        if r == rank:
            mine.setdefault(g, []).append(w)

    own_rows = [plan.groups[g].video_rows.view(-1, plan.groups[g].video_length)[w] for g, ws in mine.items()
                for w in ws]
    rows = (torch.cat(own_rows).sort().values if own_rows
            else torch.empty(0, dtype=torch.int64, device=device))
    # Global row of [video; text] -> row of [own video; text]; text rows keep their order after the video.
    local = torch.full((total_video,), -1, dtype=torch.int64, device=device)
    local[rows] = torch.arange(rows.numel(), device=device)
    text_rows = plan.text_position.numel()
    to_local = torch.cat([local, rows.numel() + torch.arange(text_rows, device=device)])

    groups = []
    for g, ws in mine.items():
        group = plan.groups[g]
        index = to_local[group.token_index[ws]]
        groups.append(WindowGroup(
            shape=group.shape, text_length=group.text_length, token_index=index,
            video_rows=index[:, : group.video_length].reshape(-1),
            text_rows=(group.token_index[ws][:, group.video_length:].reshape(-1) - total_video),
        ))
    local_plan = WindowPlan(tuple(groups), plan.video_offset[rows], plan.video_extent[rows],
                            plan.video_text_length[rows], plan.text_position, plan.text_weight)
    rope_type, axis_dim = rope
    cos, sin = rotary_rows(rope_type, axis_dim, plan)
    table_rows = rows if cos.shape[0] == total_video else torch.cat(
        [rows, total_video + torch.arange(cos.shape[0] - total_video, device=device)])
    local_plan.cache[("rotary", rope_type, axis_dim)] = (cos[table_rows], sin[table_rows])

    starts = torch.tensor([0, *layout.video_lengths], device="cpu").cumsum(0)
    counts = torch.bucketize(rows.cpu(), starts[1:], right=True).bincount(minlength=layout.num_samples)
    return Shard(rows, ShardLayout(tuple(counts.tolist()), layout.text_lengths), local_plan)


class WindowParallelDiT:
    """Runs a :class:`NaDiT` across ``group`` (default: the whole world); called like the model itself."""

    def __init__(self, model: NaDiT, group: dist.ProcessGroup | None = None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("window-parallel DiT needs an initialised torch.distributed process group "
                               "(launch with torchrun, or call torch.distributed.init_process_group first)")
        self.model, self.group = model, group
        self.rank, self.ranks = dist.get_rank(group), dist.get_world_size(group)
        self._shards: dict[tuple, Shard] = {}

    def _shard(self, layout: PackedLayout, key: tuple, plan: WindowPlan) -> Shard:
        cache_key = (layout, key, plan.video_offset.device)
        if cache_key not in self._shards:
            config = self.model.config
            self._shards[cache_key] = shard_plan(plan, layout, self.rank, self.ranks,
                                                 (config.rope_type, config.rope_axis_dim))
        return self._shards[cache_key]

    def _gather(self, x_local: torch.Tensor, shard: Shard, total: int) -> torch.Tensor:
        """The full (total, d) video hidden states from every rank's rows."""
        counts = torch.tensor([shard.rows.numel()], device=x_local.device)
        all_counts = [torch.empty_like(counts) for _ in range(self.ranks)]
        dist.all_gather(all_counts, counts, group=self.group)
        longest = int(max(c.item() for c in all_counts))
        padded = x_local.new_zeros((longest, x_local.shape[1]))
        padded[: x_local.shape[0]] = x_local
        rows = shard.rows.new_full((longest,), -1)
        rows[: shard.rows.numel()] = shard.rows
        parts = [torch.empty_like(padded) for _ in range(self.ranks)]
        part_rows = [torch.empty_like(rows) for _ in range(self.ranks)]
        dist.all_gather(parts, padded, group=self.group)
        dist.all_gather(part_rows, rows, group=self.group)
        full = x_local.new_empty((total, x_local.shape[1]))
        for part, index, count in zip(parts, part_rows, all_counts):
            n = int(count.item())
            full[index[:n]] = part[:n]
        return full

    def _reduced_text_mean(self, attention):
        original = attention.text_mean

        def text_mean(text_sum: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
            dist.all_reduce(text_sum, group=self.group)
            return original(text_sum, plan)
        return text_mean

    @torch.no_grad()
    def __call__(self, vid: torch.Tensor, txt: torch.Tensor, vid_shape: torch.Tensor, txt_shape: torch.Tensor,
                 timestep: torch.Tensor) -> torch.Tensor:
        """The model's output (Σ T·H·W, vid_out_channels) float32, on every rank."""
        model, config = self.model, self.model.config
        layout = PackedLayout.from_shapes(vid_shape, txt_shape, config.patch_size)
        timestep = model._check_inputs(vid, txt, timestep, layout)
        dtype = model.compute_dtype
        x_vid = model.vid_in(vid.to(dtype), layout)
        x_txt = model.txt_in(txt.to(dtype))
        time = model.emb_in(timestep, dtype).unflatten(-1, (config.vid_dim, 2, 3))
        plans = model._window_plans(layout, vid.device)
        total = x_vid.shape[0]

        attentions = [block.attn for block in model.blocks]
        for attention in attentions:
            attention.text_mean = self._reduced_text_mean(attention)
        try:
            shard, x_local = None, None
            for block in model.blocks:
                key = (block.window, block.window_method)
                next_shard = self._shard(layout, key, plans[key])
                if next_shard is not shard:
                    full = x_vid if shard is None else self._gather(x_local, shard, total)
                    shard, x_local = next_shard, full[next_shard.rows]
                x_local, x_txt = block(x_local, x_txt, time, shard.layout, shard.plan)
            x_vid = self._gather(x_local, shard, total)
        finally:
            for attention in attentions:
                del attention.text_mean   # back to the class's own method

        if model.vid_out_norm is not None:
            x_vid = model.vid_out_ada.modulate(model.vid_out_norm(x_vid), time[:, :, ATTN_SLOT], "out",
                                               layout.video_lengths)
        return model.vid_out(x_vid, layout).float()
