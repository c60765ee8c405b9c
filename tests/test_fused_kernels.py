"""When the DiT's fused kernels run (optimization/fused_kernels.py), and the plain rotation they are checked
against.  Runs without Triton: the kernel module is replaced by a stand-in that records its calls (the
kernels themselves are tested in test_dit_triton.py)."""
import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from src.models.dit.mlp import SwiGLUMLP
from src.models.dit.rope import apply_rotary
from src.optimization import fused_kernels
from conftest import ran_in_fresh_process


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
    monkeypatch.setattr(fused_kernels, "_load_dit_triton", lambda: module)
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


def test_kernels_run_only_inside_the_switch(stand_in):
    gate, up = _gate_and_up()
    assert fused_kernels.silu_mul(gate, up) is None
    with fused_kernels.fused(True):
        torch.testing.assert_close(fused_kernels.silu_mul(gate, up), F.silu(gate) * up)
        with fused_kernels.fused(False):
            assert fused_kernels.silu_mul(gate, up) is None
    assert fused_kernels.silu_mul(gate, up) is None
    assert len(stand_in.calls) == 1


def test_cpu_tensors_take_the_plain_path():
    gate, up = _gate_and_up()
    assert fused_kernels.KERNEL_DEVICES == ("cuda",)
    with fused_kernels.fused(True):
        assert fused_kernels.silu_mul(gate, up) is None
        assert fused_kernels.modulated_rms_norm(gate, 1e-5, up[:1], up[:1], (4,)) is None


@pytest.mark.parametrize("value, wanted", [(None, True), ("1", True), ("0", False), ("off", False), ("No", False)])
def test_environment_switch(stand_in, monkeypatch, value, wanted):
    if value is not None:
        monkeypatch.setenv(fused_kernels.TRITON_KERNELS_ENV, value)
    gate, up = _gate_and_up()
    with fused_kernels.fused(True):
        assert (fused_kernels.silu_mul(gate, up) is not None) is wanted
    assert len(stand_in.calls) == int(wanted)


def test_torch_compile_switch_does_not_turn_the_kernels_off(stand_in, monkeypatch):
    monkeypatch.setenv("SEEDVR2_ENABLE_COMPILE", "0")   # about torch.compile only
    with fused_kernels.fused(True):
        assert fused_kernels.silu_mul(*_gate_and_up()) is not None


def test_autograd_takes_the_plain_path(stand_in):
    gate, up = _gate_and_up()
    gate.requires_grad_(True)
    with fused_kernels.fused(True):
        assert fused_kernels.silu_mul(gate, up) is None       # the kernels have no backward
        with torch.no_grad():
            assert fused_kernels.silu_mul(gate, up) is not None


def test_compiled_code_calls_the_kernel_as_one_operator(stand_in):
    if ran_in_fresh_process(__file__, "test_compiled_code_calls_the_kernel_as_one_operator"):  # process-wide state
        return
    # Inside a compiled block the kernel is an opaque custom operator: the graph holds it (no graph break,
    # or fullgraph=True would fail) and the compiled module runs the kernel, as the eager one does.
    mlp = SwiGLUMLP(6, 16)
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compiled = torch.compile(mlp, backend=backend, fullgraph=True)
    x = torch.randn(5, 6)
    expected = mlp.proj_out(F.silu(mlp.proj_in_gate(x)) * mlp.proj_in(x))
    with torch.no_grad(), fused_kernels.fused(True):
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
        torch.testing.assert_close(compiled(x), mlp.proj_out(F.silu(mlp.proj_in_gate(x)) * mlp.proj_in(x)))
    assert stand_in.calls == []


def test_declined_arguments_take_the_plain_path_silently(stand_in, caplog):
    with caplog.at_level(logging.WARNING, logger="seedvr2"), fused_kernels.fused(True):
        assert fused_kernels.silu_mul(torch.randn(4, 6), torch.randn(4, 7)) is None
        assert fused_kernels.silu_mul(*_gate_and_up()) is not None
    assert not caplog.records


def test_a_failing_kernel_warns_once_and_stays_off(stand_in, monkeypatch, caplog):
    def broken(gate, up):
        raise RuntimeError("PTX assembly failed\nsecond line")

    monkeypatch.setattr(stand_in.module, "silu_mul", broken)
    with caplog.at_level(logging.WARNING, logger="seedvr2"), fused_kernels.fused(True):
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
    with fused_kernels.fused(True):
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
    with torch.no_grad(), fused_kernels.fused(True):
        torch.testing.assert_close(compiled(x), mlp.proj_out(F.silu(mlp.proj_in_gate(x)) * mlp.proj_in(x)))
    assert stand_in.calls == []
