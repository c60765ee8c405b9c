"""SeedVR2 NaDiT diffusion transformer (3B and 7B), checkpoint-faithful."""
from .config import NaDiTConfig
from .model import NaDiT
from .windows import partition_windows

__all__ = ["NaDiT", "NaDiTConfig", "partition_windows"]
