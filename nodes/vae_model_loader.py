"""SeedVR2LoadVAEModel: choose the video VAE weights, device and spatial tiling.

Inputs, defaults and widget order are those of the earlier SeedVR2 node pack (v2.5.24), so its saved
workflows load unchanged; ``enable_optimizations`` and ``quantization`` are new and come last.  Returns a :class:`VAESpec`.
"""
from __future__ import annotations

from ..src.models.file_types import checked_from_header
from ..src.models.load import validate_vae
from ..src.models.registry import DEFAULT_VAE
from ..src.pipeline.devices import (
    compute_device_choices, offload_device_choices, resolve_device,
)
from ..src.options import TILE_DEBUG_MODES, VAE_QUANTIZATIONS
from ..src.pipeline.settings import CompileSettings, SettingsError, VAESpec
from .model_folders import fetch_model, vae_choices
from .validation import loader_validation, require_model



def _tile_inputs(phase: str, verb: str) -> dict:
    return {
        f"{phase}_tiled": ("BOOLEAN", {
            "default": False,
            "tooltip": f"{verb} each frame in exact row bands of about tile_size² pixels to bound memory at high "
                       f"resolution (same result as untiled; the upscaler's vram_budget plans this by itself).",
        }),
        f"{phase}_tile_size": ("INT", {
            "default": 1024, "min": 64, "step": 32,
            "tooltip": f"Tile size in pixels for {phase} tiling (height and width).",
        }),
        f"{phase}_tile_overlap": ("INT", {
            "default": 128, "min": 0, "step": 32,
            "tooltip": "Kept for saved workflows: bands are exact, nothing is blended, so the overlap is unused.",
        }),
    }


class SeedVR2LoadVAEModel:
    """Select the SeedVR2 video VAE, its device, offloading and encode/decode tiling."""

    CATEGORY = "SEEDVR2"
    DESCRIPTION = (
        "Select the SeedVR2 video VAE (downloaded on first use) with its device and tiling. "
        "Connect to SeedVR2 Video Upscaler."
    )
    RETURN_TYPES = ("SEEDVR2_VAE",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (vae_choices(), {
                    "default": DEFAULT_VAE,
                    "tooltip": "VAE weights; the released file is downloaded into models/SEEDVR2 when missing.",
                }),
                "device": (compute_device_choices(), {
                    "default": "auto",
                    "tooltip": "Where the VAE runs. 'auto' = ComfyUI's device. A device this machine lacks "
                               "falls back to the best available one.",
                }),
            },
            "optional": {
                **_tile_inputs("encode", "Encode"),
                **_tile_inputs("decode", "Decode"),
                "tile_debug": (list(TILE_DEBUG_MODES), {
                    "default": "false",
                    "tooltip": "Draw the encode or decode tile borders on the output, to tune tiling.",
                }),
                "offload_device": (offload_device_choices(), {
                    "default": "none",
                    "tooltip": "Where the VAE waits while the DiT runs and between runs; 'none' keeps it on "
                               "its device.",
                }),
                "cache_model": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Keep the loaded VAE between runs (on the offload device, or on its device "
                               "when offload_device is 'none').",
                }),
                "torch_compile_args": ("TORCH_COMPILE_ARGS", {
                    "tooltip": "Optional settings from SeedVR2 Torch Compile Settings.",
                }),
                "enable_optimizations": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "Use the fast, memory-lean VAE path (fused GroupNorm+SiLU, channels-last, "
                               "streamed pieces); same results. Off runs the plain reference path.",
                }),
                "quantization": (list(VAE_QUANTIZATIONS), {
                    "default": "disabled",
                    "tooltip": "fp8_e4m3fn: the convolutions after each GroupNorm and in the decoder's upsamplers "
                               "multiply fp8 values (about 30 % faster on RTX 40/50, H100 and newer) and keep "
                               "half the memory between frames; outputs are no longer exact (a few levels of 255 on average). "
                               "disabled: exact. Needs enable_optimizations.",
                }),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, device=None, offload_device=None):
        """Checks the device names; the model name is checked by ComfyUI's combo (see :func:`loader_validation`)."""
        return loader_validation(device, offload_device)

    def load(
        self,
        model: str,
        device: str,
        encode_tiled: bool = False,
        encode_tile_size: int = 1024,
        encode_tile_overlap: int = 128,
        decode_tiled: bool = False,
        decode_tile_size: int = 1024,
        decode_tile_overlap: int = 128,
        tile_debug: str = "false",
        offload_device: str = "none",
        cache_model: bool = False,
        torch_compile_args: CompileSettings | None = None,
        enable_optimizations: bool = True,
        quantization: str = "disabled",
    ) -> tuple[VAESpec]:
        """Resolve devices, check the tiling, fetch the file, check it holds a VAE, return the spec."""
        for phase, tiled, size, overlap in (("encode", encode_tiled, encode_tile_size, encode_tile_overlap),
                                            ("decode", decode_tiled, decode_tile_size, decode_tile_overlap)):
            if tiled and overlap >= size:
                raise SettingsError(
                    f"{phase}_tile_overlap ({overlap}) must be smaller than {phase}_tile_size ({size}); "
                    f"lower the overlap or raise the tile size."
                )
        run_on = resolve_device(device)
        offload_to = resolve_device(offload_device, offload=True)
        require_model(model, "vae")
        path = fetch_model(model)
        if checked_from_header(path):  # refuse a broken file here, not at the run
            validate_vae(path)
        spec = VAESpec(
            model=str(path),
            device=run_on,
            offload_device=offload_to,
            cache_model=cache_model,
            encode_tiled=encode_tiled,
            encode_tile_size=encode_tile_size,
            encode_tile_overlap=encode_tile_overlap,
            decode_tiled=decode_tiled,
            decode_tile_size=decode_tile_size,
            decode_tile_overlap=decode_tile_overlap,
            tile_debug=tile_debug,
            enable_optimizations=enable_optimizations,
            compile=torch_compile_args,
            quantization=quantization,
        )
        return (spec,)
