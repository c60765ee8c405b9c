"""The interpreter helpers' guards (tests/triton_interpreter.py): where Triton's private interpreter internals
are not what they were written for, a kernel test skips and names the Triton version; it never breaks.
Both ways of patching the scalars' ``__index__`` (Triton 3.5's and 3.6's) are tried on stand-ins."""
from __future__ import annotations

import operator
import types

import numpy as np
import pytest
import triton_interpreter
from triton_interpreter import DEVICE, UNKNOWN_INTERPRETER, choose_interpreter, compute_as_the_gpu

choose_interpreter()  # importing Triton here must not keep later kernel modules from the interpreter

NO_TRITON = "Triton is not installed: the interpreter helpers only matter with it"


class _Scalar:
    """What the interpreter hands a kernel for a scalar argument: a tensor whose handle holds a one-element
    array."""

    def __init__(self, value):
        self.handle = types.SimpleNamespace(data=np.array([value], dtype=np.int32))


@pytest.fixture
def triton():
    if DEVICE != "cpu":
        pytest.skip("the helpers patch nothing on a GPU")
    return pytest.importorskip("triton", reason=NO_TRITON)


def test_a_changed_private_method_skips_naming_the_version(triton, monkeypatch):
    from triton.runtime.interpreter import InterpreterBuilder

    monkeypatch.setattr(InterpreterBuilder, "create_dot", lambda self, a, b: None)
    with pytest.MonkeyPatch.context() as patch, pytest.raises(pytest.skip.Exception) as skipped:
        compute_as_the_gpu(patch, bf16_dot=True)
    reason = str(skipped.value)
    assert f"Triton {triton.__version__}'s interpreter" in reason and UNKNOWN_INTERPRETER in reason
    assert "create_dot takes (self, a, b)" in reason


def test_a_missing_private_name_skips(triton, monkeypatch):
    from triton.runtime import interpreter

    monkeypatch.delattr(interpreter, "InterpreterBuilder")
    with pytest.MonkeyPatch.context() as patch, pytest.raises(pytest.skip.Exception, match="InterpreterBuilder is gone"):
        compute_as_the_gpu(patch, bf16_rounding=True)


def test_the_scalar_index_patch_for_triton_3_5(monkeypatch):
    patched_by_triton = []
    interpreter = types.SimpleNamespace(__name__="interpreter", _patch_lang_tensor=patched_by_triton.append)
    tensor_class = type("tensor", (), {})
    with pytest.MonkeyPatch.context() as patch:
        triton_interpreter._patch_scalar_index(patch, interpreter)
        interpreter._patch_lang_tensor(tensor_class)
    assert patched_by_triton == [tensor_class], "Triton's own patches still apply"
    scalar = _Scalar(7)
    scalar.__class__ = type("tensor", (tensor_class, _Scalar), {})
    assert operator.index(scalar) == 7 and list(range(scalar)) == list(range(7))


def test_the_scalar_index_patch_for_triton_3_6(monkeypatch):
    class Scope:  # Triton 3.6's _LangPatchScope: records what it sets, to undo it after the kernel
        def __init__(self):
            self.set = []

        def set_attr(self, obj, name, value):
            self.set.append((obj, name))
            setattr(obj, name, value)

    def patch_lang_tensor(tensor, scope):
        scope.set_attr(tensor, "__bool__", lambda self: True)

    interpreter = types.SimpleNamespace(__name__="interpreter", _patch_lang_tensor=patch_lang_tensor)
    scalar_class = type("tensor", (_Scalar,), {})
    scope = Scope()
    with pytest.MonkeyPatch.context() as patch:
        triton_interpreter._patch_scalar_index(patch, interpreter)
        interpreter._patch_lang_tensor(scalar_class, scope)
    assert scope.set == [(scalar_class, "__bool__"), (scalar_class, "__index__")], "patched within the scope"
    assert operator.index(scalar_class(5)) == 5
    assert interpreter._patch_lang_tensor is patch_lang_tensor, "Triton's function is back after the test"


def test_an_unknown_patch_signature_skips(triton):
    interpreter = types.SimpleNamespace(__name__="interpreter", _patch_lang_tensor=lambda tensor, scope, extra: None)
    with pytest.MonkeyPatch.context() as patch, pytest.raises(pytest.skip.Exception,
                                                              match=r"takes \(tensor, scope, extra\)"):
        triton_interpreter._patch_scalar_index(patch, interpreter)
