"""Testing the Triton kernels without a GPU: Triton's CPU interpreter, and the gaps between it and a GPU.

A kernel test module calls :func:`choose_interpreter` at import.  Without a GPU it switches the interpreter
on, which must happen before Triton is first imported (the interpreter is chosen when a kernel is defined).
When an earlier test module already imported Triton, the kernel tests skip in this process, and the module's
``test_kernels_in_a_fresh_interpreter`` runs them again in a child pytest process
(:func:`run_in_fresh_interpreter`).  :func:`compute_as_the_gpu` closes the gaps between the interpreter and a
GPU that a test's expectations would otherwise trip over.  It patches Triton's private interpreter internals,
so it checks first that they look the way it was written for (Triton 3.5 to 3.8) and skips the test, naming
the Triton version and what is missing, where they do not.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SKIP_REASON = ("no GPU, and Triton was imported before its interpreter could be switched on: "
               "test_kernels_in_a_fresh_interpreter runs these tests in a process of their own")
UNKNOWN_INTERPRETER = "tests/triton_interpreter.py closes the interpreter's gaps for Triton 3.5 to 3.8 only"


def choose_interpreter() -> None:
    """Without a GPU, run the Triton kernels under the interpreter, if Triton is not imported yet."""
    if DEVICE == "cpu" and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def kernels_run_here() -> bool:
    """Whether this process can run the kernels: on the GPU, or under the interpreter."""
    return DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def skip_unless_kernels_run_here() -> None:
    if not kernels_run_here():
        pytest.skip(SKIP_REASON)


def kernel_module(name: str, no_triton_reason: str, *, runnable: bool = True):
    """``src.optimization.<name>`` (which imports Triton), skipping without Triton and, when ``runnable``,
    where this process cannot run its kernels."""
    pytest.importorskip("triton", reason=no_triton_reason)
    if runnable:
        skip_unless_kernels_run_here()
    return importlib.import_module(f"src.optimization.{name}")


def run_in_fresh_interpreter(test_file: str, no_triton_reason: str, selection: str = "not fresh_interpreter") -> None:
    """The body of ``test_kernels_in_a_fresh_interpreter``: run ``test_file``'s tests matching ``selection`` in
    a child pytest process with the interpreter on, when this process cannot run them; none may skip, except
    where this Triton's interpreter is one :func:`compute_as_the_gpu` does not know (then this test skips
    with that reason)."""
    pytest.importorskip("triton", reason=no_triton_reason)
    if kernels_run_here():
        pytest.skip("the kernel tests run in this process")
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-k", selection, test_file],
        cwd=Path(test_file).resolve().parents[1], env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True, text=True, timeout=600, check=False,
    )
    report = child.stdout[-4000:] + child.stderr[-2000:]
    assert child.returncode == 0, report
    skips = [line for line in child.stdout.splitlines() if line.startswith("SKIPPED")]
    if skips and all(UNKNOWN_INTERPRETER in line for line in skips):
        pytest.skip(skips[0].split(": ", 1)[-1])
    assert "skipped" not in child.stdout, report


def compute_as_the_gpu(patch: pytest.MonkeyPatch, *, bf16_dot: bool = False, bf16_rounding: bool = False,
                       loop_bounds: bool = False) -> None:
    """Close gaps between Triton's interpreter and a GPU (only on the CPU; a GPU needs none of it):

    * ``bf16_dot``: it multiplies bfloat16 blocks as their raw uint16 bits (numpy has no bfloat16); they are
      widened to float32 first, exact for the products, as the tensor cores multiply them;
    * ``bf16_rounding``: it rounds float32 to bfloat16 by truncation, where the GPU rounds to nearest (even);
    * ``loop_bounds``: up to Triton 3.7 it turns a runtime loop bound (a one-element array) into an int with
      int(array), which numpy >= 2.4 refuses for arrays of one dimension.  Whether the installed Triton and
      numpy need this is tried on a tiny kernel first; Triton 3.8 does it right and is left alone.
    """
    if DEVICE != "cpu":
        return
    import triton.language as tl
    from triton.runtime import interpreter

    builder = _private(interpreter, "InterpreterBuilder")
    tensor_handle = _private(interpreter, "TensorHandle")
    if bf16_dot:
        create_dot = _private_method(builder, "create_dot",
                                     ["self", "a", "b", "d", "input_precision", "max_num_imprecise_acc"])

        def widened(handle):
            if handle.dtype.scalar != tl.bfloat16:
                return handle
            return tensor_handle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

        def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
            return create_dot(self, widened(a), widened(b), d, input_precision, max_num_imprecise_acc)

        patch.setattr(builder, "create_dot", dot)
    if bf16_rounding:
        cast = _private_method(builder, "cast_impl", ["self", "src", "dst_type"])

        def rounded_cast(self, src, dst_type):
            if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
                return cast(self, src, dst_type)
            values = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            return tensor_handle(values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), tl.bfloat16)

        patch.setattr(builder, "cast_impl", rounded_cast)
    if loop_bounds and _runtime_loop_bound_fails():
        _patch_scalar_index(patch, interpreter)
        failure = _runtime_loop_bound_fails()
        if failure:
            _skip_for_this_triton(f"a runtime loop bound fails even with its scalars' __index__ patched: {failure}")


def _triton_version() -> str:
    import triton

    return triton.__version__


def _skip_for_this_triton(what: str) -> None:
    pytest.skip(f"Triton {_triton_version()}'s interpreter (numpy {np.__version__}): {what}; {UNKNOWN_INTERPRETER}")


def _private(module, name: str):
    if not hasattr(module, name):
        _skip_for_this_triton(f"{module.__name__}.{name} is gone")
    return getattr(module, name)


def _private_method(owner, name: str, parameters: list[str]):
    method = _private(owner, name)
    found = list(inspect.signature(method).parameters)
    if found != parameters:
        _skip_for_this_triton(f"{owner.__name__}.{name} takes ({', '.join(found)}), "
                              f"not ({', '.join(parameters)})")
    return method


def _patch_scalar_index(patch: pytest.MonkeyPatch, interpreter) -> None:
    """Make the interpreter's scalars convert to an int whatever their array's shape, through the function
    that patches triton.language.tensor for a kernel run: Triton 3.5 patches the class for good
    (``(tensor)``), 3.6 and later within a scope undone after the run (``(tensor, scope)``)."""
    patch_lang_tensor = _private(interpreter, "_patch_lang_tensor")
    parameters = list(inspect.signature(patch_lang_tensor).parameters)

    def index(self):
        return self.handle.data.item()

    if len(parameters) == 1:
        def patched(tensor):
            patch_lang_tensor(tensor)
            tensor.__index__ = index
    elif len(parameters) == 2:
        def patched(tensor, scope):
            patch_lang_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", index)
    else:
        _skip_for_this_triton(f"_patch_lang_tensor takes ({', '.join(parameters)}), not (tensor[, scope])")
    patch.setattr(interpreter, "_patch_lang_tensor", patched)


def _runtime_loop_bound_fails() -> str | None:
    """How the interpreter, as it is patched now, fails a loop whose bound is a kernel argument; None: it
    runs it right."""
    global tl  # the interpreter looks for triton.language among the kernel's globals
    import triton
    import triton.language as tl

    count = torch.zeros(1, dtype=torch.int32)
    try:
        _loop_kernel(triton)[(1,)](count, 3)
    except Exception as error:  # noqa: BLE001 - the reason goes into the skip message
        return f"{type(error).__name__}: {error}"
    return None if int(count.item()) == 3 else f"the loop ran {int(count.item())} times, not 3"


@functools.cache
def _loop_kernel(triton):
    @triton.jit
    def count_to(out, n):
        total = 0
        for _ in range(0, n):
            total += 1
        tl.store(out, total)

    return count_to
