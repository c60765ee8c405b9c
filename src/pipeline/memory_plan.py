"""The VRAM planner: from a memory budget, how each phase runs so that it fits (and the predicted peaks).

Given the budget (the user's ``vram_budget``, or by default what the device has free, ComfyUI's reserve
honoured), the job's size and the models, :func:`plan_memory` decides:

* per VAE direction: untiled, when the optimized path's estimate fits next to the VAE's weights; otherwise
  exact row bands (:class:`~src.models.video_vae_v3.banded.BandPlan`): the largest band, and the largest
  ``resident_bytes`` (activations kept on the GPU, the rest in pinned host memory), whose estimate fits;
* for the DiT: its weights plus activations; when they do not fit, token chunks (exact, see
  ``optimization.dit_chunking``) and, if the weights alone do not fit, BlockSwap blocks in host memory;
* whether the DiT must leave the GPU during the VAE phases (it does whenever both do not fit together).

Every estimate is derived from the architecture (bytes per pixel or token per layer); the VAE's are
checked against live-tensor tracking on CPU in the tests, the plan's outcome on the GPU in the benchmark.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Optional

import torch

from ..models.video_vae_v3.banded import BandPlan
from ..optimization.vae_banded import estimate_banded_peak_bytes

log = logging.getLogger("seedvr2")

GIB = 2**30
# Band sizes tried, largest first (pixels of a layer's output per band): 1024² down to 64² pixels.
BAND_PIXELS = tuple(side * side for side in (1024, 768, 512, 384, 256, 192, 128, 96, 64))
# Fractions of the budget tried for resident activations, largest first (0: everything on the host).
RESIDENT_FRACTIONS = (None, 0.5, 0.25, 0.125, 0.0625, 0.0)
# Kept free of any plan: allocator fragmentation and small tensors no estimate covers.
SAFETY_FRACTION = 0.08
# Text rows of a DiT call (the positive prompt embedding; an upper bound).
TEXT_TOKENS = 256
# Token chunks tried for the DiT, largest first.
DIT_CHUNKS = (None, 65536, 32768, 16384, 8192, 4096)


@dataclass(frozen=True)
class VAEPhasePlan:
    bands: Optional[BandPlan]   # None: untiled
    peak: int                   # predicted bytes, weights included


@dataclass(frozen=True)
class MemoryPlan:
    budget: int
    encode: VAEPhasePlan
    decode: VAEPhasePlan
    dit_chunk_rows: Optional[int]
    blocks_to_swap: int
    dit_peak: int
    dit_off_during_vae: bool

    def summary(self) -> str:
        def phase(name: str, p: VAEPhasePlan) -> str:
            if p.bands is None:
                how = "untiled"
            else:
                side = int(math.isqrt(p.bands.band_pixels)) if p.bands.band_pixels else p.bands.band_rows
                resident = ("all on the GPU" if p.bands.resident_bytes is None
                            else f"activations above {_size(p.bands.resident_bytes)} in host memory")
                how = f"exact bands of {side}x{side} px ({resident})"
            return f"VAE {name} {how}, peak ~{_size(p.peak)}"

        dit = (f"DiT {'unchunked' if self.dit_chunk_rows is None else f'in chunks of {self.dit_chunk_rows} tokens'}"
               f"{f', {self.blocks_to_swap} blocks swapped' if self.blocks_to_swap else ''}, "
               f"peak ~{_size(self.dit_peak)}")
        return (f"SeedVR2 memory plan for a {_size(self.budget)} budget: {phase('encode', self.encode)}; "
                f"{dit}; {phase('decode', self.decode)}"
                f"{'; DiT moved to the CPU during the VAE phases' if self.dit_off_during_vae else ''}")


def _size(count: float) -> str:
    return f"{count / GIB:.2f} GiB" if count >= GIB / 4 else f"{count / 2**20:.1f} MiB"


class BudgetError(RuntimeError):
    """Nothing fits the budget; the message says what would."""


def default_budget(device: torch.device) -> int:
    """What ``device`` has free for this run: inside ComfyUI its free memory plus what its loaded models on
    that device hold (it unloads them for us), minus its reserve; outside, the device's free memory plus
    PyTorch's cached blocks.  CPU: the available RAM."""
    if device.type != "cuda":
        try:
            import psutil
            return int(psutil.virtual_memory().available)
        except ImportError:
            return 1 << 62
    try:
        import comfy.model_management as comfy_mm
    except ImportError:
        comfy_mm = None
    if comfy_mm is not None:
        loaded = sum(m.model_loaded_memory() for m in comfy_mm.current_loaded_models
                     if getattr(m, "device", None) == device)
        return max(0, int(comfy_mm.get_free_memory(device)) + int(loaded) - int(comfy_mm.extra_reserved_memory()))
    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + cached)


def dit_activation_bytes(config, tokens: int, text_tokens: int, dtype: torch.dtype,
                         chunk_rows: Optional[int]) -> int:
    """Peak activation bytes of one DiT block at ``tokens`` video tokens (plus text), from its widths:
    the residual stream in and out, the attention's qkv, rotated q/k/v, gathered copies (chunk-sized when
    chunked), output and window scatter, or the MLP's input, gate/up/hidden (chunk-sized when chunked)."""
    e = torch.empty((), dtype=dtype).element_size()
    rows = tokens + text_tokens
    d, inner, hidden = config.vid_dim, config.inner_dim, config.mlp_hidden_dim
    chunk = rows if chunk_rows is None else min(rows, chunk_rows)
    attention = rows * (2 * d + 3 * inner + 3 * inner + 2 * inner) + chunk * 4 * inner
    mlp = rows * 2 * d + chunk * (2 * d + 3 * hidden)
    # + the window plan's index tensors, rope tables, per-sample temporaries and float32 norms (not measured
    # apart yet: a margin).
    return int(max(attention, mlp) * e * 1.3)


def _fits_vae(config, direction: str, height: int, width: int, frames: int, dtype: torch.dtype,
              available: int, *, untiled_peak: Optional[int], channels_last: bool,
              user_band_pixels: Optional[int], result_element: int) -> tuple[Optional[BandPlan], int]:
    if untiled_peak is not None and user_band_pixels is None and untiled_peak <= available:
        return None, untiled_peak
    sizes = [p for p in BAND_PIXELS if user_band_pixels is None or p <= user_band_pixels] or [BAND_PIXELS[-1]]
    if user_band_pixels is not None and user_band_pixels not in sizes:
        sizes.insert(0, user_band_pixels)
    best: Optional[tuple[BandPlan, int]] = None
    for fraction in RESIDENT_FRACTIONS:
        resident = None if fraction is None else int(available * fraction)
        for pixels in sizes:
            plan = BandPlan(band_pixels=pixels, resident_bytes=resident)
            peak = estimate_banded_peak_bytes(config, direction, height, width, frames=frames, dtype=dtype,
                                              plan=plan, channels_last=channels_last, result_element=result_element)
            if peak <= available:
                return plan, peak
            if best is None or peak < best[1]:
                best = (plan, peak)
    raise BudgetError(
        f"VAE {direction} of {frames} frames at {width}x{height} needs about {_size(best[1])} even in "
        f"{int(math.isqrt(best[0].band_pixels))} px bands with its activations in host memory, but the budget "
        f"leaves {_size(available)} for it: raise vram_budget, lower batch_size or resolution."
    )


def plan_memory(budget: int, *, vae_config, vae_dtype: torch.dtype, vae_weight_bytes: int, height: int,
                width: int, frames: int, untiled_peaks: Optional[dict[str, int]] = None, channels_last: bool = False,
                user_bands: Optional[dict[str, Optional[int]]] = None, dit_config=None,
                dit_dtype: torch.dtype = torch.bfloat16, dit_weight_bytes: int = 0, dit_blocks: int = 0,
                text_tokens: int = 0, user_blocks_to_swap: int = 0, decode_to_host: bool = False) -> MemoryPlan:
    """The plan for a job of ``frames`` frames (the largest batch) of ``height`` x ``width`` padded pixels.
    ``untiled_peaks``: the optimized VAE path's untiled estimates per direction (None: no estimate, always
    banded); ``user_bands``: the band pixels the loader's tile sizes ask for (None: the planner's choice);
    ``decode_to_host``: the decoded video goes to host memory (else it stays on the GPU in the VAE's dtype)."""
    usable = int(budget * (1 - SAFETY_FRACTION))
    untiled_peaks = untiled_peaks or {}
    user_bands = user_bands or {}
    vae_available = usable - vae_weight_bytes
    if vae_available <= 0:
        raise BudgetError(
            f"the VAE's weights alone ({_size(vae_weight_bytes)}) do not fit the budget of "
            f"{_size(budget)}: raise vram_budget, lower batch_size or resolution."
        )
    phases = {}
    for direction in ("encode", "decode"):
        bands, activations = _fits_vae(
            vae_config, direction, height, width, frames, vae_dtype, vae_available,
            untiled_peak=untiled_peaks.get(direction), channels_last=channels_last,
            user_band_pixels=user_bands.get(direction),
            result_element=4 if direction == "encode" else 0 if decode_to_host else torch.empty(
                (), dtype=vae_dtype).element_size())
        phases[direction] = VAEPhasePlan(bands, activations + vae_weight_bytes)

    chunk_rows, swap, dit_peak = None, user_blocks_to_swap, 0
    if dit_config is not None:
        patch = dit_config.patch_size
        latent_frames = (frames - 1) // 4 + 1
        tokens = (-(-latent_frames // patch[0]) * -(-height // (8 * patch[1])) * -(-width // (8 * patch[2])))
        per_block = dit_weight_bytes / max(1, dit_blocks)
        for chunk_rows in DIT_CHUNKS:
            activations = dit_activation_bytes(dit_config, tokens, text_tokens, dit_dtype, chunk_rows)
            if dit_weight_bytes + activations <= usable:
                break
        # Weights that still do not fit go to BlockSwap (each swapped block streams in, so two are resident).
        excess = dit_weight_bytes + activations - usable
        needed = 0 if excess <= 0 else min(dit_blocks, math.ceil(excess / per_block) + 2)
        swap = max(user_blocks_to_swap, needed)
        dit_peak = int(dit_weight_bytes - max(0, swap - 2) * per_block + activations)
    together = dit_weight_bytes + max(phases["encode"].peak, phases["decode"].peak)
    plan = MemoryPlan(budget, phases["encode"], phases["decode"], chunk_rows, swap, dit_peak,
                      dit_off_during_vae=dit_config is not None and together > usable)
    return plan


def with_swap(spec, plan: MemoryPlan):
    """``spec`` (a DiTSpec) with the plan's BlockSwap, the swapped blocks in host memory."""
    if plan.blocks_to_swap <= spec.blocks_to_swap:
        return spec
    offload = spec.offload_device if spec.offload_device not in ("none", "") else "cpu"
    return replace(spec, blocks_to_swap=plan.blocks_to_swap, offload_device=offload)
