"""SeedVR2LoadDiTModel: choose the DiT weights and how to run them.

Inputs, defaults and widget order are those of the earlier SeedVR2 node pack (v2.5.24), so its saved
workflows load unchanged; ``quantization`` and ``enable_optimizations`` are new and come last.  The node
loads nothing: it makes sure the file is there (downloading a released one) and returns a
:class:`DiTSpec`; the upscaler loads and caches the model.
"""
from __future__ import annotations

from ..src.models.file_types import checked_from_header, is_gguf
from ..src.models.load import validate_dit
from ..src.models.registry import DEFAULT_DIT
from ..src.options import ATTENTION_MODES, QUANTIZATION_MODES
from ..src.pipeline.devices import (
    compute_device_choices, offload_device_choices, resolve_device,
)
from ..src.pipeline.settings import CompileSettings, DiTSpec, SettingsError
from .model_folders import dit_choices, fetch_model
from .validation import loader_validation, require_model



def legacy_quantization(quantization) -> str:
    """The ``quantization`` value of a saved workflow.  A boolean is the trailing ``local_models_only`` toggle
    of the earlier pack's open PR #625: the UI hands widget values over by position, so that toggle lands
    in our first extra widget; it means no quantization."""
    return "disabled" if isinstance(quantization, bool) else quantization


def quantization_problem(quantization) -> str | None:
    """Why ``quantization`` is not a mode (booleans of older workflows are accepted), or None."""
    if quantization is None or legacy_quantization(quantization) in QUANTIZATION_MODES:
        return None
    return f"{quantization!r} is not a quantization mode; pick one of {', '.join(QUANTIZATION_MODES)}."


def choose_quantization(model: str, quantization: str) -> str:
    """The quantization mode to use: a .gguf file is always "gguf"; "gguf" needs a .gguf file."""
    gguf_file = is_gguf(model)
    if gguf_file and quantization not in ("disabled", "gguf"):
        raise SettingsError(
            f"{model} is a GGUF file, which is already quantized; set quantization to 'disabled' or 'gguf', "
            f"or pick a .safetensors model to use {quantization!r}."
        )
    if quantization == "gguf" and not gguf_file:
        raise SettingsError(f"quantization 'gguf' needs a .gguf model file; {model} is not one.")
    return "gguf" if gguf_file else quantization


class SeedVR2LoadDiTModel:
    """Select the SeedVR2 DiT (3B or 7B) and its device, offloading, attention and quantization."""

    CATEGORY = "SEEDVR2"
    DESCRIPTION = (
        "Select the SeedVR2 DiT weights (3B or 7B; released files are downloaded on first use) and how "
        "to run them. Connect to SeedVR2 Video Upscaler."
    )
    RETURN_TYPES = ("SEEDVR2_DIT",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        devices = compute_device_choices()
        return {
            "required": {
                "model": (dit_choices(), {
                    "default": DEFAULT_DIT,
                    "tooltip": "DiT weights: 3B is faster, 7B finer; fp16 is exact, fp8 and GGUF save memory. "
                               "Released files are downloaded into models/SEEDVR2 when missing.",
                }),
                "device": (devices, {
                    "default": "auto",
                    "tooltip": "Where the DiT runs. 'auto' = ComfyUI's device. A device this machine lacks "
                               "(e.g. from a shared workflow) falls back to the best available one.",
                }),
            },
            "optional": {
                "blocks_to_swap": ("INT", {
                    "default": 0, "min": 0, "max": 36, "step": 1,
                    "tooltip": "Transformer blocks kept on the offload device and brought in one at a time "
                               "(3B has 32, 7B 36): less VRAM, slower. Needs an offload_device.",
                }),
                "swap_io_components": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Also keep the input/output layers on the offload device. Needs an offload_device.",
                }),
                "offload_device": (offload_device_choices(), {
                    "default": "none",
                    "tooltip": "Where the DiT waits between runs and where swapped blocks live; "
                               "'none' keeps it on its device.",
                }),
                "cache_model": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Keep the loaded DiT between runs (on the offload device, or on its device "
                               "when offload_device is 'none').",
                }),
                "attention_mode": (list(ATTENTION_MODES), {
                    "default": "auto",
                    "tooltip": "Attention kernel. 'auto' picks the fastest installed one; a kernel that is "
                               "not installed falls back to PyTorch SDPA.",
                }),
                "torch_compile_args": ("TORCH_COMPILE_ARGS", {
                    "tooltip": "Optional settings from SeedVR2 Torch Compile Settings.",
                }),
                "quantization": (list(QUANTIZATION_MODES), {
                    "default": "disabled",
                    "tooltip": "Run the DiT with quantized weights: fp8_e4m3fn (fp8 matmuls on Ada/Hopper/"
                               "Blackwell, weight-only elsewhere), fp4_experimental (4-bit weights, any GPU), "
                               "fp4_scaled / fp4_scaled_fast (FP4 matmuls on Blackwell; fp8 elsewhere). "
                               "'disabled' uses the file as it is. A .gguf file always runs as gguf.",
                }),
                "enable_optimizations": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "Use the fast paths: the attention backend of attention_mode and fused "
                               "(compiled) kernels. Off runs the plain reference path (PyTorch SDPA, eager "
                               "ops), for comparison.",
                }),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, device=None, offload_device=None, quantization=None):
        """Checks the device names (see :func:`loader_validation`; the model name is left to ComfyUI's combo
        check, so its error is attached to ``model`` alone), and ``quantization`` here rather than by ComfyUI's
        combo check, so that older workflows' booleans pass."""
        result = loader_validation(device, offload_device)
        problem = quantization_problem(quantization)
        if problem is None:
            return result
        return f"quantization: {problem}" if result is True else f"{result} quantization: {problem}"

    def load(
        self,
        model: str,
        device: str,
        blocks_to_swap: int = 0,
        swap_io_components: bool = False,
        offload_device: str = "none",
        cache_model: bool = False,
        attention_mode: str = "auto",
        torch_compile_args: CompileSettings | None = None,
        quantization: str = "disabled",
        enable_optimizations: bool = True,
    ) -> tuple[DiTSpec]:
        """Resolve devices, fetch the file, check it holds a DiT, and return the spec."""
        quantization = choose_quantization(model, legacy_quantization(quantization))
        run_on = resolve_device(device)
        offload_to = resolve_device(offload_device, offload=True)
        if (blocks_to_swap > 0 or swap_io_components) and offload_to == "none":
            raise SettingsError(
                "blocks_to_swap / swap_io_components keep parts of the DiT on the offload device, but "
                "offload_device is 'none'. Set offload_device to 'cpu', or blocks_to_swap to 0 and "
                "swap_io_components off."
            )
        if offload_to == run_on:
            blocks_to_swap, swap_io_components = 0, False  # swapping to the device it runs on changes nothing
        require_model(model, "dit")
        path = fetch_model(model)
        if checked_from_header(path):  # refuse a broken file here, not at the run
            validate_dit(path)
        spec = DiTSpec(
            model=str(path),
            device=run_on,
            offload_device=offload_to,
            cache_model=cache_model,
            blocks_to_swap=blocks_to_swap,
            swap_io_components=swap_io_components,
            attention_mode=attention_mode,
            quantization=quantization,
            enable_optimizations=enable_optimizations,
            compile=torch_compile_args,
        )
        return (spec,)
