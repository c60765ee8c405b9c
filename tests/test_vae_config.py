"""VAE configuration: released kwargs, architecture detection from state-dict shapes, full-size key
manifest (golden README §3, §10) and parameter counts."""
from __future__ import annotations

import pytest
import torch
from conftest import golden_json, golden_path

from src.models.video_vae_v3 import VAEConfig, VAEConfigError, VideoAutoencoder

RELEASED_WIDTHS = {"block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32}


def _tiny_kwargs() -> dict:
    return golden_json("vae_config.json")["kwargs"]


def _manifest(name: str) -> dict[str, tuple[int, ...]]:
    return {key: tuple(shape) for key, (shape, _dtype) in golden_json(f"manifests/{name}.json").items()}


def _tiny_weight_shapes() -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(golden_path("vae_weights.safetensors")), "pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}


def test_from_kwargs_tiny():
    config = VAEConfig.from_kwargs(_tiny_kwargs())
    assert config.block_out_channels == (8, 16, 32, 32)
    assert config.norm_num_groups == 4
    assert (config.layers_per_block, config.latent_channels, config.temporal_scale_num) == (2, 16, 2)
    assert (config.spatial_downsample_factor, config.temporal_downsample_factor) == (8, 4)


def test_released_equals_released_kwargs():
    assert VAEConfig.from_kwargs({**_tiny_kwargs(), **RELEASED_WIDTHS}) == VAEConfig.released()


def test_tiny_param_count():
    model = VideoAutoencoder(VAEConfig.from_kwargs(_tiny_kwargs()))
    assert sum(p.numel() for p in model.parameters()) == golden_json("vae_config.json")["param_count"] == 1_023_627


def test_released_meta_build_matches_manifest():
    with torch.device("meta"):
        model = VideoAutoencoder(VAEConfig.released())
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert shapes == _manifest("vae")
    assert sum(p.numel() for p in model.parameters()) == 250_648_227


def test_detects_tiny_weights():
    assert VAEConfig.from_state_dict_shapes(_tiny_weight_shapes()) == VAEConfig.from_kwargs(_tiny_kwargs())


def test_detects_released_manifest():
    assert VAEConfig.from_state_dict_shapes(_manifest("vae")) == VAEConfig.released()


def test_group_count_can_be_given():
    config = VAEConfig.from_state_dict_shapes(_manifest("vae"), norm_num_groups=16)
    assert config == VAEConfig(norm_num_groups=16)


@pytest.mark.parametrize("dit", ["dit3b", "dit7b"])
def test_dit_state_dict_is_rejected(dit):
    shapes = _manifest(dit)
    with pytest.raises(VAEConfigError) as error:
        VAEConfig.from_state_dict_shapes(shapes)
    message = str(error.value)
    assert "not a SeedVR2 video VAE" in message and "DiT" in message
    assert sum(key in message for key in shapes) >= 3  # names a few offending keys


def test_incomplete_vae_state_dict_is_rejected():
    shapes = _manifest("vae")
    del shapes["encoder.conv_out.weight"]
    with pytest.raises(VAEConfigError, match="encoder.conv_out.weight"):
        VAEConfig.from_state_dict_shapes(shapes)


def test_extra_foreign_key_is_named():
    shapes = {**_manifest("vae"), "quant_conv.weight": (32, 32, 1, 1, 1)}
    with pytest.raises(VAEConfigError, match="quant_conv.weight"):
        VAEConfig.from_state_dict_shapes(shapes)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ({"act_fn": "relu"}, "act_fn"),
        ({"use_quant_conv": True}, "use_quant_conv"),
        ({"use_post_quant_conv": True}, "use_post_quant_conv"),
        ({"inflation_mode": "bogus"}, "inflation_mode"),
        ({"down_block_types": ["DownEncoderBlock2D"] * 4}, "down_block_types"),
        ({"up_block_types": ["UpDecoderBlock3D"] * 3}, "up_block_types"),
        ({"spatial_downsample_factor": 16}, "spatial_downsample_factor"),
        ({"temporal_downsample_factor": 8}, "temporal_downsample_factor"),
        ({"norm_num_groups": 3}, "norm_num_groups"),
        ({"temporal_scale_num": 4}, "temporal_scale_num"),
        ({"slicing_sample_min_size": 6}, "slicing_sample_min_size"),
        ({"attention_heads": 8}, "attention_heads"),
    ],
)
def test_from_kwargs_rejects_unsupported_values(override, fragment):
    with pytest.raises(VAEConfigError, match=fragment):
        VAEConfig.from_kwargs({**_tiny_kwargs(), **override})
