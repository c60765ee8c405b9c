"""Testing the Triton kernels without a GPU: Triton's CPU interpreter, and the gaps between it and a GPU.

A kernel test module calls :func:`choose_interpreter` at import.  Without a GPU it switches the interpreter
on, which must happen before Triton is first imported (the interpreter is chosen when a kernel is defined).
When an earlier test module already imported Triton, the kernel tests skip in this process, and the module's
``test_kernels_in_a_fresh_interpreter`` runs them again in a child pytest process
(:func:`run_in_fresh_interpreter`).  :func:`compute_as_the_gpu` closes the gaps of Triton 3.5's interpreter
that a test's expectations would otherwise trip over.
"""
from __future__ import annotations

import importlib
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
    a child pytest process with the interpreter on, when this process cannot run them; none may skip."""
    pytest.importorskip("triton", reason=no_triton_reason)
    if kernels_run_here():
        pytest.skip("the kernel tests run in this process")
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", selection, test_file],
        cwd=Path(test_file).resolve().parents[1], env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert child.returncode == 0 and "skipped" not in child.stdout, child.stdout[-4000:] + child.stderr[-2000:]


def compute_as_the_gpu(patch: pytest.MonkeyPatch, *, bf16_dot: bool = False, bf16_rounding: bool = False,
                       loop_bounds: bool = False) -> None:
    """Close gaps between Triton 3.5's interpreter and a GPU (only on the CPU; a GPU needs none of it):

    * ``bf16_dot``: it multiplies bfloat16 blocks as their raw uint16 bits (numpy has no bfloat16); they are
      widened to float32 first, exact for the products, as the tensor cores multiply them;
    * ``bf16_rounding``: it rounds float32 to bfloat16 by truncation, where the GPU rounds to nearest (even);
    * ``loop_bounds``: it turns a runtime loop bound (a one-element array) into an int with int(array), which
      numpy >= 2.4 refuses for arrays of one dimension.
    """
    if DEVICE != "cpu":
        return
    import triton.language as tl
    from triton.runtime import interpreter
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    if bf16_dot:
        create_dot = InterpreterBuilder.create_dot

        def widened(handle):
            if handle.dtype.scalar != tl.bfloat16:
                return handle
            return TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

        def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
            return create_dot(self, widened(a), widened(b), d, input_precision, max_num_imprecise_acc)

        patch.setattr(InterpreterBuilder, "create_dot", dot)
    if bf16_rounding:
        cast = InterpreterBuilder.cast_impl

        def rounded_cast(self, src, dst_type):
            if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
                return cast(self, src, dst_type)
            values = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            return TensorHandle(values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), tl.bfloat16)

        patch.setattr(InterpreterBuilder, "cast_impl", rounded_cast)
    if loop_bounds:
        patch_lang_tensor = interpreter._patch_lang_tensor

        def patch_scalars(tensor):
            patch_lang_tensor(tensor)
            tensor.__index__ = lambda self: self.handle.data.item()

        patch.setattr(interpreter, "_patch_lang_tensor", patch_scalars)
