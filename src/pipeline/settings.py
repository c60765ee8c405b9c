"""What the nodes (and the CLI) hand to the pipeline: plain, validated settings objects.

The loader nodes do not load weights; they return a :class:`DiTSpec` / :class:`VAESpec` describing what
to load and how to run it.  The upscaler resolves them through the model manager, so a cached model is
reused when the spec is unchanged, and ComfyUI's memory manager can evict it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..optimization.compile_settings import CompileSettings  # noqa: F401  (part of the specs' interface)
from ..options import COLOR_CORRECTIONS, PARALLEL_MODES, TILE_DEBUG_MODES, VAE_QUANTIZATIONS

SEED_LIMIT = 2**64  # ComfyUI's seeds go to 2^64 − 1, which is also the range of torch.manual_seed


class SettingsError(ValueError):
    """A user-facing setting is invalid; the message says which and what to do."""


@dataclass(frozen=True)
class DiTSpec:
    """Which DiT file to use and how to run it."""

    model: str                      # file name as listed in the models folder (or an absolute path)
    device: str = "auto"            # "auto", "cpu", "cuda:N", "mps"
    offload_device: str = "none"    # where the weights live between runs / swapped blocks live
    cache_model: bool = False
    blocks_to_swap: int = 0
    swap_io_components: bool = False
    attention_mode: str = "auto"
    quantization: str = "disabled"
    enable_optimizations: bool = True
    compile: CompileSettings | None = None


@dataclass(frozen=True)
class VAESpec:
    """Which VAE file to use and how to run it (tiling sizes are in pixels)."""

    model: str
    device: str = "auto"
    offload_device: str = "none"
    cache_model: bool = False
    encode_tiled: bool = False
    encode_tile_size: int = 1024
    encode_tile_overlap: int = 128
    decode_tiled: bool = False
    decode_tile_size: int = 1024
    decode_tile_overlap: int = 128
    tile_debug: str = "false"       # "false", "encode" or "decode": draw that direction's VAE tiles
    enable_optimizations: bool = True
    compile: CompileSettings | None = None
    quantization: str = "disabled"  # "fp8_e4m3fn": convolutions in fp8 (optimization.vae_fp8)

    def __post_init__(self) -> None:
        # Everything is checked here, when the loader runs, not when the first tile is drawn after the
        # encode and the DiT have run.
        if self.tile_debug not in TILE_DEBUG_MODES:
            raise SettingsError(f"tile_debug must be one of {', '.join(TILE_DEBUG_MODES)}, got {self.tile_debug!r}.")
        for direction in ("encode", "decode"):
            if getattr(self, f"{direction}_tiled"):
                _check_tiling(direction, getattr(self, f"{direction}_tile_size"),
                              getattr(self, f"{direction}_tile_overlap"))
        if self.quantization not in VAE_QUANTIZATIONS:
            raise SettingsError(f"VAE quantization must be one of {VAE_QUANTIZATIONS}, got {self.quantization!r}.")
        if self.quantization != "disabled" and not self.enable_optimizations:
            raise SettingsError(
                f"VAE quantization {self.quantization!r} runs on the optimized VAE path: turn enable_optimizations "
                f"on, or set quantization to 'disabled'."
            )


def _check_tiling(direction: str, size: object, overlap: object) -> None:
    """The VAE's own rule for tile sizes (``tiling.check_tiling``), with the loader input's name."""
    from ..models.video_vae_v3.errors import VAEInputError
    from ..models.video_vae_v3.tiling import check_tiling

    if isinstance(size, bool) or isinstance(overlap, bool):
        raise SettingsError(f"{direction}_tile_size and {direction}_tile_overlap must be whole numbers of pixels.")
    try:
        check_tiling(size, overlap, 8)
    except VAEInputError as exc:
        raise SettingsError(f"{direction}_tile_size {size!r} / {direction}_tile_overlap {overlap!r}: {exc}") from exc


def check_seed(seed: object) -> int:
    """A seed in ComfyUI's range 0 … 2^64 − 1 (torch.manual_seed takes the same values, so a seed gives the
    same noise as in the earlier pack); anything else is refused, never wrapped silently."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SettingsError(f"seed must be a whole number from 0 to 2^64 − 1, got {seed!r}.")
    if not 0 <= seed < SEED_LIMIT:
        raise SettingsError(f"seed must be between 0 and 2^64 − 1 = {SEED_LIMIT - 1} (ComfyUI's range), got {seed}.")
    return seed


@dataclass(frozen=True)
class UpscaleSettings:
    """Per-run settings of the upscaler node; defaults are the node's defaults."""

    seed: int = 42
    resolution: int = 1080
    max_resolution: int = 0
    batch_size: int = 5
    uniform_batch_size: bool = False
    color_correction: str = "lab"
    temporal_overlap: int = 0
    prepend_frames: int = 0
    input_noise_scale: float = 0.0
    latent_noise_scale: float = 0.0
    offload_device: str = "cpu"     # where finished frames and between-phase latents are kept
    enable_debug: bool = False
    extra: dict = field(default_factory=dict)
    parallel: str = "auto"          # how processes of a torch.distributed run share the clip (src/distributed)
    vram_budget: float = 0.0        # GiB the run may use on the GPU; 0: what the device has free (memory_plan)

    def validate(self) -> None:
        check_seed(self.seed)
        for name in ("resolution", "max_resolution", "batch_size", "temporal_overlap", "prepend_frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise SettingsError(f"{name} must be a whole number, got {value!r}.")
        if self.resolution < 16:
            raise SettingsError(f"resolution must be at least 16 pixels (got {self.resolution}).")
        if self.max_resolution and self.max_resolution < 16:
            raise SettingsError(
                f"max_resolution must be 0 (no cap) or at least 16 pixels (got {self.max_resolution})."
            )
        if self.batch_size < 1:
            raise SettingsError(f"batch_size must be at least 1 (got {self.batch_size}).")
        if self.temporal_overlap < 0 or self.prepend_frames < 0:
            raise SettingsError("temporal_overlap and prepend_frames must not be negative.")
        if self.temporal_overlap and self.temporal_overlap >= self.batch_size:
            raise SettingsError(
                f"temporal_overlap ({self.temporal_overlap}) must be smaller than batch_size "
                f"({self.batch_size}); raise batch_size or lower the overlap."
            )
        if self.color_correction not in COLOR_CORRECTIONS:
            raise SettingsError(
                f"color_correction {self.color_correction!r} is not one of {', '.join(COLOR_CORRECTIONS)}."
            )
        if self.parallel not in PARALLEL_MODES:
            raise SettingsError(f"parallel {self.parallel!r} is not one of {', '.join(PARALLEL_MODES)}.")
        if not isinstance(self.vram_budget, (int, float)) or not 0 <= self.vram_budget <= 4096:
            raise SettingsError(
                f"vram_budget must be 0 (use what the GPU has free) or a size in GiB up to 4096, got "
                f"{self.vram_budget!r}."
            )
        for name in ("input_noise_scale", "latent_noise_scale"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise SettingsError(f"{name} must be between 0 and 1 (got {value}).")
