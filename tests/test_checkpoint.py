"""Loading weight files: strict keys and shapes, dtypes, architecture detection, and every bad input."""
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import golden_cases, golden_path, load_golden, rel_err
from src.models.checkpoint import CheckpointError, read_index
from src.models.load import inspect_dit, inspect_vae, load_dit, load_vae
from src.optimization import quantized_load

DIT_CASE = "image"  # the smallest golden DiT case


def _dit_output(model, name="dit3b_cases.safetensors"):
    case = golden_cases(name)[DIT_CASE]
    return model(case["vid"], case["txt"], case["vid_shape"], case["txt_shape"], case["timestep"]), case["out"]


def _write_fake_full_size(path, manifest_name):
    """A sparse safetensors file with the full-size manifest's header (no real data, no disk use)."""
    manifest = json.loads(golden_path(f"manifests/{manifest_name}.json").read_text())
    header, offset = {}, 0
    for key, (shape, _dtype) in manifest.items():
        size = 2 * int(torch.tensor(shape).prod().item()) if shape else 2
        header[key] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)
    return manifest


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_load_strictly(tmp_path, dtype):
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_golden("dit3b_weights.safetensors").items()}
    path = tmp_path / "seedvr2_ema_3b_fp16.safetensors"
    save_file(state, str(path))
    out, ref = _dit_output(load_dit(path))
    assert rel_err(out, ref) < 1e-2  # only the weight rounding differs


def test_rope_buffers_are_recomputed_or_filled(tmp_path):
    state = load_golden("dit3b_weights.safetensors")
    rope_keys = [k for k in state if k.endswith("rope.rope.freqs")]
    assert rope_keys
    without = {k: v for k, v in state.items() if k not in rope_keys}
    save_file(without, str(tmp_path / "no_rope.safetensors"))
    garbage = {k: (torch.zeros_like(v) if k in rope_keys else v) for k, v in state.items()}
    save_file(garbage, str(tmp_path / "bad_rope.safetensors"))
    for name in ("no_rope.safetensors", "bad_rope.safetensors"):
        out, ref = _dit_output(load_dit(tmp_path / name))
        assert rel_err(out, ref) <= 1e-5


def test_pth_with_plain_tensors_loads(tmp_path):
    path = tmp_path / "vae.pth"
    torch.save(load_golden("vae_weights.safetensors"), path)
    model = load_vae(path)
    reference = load_vae(golden_path("vae_weights.safetensors"))
    for (k, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), k


def test_pickle_with_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weights": load_golden("vae_weights.safetensors"), "config": {1, 2}, "fn": print}, path)
    with pytest.raises(CheckpointError, match="only plain tensors"):
        load_vae(path)


def test_pickle_that_is_not_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="dict of named tensors"):
        read_index(path)


def test_truncated_safetensors(tmp_path):
    data = golden_path("vae_weights.safetensors").read_bytes()
    path = tmp_path / "ema_vae_fp16.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_vae(path)


@pytest.mark.parametrize("payload", [b"", b"\x01\x02", b"not a safetensors file at all, just text" * 10])
def test_corrupt_safetensors(tmp_path, payload):
    path = tmp_path / "seedvr2_ema_3b_fp16.safetensors"
    path.write_bytes(payload)
    with pytest.raises(CheckpointError, match="empty|corrupt"):
        load_dit(path)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"x" * 100)
    with pytest.raises(CheckpointError, match="unsupported weight file type"):
        load_dit(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_dit(tmp_path / "nope.safetensors")


def test_vae_given_as_dit_and_dit_given_as_vae():
    with pytest.raises(CheckpointError, match="selected as a SeedVR2 DiT.*holds the SeedVR2 VAE"):
        load_dit(golden_path("vae_weights.safetensors"))
    with pytest.raises(CheckpointError, match="selected as the SeedVR2 VAE.*holds a SeedVR2 DiT"):
        load_vae(golden_path("dit3b_weights.safetensors"))


def test_unrelated_file_is_named_clearly(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"conv.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(CheckpointError, match="no SeedVR2 model we know.*conv.weight"):
        load_dit(path)


def test_wrong_shape_is_reported_by_key(tmp_path):
    state = load_golden("vae_weights.safetensors")
    key = "decoder.up_blocks.1.resnets.0.conv1.bias"
    state[key] = torch.zeros(state[key].shape[0] + 3)
    path = tmp_path / "vae.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=rf"wrong shape: {key}"):
        load_vae(path)


def test_missing_and_unexpected_keys_are_reported(tmp_path):
    state = load_golden("dit7b_weights.safetensors")
    dropped = "blocks.2.mlp.vid.proj_out.bias"
    del state[dropped]
    state["blocks.2.mlp.vid.extra.weight"] = torch.zeros(3)
    path = tmp_path / "dit.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as info:
        load_dit(path)
    assert dropped in str(info.value) and "blocks.2.mlp.vid.extra.weight" in str(info.value)


def test_window_metadata_is_honoured(tmp_path):
    state = load_golden("dit3b_weights.safetensors")
    path = tmp_path / "dit.safetensors"
    windows = [[1, 1, 1]] * 4
    save_file(state, str(path), metadata={"seedvr2.config": json.dumps({"window": windows})})
    _, config = inspect_dit(path)
    assert config.window == ((1, 1, 1),) * 4


@pytest.mark.parametrize("manifest,variant", [("dit3b", "3b"), ("dit7b", "7b")])
def test_full_size_dit_manifests_detect_and_match_strictly(tmp_path, manifest, variant):
    from src.models.dit import NaDiT, NaDiTConfig

    path = tmp_path / f"{manifest}.safetensors"
    expected = _write_fake_full_size(path, manifest)
    index, config = inspect_dit(path)
    assert config == NaDiTConfig.released(variant)
    with torch.device("meta"):
        model = NaDiT(config)
    state = model.state_dict()
    assert {k: list(v.shape) for k, v in state.items()} == {k: v[0] for k, v in expected.items()}
    assert sum(p.numel() for p in model.parameters()) == {"3b": 3_391_475_776, "7b": 8_239_607_872}[variant]


def test_full_size_vae_manifest_detects_and_matches_strictly(tmp_path):
    from src.models.video_vae_v3 import VAEConfig, VideoAutoencoder

    path = tmp_path / "ema_vae_fp16.safetensors"
    expected = _write_fake_full_size(path, "vae")
    _, config = inspect_vae(path)
    assert config == VAEConfig.released()
    with torch.device("meta"):
        model = VideoAutoencoder(config)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == {k: v[0] for k, v in expected.items()}


def test_mixed_precision_file_loads(tmp_path):
    """Files mixing dtypes (like the released fp8 'mixed_block35_fp16' ones) load tensor by tensor."""
    state = load_golden("dit7b_weights.safetensors")
    mixed = {k: (v.half() if k.startswith("blocks.3.") else v.bfloat16()) for k, v in state.items()}
    path = tmp_path / "mixed.safetensors"
    save_file(mixed, str(path))
    dtypes = {v.dtype for v in read_index(path).tensors.values()}
    assert dtypes == {torch.float16, torch.bfloat16}
    out, ref = _dit_output(load_dit(path), "dit7b_cases.safetensors")
    assert rel_err(out, ref) < 1e-2


def test_loading_assigns_without_extra_copies(tmp_path):
    """Every parameter is a fresh tensor of the requested dtype; nothing is left on the meta device."""
    model = load_dit(golden_path("dit3b_weights.safetensors"), dtype=torch.bfloat16)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        assert tensor.device.type == "cpu", name
        assert tensor.dtype in (torch.bfloat16, torch.float32), name
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    reference = load_file(str(golden_path("dit3b_weights.safetensors")))
    assert torch.equal(model.state_dict()["txt_in.weight"], reference["txt_in.weight"].bfloat16())


def test_fp8_file_keeps_fp8_storage_and_matches(tmp_path):
    """A released-style fp8 file (plain casts) loads without an upcast copy; outputs follow the fp8 weights."""
    state = load_golden("dit3b_weights.safetensors")
    fp8 = {k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 and k.startswith("blocks.") else v) for k, v in state.items()}
    path = tmp_path / "seedvr2_ema_3b_fp8_e4m3fn.safetensors"
    save_file(fp8, str(path))
    model = quantized_load.load_dit(path)   # the loader with the layers that keep fp8 storage
    stored = {p.dtype for n, p in model.named_parameters() if n.startswith("blocks.") and n.endswith("proj_qkv.vid.weight")}
    assert stored == {torch.float8_e4m3fn}
    upcast = {k: v.float() for k, v in fp8.items()}
    reference_path = tmp_path / "upcast.safetensors"
    save_file(upcast, str(reference_path))
    out, _ = _dit_output(model)
    ref, _ = _dit_output(load_dit(reference_path))
    assert rel_err(out, ref) <= 1e-5


def test_the_plain_loader_upcasts_fp8_and_refuses_packed_files(tmp_path):
    # Without a prepare_layers hook the model keeps its nn.Linear layers: fp8 weights become the load dtype,
    # and a file whose layers only exist packed is refused by name instead of loading wrongly.
    state = load_golden("dit3b_weights.safetensors")
    fp8 = {k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 and k.startswith("blocks.") else v) for k, v in state.items()}
    path = tmp_path / "fp8.safetensors"
    save_file(fp8, str(path))
    model = load_dit(path)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    out, _ = _dit_output(model)
    ref, _ = _dit_output(quantized_load.load_dit(path))
    assert rel_err(out, ref) <= 1e-5
    gguf = pytest.importorskip("gguf")
    packed = tmp_path / "packed.gguf"
    writer = gguf.GGUFWriter(str(packed), "seedvr2")
    for key, value in state.items():
        writer.add_tensor(key, value.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="packed.gguf is a GGUF file: load it with layers"):
        load_dit(packed)


def test_gguf_file_loads_through_the_loader(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    state = load_golden("dit3b_weights.safetensors")
    path = tmp_path / "seedvr2_ema_3b-Q8_0.gguf"
    writer = gguf.GGUFWriter(str(path), "seedvr2")
    for key, value in state.items():
        array = value.numpy()
        if value.ndim == 2 and key.startswith("blocks.") and value.shape[1] % 32 == 0:
            packed = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(key, packed, raw_shape=packed.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(key, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model = quantized_load.load_dit(path, quantization="gguf")
    out, ref = _dit_output(model)
    assert rel_err(out, ref) < 3e-2  # Q8_0 rounding only
