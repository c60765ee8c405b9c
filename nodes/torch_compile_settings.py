"""SeedVR2TorchCompileSettings: torch.compile options for the DiT and VAE loaders."""
from __future__ import annotations

from ..src.optimization.compile_settings import COMPILE_BACKENDS, COMPILE_MODES, CompileSettings


class SeedVR2TorchCompileSettings:
    """torch.compile settings; connect to the loaders' torch_compile_args to compile those models."""

    CATEGORY = "SEEDVR2"
    DESCRIPTION = (
        "torch.compile settings for the SeedVR2 loaders. The first batch pays for compilation; later "
        "batches and runs of the same size are faster. Worth it for long videos, not single images."
    )
    RETURN_TYPES = ("TORCH_COMPILE_ARGS",)
    FUNCTION = "settings"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "backend": (list(COMPILE_BACKENDS), {
                    "default": "inductor",
                    "tooltip": "inductor generates fused kernels (needs Triton on GPU); cudagraphs only "
                               "replays CUDA graphs.",
                }),
                "mode": (list(COMPILE_MODES), {
                    "default": "default",
                    "tooltip": "max-autotune tries more kernel variants: slower first run, sometimes faster after.",
                }),
                "fullgraph": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Fail instead of splitting the model into several graphs.",
                }),
                "dynamic": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Compile for varying input sizes at once instead of once per size.",
                }),
                "dynamo_cache_size_limit": ("INT", {
                    "default": 64, "min": 0, "max": 1024, "step": 1,
                    "tooltip": "How many compiled variants to keep per function.",
                }),
                "dynamo_recompile_limit": ("INT", {
                    "default": 128, "min": 0, "max": 1024, "step": 1,
                    "tooltip": "How many recompilations to allow before running uncompiled.",
                }),
            },
        }

    def settings(
        self,
        backend: str = "inductor",
        mode: str = "default",
        fullgraph: bool = False,
        dynamic: bool = False,
        dynamo_cache_size_limit: int = 64,
        dynamo_recompile_limit: int = 128,
    ) -> tuple[CompileSettings]:
        """Bundle the widget values."""
        return (CompileSettings(backend, mode, fullgraph, dynamic, dynamo_cache_size_limit, dynamo_recompile_limit),)
