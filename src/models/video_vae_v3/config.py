"""Architecture of the causal video VAE, under the released constructor argument names.

The released model (``s8_c16_t4_inflation_sd3.yaml``): 4 levels of widths 128/256/512/512, 2 resnets per
encoder level, 32 GroupNorm groups, 16 latent channels; space is compressed 8x (one halving per level
but the last) and time 4x (the last ``temporal_scale_num`` downsampling levels also halve time).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from .errors import VAEConfigError

RELEASED_NORM_NUM_GROUPS = 32

# Keys of the released constructor that must hold one fixed value here, because the value changes the
# architecture and only the released one is implemented.
_FIXED_KWARGS = {
    "act_fn": "silu",
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
# "pad", "tail", "replicate" and "none" only decide how 2-D weights would be inflated to 3-D when loading
# an image checkpoint; every SeedVR2 checkpoint already stores 3-D weights, so they all build the same model.
_INFLATION_MODES = ("pad", "tail", "replicate", "none")
_DOWN_BLOCK_TYPE = "DownEncoderBlock3D"
_UP_BLOCK_TYPE = "UpDecoderBlock3D"


@dataclass
class VAEConfig:
    """Sizes of the causal video VAE; field names are the released constructor's kwargs."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = RELEASED_NORM_NUM_GROUPS
    latent_channels: int = 16
    temporal_scale_num: int = 2
    in_channels: int = 3
    out_channels: int = 3
    # Frames per encode chunk after the first one (the released implementation's causal slicing split size).
    slicing_sample_min_size: int = 4

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        sizes = {
            "layers_per_block": self.layers_per_block, "norm_num_groups": self.norm_num_groups,
            "latent_channels": self.latent_channels, "in_channels": self.in_channels,
            "out_channels": self.out_channels, "slicing_sample_min_size": self.slicing_sample_min_size,
        }
        for name, value in sizes.items():
            if not isinstance(value, int) or value < 1:
                raise VAEConfigError(f"VAE config: {name} must be a positive integer, got {value!r}.")
        if not self.block_out_channels or min(self.block_out_channels) < 1:
            raise VAEConfigError(
                f"VAE config: block_out_channels must be a non-empty list of positive widths, "
                f"got {list(self.block_out_channels)}."
            )
        if not 0 <= self.temporal_scale_num <= self.num_levels - 1:
            raise VAEConfigError(
                f"VAE config: temporal_scale_num={self.temporal_scale_num} needs that many downsampling levels, "
                f"but {self.num_levels} levels have only {self.num_levels - 1}."
            )
        bad_widths = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad_widths:
            raise VAEConfigError(
                f"VAE config: norm_num_groups={self.norm_num_groups} must divide every width in "
                f"block_out_channels {list(self.block_out_channels)} (not {bad_widths})."
            )
        if self.slicing_sample_min_size % self.temporal_downsample_factor:
            raise VAEConfigError(
                f"VAE config: slicing_sample_min_size={self.slicing_sample_min_size} must be a multiple of the "
                f"temporal compression {self.temporal_downsample_factor} so that chunks map to whole latent frames."
            )

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def spatial_downsample_factor(self) -> int:
        return 2 ** (self.num_levels - 1)

    @property
    def temporal_downsample_factor(self) -> int:
        return 2**self.temporal_scale_num

    @classmethod
    def released(cls) -> "VAEConfig":
        """The released SeedVR2 VAE (250,648,227 parameters)."""
        return cls()

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> "VAEConfig":
        """Build from the released constructor kwargs (missing keys take released values); rejects
        values that would need an architecture we do not implement."""
        fields = {
            "block_out_channels", "layers_per_block", "norm_num_groups", "latent_channels",
            "temporal_scale_num", "in_channels", "out_channels", "slicing_sample_min_size",
        }
        checked = set(_FIXED_KWARGS) | {
            "down_block_types", "up_block_types", "inflation_mode", "spatial_downsample_factor",
            "temporal_downsample_factor", "freeze_encoder",
        }
        unknown = sorted(set(kwargs) - fields - checked)
        if unknown:
            raise VAEConfigError(
                f"VAE kwargs: unsupported argument(s) {unknown}; known: {sorted(fields | checked)}."
            )
        for key, required in _FIXED_KWARGS.items():
            if key in kwargs and kwargs[key] != required:
                raise VAEConfigError(
                    f"VAE kwargs: {key}={kwargs[key]!r} is not supported; the SeedVR2 VAE uses {required!r}."
                )
        if kwargs.get("inflation_mode", "pad") not in _INFLATION_MODES:
            raise VAEConfigError(
                f"VAE kwargs: inflation_mode={kwargs['inflation_mode']!r} is unknown; use one of {_INFLATION_MODES}."
            )
        config = cls(**{key: kwargs[key] for key in fields if key in kwargs})
        for key, block_type in (("down_block_types", _DOWN_BLOCK_TYPE), ("up_block_types", _UP_BLOCK_TYPE)):
            types = list(kwargs.get(key, [block_type] * config.num_levels))
            if types != [block_type] * config.num_levels:
                raise VAEConfigError(
                    f"VAE kwargs: {key} must be {config.num_levels} x {block_type!r} "
                    f"(one per block_out_channels entry), got {types}."
                )
        for key, derived in (
            ("spatial_downsample_factor", config.spatial_downsample_factor),
            ("temporal_downsample_factor", config.temporal_downsample_factor),
        ):
            if key in kwargs and kwargs[key] != derived:
                raise VAEConfigError(
                    f"VAE kwargs: {key}={kwargs[key]} contradicts the architecture, which gives {derived} "
                    f"({config.num_levels} levels, temporal_scale_num={config.temporal_scale_num})."
                )
        return config

    @classmethod
    def from_state_dict_shapes(
        cls, shapes: Mapping[str, Sequence[int]], norm_num_groups: int | None = None
    ) -> "VAEConfig":
        """Detect the architecture from state-dict key names and shapes (no tensor data needed).

        The GroupNorm group count is not stored in a state dict: ``None`` means the released 32, or half
        the narrowest width for models narrower than 64 channels (the convention of the golden tiny model).
        """
        foreign = [key for key in shapes if not key.startswith(("encoder.", "decoder."))]
        if foreign:
            hint = ""
            if any(key.startswith(("blocks.", "vid_in.", "txt_in.", "emb_in.")) for key in foreign):
                hint = " They look like a SeedVR2 DiT checkpoint; load that file with the DiT loader."
            raise VAEConfigError(
                f"not a SeedVR2 video VAE state dict: {len(foreign)} of {len(shapes)} keys lie outside "
                f"encoder.* / decoder.*, e.g. {', '.join(foreign[:3])}.{hint}"
            )

        def shape(key: str) -> tuple[int, ...]:
            if key not in shapes:
                raise VAEConfigError(
                    f"VAE state dict lacks {key!r}; the file is incomplete or not a SeedVR2 video VAE."
                )
            return tuple(int(s) for s in shapes[key])

        levels = _indices(shapes, r"encoder\.down_blocks\.(\d+)\.")
        if not levels or levels != list(range(len(levels))):
            raise VAEConfigError(
                f"VAE state dict: encoder.down_blocks levels must be numbered 0..N-1, found {levels}."
            )
        widths = tuple(shape(f"encoder.down_blocks.{j}.resnets.0.conv1.weight")[0] for j in levels)
        temporal_levels = [
            j for j in levels[:-1] if shape(f"encoder.down_blocks.{j}.downsamplers.0.conv.weight")[2] == 3
        ]
        if norm_num_groups is None:
            norm_num_groups = RELEASED_NORM_NUM_GROUPS if widths[0] >= 2 * RELEASED_NORM_NUM_GROUPS else widths[0] // 2
        return cls(
            block_out_channels=widths,
            layers_per_block=len(_indices(shapes, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")),
            norm_num_groups=norm_num_groups,
            latent_channels=shape("encoder.conv_out.weight")[0] // 2,
            temporal_scale_num=len(temporal_levels),
            in_channels=shape("encoder.conv_in.weight")[1],
            out_channels=shape("decoder.conv_out.weight")[0],
        )


def _indices(keys: Iterable[str], pattern: str) -> list[int]:
    """Sorted distinct integers captured by ``pattern`` at the start of the keys."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for key in keys if (m := regex.match(key))})
