"""The four SeedVR2 nodes (classic ComfyUI node API), under the names the earlier SeedVR2 pack used, so
its saved workflows open unchanged.  Importing this package needs no ComfyUI (tests import it too)."""
from .dit_model_loader import SeedVR2LoadDiTModel
from .model_folders import register_model_folder
from .torch_compile_settings import SeedVR2TorchCompileSettings
from .vae_model_loader import SeedVR2LoadVAEModel
from .video_upscaler import SeedVR2VideoUpscaler

register_model_folder()

NODE_CLASS_MAPPINGS = {
    "SeedVR2VideoUpscaler": SeedVR2VideoUpscaler,
    "SeedVR2LoadDiTModel": SeedVR2LoadDiTModel,
    "SeedVR2LoadVAEModel": SeedVR2LoadVAEModel,
    "SeedVR2TorchCompileSettings": SeedVR2TorchCompileSettings,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "SeedVR2VideoUpscaler": "SeedVR2 Video Upscaler",
    "SeedVR2LoadDiTModel": "SeedVR2 (Down)Load DiT Model",
    "SeedVR2LoadVAEModel": "SeedVR2 (Down)Load VAE Model",
    "SeedVR2TorchCompileSettings": "SeedVR2 Torch Compile Settings",
}
