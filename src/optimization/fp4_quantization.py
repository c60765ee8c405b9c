"""The seed's name for the DiT's quantized Linear layers (FP8 and NVFP4), kept as an entry point for code that
imports it; the implementation is :mod:`.linear_quantization`."""
from __future__ import annotations

from .linear_quantization import *  # noqa: F401,F403  (the public names)
