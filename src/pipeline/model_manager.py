"""Loading, caching and placing the DiT and the VAE across the phases of a run.

Inside ComfyUI every model we load is wrapped in ComfyUI's own ``ModelPatcher`` and placed with
``comfy.model_management.load_models_gpu``: ComfyUI then knows how much VRAM we hold, can evict its own
models to make room for ours, and evicts ours ("Unload models", or when another model needs the room).
Outside ComfyUI (the CLI, the tests, the benchmark) models are moved with ``.to()``.

Models are cached between runs when the spec says ``cache_model`` (parked on the offload device); without
it every run loads afresh and drops the model at its end, so nothing outlives the workflow that loaded it.

Who keeps a cached model alive.  Outside ComfyUI, the manager (until :meth:`ModelManager.clear`).  Inside
ComfyUI, the loader node's output: the spec object ComfyUI keeps in its execution cache.  The manager holds
cached models only for as long as a spec that asked for them exists, so they go when ComfyUI lets go of that
output: "Free model and node cache" (``POST /free`` with ``free_memory``), a changed loader input, a loader
removed from the workflow, or its RAM-pressure cache.  ComfyUI's "Unload models" moves our weights off the GPU
like its own (its ``unload_all_models`` detaches every patcher), keeping them in RAM for the next run.

The sizes ComfyUI plans with are ours: the weights' real bytes (``ModelPatcher`` size) and, for each phase,
an estimate of its activations (``memory_required``).
"""
from __future__ import annotations

import inspect
import logging
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..models.file_types import SAFETENSORS, file_format, is_gguf
from ..models.load import load_dit, load_vae
from ..optimization import quantized_load, stable_memory
from . import timing
from .devices import resolve_device
from .finite import check_weights
from .settings import DiTSpec, VAESpec

log = logging.getLogger("seedvr2")

try:  # ComfyUI present?
    import comfy.model_management as comfy_mm
    import comfy.model_patcher as comfy_patcher
except ImportError:  # CLI / tests
    comfy_mm = None
    comfy_patcher = None


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it, fp16 on older GPUs, float32 on the CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


class SeedVR2Model(torch.nn.Module):
    """Gives ComfyUI's ModelPatcher a module whose ``device`` attribute it may overwrite."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        super().__init__()
        self.inner = model
        self.device = device


@dataclass(eq=False)
class ManagedModel:
    """A loaded model, the devices it lives on, and how ComfyUI tracks it."""

    kind: str
    key: tuple
    model: torch.nn.Module
    device: torch.device
    offload_device: torch.device | None
    dtype: torch.dtype
    cache: bool
    patcher: object | None = None
    info: dict = field(default_factory=dict)

    def activate(self, memory_required: int = 0) -> torch.nn.Module:
        """Make sure the weights are on the compute device, with ``memory_required`` bytes of room for the
        activations that follow (inside ComfyUI, its model management unloads other models to make it).

        With BlockSwap the swapped blocks stay in (pinned) host memory and stream in during the forward.
        """
        if self.patcher is not None:
            # Our patcher always loads whole (see _patcher_class); where it cannot, ComfyUI must be told to.
            whole = not getattr(self.patcher, "loads_whole", False)
            comfy_mm.load_models_gpu([self.patcher], memory_required=memory_required, force_full_load=whole)
        elif _module_device(self.model) != self.device:
            stable_memory.offload(self.model, self.device)
        return self.model

    def resident_on(self, device: torch.device) -> bool:
        return _module_device(self.model) == device

    def park(self, to: torch.device | None = None) -> None:
        """Move the weights to ``to`` (default: the offload device, if one is set) between phases."""
        target = to or self.offload_device
        if target is None or _module_device(self.model) == target:
            return
        _release_caches(self.model)  # device-side caches (the DiT's window plans) are rebuilt on the next use
        if self.patcher is not None:
            self.patcher.detach()
            _forget_patcher(self.patcher)
        else:
            stable_memory.offload(self.model, target, pin_memory=True)
        # ComfyUI's convention: return the memory to the driver after moving a model.  Standalone the freed
        # weights stay in PyTorch's cache, for the next phase's activations: returning them to the driver only
        # to map them back for the decode costs time (docs/performance.md, DiT offload).
        if comfy_mm is not None:
            _empty_cache(self.device)


def _release_caches(model: torch.nn.Module | None) -> None:
    release = getattr(model, "release_caches", None)
    if release is not None:
        release()


def _module_device(module: torch.nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's parameters and buffers, each storage counted once (views of one packed buffer,
    tied weights) and at its real size (fp8, packed 4-bit and GGUF storages included)."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def dit_working_bytes(config, latent_shapes, dtype: torch.dtype) -> int:
    """Estimated peak activation memory of one DiT forward over the largest of ``latent_shapes`` ((T, H, W)
    latents): per video token the residual streams, the normalised input, q/k/v and their window-gathered
    copies, the attention output and the MLP's hidden activations (SwiGLU: gate and value) in ``dtype``, plus
    float32 output.  Used to make room before the DiT phase; the GPU check in benchmarks/ compares it with
    the measured peak."""
    from ..models.dit.config import swiglu_hidden_dim

    patch = config.patch_size
    tokens = max((t // patch[0]) * (h // patch[1]) * (w // patch[2]) for t, h, w in latent_shapes)
    dim = config.vid_dim
    swiglu = str(config.mlp_type).startswith("swiglu")
    hidden = swiglu_hidden_dim(dim, config.expand_ratio) * 2 if swiglu else dim * config.expand_ratio
    element = torch.empty((), dtype=dtype).element_size()
    per_token = (10 * dim + hidden) * element + 4 * config.vid_out_channels * patch[1] * patch[2]
    return int(tokens * per_token)


def _empty_cache(device: torch.device) -> None:
    if comfy_mm is not None:
        comfy_mm.soft_empty_cache()
    elif device.type == "cuda":
        torch.cuda.empty_cache()


def _forget_patcher(patcher) -> None:
    """Remove a detached patcher from ComfyUI's list of loaded models."""
    for index, loaded in enumerate(list(comfy_mm.current_loaded_models)):
        if loaded.model is patcher:
            comfy_mm.current_loaded_models.pop(index)
            break


# ModelPatcher.load as of ComfyUI 0.8.0 - 0.19 (the newest read): our override needs these parameters.
_PATCHER_LOAD_PARAMETERS = ("device_to", "lowvram_model_memory", "force_patch_weights", "full_load")
_PATCHER_CLASS = None


def _patcher_class():
    """ComfyUI's ModelPatcher, made to always load our models whole.

    ComfyUI's partial ("lowvram") loading leaves modules without its cast hooks on the offload device, which
    our plain PyTorch modules cannot run with; so far we asked for ``force_full_load``, after which ComfyUI
    neither computes nor logs the memory it could give the model ("1e32 MB usable").  Loading whole here lets
    ComfyUI size and log the load against the real free memory.  Where ``load`` has another signature (a
    ComfyUI this was not written against) the plain ModelPatcher with ``force_full_load`` is used.
    """
    global _PATCHER_CLASS
    if _PATCHER_CLASS is not None:
        return _PATCHER_CLASS
    base = comfy_patcher.ModelPatcher
    parameters = list(inspect.signature(base.load).parameters)[1:5]
    if tuple(parameters) != _PATCHER_LOAD_PARAMETERS:
        log.info("SeedVR2: ComfyUI's ModelPatcher.load has parameters %s; loading our models with "
                 "force_full_load instead.", parameters)
        _PATCHER_CLASS = base
        return base

    class SeedVR2Patcher(base):
        loads_whole = True

        def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False, **kw):
            result = super().load(device_to, lowvram_model_memory, force_patch_weights, True, **kw)
            # All of it is on the device now, buffers too (ComfyUI counts only modules with parameters, which
            # leaves out the fp8 weight-only layers' buffers): its bookkeeping gets the real figure.
            self.model.model_loaded_weight_memory = self.model_size()
            return result

    _PATCHER_CLASS = SeedVR2Patcher
    return SeedVR2Patcher


class ModelManager:
    """Turns specs into loaded models; one per process (see :func:`default_manager`)."""

    def __init__(self, resolve_path=None, hold_for_specs: bool | None = None):
        """``hold_for_specs``: keep a cached model only while a spec that asked for it exists (default: inside
        ComfyUI, whose execution cache holds the loaders' specs)."""
        self._cache: dict[tuple, ManagedModel] = {}
        self._resolve_path = resolve_path or _default_resolver
        self._hold_for_specs = comfy_mm is not None if hold_for_specs is None else hold_for_specs
        self._holders: dict[int, ManagedModel] = {}  # id(spec) -> the cached model it holds

    def dit_facts(self, spec: DiTSpec) -> tuple:
        """(config, weight bytes once loaded) of the DiT ``spec`` names, from its file's header (no data read),
        for the memory planner."""
        import math

        from ..models.load import inspect_dit

        path = self._resolve_path(spec.model)
        index, config = inspect_dit(path)
        element = torch.empty((), dtype=compute_dtype(torch.device(resolve_device(spec.device)))).element_size()
        count = sum(math.prod(info.shape) for info in index.tensors.values())
        return config, min(count * element, path.stat().st_size)  # quantized files stay smaller

    # ------------------------------------------------------------------ loading
    def dit(self, spec: DiTSpec) -> ManagedModel:
        device = torch.device(resolve_device(spec.device))
        dtype = compute_dtype(device)
        path = self._resolve_path(spec.model)
        quantization = "gguf" if is_gguf(path) else spec.quantization
        key = ("dit", _file_key(path), str(device), dtype, quantization, spec.blocks_to_swap,
               spec.swap_io_components, spec.offload_device)
        cached = self._take(key, spec)
        if cached is not None:
            return cached
        load_device = _load_device(device, spec.offload_device, spec.blocks_to_swap > 0)
        log.info("SeedVR2: loading DiT %s to %s (%s)", path.name, load_device, str(dtype).replace("torch.", ""))
        with timing.span("load_dit", sync=load_device, file=path.name):
            model = load_dit(path, device=load_device, dtype=dtype,
                             prepare_layers=quantized_load.quantized_layers(quantization))
            check_weights(model, path)  # NaN/Inf weights would give all-NaN (black) frames
        offload_device = _offload(spec.offload_device)
        managed = ManagedModel("dit", key, model, device, offload_device, dtype, spec.cache_model,
                               info={"path": path, "quantization": quantization, "config": model.config})
        if spec.blocks_to_swap > 0 and offload_device is not None and offload_device != device:
            io = [m for m in (model.vid_in, model.txt_in, model.emb_in, model.vid_out_norm, model.vid_out_ada,
                              model.vid_out) if m is not None] if spec.swap_io_components else []
            managed.info["block_swap"] = stable_memory.BlockSwap(model.blocks, spec.blocks_to_swap, device,
                                                                 offload_device, swap_io=io)
        self._register(managed, spec, allow_comfy="block_swap" not in managed.info)
        return managed

    def dit_weight_bytes(self, spec: DiTSpec) -> int | None:
        """Device memory the DiT's weights take when :meth:`dit` loads them for ``spec``: 0 when it is cached
        or loads to the offload device (BlockSwap), None when unknown (not a safetensors file)."""
        device = torch.device(resolve_device(spec.device))
        path = self._resolve_path(spec.model)
        if file_format(path) != SAFETENSORS:
            return None
        dtype = compute_dtype(device)
        key = ("dit", _file_key(path), str(device), dtype, spec.quantization, spec.blocks_to_swap,
               spec.swap_io_components, spec.offload_device)
        if key in self._cache or _load_device(device, spec.offload_device, spec.blocks_to_swap > 0) != device:
            return 0
        from ..models.checkpoint import read_index

        total = 0
        for info in read_index(path).tensors.values():
            size = torch.empty(0, dtype=info.dtype).element_size()
            if info.dtype.is_floating_point:
                size = max(size, dtype.itemsize)  # fp8 files may be widened to the compute dtype
            numel = 1
            for n in info.shape:
                numel *= n
            total += numel * size
        return total

    def vae(self, spec: VAESpec) -> ManagedModel:
        device = torch.device(resolve_device(spec.device))
        dtype = compute_dtype(device)
        path = self._resolve_path(spec.model)
        # The optimization switches are applied once per loaded model: a change of them needs another one.
        key = ("vae", _file_key(path), str(device), dtype, spec.enable_optimizations, spec.quantization)
        cached = self._take(key, spec)
        if cached is not None:
            return cached
        load_device = _load_device(device, spec.offload_device, False)
        log.info("SeedVR2: loading VAE %s to %s (%s)", path.name, load_device, str(dtype).replace("torch.", ""))
        with timing.span("load_vae", sync=load_device, file=path.name):
            model = load_vae(path, device=load_device, dtype=dtype)
            check_weights(model, path)
        managed = ManagedModel("vae", key, model, device, _offload(spec.offload_device), dtype, spec.cache_model,
                               info={"path": path})
        self._register(managed, spec, allow_comfy=True)
        return managed

    def _take(self, key: tuple, spec) -> ManagedModel | None:
        """The cached model for ``key``, if the spec asks for caching (without it every run loads afresh)."""
        if not spec.cache_model:
            return None
        cached = self._cache.get(key)
        if cached is not None:
            self._hold(spec, cached)
        return cached

    def _register(self, managed: ManagedModel, spec, allow_comfy: bool) -> None:
        if comfy_mm is not None and comfy_patcher is not None and allow_comfy:
            holder = SeedVR2Model(managed.model, _module_device(managed.model))
            offload = managed.offload_device or comfy_mm.unet_offload_device()
            managed.patcher = _patcher_class()(holder, load_device=managed.device, offload_device=offload,
                                               size=weight_bytes(managed.model))
        if managed.cache:
            self._cache[managed.key] = managed
            self._hold(spec, managed)

    def _hold(self, spec, managed: ManagedModel) -> None:
        """Keep ``managed`` cached while ``spec`` exists (inside ComfyUI); a spec holds one model of each kind."""
        if not self._hold_for_specs:
            return
        holder = id(spec)
        if holder in self._holders:
            previous = self._holders[holder]
            self._holders[holder] = managed
            if previous is not managed:
                self._release_if_unheld(previous)
            return
        try:
            weakref.finalize(spec, self._spec_gone, holder)
        except TypeError:  # a spec that cannot be watched: the manager keeps the model (until clear())
            return
        self._holders[holder] = managed

    def _spec_gone(self, holder: int) -> None:
        managed = self._holders.pop(holder, None)
        if managed is not None:
            self._release_if_unheld(managed)

    def _release_if_unheld(self, managed: ManagedModel) -> None:
        if managed.model is not None and all(held is not managed for held in self._holders.values()):
            log.info("SeedVR2: releasing the cached %s (its loader's output is gone).", managed.kind.upper())
            self.drop(managed)

    # ------------------------------------------------------------------ release
    def finish(self, *models: ManagedModel) -> None:
        """End of a run: park cached models on their offload device, drop the others."""
        for managed in models:
            if managed is None:
                continue
            if managed.cache:
                managed.park()
                continue
            self.drop(managed)

    def drop(self, managed: ManagedModel) -> None:
        """Release a model: out of our cache and ComfyUI's list, its memory freed with the last reference.

        The weights are not moved anywhere first (ComfyUI's detach would copy them to the offload device).
        """
        if self._cache.get(managed.key) is managed:  # an uncached model may share a cached one's key
            del self._cache[managed.key]
        swap = managed.info.pop("block_swap", None)
        if swap is not None:
            swap.remove()
        if managed.patcher is not None:
            _forget_patcher(managed.patcher)
            managed.patcher = None
        device = managed.device
        _release_caches(managed.model)  # also for a caller that still holds the module
        managed.model = None
        _empty_cache(device)

    def clear(self) -> None:
        """Drop every cached model."""
        self._holders.clear()
        for managed in list(self._cache.values()):
            self.drop(managed)

    def cached(self) -> list[ManagedModel]:
        """The models cached now."""
        return list(self._cache.values())


def _default_resolver(name: str) -> Path:
    """An existing path as is; otherwise a file of ./models/SEEDVR2, downloaded there if released."""
    from ..models.download import ensure_model
    from ..models.locate import DEFAULT_MODEL_DIR

    path = Path(name)
    return path if path.is_file() else ensure_model(name, [DEFAULT_MODEL_DIR])


def _file_key(path: Path) -> tuple:
    stat = os.stat(path) if path.exists() else None
    return (str(path.resolve()) if path.exists() else str(path), stat.st_size if stat else 0,
            int(stat.st_mtime) if stat else 0)


def _offload(name: str) -> torch.device | None:
    resolved = resolve_device(name, offload=True)
    return None if resolved == "none" else torch.device(resolved)


def _load_device(device: torch.device, offload: str, block_swap: bool) -> torch.device:
    """Load straight to the compute device unless weights must start on the offload device."""
    off = _offload(offload)
    if block_swap and off is not None:
        return off
    return device


_DEFAULT: ModelManager | None = None


def default_manager() -> ModelManager:
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = ModelManager()
    return _DEFAULT


