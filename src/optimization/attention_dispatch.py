"""The one attention entry point of the pack, and the registry of kernels behind it.

Every attention in the models calls :func:`attention` with equal-length sequences batched together
as ``(batch, heads, seq, head_dim)``.  The plain path is PyTorch's scaled-dot-product attention; faster
backends plug in behind the same signature, so the model code never changes when a backend is added.

A model's attention modules name their backend in an ``attention_backend`` attribute (set for a whole
model by :func:`use_backend`) and pass it as ``backend=``: there is no process-wide selection, so two
models (or a model and a benchmark) never see each other's choice.  A request is resolved once per (name, device, dtype, head_dim): an
availability probe (device type, compute capability, dtype, head_dim limit, the import, then any limits
of the kernel itself) decides whether the backend can run those inputs, and the answer is remembered, so
the hot path is one dictionary lookup.  A backend that is missing, or that raises at run time, falls back
once along its ``fallback`` chain (to the plain path unless it names another), with one log line naming
what was asked, what is used and why.

``auto`` picks by hardware and shape (:func:`_auto_choice`).  For heads wider than SDPA's fused kernels take
(the VAE's 512) on CUDA in half precision, that is the Triton flash-attention kernel of
:mod:`.attention_triton` (``triton_wide``) where Triton is installed and the GPU has the shared memory for
it, else ``matmul_chunked``.
"""
from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..options import check_implemented

logger = logging.getLogger(__name__)

PLAIN = "sdpa"
AUTO = "auto"
# Every backend name attention() accepts, in the order the node and the command line offer them: "auto" and
# the earlier node pack's names in its order (flash_attn = flash_attn_2, sageattn = sageattn_2, sageattn_3_fp4
# = sageattn_3), then ours.  A literal, read without importing this module (src.options); each name other
# than "auto" is registered below.
ATTENTION_MODES = (
    "auto", "sdpa", "flash_attn_2", "flash_attn_3", "sageattn_2", "sageattn_3", "sageattn", "sageattn_3_fp4",
    "sageattn_3_fp8", "flash_attn", "xformers", "flex",
    "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math", "sdpa_chunked", "matmul_chunked", "triton_wide",
)
HALF_DTYPES = (torch.float16, torch.bfloat16)

# sdpa_chunked / matmul_chunked: queries per slice are chosen so one slice's score matrix holds about this
# many elements (256 MiB in half precision, 512 MiB in float32), which bounds the memory of the VAE's
# single-head H*W attention.
CHUNK_SCORE_ELEMENTS = 1 << 27

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ResolutionKey = tuple[str, torch.device, torch.dtype, int]


class UnknownAttentionBackendError(ValueError):
    """An attention backend name that is not registered."""


class AttentionBackendUnavailableError(RuntimeError):
    """A backend asked to run directly (e.g. by :func:`verify_backend`) cannot run these inputs here."""


@dataclass(frozen=True)
class AttentionBackend:
    """One attention kernel and what it needs; ``run`` takes and returns ``(batch, heads, seq, head_dim)``."""

    name: str
    run: Kernel | None
    devices: tuple[str, ...] | None = ("cuda",)          # None: any device
    dtypes: tuple[torch.dtype, ...] | None = None        # None: any floating dtype
    max_head_dim: int | None = None
    capability: tuple[tuple[int, int], tuple[int, int]] | None = None  # NVIDIA sm range, inclusive
    package: str | None = None                           # module the kernel comes from
    install_hint: str = ""
    traceable: bool = False       # torch.compile can trace run; others run eagerly as a graph break
    fallback: str = PLAIN         # what runs when this backend cannot
    note: str = ""                # why a backend without a kernel of its own exists
    # Limits the fields above cannot express, checked after the import: (device, dtype, head_dim) -> why the
    # kernel cannot run such inputs here, or None.
    limits: Callable[[torch.device, torch.dtype, int], str | None] | None = None


# ---------------------------------------------------------------------------------------------------
# Kernels.  Each takes (batch, heads, seq, head_dim) and converts to its library's layout itself.
# ---------------------------------------------------------------------------------------------------


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def _sdpa_restricted_to(kernel: SDPBackend) -> Kernel:
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(kernel):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def _sdpa_query_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # Exact: every query row attends independently, so slicing the queries only bounds the size of
    # the score matrix a math kernel materialises at once.
    batch, heads, query_len, _ = q.shape
    rows = max(1, CHUNK_SCORE_ELEMENTS // (batch * heads * k.shape[2]))
    if rows >= query_len:
        return F.scaled_dot_product_attention(q, k, v)
    out = q.new_empty(batch, heads, query_len, v.shape[-1])
    for start in range(0, query_len, rows):
        out[:, :, start:start + rows] = F.scaled_dot_product_attention(q[:, :, start:start + rows], k, v)
    return out


_half_scores_fp32: bool | None = None  # does this PyTorch build do half-precision bmm with float32 output?


def _float32_scores(q: torch.Tensor, k_t: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · q k_tᵀ`` as float32 for (batch, rows, d) x (batch, d, keys), from half inputs without
    rounding the scores to half precision: a half-precision GEMM with float32 output where PyTorch has
    one (CUDA, 2.8+; the products are exact in float32 anyway), else float32 copies of the inputs."""
    global _half_scores_fp32
    if q.dtype in HALF_DTYPES and q.is_cuda and _half_scores_fp32 is not False:
        try:
            scores = torch.baddbmm(q.new_empty((), dtype=torch.float32).expand(q.shape[0], q.shape[1], k_t.shape[2]),
                                   q, k_t, beta=0, alpha=scale, out_dtype=torch.float32)
            _half_scores_fp32 = True
            return scores
        except (TypeError, RuntimeError, NotImplementedError) as error:
            _half_scores_fp32 = False
            _report_once(f"half-precision GEMM with float32 output is unavailable ({_first_line(error)}); the "
                         f"matmul_chunked attention multiplies float32 copies (slower, same result)")
    return torch.bmm(q.float(), k_t.float()).mul_(scale)


def _matmul_query_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # For heads wider than the fused kernels take (the VAE's 512): softmax(q kᵀ/√d) v as two GEMMs per slice
    # of queries, scores and softmax in float32, probabilities rounded to the input dtype for the second
    # GEMM (as flash attention does).  Tensor-core GEMMs plus three passes over each slice's scores beat
    # the memory-efficient kernel's ~120 TFLOP/s at head_dim 512; slices bound the scores' memory.
    batch, heads, query_len, head_dim = q.shape
    key_len = k.shape[2]
    flat_q, flat_k, flat_v = (t.reshape(batch * heads, t.shape[2], t.shape[3]) for t in (q, k, v))
    k_t = flat_k.transpose(1, 2)
    rows = max(1, CHUNK_SCORE_ELEMENTS // (batch * heads * key_len))
    out = q.new_empty(batch * heads, query_len, v.shape[-1])
    for start in range(0, query_len, rows):
        scores = _float32_scores(flat_q[:, start:start + rows], k_t, head_dim ** -0.5)
        probabilities = torch.softmax(scores, dim=-1).to(v.dtype)
        del scores
        out[:, start:start + rows] = torch.bmm(probabilities, flat_v)
        del probabilities
    return out.view(batch, heads, query_len, v.shape[-1])


def _load_attention_triton():
    # Imported on first use: it imports Triton, which importing the pack should not.
    return importlib.import_module(".attention_triton", __package__)


def _triton_wide(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _load_attention_triton().wide_attention(q, k, v)


def _triton_wide_limits(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    try:
        return _load_attention_triton().unsupported_reason(device, head_dim)
    except Exception as error:  # e.g. a Triton release too old for the kernel, or no C compiler for its launcher
        return f"its Triton kernel cannot be set up ({type(error).__name__}: {_first_line(error)})"


_compiled_flex: Kernel | None = None


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling():
        return flex_attention(q, k, v)  # the surrounding graph compiles it
    global _compiled_flex
    if _compiled_flex is None:
        # FlexAttention is only fast compiled; one compiled function serves every shape.
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex(q, k, v)


def _flash_attn_2(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    flash_attn_func = importlib.import_module("flash_attn").flash_attn_func
    return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _flash_attn_3(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    flash_attn_func = importlib.import_module("flash_attn_interface").flash_attn_func
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    if isinstance(out, tuple):  # early FA3 releases also return the softmax log-sum-exp
        out = out[0]
    return out.transpose(1, 2)


def _xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    memory_efficient_attention = importlib.import_module("xformers.ops").memory_efficient_attention
    return memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _sageattn_2(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    sageattn = importlib.import_module("sageattention").sageattn
    return sageattn(q, k, v, tensor_layout="HND", is_causal=False)


def _sageattn_3(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    sageattn3_blackwell = importlib.import_module("sageattn3").sageattn3_blackwell
    # The kernel subtracts the key mean from k in place; give it a copy so callers' k stays intact.
    return sageattn3_blackwell(q, k.clone(), v, is_causal=False)


# ---------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------

_BACKENDS: dict[str, AttentionBackend] = {}
_resolutions: dict[ResolutionKey, str] = {}      # (requested name, device, dtype, head_dim) -> backend used
_reported: set[str] = set()                      # fallback messages already logged
_import_errors: dict[str, str | None] = {}       # package -> why it does not import, None if it does


def clear_backend_cache() -> None:
    """Forget every resolution, remembered failure and import probe (e.g. after installing a package)."""
    _resolutions.clear()
    _reported.clear()
    _import_errors.clear()


def register_backend(backend: AttentionBackend, aliases: tuple[str, ...] = ()) -> None:
    """Make ``backend`` selectable by its name and by ``aliases`` (replacing any earlier registration)."""
    for name in (backend.name, *aliases):
        if name == AUTO:
            raise ValueError(f"{AUTO!r} is reserved for the automatic choice; pick another backend name.")
        _BACKENDS[name] = backend
    clear_backend_cache()


def _register_builtin_backends() -> None:
    register_backend(AttentionBackend(PLAIN, _sdpa, devices=None, traceable=True))
    register_backend(AttentionBackend(
        "sdpa_flash", _sdpa_restricted_to(SDPBackend.FLASH_ATTENTION), devices=("cuda", "cpu"), traceable=True))
    register_backend(AttentionBackend(
        "sdpa_cudnn", _sdpa_restricted_to(SDPBackend.CUDNN_ATTENTION), dtypes=HALF_DTYPES,
        capability=((8, 0), (99, 99)), traceable=True))
    register_backend(AttentionBackend(
        "sdpa_efficient", _sdpa_restricted_to(SDPBackend.EFFICIENT_ATTENTION), traceable=True))
    register_backend(AttentionBackend(
        "sdpa_math", _sdpa_restricted_to(SDPBackend.MATH), devices=None, traceable=True))
    register_backend(AttentionBackend("sdpa_chunked", _sdpa_query_chunks, devices=None, traceable=True))
    register_backend(AttentionBackend("matmul_chunked", _matmul_query_chunks, devices=None))
    register_backend(AttentionBackend(
        # Flash attention for the VAE's one 512-wide head (head_dim a multiple of 64 up to 512).
        "triton_wide", _triton_wide, dtypes=HALF_DTYPES, max_head_dim=512, capability=((8, 0), (99, 99)),
        package="triton", install_hint="pip install triton; triton-windows on Windows", fallback="matmul_chunked",
        limits=_triton_wide_limits))
    register_backend(AttentionBackend(
        # CUDA only: on CPU compiling it takes about a minute and PyTorch's CPU SDPA kernel is as fast.
        "flex", _flex, max_head_dim=256, package="torch.nn.attention.flex_attention",
        install_hint="needs PyTorch 2.5 or newer", traceable=True))
    register_backend(AttentionBackend(
        "flash_attn_2", _flash_attn_2, dtypes=HALF_DTYPES, max_head_dim=256,
        capability=((8, 0), (99, 99)), package="flash_attn", install_hint="pip install flash-attn"),
        aliases=("flash_attn",))
    register_backend(AttentionBackend(
        "flash_attn_3", _flash_attn_3, dtypes=HALF_DTYPES, max_head_dim=256,
        capability=((9, 0), (9, 9)), package="flash_attn_interface",
        install_hint="build FlashAttention 3 from the hopper/ folder of the flash-attention repository"))
    register_backend(AttentionBackend(
        "xformers", _xformers, package="xformers.ops", install_hint="pip install xformers"))
    register_backend(AttentionBackend(
        "sageattn_2", _sageattn_2, dtypes=HALF_DTYPES, max_head_dim=128,
        capability=((8, 0), (12, 9)), package="sageattention", install_hint="pip install sageattention"),
        aliases=("sageattn",))
    # SageAttention 3 has one kernel, FP4 microscaling on Blackwell: sageattn_3_fp4 names it explicitly.
    register_backend(AttentionBackend(
        "sageattn_3", _sageattn_3, dtypes=HALF_DTYPES, max_head_dim=128,
        capability=((10, 0), (12, 9)), package="sageattn3",
        install_hint="install the sageattn3 package (SageAttention 3, Blackwell build)"),
        aliases=("sageattn_3_fp4",))
    register_backend(AttentionBackend(
        "sageattn_3_fp8", None, fallback="sageattn_2",
        note="SageAttention 3 has no FP8 kernel (only FP4); SageAttention 2 computes P·V in FP8 on sm89 and newer"))


_register_builtin_backends()
check_implemented(__name__, ATTENTION_MODES, (AUTO, *_BACKENDS))


def backend_names() -> tuple[str, ...]:
    """Every selectable backend name in the UI's order: :data:`ATTENTION_MODES`, then any registered later."""
    return (*ATTENTION_MODES, *(name for name in _BACKENDS if name not in ATTENTION_MODES))


# ---------------------------------------------------------------------------------------------------
# Availability probes and resolution
# ---------------------------------------------------------------------------------------------------

def _import_error(backend: AttentionBackend) -> str | None:
    package = backend.package
    if package not in _import_errors:
        try:
            importlib.import_module(package)
            _import_errors[package] = None
        except ModuleNotFoundError:
            _import_errors[package] = f"{package} is not installed ({backend.install_hint})"
        except Exception as error:  # a broken install raises anything from OSError to RuntimeError
            _import_errors[package] = f"importing {package} failed ({type(error).__name__}: {error})"
    return _import_errors[package]


def _unavailable_reason(backend: AttentionBackend, device: torch.device, dtype: torch.dtype,
                        head_dim: int) -> str | None:
    """Why ``backend`` cannot run inputs of this device/dtype/head_dim here, or None if it can."""
    if backend.run is None:
        return backend.note
    if backend.devices is not None and device.type not in backend.devices:
        return f"runs on {'/'.join(backend.devices)} only, not {device.type}"
    if backend.dtypes is not None and dtype not in backend.dtypes:
        wanted = "/".join(str(d).removeprefix("torch.") for d in backend.dtypes)
        return f"needs {wanted} inputs, got {str(dtype).removeprefix('torch.')}"
    if backend.max_head_dim is not None and head_dim > backend.max_head_dim:
        return f"supports head_dim up to {backend.max_head_dim}, got {head_dim}"
    if backend.capability is not None and device.type == "cuda" and torch.version.hip is None:
        lowest, highest = backend.capability
        capability = torch.cuda.get_device_capability(device)
        if not lowest <= capability <= highest:
            return (f"needs compute capability {lowest[0]}.{lowest[1]} to {highest[0]}.{highest[1]}, "
                    f"this GPU has {capability[0]}.{capability[1]}")
    if backend.package is not None and (reason := _import_error(backend)) is not None:
        return reason
    if backend.limits is not None:
        return backend.limits(device, dtype, head_dim)
    return None


def _available(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    return _unavailable_reason(_BACKENDS[name], device, dtype, head_dim) is None


def _auto_choice(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """The backend "auto" means for these inputs, by hardware and shape."""
    if device.type == "cuda":
        if head_dim > 256:
            # SDPA's flash and cuDNN kernels stop at 256.  For the VAE's 512-wide head (half precision) the
            # Triton flash-attention kernel never writes the scores; without it, explicit tensor-core GEMMs
            # still beat the memory-efficient kernel, which keeps float32 inputs.
            if dtype not in HALF_DTYPES:
                return "sdpa_efficient"
            return "triton_wide" if _available("triton_wide", device, dtype, head_dim) else "matmul_chunked"
        if dtype in HALF_DTYPES and torch.version.hip is None:
            if _available("flash_attn_3", device, dtype, head_dim):  # Hopper only
                return "flash_attn_3"
            if _available("sageattn_2", device, dtype, head_dim):
                return "sageattn_2"
        return PLAIN
    if head_dim > 256 and device.type != "cpu":
        # No fused kernel for wide heads (e.g. on MPS): bound the score matrix instead.
        return "sdpa_chunked"
    return PLAIN  # PyTorch's CPU kernel is already memory-efficient for every head_dim


def _first_available(wanted: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> tuple[str, list[str]]:
    """The first backend along ``wanted``'s fallback chain that can run these inputs, and why each before it
    cannot (the chain ends at the plain path, which runs anything)."""
    used, reasons = wanted, []
    while (reason := _unavailable_reason(_BACKENDS[used], device, dtype, head_dim)) is not None:
        reasons.append(f"{used}: {reason}")
        used = _BACKENDS[used].fallback
    return used, reasons


def _resolve(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    wanted = _auto_choice(device, dtype, head_dim) if name == AUTO else _BACKENDS[name].name
    used, reasons = _first_available(wanted, device, dtype, head_dim)
    if reasons:
        _report_once(f"attention backend {name!r} requested, using {used!r} ({'; '.join(reasons)})")
    return used


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


def _report_once(message: str) -> None:
    if message not in _reported:
        _reported.add(message)
        logger.warning(message)


def _resolution(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    # After prepare_for_compile, torch.compile runs this once at trace time and bakes in its answer.
    key = (name, device, dtype, head_dim)
    resolved = _resolutions.get(key)
    if resolved is None:
        resolved = _resolutions[key] = _resolve(name, device, dtype, head_dim)
    return resolved


# ---------------------------------------------------------------------------------------------------
# Selection and the entry point
# ---------------------------------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if name != AUTO and name not in _BACKENDS:
        raise UnknownAttentionBackendError(
            f"unknown attention backend {name!r}; choose one of: {', '.join(backend_names())}.")


def use_backend(model: torch.nn.Module, name: str) -> int:
    """Set ``attention_backend = name`` on every module under ``model`` that has that attribute (the modules
    that call :func:`attention` with it); returns how many."""
    _check_name(name)
    modules = [module for module in model.modules() if isinstance(vars(module).get("attention_backend"), str)]
    for module in modules:
        module.attention_backend = name
    return len(modules)


def resolve_backend(name: str, q: torch.Tensor) -> str:
    """The backend that actually runs for ``name`` on tensors like ``q`` (after probing and fallbacks)."""
    _check_name(name)
    return _resolution(name, q.device, q.dtype, q.shape[-1])


def _run_with_fallback(backend: AttentionBackend, key: ResolutionKey, q: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor) -> torch.Tensor:
    try:
        return backend.run(q, k, v)
    except torch.cuda.OutOfMemoryError:
        raise  # the caller must shrink the work (e.g. a smaller tile); a fallback kernel needs more memory
    except Exception as error:
        name, device, dtype, head_dim = key
        fallback, _ = _first_available(backend.fallback, device, dtype, head_dim)
        _resolutions[key] = fallback
        logger.warning(
            "attention backend %r (%r) failed on %s %s head_dim %d (%s: %s); using %r for these inputs from now on",
            name, backend.name, device, str(dtype).removeprefix("torch."), head_dim, type(error).__name__,
            _first_line(error), fallback)
        if fallback == PLAIN:
            return _sdpa(q, k, v)
        return _run_with_fallback(_BACKENDS[fallback], key, q, k, v)


_run_outside_graph = _run_with_fallback  # becomes a torch.compile graph break in prepare_for_compile
_compile_ready = False


def prepare_for_compile() -> None:
    """Mark the dispatcher for torch.compile: resolution runs at trace time, library kernels as graph breaks.

    Deferred to here because it imports Dynamo, which importing the pack should not; the compile manager
    calls it.  Compiling without it still gives correct results, with extra graph breaks.
    """
    global _run_outside_graph, _compile_ready
    if not _compile_ready:
        torch.compiler.assume_constant_result(_resolution)  # marks the function itself
        _run_outside_graph = torch.compiler.disable(_run_with_fallback)
        _compile_ready = True


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = PLAIN) -> torch.Tensor:
    """softmax(q kᵀ / √head_dim) v for ``(batch, heads, seq, head_dim)`` tensors, no mask, computed by the
    backend named ``backend`` (default: the plain path)."""
    if q.dim() != 4:
        raise ValueError(f"attention expects (batch, heads, seq, head_dim) tensors, got q of shape {tuple(q.shape)}.")
    _check_name(backend)
    key = (backend, q.device, q.dtype, q.shape[-1])
    chosen = _BACKENDS[_resolution(*key)]
    if chosen.name == PLAIN or (chosen.traceable and torch.compiler.is_compiling()):
        return chosen.run(q, k, v)
    return _run_outside_graph(chosen, key, q, k, v)


# ---------------------------------------------------------------------------------------------------
# Reporting for the UI and the benchmark
# ---------------------------------------------------------------------------------------------------


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def available_backends(device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16,
                       head_dim: int = 128) -> dict[str, str | None]:
    """Every backend name mapped to None if it runs such inputs here, else the reason it does not."""
    device = torch.device(device) if device is not None else _default_device()
    return {name: None if name == AUTO else _unavailable_reason(_BACKENDS[name], device, dtype, head_dim)
            for name in backend_names()}


def verify_backend(name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                   head_dim: int = 128, seq_len: int = 300) -> float:
    """Relative L2 error of backend ``name`` against the float32 plain path, on seeded random inputs."""
    _check_name(name)
    device = torch.device(device)
    concrete = _auto_choice(device, dtype, head_dim) if name == AUTO else _BACKENDS[name].name
    reason = _unavailable_reason(_BACKENDS[concrete], device, dtype, head_dim)
    if reason is not None:
        raise AttentionBackendUnavailableError(
            f"attention backend {name!r} cannot run on {device} with {dtype}: {concrete}: {reason}.")
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, seq_len, head_dim, generator=generator).to(device, dtype) for _ in range(3))
    out = _BACKENDS[concrete].run(q, k, v).double()
    # The reference sees the same (rounded) inputs, so the error measures the kernel, not the dtype.
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).double()
    return ((out - reference).norm() / reference.norm()).item()
