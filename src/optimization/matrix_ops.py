"""The seed's name for the attention entry point and its backend registry, kept as an entry point for code that
imports it; the implementation is :mod:`.attention_dispatch`."""
from __future__ import annotations

from .attention_dispatch import *  # noqa: F401,F403  (the public names)
