"""The Triton DiT kernels (optimization/dit_triton.py) against the plain model code they replace.

The kernels run on the GPU when there is one, else on CPU tensors under Triton's interpreter, which must be
switched on before Triton is imported: here, or, when an earlier test module imported Triton, in a child
pytest process of this file.  Float32 must equal the plain PyTorch path up to summation order (rel <= 1e-5),
bfloat16 must be the float32 result rounded once (within one bf16 step).  Inputs cover odd row counts,
strided rows, both rope layouts (all rows rotated / text rows beyond the table), channels beyond the rotated
pairs, a head_dim that is not a power of two, and two samples with different modulation.  The whole tiny
3B and 7B DiTs with the fused modules attached must equal their plain forward and the golden outputs.  The fallback
after a failing import is tested without Triton.
"""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import golden_cases, golden_json, load_golden, module_copies, rel_err
from triton_interpreter import DEVICE, choose_interpreter, compute_as_the_gpu, kernel_module, run_in_fresh_interpreter

from src.models.dit import NaDiT, NaDiTConfig
from src.models.dit.mlp import SwiGLUMLP
from src.models.dit.modulation import SCALE, SHIFT, Modulation
from src.models.dit.normalization import rms_norm
from src.models.dit.rope import apply_rotary
from src.optimization import fused_kernels
from src.optimization.dit_fused_modules import attach_fused_kernels

pytestmark = pytest.mark.usefixtures("single_thread")

choose_interpreter()

EXACT = 1e-5
BF16_STEP = 2.0**-7  # one bfloat16 step, relative (8 significant bits)
EPS = 1e-5
BF16_GOLDEN = 2e-2  # a bfloat16 DiT against the float32 goldens (test_dit_golden)
NO_TRITON = "Triton is not installed: its DiT kernels are optional (CUDA only)"



@pytest.fixture(scope="module")
def kernels():
    """The dit_triton module, its kernels compiled for the GPU or run by the interpreter."""
    return kernel_module("dit_triton", NO_TRITON)


def _random(shape, seed: int, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * scale).to(DEVICE, dtype)


def _strided_rows(rows: int, width: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """(rows, width) whose rows sit 5 elements further apart than their width (a slice of a wider buffer)."""
    return _random((rows, width + 5), seed, dtype, scale=2.0)[:, :width]


# ---------------------------------------------------------------------------------------------------
# q/k RMSNorm + rope (+ v)
# ---------------------------------------------------------------------------------------------------

HEADS, VIDEO_ROWS, TEXT_ROWS = 3, 13, 5


def _qkv_inputs(head_dim: int, pairs: int, table_rows: int, dtype=torch.float32):
    """Two streams of strided qkv projections with their own norm weights, and a (table_rows, pairs) table."""
    streams = []
    for stream, rows in enumerate((VIDEO_ROWS, TEXT_ROWS)):
        qkv = _strided_rows(rows, 3 * HEADS * head_dim, seed=10 + stream, dtype=dtype)
        q_weight = (_random(head_dim, seed=20 + stream).abs() + 0.5).to(dtype)
        k_weight = (_random(head_dim, seed=30 + stream).abs() + 0.5).to(dtype)
        streams.append((qkv, q_weight, k_weight))
    angles = _random((table_rows, pairs), seed=40, scale=3.0)
    return streams, angles.cos(), angles.sin()


def _plain_qkv(streams, cos, sin):
    """JointWindowAttention's plain path: per-head RMSNorm per stream, video rows then text rows, rope of q, k."""
    qs, ks, vs = [], [], []
    for qkv, q_weight, k_weight in streams:
        q, k, v = qkv.unflatten(-1, (3, HEADS, -1)).unbind(1)
        qs.append(rms_norm(q, EPS, q_weight))
        ks.append(rms_norm(k, EPS, k_weight))
        vs.append(v)
    return apply_rotary(torch.cat(qs), cos, sin), apply_rotary(torch.cat(ks), cos, sin), torch.cat(vs)


# (head_dim, rotated pairs, table rows): 3B layout (every row rotated) and 7B layout (video rows only), with
# channels left after the pairs; 12 is not a power of two (a masked tile of 16).
QKV_LAYOUTS = {"all_rows": (16, 6, VIDEO_ROWS + TEXT_ROWS), "video_rows": (16, 4, VIDEO_ROWS),
               "head_dim_12": (12, 5, VIDEO_ROWS + TEXT_ROWS)}


@pytest.mark.parametrize("layout", QKV_LAYOUTS.values(), ids=QKV_LAYOUTS.keys())
def test_qkv_float32_equals_plain_path(kernels, layout):
    head_dim, pairs, table_rows = layout
    streams, cos, sin = _qkv_inputs(head_dim, pairs, table_rows)
    assert kernels.qkv_norm_rope_supported(streams, cos, sin, HEADS, EPS)
    q, k, v = kernels.qkv_norm_rope(streams, cos, sin, HEADS, EPS, tile_elements=64)  # 4 head rows a tile
    plain_q, plain_k, plain_v = _plain_qkv(streams, cos, sin)
    assert q.shape == k.shape == v.shape == (VIDEO_ROWS + TEXT_ROWS, HEADS, head_dim)
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    assert rel_err(q, plain_q) <= EXACT and rel_err(k, plain_k) <= EXACT
    assert torch.equal(v, plain_v)
    # Rows beyond the table and channels beyond the pairs are only normalised; the rest is rotated.
    unrotated_q, _, _ = _plain_qkv(streams, cos[:0], sin[:0])
    torch.testing.assert_close(q[table_rows:], unrotated_q[table_rows:], rtol=EXACT, atol=1e-6)
    torch.testing.assert_close(q[:, :, 2 * pairs:], unrotated_q[:, :, 2 * pairs:], rtol=EXACT, atol=1e-6)
    assert rel_err(q[:table_rows, :, : 2 * pairs], unrotated_q[:table_rows, :, : 2 * pairs]) > 0.1


def test_qkv_bfloat16_is_the_float32_result_rounded(kernels):
    streams, cos, sin = _qkv_inputs(16, 4, VIDEO_ROWS, dtype=torch.bfloat16)
    q, k, v = kernels.qkv_norm_rope(streams, cos, sin, HEADS, EPS, tile_elements=64)
    as_float32 = [tuple(t.float() for t in stream) for stream in streams]
    for fused, plain in zip((q, k, v), _plain_qkv(as_float32, cos, sin)):
        assert fused.dtype == torch.bfloat16
        torch.testing.assert_close(fused.float(), plain.bfloat16().float(), rtol=BF16_STEP, atol=1e-5)


def test_qkv_preconditions(kernels):
    streams, cos, sin = _qkv_inputs(16, 4, VIDEO_ROWS)
    assert not kernels.qkv_norm_rope_supported(streams, cos, sin, HEADS + 1, EPS)  # row is not 3·heads·head_dim
    assert not kernels.qkv_norm_rope_supported(streams, cos.double(), sin.double(), HEADS, EPS)
    too_many_pairs = torch.ones(VIDEO_ROWS, 9, device=DEVICE)
    assert not kernels.qkv_norm_rope_supported(streams, too_many_pairs, too_many_pairs, HEADS, EPS)
    mixed = [streams[0], tuple(t.half() for t in streams[1])]
    assert not kernels.qkv_norm_rope_supported(mixed, cos, sin, HEADS, EPS)
    column_strided = [(qkv.t().contiguous().t(), q_w, k_w) for qkv, q_w, k_w in streams]
    assert not kernels.qkv_norm_rope_supported(column_strided, cos, sin, HEADS, EPS)


# ---------------------------------------------------------------------------------------------------
# Modulated RMSNorm
# ---------------------------------------------------------------------------------------------------

DIM = 40  # not a power of two: a masked tile of 64


def _modulation(samples: int, dtype=torch.float32) -> tuple[Modulation, torch.Tensor]:
    """A Modulation with non-trivial learned vectors, and a (samples, DIM, 3) time slice that differs per sample."""
    modulation = Modulation(DIM, ("attn",)).to(DEVICE, dtype)
    with torch.no_grad():
        for seed, parameter in enumerate(modulation.parameters()):
            parameter.copy_(_random(DIM, seed=50 + seed, dtype=dtype))
    return modulation, _random((samples, DIM, 3), seed=60, dtype=dtype)


def _scale_and_shift(modulation: Modulation, time: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return time[..., SCALE] + modulation.attn_scale, time[..., SHIFT] + modulation.attn_shift


@pytest.mark.parametrize("lengths", [(7, 4), (11,)], ids=["two_samples", "one_sample"])
def test_modulated_norm_float32_equals_plain_path(kernels, lengths):
    x = _strided_rows(sum(lengths), DIM, seed=70)
    modulation, time = _modulation(len(lengths))
    scale, shift = _scale_and_shift(modulation, time)
    assert kernels.modulated_rms_norm_supported(x, EPS, scale, shift, lengths)
    out = kernels.modulated_rms_norm(x, EPS, scale, shift, lengths, tile_elements=128)  # 2 rows a tile
    with torch.no_grad():
        plain = modulation.modulate(rms_norm(x, EPS), time, "attn", lengths)
    assert out.is_contiguous() and rel_err(out, plain) <= EXACT
    if len(lengths) == 2:  # each sample's rows got its own modulation
        with torch.no_grad():
            first_only = modulation.modulate(rms_norm(x, EPS), time[:1], "attn", (sum(lengths),))
        assert rel_err(out[lengths[0]:], first_only[lengths[0]:]) > 0.1


def test_modulated_norm_bfloat16_is_the_float32_result_rounded(kernels):
    lengths = (7, 4)
    x = _strided_rows(sum(lengths), DIM, seed=71, dtype=torch.bfloat16)
    modulation, time = _modulation(2, torch.bfloat16)
    scale, shift = _scale_and_shift(modulation, time)
    out = kernels.modulated_rms_norm(x, EPS, scale, shift, lengths, tile_elements=128)
    expected = rms_norm(x.float(), EPS) * scale.float().repeat_interleave(torch.tensor(lengths, device=DEVICE), 0)
    expected += shift.float().repeat_interleave(torch.tensor(lengths, device=DEVICE), 0)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.bfloat16().float(), rtol=BF16_STEP, atol=1e-5)


def test_modulated_norm_preconditions(kernels):
    x = _strided_rows(11, DIM, seed=72)
    modulation, time = _modulation(2)
    scale, shift = _scale_and_shift(modulation, time)
    assert not kernels.modulated_rms_norm_supported(x, EPS, scale, shift, (7, 5))      # lengths != rows
    assert not kernels.modulated_rms_norm_supported(x, EPS, scale[:1], shift[:1], (7, 4))  # a scale per sample
    assert not kernels.modulated_rms_norm_supported(x.t(), EPS, scale, shift, (7, 4))


# ---------------------------------------------------------------------------------------------------
# Gated residual
# ---------------------------------------------------------------------------------------------------


def _gate(modulation: Modulation, time: torch.Tensor) -> torch.Tensor:
    return time[..., 2] + modulation.attn_gate


@pytest.mark.parametrize("lengths", [(7, 4), (11,)], ids=["two_samples", "one_sample"])
def test_gated_residual_float32_equals_plain_path(kernels, lengths):
    residual, update = _strided_rows(sum(lengths), DIM, seed=90), _strided_rows(sum(lengths), DIM, seed=91)
    modulation, time = _modulation(len(lengths))
    with torch.no_grad():
        modulation.attn_gate.normal_()
        gate = _gate(modulation, time)
        assert kernels.gated_residual_supported(residual, update, gate, lengths)
        out = kernels.gated_residual(residual, update, gate, lengths, tile_elements=128)  # 2 rows a tile
        plain = modulation.add_gated(residual, update, time, "attn", lengths)
    assert out.is_contiguous() and rel_err(out, plain) <= EXACT
    if len(lengths) == 2:  # each sample's rows got its own gate
        with torch.no_grad():
            first_only = modulation.add_gated(residual, update, time[:1], "attn", (sum(lengths),))
        assert rel_err(out[lengths[0]:], first_only[lengths[0]:]) > 0.1


def test_gated_residual_bfloat16_is_the_float32_result_rounded(kernels):
    lengths = (7, 4)
    residual = _strided_rows(sum(lengths), DIM, seed=92, dtype=torch.bfloat16)
    update = _strided_rows(sum(lengths), DIM, seed=93, dtype=torch.bfloat16)
    gate = _random((2, DIM), seed=94, dtype=torch.bfloat16)
    out = kernels.gated_residual(residual, update, gate, lengths, tile_elements=128)
    per_row = gate.float().repeat_interleave(torch.tensor(lengths, device=DEVICE), 0)
    expected = residual.float() + update.float() * per_row
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.bfloat16().float(), rtol=BF16_STEP, atol=1e-5)


def test_gated_residual_preconditions(kernels):
    residual, update = _strided_rows(11, DIM, seed=95), _strided_rows(11, DIM, seed=96)
    gate = _random((2, DIM), seed=97)
    assert not kernels.gated_residual_supported(residual, update, gate, (7, 5))          # lengths != rows
    assert not kernels.gated_residual_supported(residual, update, gate[:1], (7, 4))      # a gate per sample
    assert not kernels.gated_residual_supported(residual, update[:, :-1], gate, (7, 4))  # shapes differ
    assert not kernels.gated_residual_supported(residual, update.double(), gate, (7, 4))


# ---------------------------------------------------------------------------------------------------
# SwiGLU gate
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_silu_mul_equals_plain_path(kernels, dtype):
    gate, up = _random((7, 37), seed=80, dtype=dtype, scale=4.0), _random((7, 37), seed=81, dtype=dtype)
    assert kernels.silu_mul_supported(gate, up)
    out = kernels.silu_mul(gate, up, block=64)  # 259 elements: a partial last block
    expected = F.silu(gate.float()) * up.float()
    assert out.dtype == dtype
    if dtype == torch.float32:
        assert rel_err(out, expected) <= EXACT
    else:
        torch.testing.assert_close(out.float(), expected.bfloat16().float(), rtol=BF16_STEP, atol=1e-5)
    assert not kernels.silu_mul_supported(gate.t(), up.t())
    assert not kernels.silu_mul_supported(gate, up.double())


# ---------------------------------------------------------------------------------------------------
# The wiring: the whole tiny DiT through the kernels, and the fallback
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def kernels_take_these_tensors(monkeypatch):
    """Route the model's fused calls to the kernels for this test's device (CPU: the interpreter), with fresh
    failure state, counting the launches per kernel."""
    monkeypatch.setattr(fused_kernels, "KERNEL_DEVICES", ("cuda", DEVICE))
    module = fused_kernels._load_dit_triton()
    # Every copy of fused_kernels launches this module's kernels: the custom operators run the launchers of
    # the copy that registered them.
    for copy in module_copies(fused_kernels):
        monkeypatch.setattr(copy, "_load_dit_triton", lambda: module)
    launches = {}
    for name, label in (("qkv_norm_rope", "qkv"), ("modulated_rms_norm", "norm"), ("gated_residual", "gated"),
                        ("silu_mul", "swiglu")):
        monkeypatch.setattr(fused_kernels, f"_{name}", fused_kernels._TritonKernel(
            name, label, getattr(fused_kernels, f"_{name}").operator))
        launcher = getattr(module, name)

        def counted(*args, _launcher=launcher, _name=name):
            launches[_name] = launches.get(_name, 0) + 1
            return _launcher(*args)

        monkeypatch.setattr(module, name, counted)
    return launches


@pytest.fixture
def rounding_as_on_the_gpu(monkeypatch):
    """Triton 3.5's interpreter rounds float32 to bfloat16 by truncation, where the GPU rounds to nearest
    (even).  Across a whole DiT the truncated residual stream drifts (7B: rel 2.2e-2 from the golden against
    6.6e-3), so the model test rounds as the GPU does."""
    compute_as_the_gpu(monkeypatch, bf16_rounding=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("variant", ["3b", "7b"])
def test_tiny_dit_through_the_kernels_equals_plain_and_golden(kernels, kernels_take_these_tensors, caplog,
                                                               rounding_as_on_the_gpu, variant, dtype):
    config = NaDiTConfig.from_kwargs(golden_json(f"dit{variant}_config.json")["kwargs"])
    model = NaDiT(config)
    model.load_state_dict(load_golden(f"dit{variant}_weights.safetensors"), strict=True)
    model = model.to(DEVICE, dtype).eval()
    case = {name: t.to(DEVICE) for name, t in golden_cases(f"dit{variant}_cases.safetensors")["packed2"].items()}
    arguments = (case["vid"], case["txt"], case["vid_shape"].cpu(), case["txt_shape"].cpu(), case["timestep"])
    with torch.no_grad():
        plain = model(*arguments)
        assert not kernels_take_these_tensors  # plain modules: no kernel
        attach_fused_kernels(model)
        with caplog.at_level(logging.WARNING, logger="seedvr2"):
            fused = model(*arguments)
    assert not [record for record in caplog.records if record.name == "seedvr2"]
    # Every block: one qkv launch per layer, four modulated norms and gated residuals (3B last block: two
    # each), a SwiGLU per MLP.
    layers = config.num_layers
    assert kernels_take_these_tensors["qkv_norm_rope"] == layers
    assert kernels_take_these_tensors["modulated_rms_norm"] == (4 * layers - 2 if variant == "3b" else 4 * layers)
    assert kernels_take_these_tensors["gated_residual"] == kernels_take_these_tensors["modulated_rms_norm"]
    assert kernels_take_these_tensors.get("silu_mul", 0) == (2 * layers - 1 if variant == "3b" else 0)
    golden = case["out_per_sample"]
    if dtype == torch.float32:
        assert rel_err(fused, plain) <= EXACT and rel_err(fused, golden) <= EXACT
    else:
        # Rounded once per fused op instead of after every plain op: as close to the golden as the plain path
        # (measured: 3B 8.3e-3 against plain 8.0e-3, 7B 6.6e-3 against 6.6e-3).
        assert rel_err(fused, golden) <= min(BF16_GOLDEN, 1.25 * rel_err(plain, golden))


def test_compiled_tiny_dit_calls_every_kernel_as_an_operator(kernels, kernels_take_these_tensors):
    # torch.compile traces the blocks with the kernels as opaque custom operators (backend "eager": Dynamo's
    # graphs run as traced, no Inductor); the result is the plain model's, and every kernel ran.
    config = NaDiTConfig.from_kwargs(golden_json("dit3b_config.json")["kwargs"])
    model = NaDiT(config)
    model.load_state_dict(load_golden("dit3b_weights.safetensors"), strict=True)
    model = model.to(DEVICE).eval()
    case = {name: t.to(DEVICE) for name, t in golden_cases("dit3b_cases.safetensors")["packed2"].items()}
    arguments = (case["vid"], case["txt"], case["vid_shape"].cpu(), case["txt_shape"].cpu(), case["timestep"])
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        plain = model(*arguments)
        attach_fused_kernels(model)
        fused = compiled(*arguments)
    torch._dynamo.reset()
    assert rel_err(fused, plain) <= EXACT
    kernels_run = {"qkv_norm_rope", "modulated_rms_norm", "gated_residual", "silu_mul"}
    assert set(kernels_take_these_tensors) == kernels_run
    operators = {str(node.target) for graph in graphs for node in graph.graph.nodes if "seedvr2" in str(node.target)}
    assert operators == {f"seedvr2.dit_{name}.default" for name in kernels_run}


def test_failing_import_warns_once_and_falls_back(monkeypatch, caplog):
    # Runs without Triton: the import itself is made to fail.
    def no_triton():
        raise ImportError("No module named 'triton'\nsecond line")

    monkeypatch.setattr(fused_kernels, "_load_dit_triton", no_triton)
    monkeypatch.setattr(fused_kernels, "triton_installed", lambda: True)
    monkeypatch.setattr(fused_kernels, "KERNEL_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(fused_kernels, "_silu_mul", fused_kernels._TritonKernel(
        "silu_mul", "SwiGLU", fused_kernels._silu_mul.operator))
    mlp = SwiGLUMLP(8, 24)
    x = torch.randn(5, 8)
    with torch.no_grad():
        expected = mlp.proj_out(F.silu(mlp.proj_in_gate(x)) * mlp.proj_in(x))
        attach_fused_kernels(mlp)
        with caplog.at_level(logging.WARNING, logger="seedvr2"):
            results = [mlp(x), mlp(x)]
    for result in results:
        assert torch.equal(result, expected)
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1
    assert "SwiGLU" in warnings[0] and "ImportError: No module named 'triton'" in warnings[0]
    assert "plain PyTorch path" in warnings[0] and "second line" not in warnings[0]


def test_kernels_in_a_fresh_interpreter():
    run_in_fresh_interpreter(__file__, NO_TRITON)
