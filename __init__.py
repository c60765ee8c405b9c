"""SeedVR2 for ComfyUI: one-step video and image restoration and upscaling (ByteDance SeedVR2).

ComfyUI imports this folder as a package and reads the two mappings below; the nodes live in ``nodes/``,
the models and pipeline in ``src/``.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
