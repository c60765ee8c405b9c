"""When the DiT's fused kernels run (optimization/fused_kernels.py, swapped in by dit_fused_modules.py), and the
plain rotation they are checked against.  Runs without Triton: the kernel module is replaced by a stand-in that records its calls (the
kernels themselves are tested in test_dit_triton.py)."""
import importlib.util
import logging
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from src.models.dit.mlp import SwiGLUMLP
from src.models.dit.rope import apply_rotary
from src.optimization import fused_kernels
from src.optimization.dit_fused_modules import FusedSwiGLUMLP, attach_fused_kernels, detach_fused_kernels
from conftest import module_copies


def test_rotation_preserves_each_pair_and_leaves_the_rest():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(37, 3, 16, generator=generator, dtype=torch.float64)
    angles = torch.randn(30, 7, generator=generator, dtype=torch.float64)   # 30 of 37 rows, 7 of 8 pairs
    out = apply_rotary(x, angles.cos(), angles.sin())
    before = x[:30, :, :14].unflatten(-1, (7, 2)).norm(dim=-1)
    after = out[:30, :, :14].unflatten(-1, (7, 2)).norm(dim=-1)
    torch.testing.assert_close(after, before)
    assert not torch.allclose(out[:30, :, :14], x[:30, :, :14])
    assert torch.equal(out[:, :, 14:], x[:, :, 14:]) and torch.equal(out[30:], x[30:])


@pytest.fixture
def stand_in(monkeypatch):
    """A SwiGLU kernel that records its calls, reachable for CPU tensors, with fresh failure state."""
    calls = []

    def silu_mul(gate, up):
        calls.append(gate.shape)
        return F.silu(gate) * up

    module = SimpleNamespace(silu_mul_supported=lambda gate, up: gate.shape == up.shape, silu_mul=silu_mul)
    # Every copy of the module: the custom operators run the launchers of the copy that registered them.
    for copy in module_copies(fused_kernels):
        monkeypatch.setattr(copy, "_load_dit_triton", lambda: module)
    monkeypatch.setattr(fused_kernels, "_module", None)
    monkeypatch.setattr(fused_kernels, "triton_installed", lambda: True)
    monkeypatch.setattr(fused_kernels, "KERNEL_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(fused_kernels, "_silu_mul",
                        fused_kernels._TritonKernel("silu_mul", "SwiGLU", fused_kernels._silu_mul.operator))
    monkeypatch.delenv(fused_kernels.TRITON_KERNELS_ENV, raising=False)
    # Code compiled by an earlier test (the same module classes, other switch state) must not be reused.
    torch.compiler.reset()
    return SimpleNamespace(module=module, calls=calls)


def _gate_and_up():
    return torch.randn(4, 6), torch.randn(4, 6)


def _plain_swiglu(mlp, x):
    return mlp.proj_out(F.silu(mlp.proj_in_gate(x)) * mlp.proj_in(x))


def test_kernels_run_only_in_attached_modules(stand_in):
    mlp, x = SwiGLUMLP(6, 16), torch.randn(5, 6)
    with torch.no_grad():
        expected = _plain_swiglu(mlp, x)
        mlp(x)
        assert attach_fused_kernels(mlp) == 1 and type(mlp) is FusedSwiGLUMLP
        assert attach_fused_kernels(mlp) == 0   # attached already
        torch.testing.assert_close(mlp(x), expected)
        assert detach_fused_kernels(mlp) == 1 and type(mlp) is SwiGLUMLP
        mlp(x)
    assert len(stand_in.calls) == 1


def test_cpu_tensors_take_the_plain_path():
    gate, up = _gate_and_up()
    assert fused_kernels.KERNEL_DEVICES == ("cuda",)
    assert fused_kernels.silu_mul(gate, up) is None
    assert fused_kernels.modulated_rms_norm(gate, 1e-5, up[:1], up[:1], (4,)) is None


@pytest.mark.parametrize("value, wanted", [(None, True), ("1", True), ("0", False), ("off", False), ("No", False)])
def test_environment_switch(stand_in, monkeypatch, value, wanted):
    if value is not None:
        monkeypatch.setenv(fused_kernels.TRITON_KERNELS_ENV, value)
    gate, up = _gate_and_up()
    assert (fused_kernels.silu_mul(gate, up) is not None) is wanted
    assert len(stand_in.calls) == int(wanted)


def test_torch_compile_switch_does_not_turn_the_kernels_off(stand_in, monkeypatch):
    monkeypatch.setenv("SEEDVR2_ENABLE_COMPILE", "0")   # about torch.compile only
    assert fused_kernels.silu_mul(*_gate_and_up()) is not None


def test_autograd_takes_the_plain_path(stand_in):
    gate, up = _gate_and_up()
    gate.requires_grad_(True)
    assert fused_kernels.silu_mul(gate, up) is None       # the kernels have no backward
    with torch.no_grad():
        assert fused_kernels.silu_mul(gate, up) is not None


def test_compiled_code_calls_the_kernel_as_one_operator(stand_in):
    # Inside a compiled block the kernel is an opaque custom operator: the graph holds it (no graph break,
    # or fullgraph=True would fail) and the compiled module runs the kernel, as the eager one does.
    mlp = SwiGLUMLP(6, 16)
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compiled = torch.compile(mlp, backend=backend, fullgraph=True)
    x = torch.randn(5, 6)
    expected = _plain_swiglu(mlp, x)
    attach_fused_kernels(mlp)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), expected)
        assert len(stand_in.calls) == 1
        mlp(x)
    assert len(stand_in.calls) == 2
    targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert "seedvr2.dit_silu_mul.default" in targets
    assert not [t for t in targets if "silu" in t and "dit_silu_mul" not in t]   # no plain SiLU traced


def test_compiled_code_outside_the_switch_traces_the_plain_path(stand_in):
    mlp = SwiGLUMLP(6, 16)
    compiled = torch.compile(mlp, backend="eager", fullgraph=True)
    x = torch.randn(5, 6)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), _plain_swiglu(mlp, x))
    assert stand_in.calls == []


def test_a_compiled_module_follows_attach_and_detach(stand_in):
    # torch.compile guards on the module's class: swapping it recompiles instead of reusing the plain graph.
    mlp, x = SwiGLUMLP(6, 16), torch.randn(5, 6)
    compiled = torch.compile(mlp, backend="eager", fullgraph=True)
    with torch.no_grad():
        expected = compiled(x)
        attach_fused_kernels(mlp)
        torch.testing.assert_close(compiled(x), expected)
        assert len(stand_in.calls) == 1
        detach_fused_kernels(mlp)
        torch.testing.assert_close(compiled(x), expected)
    assert len(stand_in.calls) == 1


def test_declined_arguments_take_the_plain_path_silently(stand_in, caplog):
    with caplog.at_level(logging.WARNING, logger="seedvr2"):
        assert fused_kernels.silu_mul(torch.randn(4, 6), torch.randn(4, 7)) is None
        assert fused_kernels.silu_mul(*_gate_and_up()) is not None
    assert not caplog.records


def test_a_failing_kernel_warns_once_and_stays_off(stand_in, monkeypatch, caplog):
    def broken(gate, up):
        raise RuntimeError("PTX assembly failed\nsecond line")

    monkeypatch.setattr(stand_in.module, "silu_mul", broken)
    with caplog.at_level(logging.WARNING, logger="seedvr2"):
        assert fused_kernels.silu_mul(*_gate_and_up()) is None
        monkeypatch.setattr(stand_in.module, "silu_mul", lambda gate, up: gate)  # working again: still off
        assert fused_kernels.silu_mul(*_gate_and_up()) is None
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1
    assert "Triton DiT SwiGLU kernel failed (RuntimeError: PTX assembly failed)" in warnings[0]
    assert "plain PyTorch path" in warnings[0]


def test_out_of_memory_is_not_a_kernel_failure(stand_in, monkeypatch):
    def out_of_memory(gate, up):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(stand_in.module, "silu_mul", out_of_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        fused_kernels.silu_mul(*_gate_and_up())
    monkeypatch.setattr(stand_in.module, "silu_mul", lambda gate, up: gate)
    assert fused_kernels.silu_mul(*_gate_and_up()) is not None   # still on


def test_without_custom_operators_compiled_code_traces_the_plain_path(stand_in, monkeypatch):
    # torch before 2.4 has no torch.library.custom_op: no operator is made, and a compiled block traces the
    # plain code (which works everywhere) instead of failing to import or to compile.
    monkeypatch.delattr(torch.library, "custom_op")
    assert fused_kernels._custom_operator("dit_test_only", lambda x: x, lambda x: x) is None
    monkeypatch.setattr(fused_kernels, "_silu_mul", fused_kernels._TritonKernel("silu_mul", "SwiGLU", None))
    mlp = SwiGLUMLP(6, 16)
    compiled = torch.compile(mlp, backend="eager", fullgraph=True)
    x = torch.randn(5, 6)
    attach_fused_kernels(mlp)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), _plain_swiglu(mlp, x))
    assert stand_in.calls == []


def test_a_second_copy_of_the_module_reuses_the_operators(stand_in, monkeypatch):
    # ComfyUI imports the pack under its own package name, so this module can be imported twice in one
    # process; torch.library is process-wide.  The second copy must reuse the operators, not replace them.
    package = ModuleType("seedvr2_second_copy")
    package.__path__ = [str(Path(fused_kernels.__file__).parent)]
    monkeypatch.setitem(sys.modules, package.__name__, package)
    spec = importlib.util.spec_from_file_location(f"{package.__name__}.fused_kernels", fused_kernels.__file__)
    second = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, second)
    spec.loader.exec_module(second)
    gate, up = _gate_and_up()
    # The operator runs the first copy's launcher (the stand-in); a replaced one would import the second
    # copy's own Triton module instead.
    torch.testing.assert_close(second._silu_mul_operator(gate, up), F.silu(gate) * up)
    torch.testing.assert_close(torch.ops.seedvr2.dit_silu_mul(gate, up), F.silu(gate) * up)
    assert len(stand_in.calls) == 2
    for name in ("qkv_norm_rope", "modulated_rms_norm", "gated_residual", "silu_mul"):
        # The overload itself, so that a traced call is the same graph node whichever copy traced it.
        assert getattr(second, f"_{name}_operator") is getattr(torch.ops.seedvr2, f"dit_{name}").default
