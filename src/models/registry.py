"""The released SeedVR2 weight files: what each one holds, where it is downloaded from, its SHA-256.

The table is the one users of the earlier ComfyUI node pack know (same file names, repositories and
hashes), so their model folders and saved workflows keep working.  Files that are not listed here can
still be used; they are found in the model folders (see :mod:`.locate`) but never downloaded.
"""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_DIT = "seedvr2_ema_3b_fp8_e4m3fn.safetensors"
DEFAULT_VAE = "ema_vae_fp16.safetensors"


@dataclass(frozen=True)
class ModelInfo:
    """One released file: ``kind`` is "dit" or "vae", ``size`` "3b"/"7b" ("" for the VAE)."""

    filename: str
    repo: str
    sha256: str
    kind: str
    size: str
    precision: str  # fp16, fp8_e4m3fn, fp8_e4m3fn_mixed (block 35 kept in fp16), or a GGUF type
    sharp: bool = False

    @property
    def url(self) -> str:
        """Direct download address on the Hugging Face Hub."""
        return f"https://huggingface.co/{self.repo}/resolve/main/{self.filename}"


_NUMZ = "numz/SeedVR2_comfyUI"
_AINVFX = "AInVFX/SeedVR2_comfyUI"

KNOWN_MODELS: tuple[ModelInfo, ...] = (
    ModelInfo("seedvr2_ema_3b-Q4_K_M.gguf", _AINVFX,
              "e665e3909de1a8c88a69c609bca9d43ff5a134647face2ce4497640cc3597f0e", "dit", "3b", "Q4_K_M"),
    ModelInfo("seedvr2_ema_3b-Q8_0.gguf", _AINVFX,
              "be0d60083a2051a265eb4b77f28edf494e6db67ffc250216f32b72292e5cbd96", "dit", "3b", "Q8_0"),
    ModelInfo("seedvr2_ema_3b_fp8_e4m3fn.safetensors", _NUMZ,
              "3bf1e43ebedd570e7e7a0b1b60d6a02e105978f505c8128a241cde99a8240cff", "dit", "3b", "fp8_e4m3fn"),
    ModelInfo("seedvr2_ema_3b_fp16.safetensors", _NUMZ,
              "2fd0e03a3dad24e07086750360727ca437de4ecd456f769856e960ae93e2b304", "dit", "3b", "fp16"),
    ModelInfo("seedvr2_ema_7b-Q4_K_M.gguf", _AINVFX,
              "db9cb2ad90ebd40d2e8c29da2b3fc6fd03ba87cd58cbadceccca13ad27162789", "dit", "7b", "Q4_K_M"),
    ModelInfo("seedvr2_ema_7b_fp8_e4m3fn_mixed_block35_fp16.safetensors", _AINVFX,
              "3d68b5ec0b295ae28092e355c8cad870edd00b817b26587d0cb8f9dd2df19bb2", "dit", "7b", "fp8_e4m3fn_mixed"),
    ModelInfo("seedvr2_ema_7b_fp16.safetensors", _NUMZ,
              "7b8241aa957606ab6cfb66edabc96d43234f9819c5392b44d2492d9f0b0bbe4a", "dit", "7b", "fp16"),
    ModelInfo("seedvr2_ema_7b_sharp-Q4_K_M.gguf", _AINVFX,
              "7aed800ac4eb8e0d18569a954c0ff35f5a1caa3ed5d920e66cc31405f75b6e69", "dit", "7b", "Q4_K_M", sharp=True),
    ModelInfo("seedvr2_ema_7b_sharp_fp8_e4m3fn_mixed_block35_fp16.safetensors", _AINVFX,
              "0d2c5b8be0fda94351149c5115da26aef4f4932a7a2a928c6f184dda9186e0be", "dit", "7b", "fp8_e4m3fn_mixed",
              sharp=True),
    ModelInfo("seedvr2_ema_7b_sharp_fp16.safetensors", _NUMZ,
              "20a93e01ff24beaeebc5de4e4e5be924359606c356c9c51509fba245bd2d77dd", "dit", "7b", "fp16", sharp=True),
    ModelInfo("ema_vae_fp16.safetensors", _NUMZ,
              "20678548f420d98d26f11442d3528f8b8c94e57ee046ef93dbb7633da8612ca1", "vae", "", "fp16"),
)

_BY_NAME = {info.filename: info for info in KNOWN_MODELS}

# Released files this pack loads but does not download: no SHA-256 of them is published or known to us,
# and a download is only ever renamed into place after its hash matched.  Users place them themselves
# (ComfyUI's own templates download them into models/diffusion_models and models/vae).
# Comfy-Org's 3B is ByteDance's current 3B release (2025-06-22), not the earlier one numz's files hold.
_COMFY_ORG = "Comfy-Org/SeedVR2"
_COMFY_FORMATS = ("fp16", "fp8_e4m3fn", "int8_convrot", "mxfp8", "nvfp4")
PLACE_YOURSELF: tuple[ModelInfo, ...] = (
    *(ModelInfo(f"seedvr2_{size}_{fmt}.safetensors", _COMFY_ORG, "", "dit", size[:2], fmt, sharp=size.endswith("sharp"))
      for size in ("3b", "7b", "7b_sharp") for fmt in _COMFY_FORMATS),
    ModelInfo("seedvr2_ema_vae_fp16.safetensors", _COMFY_ORG, "", "vae", "", "fp16"),
    ModelInfo("seedvr2_ema_3b.pth", "ByteDance-Seed/SeedVR2-3B", "", "dit", "3b", "fp32"),
    ModelInfo("seedvr2_ema_7b.pth", "ByteDance-Seed/SeedVR2-7B", "", "dit", "7b", "fp32"),
    ModelInfo("seedvr2_ema_7b_sharp.pth", "ByteDance-Seed/SeedVR2-7B", "", "dit", "7b", "fp32", sharp=True),
    ModelInfo("ema_vae.pth", "ByteDance-Seed/SeedVR2-3B", "", "vae", "", "fp32"),
)
_PLACED = {info.filename: info for info in PLACE_YOURSELF}


def known_model(name: str) -> ModelInfo | None:
    """The registry entry of a downloadable released file (a bare name, not a path in a subfolder), or None."""
    return _BY_NAME.get(name)


def placed_model(name: str) -> ModelInfo | None:
    """The entry of a released file that is not downloaded (no known SHA-256), or None."""
    return _PLACED.get(name)


def place_yourself_hint(info: ModelInfo) -> str:
    """What to tell a user who selected a released file that is not downloaded and is missing."""
    folder = "models/diffusion_models" if info.kind == "dit" else "models/vae"
    return (
        f"{info.filename!r} is a released SeedVR2 file, but no SHA-256 of it is known to this pack, so it is "
        f"not downloaded automatically (a download is only used after its hash is checked). Download it from "
        f"https://huggingface.co/{info.repo} and put it into ComfyUI's {folder} (or models/SEEDVR2)."
    )


def known_dit_models() -> list[str]:
    """File names of the released DiT weights, in registry order."""
    return [info.filename for info in KNOWN_MODELS if info.kind == "dit"]


def known_vae_models() -> list[str]:
    """File names of the released VAE weights."""
    return [info.filename for info in KNOWN_MODELS if info.kind == "vae"]
