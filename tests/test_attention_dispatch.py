"""Attention backends: resolution, fallbacks, numerics against a float64 softmax reference, compile."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from src.optimization import attention_dispatch
from src.optimization.attention_dispatch import (
    AttentionBackend,
    AttentionBackendUnavailableError,
    UnknownAttentionBackendError,
    attention,
    available_backends,
    backend_names,
    prepare_for_compile,
    register_backend,
    resolve_backend,
    verify_backend,
)

LOGGER = attention_dispatch.__name__
CPU_BACKENDS = ("sdpa", "sdpa_flash", "sdpa_math", "sdpa_chunked", "matmul_chunked", "auto")


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch):
    """Every test starts with no remembered resolutions and leaves the registry as it found it."""
    monkeypatch.setattr(attention_dispatch, "_BACKENDS", dict(attention_dispatch._BACKENDS))
    attention_dispatch.clear_backend_cache()
    yield
    attention_dispatch.clear_backend_cache()


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d) v written out in float64."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(scores, dim=-1) @ v


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def qkv(batch, heads, q_len, k_len, head_dim, dtype=torch.float32):
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(batch, heads, q_len, head_dim, generator=generator)
    k = torch.randn(batch, heads, k_len, head_dim, generator=generator)
    v = torch.randn(batch, heads, k_len, head_dim, generator=generator)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def fallback_records(caplog):
    return [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def test_the_torch_free_list_of_modes_is_exactly_what_is_registered():
    """The CLI offers options.ATTENTION_MODES (read without importing torch); it must match the registry."""
    from src import options

    assert backend_names() == options.ATTENTION_MODES == attention_dispatch.ATTENTION_MODES


def test_every_backend_name_resolves_on_cpu():
    q = torch.zeros(1, 2, 8, 64)
    runnable_here = {"sdpa", "sdpa_flash", "sdpa_math", "sdpa_chunked", "matmul_chunked"}
    fallback_runnable_here = {"triton_wide": "matmul_chunked"}
    for name in backend_names():
        resolved = resolve_backend(name, q)
        assert resolved == (name if name in runnable_here else fallback_runnable_here.get(name, "sdpa")), name


@pytest.mark.parametrize("name", ["flash_attn_2", "flash_attn", "flash_attn_3", "xformers", "sageattn_2",
                                  "sageattn_3", "sageattn_3_fp4", "sageattn_3_fp8", "flex", "sdpa_cudnn"])
def test_missing_backend_falls_back_once_with_one_log_line(name, caplog):
    q, k, v = qkv(2, 3, 40, 40, 64)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        outputs = [attention(q, k, v, backend=name) for _ in range(3)]
    records = fallback_records(caplog)
    assert len(records) == 1
    message = records[0].getMessage()
    assert repr(name) in message and "using 'sdpa'" in message and "cuda" in message
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    for out in outputs:
        torch.testing.assert_close(out, plain, rtol=0, atol=0)


def test_uninstalled_package_is_reported_with_an_install_hint(caplog):
    register_backend(AttentionBackend("needs_package", lambda q, k, v: q, devices=("cpu",),
                                      package="seedvr2_no_such_package", install_hint="pip install it"))
    q, k, v = qkv(1, 2, 16, 16, 32)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = attention(q, k, v, backend="needs_package")
        attention(q, k, v, backend="needs_package")
    assert len(fallback_records(caplog)) == 1
    assert "seedvr2_no_such_package is not installed (pip install it)" in caplog.records[0].getMessage()
    assert available_backends("cpu")["needs_package"] == "seedvr2_no_such_package is not installed (pip install it)"
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_backend_failing_at_run_time_falls_back_and_is_remembered(caplog):
    calls = []

    def broken_kernel(q, k, v):
        calls.append(q.shape)
        raise RuntimeError("unsupported shape")

    register_backend(AttentionBackend("broken", broken_kernel, devices=("cpu",)))
    q, k, v = qkv(2, 2, 24, 24, 32)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        first = attention(q, k, v, backend="broken")
        second = attention(q, k, v, backend="broken")
        assert resolve_backend("broken", q) == "sdpa"
    assert len(calls) == 1, "the failing kernel must not be retried for the same inputs"
    records = fallback_records(caplog)
    assert len(records) == 1 and "unsupported shape" in records[0].getMessage()
    expected = reference_attention(q, k, v)
    assert rel(first, expected) <= 1e-5 and rel(second, expected) <= 1e-5


def test_out_of_memory_is_not_hidden_by_a_fallback():
    def out_of_memory(q, k, v):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    register_backend(AttentionBackend("hungry", out_of_memory, devices=("cpu",)))
    q, k, v = qkv(1, 1, 8, 8, 16)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        attention(q, k, v, backend="hungry")


def test_auto_on_cpu_is_the_plain_path(caplog):
    for head_dim in (64, 128, 512):
        q = torch.zeros(1, 1, 4, head_dim)
        assert resolve_backend("auto", q) == "sdpa"
    assert fallback_records(caplog) == []


@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [
    (2, 3, 77, 77, 64),     # DiT-like window batch
    (3, 2, 40, 58, 128),    # queries and keys of different lengths
    (4, 1, 96, 96, 512),    # the VAE mid-block: one 512-wide head per frame
])
def test_attention_matches_float64_softmax(name, shape):
    q, k, v = qkv(*shape)
    out = attention(q, k, v, backend=name)
    assert out.shape == (*shape[:3], shape[4])
    assert rel(out, reference_attention(q, k, v)) <= 1e-5


@pytest.mark.parametrize("name", ["sdpa_chunked", "matmul_chunked"])
def test_chunked_queries_are_exact_across_chunk_boundaries(monkeypatch, name):
    monkeypatch.setattr(attention_dispatch, "CHUNK_SCORE_ELEMENTS", 2 * 1 * 50 * 7)  # 7 query rows per slice
    q, k, v = qkv(2, 1, 45, 50, 512)
    out = attention(q, k, v, backend=name)
    assert rel(out, reference_attention(q, k, v)) <= 1e-5


def test_matmul_chunked_keeps_scores_in_float32_for_half_inputs():
    """Large logits (a trained VAE's mid-block has them) would lose their softmax to bf16-rounded scores:
    scores and softmax stay float32, only the probabilities are rounded, so the error stays at bf16's
    rounding of the inputs and outputs."""
    q, k, v = qkv(2, 1, 64, 80, 512)
    q, k, v = (q * 4).bfloat16(), (k * 4).bfloat16(), v.bfloat16()  # logits with a spread of ~±100
    out = attention(q, k, v, backend="matmul_chunked")
    assert out.dtype == torch.bfloat16
    reference = reference_attention(q, k, v)
    assert rel(out, reference) <= 1e-2
    rounded_scores = (q.double() @ k.double().transpose(-1, -2) / math.sqrt(512)).bfloat16().double()
    assert rel(torch.softmax(rounded_scores, -1) @ v.double(), reference) > 2 * rel(out, reference)


def test_bfloat16_inputs_stay_within_the_half_precision_tier():
    q, k, v = qkv(2, 4, 64, 64, 128, dtype=torch.bfloat16)
    out = attention(q, k, v, backend="sdpa_flash")
    assert out.dtype == torch.bfloat16
    assert rel(out, reference_attention(q, k, v)) <= 1e-2


def test_unknown_backend_name_is_a_clear_error():
    with pytest.raises(UnknownAttentionBackendError, match="choose one of: auto, sdpa"):
        attention(*qkv(1, 1, 4, 4, 8), backend="flash4")
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        resolve_backend("nope", torch.zeros(1, 1, 1, 8))


def test_wrong_rank_is_a_clear_error():
    x = torch.zeros(2, 8, 16)
    with pytest.raises(ValueError, match=r"\(batch, heads, seq, head_dim\)"):
        attention(x, x, x)


def test_available_backends_lists_every_name_with_reasons():
    reasons = available_backends("cpu", torch.float32, 128)
    assert tuple(reasons) == backend_names()
    for name in CPU_BACKENDS:
        assert reasons[name] is None
    assert reasons["flash_attn_2"] == "runs on cuda only, not cpu"
    assert "no FP8 kernel" in reasons["sageattn_3_fp8"]


def test_verify_backend_measures_kernel_error():
    assert verify_backend("sdpa_math", "cpu", torch.float32) <= 1e-6
    assert verify_backend("sdpa_chunked", "cpu", torch.float32, head_dim=512) <= 1e-6
    assert 1e-5 < verify_backend("sdpa_flash", "cpu", torch.bfloat16) <= 1e-2
    with pytest.raises(AttentionBackendUnavailableError, match="flash_attn_2: runs on cuda only"):
        verify_backend("flash_attn_2", "cpu", torch.float16)


def test_compiled_caller_follows_its_modules_backend():
    """Under torch.compile the resolution runs at trace time (no graph break, even on a cold cache), and a
    module whose ``attention_backend`` changes is recompiled (Dynamo guards on the attribute)."""
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append([str(node.target) for node in graph_module.graph.nodes if node.op == "call_function"])
        return graph_module.forward

    class Block(torch.nn.Module):
        attention_backend = "sdpa"

        def forward(self, x):
            q, k, v = (x * s for s in (1.0, 0.5, 2.0))
            return attention(q, k, v, backend=self.attention_backend) + 1

    prepare_for_compile()
    block = Block()
    compiled = torch.compile(block, backend=counting_backend, fullgraph=True)
    q, _, _ = qkv(1, 2, 20, 20, 32)
    expected = reference_attention(q, q * 0.5, q * 2.0) + 1
    assert rel(compiled(q), expected) <= 1e-5
    block.attention_backend = "sdpa_math"
    assert rel(compiled(q), expected) <= 1e-5
    assert len(graphs) == 2
    assert "sdpa_kernel" not in " ".join(graphs[0]) and "sdpa_kernel" in " ".join(graphs[1])


def test_library_kernels_run_outside_the_compiled_graph():
    calls = []

    def library_kernel(q, k, v):
        calls.append(torch.compiler.is_compiling())
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    register_backend(AttentionBackend("library", library_kernel, devices=("cpu",)))
    prepare_for_compile()
    q, k, v = qkv(1, 2, 12, 12, 16)
    out = torch.compile(lambda a, b, c: attention(a, b, c, backend="library") * 2, backend="eager")(q, k, v)
    assert calls == [False], "a non-traceable kernel must run eagerly, as a graph break"
    assert rel(out, 2 * reference_attention(q, k, v)) <= 1e-5


def test_a_backend_runs_only_for_the_calls_that_name_it():
    calls = []

    def recording_kernel(q, k, v):
        calls.append(q.shape)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    register_backend(AttentionBackend("recording", recording_kernel, devices=("cpu",)))
    q, k, v = qkv(1, 2, 8, 8, 16)
    out = attention(q, k, v, backend="recording")
    attention(q, k, v)
    assert len(calls) == 1, "only the call that named the backend may run it"
    assert rel(out, reference_attention(q, k, v)) <= 1e-5
    with pytest.raises(UnknownAttentionBackendError):
        attention(q, k, v, backend="no_such_backend")


def test_use_backend_sets_the_backend_of_every_attention_module_of_a_model():
    # A per-model choice: each attention module passes its own attention_backend; nothing process-wide changes.
    from src.models.dit import NaDiT, NaDiTConfig
    from conftest import golden_json

    config = NaDiTConfig.from_kwargs(golden_json("dit3b_config.json")["kwargs"])
    model, other = NaDiT(config), NaDiT(config)
    assert {block.attn.attention_backend for block in model.blocks} == {attention_dispatch.PLAIN}
    assert attention_dispatch.use_backend(model, "sdpa_math") == config.num_layers
    assert {block.attn.attention_backend for block in model.blocks} == {"sdpa_math"}
    assert {block.attn.attention_backend for block in other.blocks} == {attention_dispatch.PLAIN}
    with pytest.raises(UnknownAttentionBackendError):
        attention_dispatch.use_backend(model, "flash4")
    assert {block.attn.attention_backend for block in model.blocks} == {"sdpa_math"}


def test_the_seed_module_name_is_an_entry_point_to_the_same_dispatcher():
    from src.optimization import matrix_ops as seed_name

    for name in ("attention", "use_backend", "register_backend", "resolve_backend", "ATTENTION_MODES", "PLAIN", "AUTO"):
        assert getattr(seed_name, name) is getattr(attention_dispatch, name), name
