"""Depth-first streaming: a causal chunk runs through a list of stages in pieces of frames.

Every convolution keeps its look-back in the :class:`CausalMemory` and decides per call whether it continues
the clip, so splitting a chunk into pieces gives the unsplit result; memory then follows the piece, not the
chunk.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch

from ...models.video_vae_v3.temporal_slicing import CausalMemory
from ...progress import checkpoint


class Stage(NamedTuple):
    """One step of a streamed network: ``run(x, memory)``.  ``growth``: how much wider its widest activation
    is, per frame, than its input (e.g. 4 for an upsampler), which sizes the pieces it is given."""

    run: Callable[[torch.Tensor, CausalMemory], torch.Tensor]
    growth: float = 1.0


def _run_pieces(stages: Sequence[Stage], x: torch.Tensor, first_stage: int, memory: CausalMemory,
                piece_bytes: int, outputs: list[torch.Tensor], last: bool, span: tuple[float, float] = (0.0, 1.0)
                ) -> None:
    """Run ``x`` from ``stages[first_stage]`` on, splitting it into pieces before any stage it would overflow.
    ``last``: no later piece of the clip will reach these stages, so their look-back need not be kept.
    ``span``: the share of the chunk's progress that these stages of this piece stand for; every stage is a
    :func:`checkpoint` (a piece of a 1080p frame through one stage takes a fraction of a second on a GPU).

    A plain recursive function, not a closure: a self-referencing closure would form a reference cycle
    that keeps the causal memory (gigabytes at 1080p) alive until Python's cycle collector happens to run.
    """
    begin, end = span
    for index in range(first_stage, len(stages)):
        if x.shape[2] == 0:
            return
        done = begin + (end - begin) * (index - first_stage) / (len(stages) - first_stage)
        stage = stages[index]
        frame_bytes = x[:, :, 0].numel() * x.element_size() * stage.growth
        frames = max(1, int(piece_bytes // frame_bytes))
        if x.shape[2] > frames:
            pieces = x.split(frames, dim=2)
            share = (end - done) / len(pieces)
            for number, piece in enumerate(pieces, start=1):
                _run_pieces(stages, piece, index, memory, piece_bytes, outputs, last and number == len(pieces),
                            (done + share * (number - 1), done + share * number))
            return
        checkpoint(done)
        memory.closing = last
        try:
            x = stage.run(x, memory)
        finally:
            memory.closing = False
    if x.shape[2]:
        outputs.append(x)


def run_streamed(stages: Sequence[Stage], clip: torch.Tensor, memory: CausalMemory, piece_bytes: int) -> torch.Tensor:
    """Run ``clip`` (B, C, T, ...) through ``stages`` depth first, in pieces of frames.

    Before each stage the input is split into pieces of as many frames as keep the stage's widest activation
    within ``piece_bytes`` (at least one frame), and every piece runs through all the remaining stages
    before the next one starts: memory follows the piece, not the chunk, and the causal memory makes the
    result equal to running each stage on the whole clip.  A stage may return no frames (a strided
    convolution still collecting its window); its piece then ends there.
    """
    outputs: list[torch.Tensor] = []
    _run_pieces(stages, clip, 0, memory, piece_bytes, outputs, memory.last_chunk)
    if not outputs:
        raise RuntimeError(
            f"a clip chunk of {clip.shape[2]} frames produced no output frames: the strided temporal convolutions "
            f"need more input; run clips through VideoAutoencoder.encode/decode, whose chunks always produce output."
        )
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
