"""Errors raised by the video VAE; every message says what was wrong and what to do."""
from __future__ import annotations


class VAEConfigError(ValueError):
    """Constructor arguments or a state dict do not describe a supported SeedVR2 video VAE."""


class VAEInputError(ValueError):
    """A tensor or an option passed to encode/decode is invalid."""
