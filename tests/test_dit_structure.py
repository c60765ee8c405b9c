"""NaDiT config detection, module tree vs. released key manifests, window partition and window plan."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import golden_json, golden_meta, golden_path, load_golden
from src.models.dit import NaDiT, NaDiTConfig, partition_windows
from src.models.dit.packing import PackedLayout
from src.models.dit.window_plan import window_plan

VARIANTS = ("3b", "7b")
# README §3: parameters of the released models (rope buffers excluded).
RELEASED_PARAMS = {"3b": 3_391_475_776, "7b": 8_239_607_872}


def _manifest_shapes(name: str) -> dict[str, tuple[int, ...]]:
    manifest = json.loads(golden_path(f"manifests/{name}.json").read_text())
    return {key: tuple(shape) for key, (shape, _dtype) in manifest.items()}


def _tiny_shapes(variant: str) -> dict[str, tuple[int, ...]]:
    return {key: tuple(t.shape) for key, t in load_golden(f"dit{variant}_weights.safetensors").items()}


def _without_rope(shapes: dict) -> dict:
    return {key: shape for key, shape in shapes.items() if not key.endswith("rope.rope.freqs")}


def _param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------- configs

def test_from_kwargs_reads_both_architecture_lines():
    tiny3b = NaDiTConfig.from_kwargs(golden_json("dit3b_config.json")["kwargs"])
    tiny7b = NaDiTConfig.from_kwargs(golden_json("dit7b_config.json")["kwargs"])
    assert (tiny3b.mlp_type, tiny3b.mlp_hidden_dim, tiny3b.mm_layers) == ("swiglu", 256, 2)
    assert (tiny3b.rope_type, tiny3b.rope_frequency_count, tiny3b.vid_out_norm) == ("mmrope3d", 5, True)
    assert tiny3b.last_layer_video_only and not tiny7b.last_layer_video_only
    assert (tiny7b.mlp_type, tiny7b.mlp_hidden_dim, tiny7b.mm_layers) == ("normal", 384, 4)
    assert (tiny7b.rope_type, tiny7b.rope_frequency_count, tiny7b.vid_out_norm) == ("rope3d", 4, False)
    assert tiny3b.window_method == ("720pwin_by_size_bysize", "720pswin_by_size_bysize") * 2


def test_released_configs():
    c3, c7 = NaDiTConfig.released("3b"), NaDiTConfig.released("7B")
    assert (c3.vid_dim, c3.heads, c3.head_dim, c3.num_layers, c3.mm_layers) == (2560, 20, 128, 32, 10)
    assert (c3.mlp_hidden_dim, c3.rope_frequency_count) == (6912, 21)     # 126 of 128 channels rotated
    assert (c7.vid_dim, c7.heads, c7.head_dim, c7.num_layers, c7.mm_layers) == (3072, 24, 128, 36, 36)
    assert (c7.mlp_hidden_dim, c7.rope_frequency_count) == (12288, 10)    # 60 of 128 channels rotated
    assert c3.window == ((4, 3, 3),) * 32 and c7.window_method[:2] == ("720pwin_by_size_bysize",
                                                                       "720pswin_by_size_bysize")
    with pytest.raises(ValueError, match="'3b' or '7b'"):
        NaDiTConfig.released("5b")


@pytest.mark.parametrize("variant", VARIANTS)
def test_detection_on_tiny_weights_matches_json_kwargs(variant):
    expected = NaDiTConfig.from_kwargs(golden_json(f"dit{variant}_config.json")["kwargs"])
    shapes = _tiny_shapes(variant)
    assert NaDiTConfig.from_state_dict_shapes(shapes) == expected
    assert NaDiTConfig.from_state_dict_shapes(_without_rope(shapes)) == expected


@pytest.mark.parametrize("variant", VARIANTS)
def test_detection_on_full_size_manifest_gives_released_config(variant):
    shapes = _manifest_shapes(f"dit{variant}")
    assert NaDiTConfig.from_state_dict_shapes(shapes) == NaDiTConfig.released(variant)
    assert NaDiTConfig.from_state_dict_shapes(_without_rope(shapes)) == NaDiTConfig.released(variant)


def test_detection_rejects_a_vae_state_dict():
    with pytest.raises(ValueError, match=r"not a SeedVR2 NaDiT.*encoder\.conv_in\.weight.*VAE"):
        NaDiTConfig.from_state_dict_shapes(_manifest_shapes("vae"))


def test_detection_rejects_prefixed_keys_with_a_hint():
    shapes = {f"model.{key}": shape for key, shape in _tiny_shapes("3b").items()}
    with pytest.raises(ValueError, match="model.*prefix"):
        NaDiTConfig.from_state_dict_shapes(shapes)


@pytest.mark.parametrize("change, message", [
    ({"shared_mlp": True}, "shared_mlp"),
    ({"qk_bias": True}, "qk_bias"),
    ({"window_method": "720pwin_unknown"}, "window_method"),
    ({"mlp_type": "moe"}, "mlp_type"),
    ({"emb_dim": 100}, "emb_dim"),
    ({"use_secret_feature": 1}, "use_secret_feature"),
])
def test_from_kwargs_rejects_unsupported_values(change, message):
    kwargs = {**golden_json("dit7b_config.json")["kwargs"], **change}
    with pytest.raises(ValueError, match=message):
        NaDiTConfig.from_kwargs(kwargs)


def test_from_kwargs_rejects_unknown_3b_rope():
    kwargs = {**golden_json("dit3b_config.json")["kwargs"], "rope_type": "rope3d"}
    with pytest.raises(ValueError, match="mmrope3d"):
        NaDiTConfig.from_kwargs(kwargs)


# -------------------------------------------------------------------------------------- module tree

@pytest.mark.parametrize("variant", VARIANTS)
def test_full_size_meta_model_has_exactly_the_manifest_keys(variant):
    shapes = _manifest_shapes(f"dit{variant}")
    with torch.device("meta"):
        model = NaDiT(NaDiTConfig.from_state_dict_shapes(shapes))
    state = model.state_dict()
    assert sorted(state) == sorted(shapes)
    assert {key: tuple(t.shape) for key, t in state.items()} == shapes
    assert _param_count(model) == RELEASED_PARAMS[variant]
    assert set(model.rope_frequency_buffers()) == {k for k in shapes if k.endswith("attn.rope.rope.freqs")}


@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_model_param_count_and_rope_constants(variant):
    config = golden_json(f"dit{variant}_config.json")
    with torch.device("meta"):
        model = NaDiT(NaDiTConfig.from_kwargs(config["kwargs"]))
    assert _param_count(model) == config["param_count"]
    weights = load_golden(f"dit{variant}_weights.safetensors")
    buffers = model.rope_frequency_buffers()
    assert set(buffers) == {key for key in weights if key.endswith("rope.rope.freqs")}
    for key, value in buffers.items():
        assert value.dtype == torch.float32 and value.device.type == "cpu"
        torch.testing.assert_close(value, weights[key], rtol=1e-7, atol=0)


def test_released_rope_constants():
    freqs3b = _meta_model("3b").rope_frequency_buffers()["blocks.0.attn.rope.rope.freqs"]
    freqs7b = _meta_model("7b").rope_frequency_buffers()["blocks.0.attn.rope.rope.freqs"]
    i = torch.arange(21, dtype=torch.float64)
    torch.testing.assert_close(freqs3b.double(), 10000 ** (-2 * i / 42), rtol=1e-6, atol=0)
    torch.testing.assert_close(freqs7b.double(), torch.pi * torch.linspace(1, 128, 10, dtype=torch.float64),
                               rtol=1e-6, atol=0)


def _meta_model(variant: str) -> NaDiT:
    with torch.device("meta"):
        return NaDiT(NaDiTConfig.released(variant))


def test_forward_rejects_malformed_inputs():
    model = NaDiT(NaDiTConfig.from_kwargs(golden_json("dit3b_config.json")["kwargs"]))
    vid, txt = torch.zeros(2 * 4 * 6, 33), torch.zeros(3, 5120)
    vid_shape, txt_shape, timestep = torch.tensor([[2, 4, 6]]), torch.tensor([[3]]), torch.tensor([500.0])
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.zeros(2 * 5 * 6, 33), txt, torch.tensor([[2, 5, 6]]), txt_shape, timestep)
    with pytest.raises(ValueError, match="vid must be"):
        model(vid[:-1], txt, vid_shape, txt_shape, timestep)
    with pytest.raises(ValueError, match="txt must be"):
        model(vid, txt[:, :100], vid_shape, txt_shape, timestep)
    with pytest.raises(ValueError, match="one value per sample"):
        model(vid, txt, vid_shape, txt_shape, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="txt_shape"):
        model(vid, txt, vid_shape, torch.tensor([3]), timestep)


# ------------------------------------------------------------------------------------------ windows

@pytest.mark.parametrize("case_name", ["single", "packed2", "image", "odd", "long33"])
def test_window_partition_matches_golden_metadata(case_name):
    config = NaDiTConfig.from_kwargs(golden_json("dit3b_config.json")["kwargs"])
    case = golden_meta("dit3b_cases.safetensors")["cases"][case_name]
    for (t, h, w), expected in zip(case["latent_sizes_THW"], case["windows_per_sample"], strict=True):
        grid = (t, h // 2, w // 2)
        for counts, method in zip(config.window, config.window_method):   # every layer
            windows = [[list(axis) for axis in window] for window in partition_windows(grid, counts, method)]
            assert windows == expected[method], (grid, method)


def test_window_plan_covers_every_token_once_and_groups_by_shape():
    # Two samples with the grids of golden cases "single" and "odd"; the first has 12 windows, the second 3.
    layout = PackedLayout(grids=((5, 22, 23), (3, 5, 7)), text_lengths=(7, 3))
    method = "720pwin_by_size_bysize"
    plan = window_plan(layout, (4, 3, 3), method, torch.device("cpu"))
    total_video = 5 * 22 * 23 + 3 * 5 * 7
    seen_video, seen_windows = [], set()
    for group in plan.groups:
        assert group.token_index.shape[1] == group.video_length + group.text_length
        for row in group.token_index.tolist():
            video, text = row[: group.video_length], row[group.video_length:]
            seen_video += video
            sample = 0 if video[0] < 5 * 22 * 23 else 1
            first_text = total_video + (0 if sample == 0 else 7)
            assert text == list(range(first_text, first_text + group.text_length))
            seen_windows.add((sample, tuple(video)))
    assert sorted(seen_video) == list(range(total_video))
    assert len(seen_windows) == 12 + 3
    assert len({(g.shape, g.text_length) for g in plan.groups}) == len(plan.groups)
    # The scatter rows of all groups cover every video token once.
    scattered = torch.cat([g.video_rows for g in plan.groups])
    assert torch.equal(scattered.sort().values, torch.arange(total_video))
    # Each video token knows its window-local offset and its window's extent.
    for group in plan.groups:
        extent = torch.tensor(group.shape).expand(group.video_rows.numel(), 3)
        assert torch.equal(plan.video_extent[group.video_rows], extent)
        assert (plan.video_offset[group.video_rows] < extent).all()
    torch.testing.assert_close(plan.text_weight, torch.tensor([1 / 12] * 7 + [1 / 3] * 3))
