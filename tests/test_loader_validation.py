"""Odd and damaged weight files are refused when they are loaded (the loader nodes' checks), with the file
and the problem named, never later at the run (issue #14, finding 7, the loader half)."""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import save_file

from conftest import golden_path, import_pack, load_golden
from src.models import download
from src.models.checkpoint import CheckpointError, read_index
from src.models.download import ModelFileError, ensure_model
from src.models.load import load_dit, load_vae, validate_dit
from src.models.registry import ModelInfo

gguf = pytest.importorskip("gguf")


def _raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


F32x4 = {"dtype": "F32", "shape": [4]}


@pytest.mark.parametrize("header, size, message", [
    ({"a": {**F32x4, "data_offsets": [0, 16]}, "b": {**F32x4, "data_offsets": [8, 24]}}, 24, "share bytes"),
    ({"a": {**F32x4, "data_offsets": [0, 8]}}, 16, "needs 16 bytes but its byte range holds 8"),
    ({"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, 16, "invalid shape"),
    ({"a": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 10]}}, 16, "invalid shape"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, True]}}, 16, "invalid byte range"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [-16, 0]}}, 16, "invalid byte range"),
])
def test_inconsistent_safetensors_headers_are_refused_by_name(tmp_path, header, size, message):
    path = _raw_safetensors(tmp_path / "odd.safetensors", header, bytes(size))
    with pytest.raises(CheckpointError, match=message) as error:
        read_index(path)
    assert "odd.safetensors" in str(error.value)


def test_integer_weights_are_refused_at_load_not_with_a_torch_message(tmp_path):
    state = load_golden("dit3b_weights.safetensors")
    state["blocks.1.mlp.vid.proj_in.weight"] = state["blocks.1.mlp.vid.proj_in.weight"].to(torch.int32)
    path = tmp_path / "int.safetensors"
    save_file(state, str(path))
    for check in (validate_dit, load_dit):
        with pytest.raises(CheckpointError, match=r"int\.safetensors: 1 tensors hold integer.*"
                                                  r"blocks\.1\.mlp\.vid\.proj_in\.weight \(torch\.int32\)"):
            check(path)


def _write_gguf(path: Path) -> bytes:
    writer = gguf.GGUFWriter(str(path), "seedvr2")
    state = load_golden("dit3b_weights.safetensors")
    for key, tensor in state.items():
        array = tensor.numpy()
        if array.ndim == 2 and array.shape[1] % 32 == 0:
            writer.add_tensor("model.diffusion_model." + key, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor("model.diffusion_model." + key, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory):
    return _write_gguf(tmp_path_factory.mktemp("gguf") / "dit.gguf")


def _last_tensor_end(path: Path) -> int:
    reader = gguf.GGUFReader(path)
    return max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)


@pytest.mark.parametrize("cut", ["inside_last_tensor", "half"])
def test_truncated_gguf_is_refused_at_load(tmp_path, gguf_bytes, cut):
    whole = tmp_path / "whole.gguf"
    whole.write_bytes(gguf_bytes)
    keep = _last_tensor_end(whole) - 100 if cut == "inside_last_tensor" else len(gguf_bytes) // 2
    path = tmp_path / "seedvr2_cut.gguf"
    path.write_bytes(gguf_bytes[:keep])
    with pytest.raises(CheckpointError, match=r"seedvr2_cut\.gguf.*(truncated|damaged)"):
        validate_dit(path)


def test_corrupt_gguf_header_is_refused_at_load(tmp_path, gguf_bytes):
    data = bytearray(gguf_bytes)
    data[8:16] = struct.pack("<Q", 2 ** 40)          # tensor count: far more than the file holds
    path = tmp_path / "count.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"count\.gguf is not a readable GGUF file"):
        validate_dit(path)


def test_intact_gguf_validates(tmp_path, gguf_bytes):
    path = tmp_path / "ok.gguf"
    path.write_bytes(gguf_bytes)
    assert validate_dit(path).kind == "dit"


def test_truncated_released_gguf_is_downloaded_again(tmp_path, monkeypatch, gguf_bytes):
    name = "seedvr2_tiny-Q8_0.gguf"
    info = ModelInfo(name, "example/SeedVR2-test", hashlib.sha256(gguf_bytes).hexdigest(), "dit", "3b", "Q8_0")
    monkeypatch.setattr(download, "known_model", lambda n: info if n == name else None)
    calls = []

    def fake_download(repo_id, filename, *, local_dir, **kwargs):
        calls.append(filename)
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(gguf_bytes)
        return str(target)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    if hasattr(download, "offline_reason"):  # the fake hub is always reachable
        monkeypatch.setattr(download, "offline_reason", lambda info: None)
    (tmp_path / name).write_bytes(gguf_bytes[: len(gguf_bytes) - 300])
    assert ensure_model(name, [tmp_path]).read_bytes() == gguf_bytes
    assert calls == [name]
    assert ensure_model(name, [tmp_path]) == tmp_path / name and calls == [name]   # intact now: no download


def test_legacy_pickle_loads_without_memory_mapping(tmp_path):
    path = tmp_path / "ema_vae.pth"
    torch.save(load_golden("vae_weights.safetensors"), path, _use_new_zipfile_serialization=False)
    reference = load_vae(golden_path("vae_weights.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(),
                                                  load_vae(path).state_dict().values()))


def test_legacy_pickle_with_objects_is_still_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "fn": os.system}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="only plain tensors"):
        read_index(path)


def test_folder_with_a_released_name_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "ema_vae_fp16.safetensors").mkdir()
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda *a, **k: pytest.fail("a folder in the way must not start a download"))
    with pytest.raises(ModelFileError, match=r"ema_vae_fp16\.safetensors is a folder, not the weight file"):
        ensure_model("ema_vae_fp16.safetensors", [tmp_path])
    with pytest.raises(CheckpointError, match="is a folder, not a weight file"):
        read_index(tmp_path / "ema_vae_fp16.safetensors")


def test_loader_node_refuses_a_damaged_file_when_it_loads(tmp_path, monkeypatch, gguf_bytes):
    pack = import_pack()
    loader = pack.nodes.dit_model_loader
    path = tmp_path / "seedvr2_cut.gguf"
    path.write_bytes(gguf_bytes[: len(gguf_bytes) - 300])
    monkeypatch.setattr(loader, "fetch_model", lambda name: path)
    # The stand-in lookup above places the file; the name check (its own tests) would look in the real folders.
    monkeypatch.setattr(loader, "require_model", lambda name, kind: None)
    with pytest.raises(ValueError, match=r"seedvr2_cut\.gguf.*(truncated|damaged)"):   # the pack's CheckpointError
        loader.SeedVR2LoadDiTModel().load(model=path.name, device="cpu")
