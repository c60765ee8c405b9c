"""SeedVR2VideoUpscaler: restore and upscale an image batch or video frames in one diffusion step.

Inputs, defaults and widget order are those of the earlier SeedVR2 node pack (v2.5.24), so its saved
workflows load unchanged.  The node checks its inputs and hands them to the pipeline
(:func:`src.pipeline.upscaler.upscale`), which loads the models described by the loader nodes.
"""
from __future__ import annotations

import torch

from ..src.pipeline.devices import device_name_problem, offload_device_choices, resolve_device
from ..src.options import COLOR_CORRECTIONS
from ..src.pipeline.settings import DiTSpec, UpscaleSettings, VAESpec
from .progress import ComfyProgress
from .validation import validation_result


class ImageInputError(ValueError):
    """The image input cannot be upscaled; the message says what was wrong."""


def check_frames(images: torch.Tensor) -> None:
    """Require a ComfyUI IMAGE batch ``(N, H, W, 3 or 4)`` with at least one frame."""
    if not isinstance(images, torch.Tensor):
        raise ImageInputError(f"image must be an IMAGE tensor, got {type(images).__name__}.")
    if images.ndim == 4 and images.shape[0] == 0:
        raise ImageInputError(
            "The image input has no frames (an empty batch, e.g. a video without frames or a filter that "
            "dropped every image). Connect at least one frame."
        )
    if images.ndim != 4 or images.shape[-1] not in (3, 4) or min(images.shape[1:3]) < 1:
        raise ImageInputError(
            f"image must be an RGB or RGBA batch shaped (frames, height, width, 3 or 4); got shape "
            f"{tuple(images.shape)}."
        )


class SeedVR2VideoUpscaler:
    """Upscale images or video frames with SeedVR2 (one-step diffusion restoration)."""

    CATEGORY = "SEEDVR2"
    DESCRIPTION = (
        "Restore and upscale images or video frames with SeedVR2. Connect the DiT and VAE loaders; frames "
        "are processed in temporal batches of batch_size (4n+1 frames, e.g. 1, 5, 9, 33)."
    )
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "Frames to upscale: an image batch or a video's frames (RGB or RGBA)."}),
                "dit": ("SEEDVR2_DIT", {"tooltip": "From SeedVR2 (Down)Load DiT Model."}),
                "vae": ("SEEDVR2_VAE", {"tooltip": "From SeedVR2 (Down)Load VAE Model."}),
                "seed": ("INT", {
                    "default": 42, "min": 0, "max": 2**32 - 1, "step": 1, "control_after_generate": True,
                    "tooltip": "Seed of the diffusion noise; the same seed and settings give the same result.",
                }),
                "resolution": ("INT", {
                    "default": 1080, "min": 16, "max": 16384, "step": 2,
                    "tooltip": "Target length of the shortest edge in pixels (the aspect ratio is kept).",
                }),
                "max_resolution": ("INT", {
                    "default": 0, "min": 0, "max": 16384, "step": 2,
                    "tooltip": "Cap on the longest edge in pixels; 0 = no cap.",
                }),
                "batch_size": ("INT", {
                    "default": 5, "min": 1, "max": 16384, "step": 4,
                    "tooltip": "Frames processed together for temporal consistency; 4n+1 (1, 5, 9, ... 33) "
                               "avoids padding. Use 1 for unrelated images. More frames need more memory.",
                }),
                "uniform_batch_size": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Pad the last batch to batch_size, so every batch has the same shape "
                               "(helps torch.compile; costs some compute).",
                }),
                "color_correction": (list(COLOR_CORRECTIONS), {
                    "default": "lab",
                    "tooltip": "Match the colours of the output to the input; lab (the default) is robust, "
                               "none keeps the model's colours. One of: " + ", ".join(COLOR_CORRECTIONS) + ".",
                }),
            },
            "optional": {
                "temporal_overlap": ("INT", {
                    "default": 0, "min": 0, "max": 16, "step": 1,
                    "tooltip": "Frames shared by consecutive batches and blended, to hide jumps at batch "
                               "boundaries. Must be smaller than batch_size.",
                }),
                "prepend_frames": ("INT", {
                    "default": 0, "min": 0, "max": 32, "step": 1,
                    "tooltip": "Mirrored frames added before the first frame and removed afterwards; "
                               "steadies the start of a clip.",
                }),
                "input_noise_scale": ("FLOAT", {
                    "default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                    "tooltip": "Noise added to the input frames before encoding; can reduce artifacts on "
                               "very clean or very compressed inputs.",
                }),
                "latent_noise_scale": ("FLOAT", {
                    "default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                    "tooltip": "Noise mixed into the encoded input; more = more invented detail, less "
                               "fidelity to the input.",
                }),
                "offload_device": (offload_device_choices(), {
                    "default": "cpu",
                    "tooltip": "Where finished frames and the latents between phases are kept; 'cpu' saves "
                               "VRAM, 'none' keeps them on the model's device.",
                }),
                "enable_debug": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Log timings and memory use of every phase to the console.",
                }),
                "vram_budget": ("FLOAT", {
                    "default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.5,
                    "tooltip": "GPU memory (GiB) the run may use; 0 = what the GPU has free, ComfyUI's reserve "
                               "kept. The pipeline plans VAE bands, DiT chunks, BlockSwap and offloading to fit; "
                               "the output is the same (the plan and its predicted peaks are logged).",
                }),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, offload_device=None):
        """Checks the device name (naming it here skips ComfyUI's combo check, so workflows saved on another
        machine, e.g. with "cuda:0", still validate)."""
        return validation_result(offload_device=device_name_problem(offload_device, offload=True))

    def execute(
        self,
        image: torch.Tensor,
        dit: DiTSpec,
        vae: VAESpec,
        seed: int,
        resolution: int,
        max_resolution: int,
        batch_size: int,
        uniform_batch_size: bool,
        color_correction: str,
        temporal_overlap: int = 0,
        prepend_frames: int = 0,
        input_noise_scale: float = 0.0,
        latent_noise_scale: float = 0.0,
        offload_device: str = "cpu",
        enable_debug: bool = False,
        vram_budget: float = 0.0,
    ) -> tuple[torch.Tensor]:
        """Validate, then run the pipeline; returns the upscaled frames (N, H', W', C) in [0, 1]."""
        check_frames(image)
        settings = UpscaleSettings(
            seed=seed,
            resolution=resolution,
            max_resolution=max_resolution,
            batch_size=batch_size,
            uniform_batch_size=uniform_batch_size,
            color_correction=color_correction,
            temporal_overlap=temporal_overlap,
            prepend_frames=prepend_frames,
            input_noise_scale=input_noise_scale,
            latent_noise_scale=latent_noise_scale,
            offload_device=resolve_device(offload_device, offload=True),
            enable_debug=enable_debug,
            vram_budget=vram_budget,
        )
        settings.validate()
        from ..src.pipeline.upscaler import upscale  # imported on use: loading the pack stays light

        progress = ComfyProgress()
        result = upscale(image, dit, vae, settings, progress=progress)
        progress.finish()
        return (result,)
