"""torch.compile for the DiT and the VAE: regional compilation, a persistent cache, an eager fallback.

Regional compilation: each repeated block is compiled rather than the whole model.  Dynamo caches
compiled code per code object, so every block of one class shares one compilation (32 or 36 DiT blocks
cost one compile, not 32), while hooks around a block (BlockSwap's weight transfers) stay eager.
Shapes start static and turn dynamic on the dimension that changed (``dynamic=None``), so a new
resolution costs one recompile for all blocks, then none.

A compiled module gets a per-instance ``forward`` bound to the shared compiled function; if compiling
or running it fails, that call re-runs eagerly, the modules sharing it stay eager afterwards, and one
log line says why.  :func:`uncompile` removes the attribute again.

Environment: ``SEEDVR2_ENABLE_COMPILE=0`` turns everything here into a no-op,
``SEEDVR2_COMPILE_BACKEND`` overrides the backend, ``SEEDVR2_COMPILE_CACHE_DIR`` moves the cache.
"""
from __future__ import annotations

import logging
import os
import sys
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.dit import graph_breaks
from . import attention_dispatch
from .compile_settings import CompileSettings
from .switches import env_switch

logger = logging.getLogger(__name__)

ENABLE_COMPILE_ENV = "SEEDVR2_ENABLE_COMPILE"
COMPILE_BACKEND_ENV = "SEEDVR2_COMPILE_BACKEND"
COMPILE_CACHE_DIR_ENV = "SEEDVR2_COMPILE_CACHE_DIR"


class CompileSetupError(ValueError):
    """The model does not have the blocks or submodules the compile call names."""


def compile_enabled() -> bool:
    """False when ``SEEDVR2_ENABLE_COMPILE`` is 0/false/no/off."""
    return env_switch(ENABLE_COMPILE_ENV, default=True)


def default_cache_dir() -> Path:
    """``<user cache dir>/seedvr2/torch_compile`` on Linux, macOS and Windows."""
    if os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "seedvr2" / "torch_compile"


_configured_cache_dir: Path | None = None


def configure_compile_cache(cache_dir: str | os.PathLike | None = None) -> Path:
    """Turn on PyTorch's persistent compile caches (FX graphs, autograd) and return their directory.

    Precedence: ``cache_dir``, then ``SEEDVR2_COMPILE_CACHE_DIR``, then an existing
    ``TORCHINDUCTOR_CACHE_DIR`` (the user's or another node's choice), then :func:`default_cache_dir`.
    """
    global _configured_cache_dir
    requested = cache_dir or os.environ.get(COMPILE_CACHE_DIR_ENV)
    if requested is None and _configured_cache_dir is not None:
        return _configured_cache_dir
    if requested is None and os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        path = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    else:
        path = Path(requested) if requested else default_cache_dir()
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    path.mkdir(parents=True, exist_ok=True)

    import torch._functorch.config
    import torch._inductor.config

    torch._inductor.config.fx_graph_cache = True
    if hasattr(torch._functorch.config, "enable_autograd_cache"):
        torch._functorch.config.enable_autograd_cache = True
    _configured_cache_dir = path
    return path


def raise_recompile_limit(wanted: int) -> None:
    """Let one compiled function hold at least ``wanted`` graphs (shapes) before Dynamo gives up on it and
    runs it eagerly.  Process-wide knobs shared with every other model in ComfyUI: only ever raised, never
    lowered.  The accumulated limit must be at least as large."""
    import torch._dynamo

    config = torch._dynamo.config
    for name in dynamo_limit_names():
        setattr(config, name, max(getattr(config, name), wanted))


def dynamo_limit_names() -> tuple[str, str]:
    """Dynamo's per-function and accumulated recompile limits: PyTorch 2.6 renamed ``cache_size_limit`` and
    ``accumulated_cache_size_limit`` to ``recompile_limit`` and ``accumulated_recompile_limit``, keeping the
    old names as deprecated aliases; the new names where they exist."""
    import torch._dynamo

    if hasattr(torch._dynamo.config, "recompile_limit"):
        return "recompile_limit", "accumulated_recompile_limit"
    return "cache_size_limit", "accumulated_cache_size_limit"


def _raise_dynamo_limits(settings: CompileSettings) -> None:
    raise_recompile_limit(max(settings.dynamo_cache_size_limit, settings.dynamo_recompile_limit))


def _compile_options(settings: CompileSettings) -> dict[str, Any]:
    return {
        "backend": os.environ.get(COMPILE_BACKEND_ENV) or settings.backend,
        "mode": None if settings.mode == "default" else settings.mode,
        "fullgraph": settings.fullgraph,
        # None: static first, then dynamic on whatever dimension changed (the token count), so a new
        # resolution does not recompile every shape; True asks for dynamic shapes from the start.
        "dynamic": True if settings.dynamic else None,
    }


def _prepare(settings: CompileSettings | None) -> dict[str, Any] | None:
    if not compile_enabled():
        logger.info("torch.compile is disabled by %s=%s", ENABLE_COMPILE_ENV, os.environ[ENABLE_COMPILE_ENV])
        return None
    settings = settings or CompileSettings()
    attention_dispatch.prepare_for_compile()
    graph_breaks.apply()
    configure_compile_cache()
    _raise_dynamo_limits(settings)
    return _compile_options(settings)


class _SharedCompilation:
    """One compiled forward shared by every module of one class; bound to each as ``module.forward``.

    Bound with ``types.MethodType``, so ``copy.deepcopy`` of a compiled model rebinds it to the copy.
    """

    def __init__(self, forward: Callable, options: dict[str, Any], label: str):
        self.forward = forward    # the class's forward, unbound: the same code object for every instance
        self.options = options
        self.label = label
        self.compiled: Callable | None = None
        self.failed = False

    def __call__(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not self.failed:
            try:
                if self.compiled is None:
                    self.compiled = torch.compile(self.forward, **self.options)
                return self.compiled(module, *args, **kwargs)
            except torch.cuda.OutOfMemoryError:
                raise  # not a compiler problem: the caller must shrink the work
            except Exception as error:
                self.failed = True
                lines = str(error).strip().splitlines()
                logger.warning("torch.compile of %s failed (%s: %s); running it eagerly from now on",
                               self.label, type(error).__name__, lines[0] if lines else "")
        return self.forward(module, *args, **kwargs)


def _compilation_of(module: nn.Module) -> _SharedCompilation | None:
    forward = module.__dict__.get("forward")
    if isinstance(forward, types.MethodType) and isinstance(forward.__func__, _SharedCompilation):
        return forward.__func__
    return None


def is_compiled(module: nn.Module) -> bool:
    """Whether this manager has compiled ``module``."""
    return _compilation_of(module) is not None


def _install(module: nn.Module, compilation: _SharedCompilation) -> bool:
    current = _compilation_of(module)
    if current is not None and current.options == compilation.options:
        return True  # compiled already with these options: applying twice changes nothing
    if current is None and "forward" in module.__dict__:
        logger.warning("not compiling %s: its forward is already replaced per instance by %r",
                       compilation.label, module.__dict__["forward"])
        return False
    module.forward = types.MethodType(compilation, module)
    return True


def compile_repeated_blocks(model: nn.Module, settings: CompileSettings | None = None,
                            block_lists: Iterable[str] = ("blocks",)) -> int:
    """Compile every block of the named ``nn.ModuleList``s, one shared compilation per block class.

    Returns the number of blocks now compiled (0 when compilation is disabled).
    """
    lists = []
    for list_name in block_lists:
        blocks = getattr(model, list_name, None)
        if not isinstance(blocks, nn.ModuleList):
            raise CompileSetupError(
                f"{type(model).__name__} has no nn.ModuleList named {list_name!r} to compile block by block; "
                f"pass the attribute that holds the repeated blocks in block_lists.")
        lists.append((list_name, blocks))
    options = _prepare(settings)
    if options is None:
        return 0
    compiled = 0
    for list_name, blocks in lists:
        shared: dict[type, _SharedCompilation] = {}
        for block in blocks:
            cls = type(block)
            if cls not in shared:
                count = sum(type(b) is cls for b in blocks)
                shared[cls] = _SharedCompilation(cls.forward, options, f"{list_name} ({count} × {cls.__name__})")
            compiled += _install(block, shared[cls])
        for compilation in shared.values():
            logger.info("torch.compile: %s share one compiled forward (%s)", compilation.label, options)
    return compiled


def compile_modules(model: nn.Module, names: Iterable[str], settings: CompileSettings | None = None) -> int:
    """Compile the submodules of ``model`` at the given dotted ``names`` (e.g. VAE stages), each on its own.

    Returns the number of modules now compiled (0 when compilation is disabled).
    """
    modules = []
    for name in names:
        try:
            modules.append((name, model.get_submodule(name)))
        except AttributeError as error:
            raise CompileSetupError(f"cannot compile {name!r}: {error}. Use the dotted name of a submodule.") from None
    options = _prepare(settings)
    if options is None:
        return 0
    compiled = 0
    for name, module in modules:
        compiled += _install(module, _SharedCompilation(type(module).forward, options, name))
    return compiled


def uncompile(model: nn.Module) -> int:
    """Give every module under ``model`` its eager forward back; returns how many were compiled."""
    restored = 0
    for module in model.modules():
        if is_compiled(module):
            del module.forward
            restored += 1
    return restored
