"""The compile manager: regional compilation equals eager, env switches, eager fallback, idempotence."""
from __future__ import annotations

import copy
import logging
import os
import sys

import pytest
import torch
from torch import nn

from src.optimization import torch_compile
from src.optimization.torch_compile import (
    COMPILE_BACKEND_ENV,
    COMPILE_CACHE_DIR_ENV,
    ENABLE_COMPILE_ENV,
    CompileSetupError,
    compile_modules,
    compile_repeated_blocks,
    configure_compile_cache,
    is_compiled,
    uncompile,
)
from src.pipeline.settings import CompileSettings

LOGGER = torch_compile.__name__
COUNTING = "seedvr2_test_counting"
FAILING = "seedvr2_test_failing"
graphs_compiled: list[torch.fx.GraphModule] = []


def _counting_backend(graph_module, example_inputs):
    graphs_compiled.append(graph_module)
    return graph_module.forward


def _failing_backend(graph_module, example_inputs):
    raise RuntimeError("backend exploded")


for _name, _fn in ((COUNTING, _counting_backend), (FAILING, _failing_backend)):
    if _name not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(_fn, name=_name)

COUNTING_SETTINGS = CompileSettings(backend=COUNTING)


@pytest.fixture(autouse=True)
def _isolated_compile_state(monkeypatch, tmp_path):
    """No compiled code, cache directory or env switch leaks between tests (or into the home dir)."""
    monkeypatch.setenv(COMPILE_CACHE_DIR_ENV, str(tmp_path / "compile_cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv(ENABLE_COMPILE_ENV, raising=False)
    monkeypatch.delenv(COMPILE_BACKEND_ENV, raising=False)
    monkeypatch.setattr(torch_compile, "_configured_cache_dir", None)
    torch._dynamo.reset()
    graphs_compiled.clear()
    yield
    torch._dynamo.reset()


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return x + scale * torch.nn.functional.gelu(self.proj(self.norm(x)))


class OtherBlock(Block):
    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return x - scale * torch.tanh(self.proj(x))


class Model(nn.Module):
    def __init__(self, dim: int = 16, depth: int = 4):
        super().__init__()
        self.embed = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x, scale=0.5)
        return self.head(x)


def tokens(count: int) -> torch.Tensor:
    """Packed (tokens, channels) input, the DiT's layout."""
    return torch.randn(count, 16, generator=torch.Generator().manual_seed(count))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_blocks_match_eager(backend):
    model = Model().eval()
    x = tokens(10)
    with torch.no_grad():
        expected = model(x)
        assert compile_repeated_blocks(model, CompileSettings(backend=backend)) == 4
        assert all(is_compiled(block) for block in model.blocks)
        torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("depth", [4, 8])
def test_blocks_of_one_class_share_one_compilation_and_new_resolutions_go_dynamic(depth):
    model = Model(depth=depth)
    compile_repeated_blocks(model, COUNTING_SETTINGS)
    with torch.no_grad():
        model(tokens(10))
        assert len(graphs_compiled) == 1, "all blocks of one class must share one compiled graph"
        model(tokens(13))
        assert len(graphs_compiled) == 2, "a second token count compiles one dynamic graph"
        model(tokens(29))
        assert len(graphs_compiled) == 2, "later token counts reuse the dynamic graph"


def test_each_block_class_gets_its_own_compilation():
    model = Model()
    model.blocks[1] = OtherBlock(16)
    compile_repeated_blocks(model, COUNTING_SETTINGS)
    with torch.no_grad():
        model(tokens(10))
    assert len(graphs_compiled) == 2


def test_backend_env_overrides_the_settings(monkeypatch):
    monkeypatch.setenv(COMPILE_BACKEND_ENV, COUNTING)
    model = Model()
    compile_repeated_blocks(model, CompileSettings(backend="inductor"))
    with torch.no_grad():
        model(tokens(10))
    assert len(graphs_compiled) == 1


def test_enable_env_zero_disables_everything(monkeypatch):
    monkeypatch.setenv(ENABLE_COMPILE_ENV, "0")
    model = Model()
    assert compile_repeated_blocks(model, COUNTING_SETTINGS) == 0
    assert compile_modules(model, ["head"], COUNTING_SETTINGS) == 0
    with torch.no_grad():
        model(tokens(10))
    assert graphs_compiled == []
    assert not any(is_compiled(module) for module in model.modules())


@pytest.mark.parametrize("backend", [FAILING, "no_such_backend"])
def test_failing_compile_falls_back_to_eager_with_one_log_line(backend, caplog):
    model = Model()
    x = tokens(10)
    with torch.no_grad():
        expected = model(x)
        compile_repeated_blocks(model, CompileSettings(backend=backend))
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            outputs = [model(x), model(x), model(tokens(12))]
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "running it eagerly from now on" in warnings[0].getMessage()
    torch.testing.assert_close(outputs[0], expected, rtol=0, atol=0)
    torch.testing.assert_close(outputs[1], expected, rtol=0, atol=0)


def test_applying_twice_does_not_wrap_twice_and_uncompile_restores():
    model = Model()
    compile_repeated_blocks(model, COUNTING_SETTINGS)
    first = [block.forward for block in model.blocks]
    assert compile_repeated_blocks(model, COUNTING_SETTINGS) == 4
    assert [block.forward for block in model.blocks] == first
    assert uncompile(model) == 4
    assert all("forward" not in block.__dict__ for block in model.blocks)
    assert uncompile(model) == 0
    with torch.no_grad():
        model(tokens(10))
    assert graphs_compiled == []


def test_new_settings_replace_the_previous_compilation():
    model = Model()
    compile_repeated_blocks(model, CompileSettings(backend=FAILING))
    compile_repeated_blocks(model, COUNTING_SETTINGS)
    with torch.no_grad():
        model(tokens(10))
    assert len(graphs_compiled) == 1
    assert uncompile(model) == 4


def test_compile_modules_by_dotted_name():
    model = Model()
    x = tokens(7)
    with torch.no_grad():
        expected = model(x)
        assert compile_modules(model, ["embed", "head.2"], COUNTING_SETTINGS) == 2
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert is_compiled(model.embed) and is_compiled(model.head[2])
    assert not is_compiled(model.head) and not is_compiled(model.head[0])
    assert len(graphs_compiled) >= 1


def test_missing_targets_are_clear_errors():
    model = Model()
    with pytest.raises(CompileSetupError, match="no nn.ModuleList named 'layers'"):
        compile_repeated_blocks(model, COUNTING_SETTINGS, block_lists=("layers",))
    with pytest.raises(CompileSetupError, match="cannot compile 'encoder.mid'"):
        compile_modules(model, ["encoder.mid"], COUNTING_SETTINGS)


@pytest.fixture
def fx_graph_cache_off():
    # torch's own config patching: pytest's monkeypatch undoes an attribute it did not find in the module's
    # __dict__ by deleting it, which hides a torch config entry for the rest of the process.
    import torch._inductor.config

    with torch._inductor.config.patch(fx_graph_cache=False):
        yield


def test_persistent_cache_directory_and_switches(tmp_path, monkeypatch, fx_graph_cache_off):
    import torch._inductor.config

    assert torch._inductor.config.fx_graph_cache is False
    chosen = tmp_path / "explicit"
    assert configure_compile_cache(chosen) == chosen
    assert chosen.is_dir()
    assert torch._inductor.config.fx_graph_cache is True
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(chosen)
    monkeypatch.delenv(COMPILE_CACHE_DIR_ENV)
    assert configure_compile_cache() == chosen, "without a new request the configured directory stays"


def test_an_existing_inductor_cache_dir_is_respected(tmp_path, monkeypatch):
    monkeypatch.delenv(COMPILE_CACHE_DIR_ENV)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "users_choice"))
    assert configure_compile_cache() == tmp_path / "users_choice"


def test_default_cache_dir_is_under_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path))
    directory = torch_compile.default_cache_dir()
    assert directory.parts[-2:] == ("seedvr2", "torch_compile")
    if sys.platform != "darwin":
        assert directory == tmp_path / "seedvr2" / "torch_compile"


def test_dynamo_limits_are_raised_never_lowered():
    config = torch._dynamo.config
    limit, accumulated = torch_compile.dynamo_limit_names()
    with config.patch({limit: 8, accumulated: 256}):
        compile_repeated_blocks(Model(), CompileSettings(backend=COUNTING, dynamo_cache_size_limit=64,
                                                         dynamo_recompile_limit=128))
        assert getattr(config, limit) == 128 and getattr(config, accumulated) == 256
        compile_repeated_blocks(Model(), CompileSettings(backend=COUNTING, dynamo_cache_size_limit=4,
                                                         dynamo_recompile_limit=300))
        assert getattr(config, limit) == 300 and getattr(config, accumulated) == 300


def test_dynamo_limits_use_the_current_names():
    # PyTorch 2.6 renamed them; the old names are deprecated aliases that may go.
    limit, accumulated = torch_compile.dynamo_limit_names()
    if torch.__version__ >= "2.6":  # a TorchVersion: compared as a version, not as text
        assert (limit, accumulated) == ("recompile_limit", "accumulated_recompile_limit")
    with torch._dynamo.config.patch({limit: 3, accumulated: 3}):
        torch_compile.raise_recompile_limit(5)
        assert getattr(torch._dynamo.config, limit) == 5 and getattr(torch._dynamo.config, accumulated) == 5


def test_a_deep_copy_of_a_compiled_model_runs_its_own_weights():
    model = Model()
    compile_repeated_blocks(model, COUNTING_SETTINGS)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in twin.blocks.parameters():
            parameter.mul_(0.5)
        eager_twin = copy.deepcopy(twin)
        uncompile(eager_twin)
        torch.testing.assert_close(twin(tokens(9)), eager_twin(tokens(9)), rtol=0, atol=0)
        assert not torch.equal(twin(tokens(9)), model(tokens(9)))
    assert all(is_compiled(block) for block in twin.blocks)
