"""Modules per stream: separate ``vid`` / ``txt`` instances, or one ``all`` instance shared by both.

The attribute names reproduce the released checkpoint keys (``blocks.N.attn.proj_qkv.vid.weight``,
``blocks.N.mlp.all.proj_in.weight``, ...).
"""
from __future__ import annotations

from typing import Callable

from torch import nn


class StreamPair(nn.Module):
    """One module per stream, or one shared module; a video-only pair has no text module."""

    def __init__(self, make: Callable[[], nn.Module], shared: bool, video_only: bool = False):
        super().__init__()
        self.shared = shared
        self.video_only = video_only
        if shared:
            self.all = make()
        else:
            self.vid = make()
            if not video_only:
                self.txt = make()

    def video(self) -> nn.Module:
        """The module applied to video tokens."""
        return self.all if self.shared else self.vid

    def text(self) -> nn.Module:
        """The module applied to text tokens."""
        if self.video_only:
            raise RuntimeError("this block updates only the video stream; it has no text module")
        return self.all if self.shared else self.txt
