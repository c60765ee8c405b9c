"""The DiT's fused kernels compute exactly the plain model's math, and stay off unless switched on."""
import logging

import torch

from src.models.dit.rope import apply_rotary
from src.optimization import fused_kernels


def _inputs(rows=37, table_rows=30, heads=3, head_dim=16, pairs=7, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, heads, head_dim, generator=g).to(dtype)
    angles = torch.randn(table_rows, pairs, generator=g)
    return x, angles.cos(), angles.sin()


def test_rotary_reference_equals_the_plain_rotation():
    for table_rows in (37, 30):          # all rows rotated (3B), or text rows left alone (7B)
        x, cos, sin = _inputs(table_rows=table_rows)
        assert torch.equal(fused_kernels.rotary_reference(x, cos, sin), apply_rotary(x, cos, sin))


def test_rotary_preserves_norm_of_each_pair():
    x, cos, sin = _inputs(dtype=torch.float64)
    out = fused_kernels.rotary_reference(x, cos.double(), sin.double())
    pairs = cos.shape[1]
    before = x[:30, :, : 2 * pairs].unflatten(-1, (pairs, 2)).norm(dim=-1)
    after = out[:30, :, : 2 * pairs].unflatten(-1, (pairs, 2)).norm(dim=-1)
    torch.testing.assert_close(after, before)
    assert torch.equal(out[:, :, 2 * pairs:], x[:, :, 2 * pairs:])


def test_kernels_are_off_by_default_and_on_cpu():
    x, cos, sin = _inputs()
    assert fused_kernels.rotary(x, cos, sin) is None
    with fused_kernels.fused(True):
        assert fused_kernels.rotary(x, cos, sin) is None   # CPU tensors always take the plain path


def test_a_failing_kernel_falls_back_once(monkeypatch, caplog):
    x, cos, sin = _inputs()

    def broken(*args):
        raise RuntimeError("inductor exploded")

    monkeypatch.setattr(fused_kernels, "_compiled", {"rotary": broken})
    monkeypatch.setattr(fused_kernels, "_failed", set())
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with caplog.at_level(logging.WARNING, logger="seedvr2"), fused_kernels.fused(True):
        assert fused_kernels.rotary(x, cos, sin) is None
        assert fused_kernels.rotary(x, cos, sin) is None
    assert sum("fused rotary kernel unavailable" in r.message for r in caplog.records) == 1


def test_compile_switch_disables_fusion(monkeypatch):
    monkeypatch.setenv("SEEDVR2_ENABLE_COMPILE", "0")
    x, cos, sin = _inputs()
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with fused_kernels.fused(True):
        assert fused_kernels.rotary(x, cos, sin) is None
