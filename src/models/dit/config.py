"""Hyper-parameters of the SeedVR2 NaDiT, under the names of the released constructor arguments.

Two architecture lines exist in the original project: the 3B (``models/dit_v2``: SwiGLU MLP, blocks that
share one weight set for both streams after ``mm_layers``, a rope on video *and* text, a video-only last
block, an output norm) and the 7B (``models/dit``: GELU MLP, separate stream weights everywhere, a rope
with "pixel" frequencies on video only).  :class:`NaDiTConfig` describes both; it is built from the
released constructor arguments, from the released names ("3b"/"7b"), or from a checkpoint's tensor shapes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

WIN = "720pwin_by_size_bysize"
SWIN = "720pswin_by_size_bysize"
WINDOW_METHODS = (WIN, SWIN)
RELEASED_WINDOW = (4, 3, 3)
ROPE_TYPES = ("mmrope3d", "rope3d")
MLP_TYPES = ("swiglu", "normal")
PATCH_SIZE = (1, 2, 2)
RELEASED_NORM_EPS = 1e-5


def _released_windows(num_layers: int) -> dict[str, list]:
    return {
        "window": [list(RELEASED_WINDOW)] * num_layers,
        "window_method": [WIN if i % 2 == 0 else SWIN for i in range(num_layers)],
    }


# The released constructor arguments (configs_3b/main.yaml and configs_7b/main.yaml, expressions evaluated).
_RELEASED_KWARGS: dict[str, dict[str, Any]] = {
    "3b": {
        "vid_in_channels": 33, "vid_out_channels": 16, "vid_dim": 2560, "vid_out_norm": "fusedrms",
        "txt_in_dim": 5120, "txt_in_norm": "fusedln", "txt_dim": 2560, "emb_dim": 6 * 2560,
        "heads": 20, "head_dim": 128, "expand_ratio": 4, "norm": "fusedrms", "norm_eps": 1e-5,
        "ada": "single", "qk_bias": False, "qk_norm": "fusedrms", "patch_size": [1, 2, 2],
        "num_layers": 32, "mm_layers": 10, "mlp_type": "swiglu", "msa_type": "None",
        "block_type": ["mmdit_sr"] * 32, **_released_windows(32),
        "rope_type": "mmrope3d", "rope_dim": 128,
    },
    "7b": {
        "vid_in_channels": 33, "vid_out_channels": 16, "vid_dim": 3072, "txt_in_dim": 5120,
        "txt_dim": 3072, "emb_dim": 6 * 3072, "heads": 24, "head_dim": 128, "expand_ratio": 4,
        "norm": "fusedrms", "norm_eps": 1e-5, "ada": "single", "qk_bias": False, "qk_rope": True,
        "qk_norm": "fusedrms", "patch_size": [1, 2, 2], "num_layers": 36, "shared_mlp": False,
        "shared_qkv": False, "mlp_type": "normal", "block_type": ["mmdit_sr"] * 36, **_released_windows(36),
    },
}

# Constructor arguments that must hold one of these values (anything else is a feature we do not implement).
_FIXED_KWARGS: dict[str, tuple] = {
    "norm": ("fusedrms", "rms"),
    "qk_norm": ("fusedrms", "rms"),
    "ada": ("single",),
    "qk_bias": (False,),
    "patch_type": ("v1",),
    "txt_proj_type": ("linear",),
    "mca_type": (None,),
    "temporal_window_size": (None,),
    "temporal_shifted": (False,),
}
# Arguments that exist in the original but have no effect on this architecture.
_INERT_KWARGS = ("txt_in_norm", "txt_in_norm_scale_factor")
_COMMON_KWARGS = (
    "vid_in_channels", "vid_out_channels", "vid_dim", "txt_in_dim", "txt_dim", "emb_dim", "heads",
    "head_dim", "expand_ratio", "norm_eps", "patch_size", "num_layers", "block_type", "mlp_type",
    "window", "window_method", "msa_type",
)
_KWARGS_3B = ("mm_layers", "rope_type", "rope_dim", "vid_out_norm")
_KWARGS_7B = ("qk_rope", "shared_qkv", "shared_mlp")

_NADIT_KEY_PREFIXES = ("vid_in.", "txt_in.", "emb_in.", "blocks.", "vid_out_norm.", "vid_out_ada.", "vid_out.")
_REQUIRED_KEYS = ("vid_in.proj.weight", "txt_in.weight", "emb_in.proj_out.weight", "vid_out.proj.weight")


def swiglu_hidden_dim(dim: int, expand_ratio: int, multiple_of: int = 256) -> int:
    """Hidden width of the 3B SwiGLU MLP: ⌊2·dim·ratio/3⌋ rounded up to a multiple of 256."""
    hidden = int(2 * dim * expand_ratio / 3)
    return multiple_of * -(-hidden // multiple_of)


@dataclass(frozen=True)
class NaDiTConfig:
    """Complete description of one NaDiT; validated on construction."""

    vid_in_channels: int
    vid_out_channels: int
    vid_dim: int
    txt_in_dim: int
    txt_dim: int
    emb_dim: int
    heads: int
    head_dim: int
    expand_ratio: int
    norm_eps: float
    num_layers: int
    mm_layers: int                      # blocks [0, mm_layers) keep separate vid/txt weights, later ones share "all"
    mlp_type: str                       # "swiglu" (3B) | "normal" (7B, GELU-tanh)
    window: tuple[tuple[int, int, int], ...]   # per block: window counts (n_t, n_h, n_w)
    window_method: tuple[str, ...]      # per block: WIN or SWIN
    rope_type: str                      # "mmrope3d" (3B: video + text, lang freqs) | "rope3d" (7B: video, pixel freqs)
    rope_dim: int                       # channels the rope module is built for; each axis gets rope_dim // 3
    vid_out_norm: bool                  # 3B: RMSNorm + modulation before the output projection
    last_layer_video_only: bool         # 3B: the last block updates only the video stream
    patch_size: tuple[int, int, int] = PATCH_SIZE

    def __post_init__(self) -> None:
        problems = []
        if self.emb_dim != 6 * self.vid_dim:
            problems.append(f"emb_dim must be 6·vid_dim = {6 * self.vid_dim} (got {self.emb_dim})")
        if self.txt_dim != self.vid_dim:
            problems.append(f"txt_dim must equal vid_dim = {self.vid_dim} (got {self.txt_dim})")
        if self.txt_in_dim == self.txt_dim:
            problems.append("txt_in_dim equal to txt_dim (no text projection) is not supported")
        if tuple(self.patch_size) != PATCH_SIZE:
            problems.append(f"patch_size must be {list(PATCH_SIZE)} (got {list(self.patch_size)})")
        if not 0 <= self.mm_layers <= self.num_layers:
            problems.append(f"mm_layers must be within [0, num_layers={self.num_layers}] (got {self.mm_layers})")
        if self.mlp_type not in MLP_TYPES:
            problems.append(f"mlp_type must be one of {MLP_TYPES} (got {self.mlp_type!r})")
        if self.rope_type not in ROPE_TYPES:
            problems.append(f"rope_type must be one of {ROPE_TYPES} (got {self.rope_type!r})")
        if len(self.window) != self.num_layers or len(self.window_method) != self.num_layers:
            problems.append(f"window and window_method need one entry per layer ({self.num_layers})")
        if any(len(w) != 3 or min(w) < 1 for w in self.window):
            problems.append(f"every window must be three positive counts (got {self.window})")
        unknown = sorted(set(self.window_method) - set(WINDOW_METHODS))
        if unknown:
            problems.append(f"unsupported window_method {unknown}; supported: {WINDOW_METHODS}")
        if self.rope_frequency_count < 1 or 6 * self.rope_frequency_count > self.head_dim:
            problems.append(f"rope_dim {self.rope_dim} gives no valid rotary layout for head_dim {self.head_dim}")
        if min(self.vid_dim, self.heads, self.head_dim, self.num_layers, self.expand_ratio) < 1:
            problems.append("vid_dim, heads, head_dim, num_layers and expand_ratio must be positive")
        if problems:
            raise ValueError("invalid NaDiT config: " + "; ".join(problems))

    # ----------------------------------------------------------------------------------------- derived

    @property
    def inner_dim(self) -> int:
        """Width of the concatenated attention heads."""
        return self.heads * self.head_dim

    @property
    def mlp_hidden_dim(self) -> int:
        """Hidden width of each block's MLP."""
        if self.mlp_type == "swiglu":
            return swiglu_hidden_dim(self.vid_dim, self.expand_ratio)
        return self.vid_dim * self.expand_ratio

    @property
    def rope_axis_dim(self) -> int:
        """Channels given to each of the temporal, height and width rope groups (before pairing)."""
        return self.rope_dim // 3

    @property
    def rope_frequency_count(self) -> int:
        """Rotary frequencies per axis; each rotates one consecutive channel pair."""
        return self.rope_axis_dim // 2

    def has_separate_weights(self, layer: int) -> bool:
        """Whether block ``layer`` keeps separate ``vid``/``txt`` weights (else one ``all`` set)."""
        return layer < self.mm_layers

    def is_video_only(self, layer: int) -> bool:
        """Whether block ``layer`` updates only the video stream (the 3B's last block)."""
        return self.last_layer_video_only and layer == self.num_layers - 1

    # ------------------------------------------------------------------------------------ constructors

    @classmethod
    def released(cls, variant: str) -> "NaDiTConfig":
        """The released full-size config: ``variant`` is "3b" or "7b"."""
        key = str(variant).lower()
        if key not in _RELEASED_KWARGS:
            raise ValueError(f"unknown SeedVR2 DiT variant {variant!r}; use '3b' or '7b'")
        return cls.from_kwargs(_RELEASED_KWARGS[key])

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> "NaDiTConfig":
        """Build from the original ``NaDiT.__init__`` arguments (the ``kwargs`` of the golden config json).

        A dict with ``mm_layers`` is the 3B line (``models/dit_v2``), otherwise the 7B line (``models/dit``).
        """
        kwargs = dict(kwargs)
        is_3b_line = "mm_layers" in kwargs
        allowed = set(_COMMON_KWARGS) | set(_FIXED_KWARGS) | set(_INERT_KWARGS)
        allowed |= set(_KWARGS_3B if is_3b_line else _KWARGS_7B)
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            line = "3B (models/dit_v2)" if is_3b_line else "7B (models/dit)"
            raise ValueError(f"unsupported NaDiT argument(s) {unknown} for the {line} architecture")
        missing = sorted(k for k in ("vid_dim", "heads", "head_dim", "num_layers", "emb_dim", "txt_in_dim",
                                     "expand_ratio", "norm_eps") if k not in kwargs)
        if missing:
            raise ValueError(f"NaDiT arguments are missing required field(s) {missing}")
        for key, values in _FIXED_KWARGS.items():
            if key in kwargs and kwargs[key] not in values:
                raise ValueError(f"NaDiT argument {key}={kwargs[key]!r} is not supported; expected one of {values}")

        num_layers = int(kwargs["num_layers"])
        for key, value in (("block_type", "mmdit_sr"), ("msa_type", None)):
            per_layer = _per_layer(kwargs.get(key, value), num_layers, key)
            if any(v not in (value, str(value)) for v in per_layer):
                raise ValueError(f"NaDiT argument {key}={kwargs[key]!r} is not supported; every layer must be {value!r}")
        if not isinstance(kwargs["txt_in_dim"], int):
            raise ValueError("a list of text input widths (several text encoders) is not supported; "
                             "txt_in_dim must be one integer")
        if "window" not in kwargs or "window_method" not in kwargs:
            raise ValueError("NaDiT arguments need 'window' and 'window_method' (per layer or one for all)")
        window = kwargs["window"]
        window = [window] * num_layers if isinstance(window[0], int) else list(window)
        window_method = _per_layer(kwargs["window_method"], num_layers, "window_method")

        if is_3b_line:
            mm_layers = kwargs["mm_layers"]
            if not isinstance(mm_layers, int):
                raise ValueError("mm_layers must be one integer (per-layer sharing flags are not supported)")
            rope_type = kwargs.get("rope_type", "rope3d")
            if rope_type != "mmrope3d":
                raise ValueError(f"rope_type {rope_type!r} is not supported by the 3B architecture; use 'mmrope3d'")
            vid_out_norm = kwargs.get("vid_out_norm")
            if vid_out_norm not in (None, "fusedrms", "rms"):
                raise ValueError(f"vid_out_norm={vid_out_norm!r} is not supported; use 'fusedrms' or None")
            extra = dict(
                mm_layers=mm_layers,
                rope_type="mmrope3d",
                # The original's default when rope_dim is not given.
                rope_dim=int(kwargs.get("rope_dim") or kwargs["head_dim"] // 2),
                vid_out_norm=vid_out_norm is not None,
                last_layer_video_only=True,
            )
        else:
            for key, value in (("qk_rope", True), ("shared_qkv", False), ("shared_mlp", False)):
                if kwargs.get(key, value) != value:
                    raise ValueError(f"NaDiT argument {key}={kwargs[key]!r} is not supported (the 7B uses {value})")
            if "qk_rope" not in kwargs:
                raise ValueError("7B-style NaDiT arguments need qk_rope=True (no-rope models are not supported)")
            extra = dict(
                mm_layers=num_layers,
                rope_type="rope3d",
                rope_dim=int(kwargs["head_dim"]) // 2,  # the 7B builds its rope for half a head
                vid_out_norm=False,
                last_layer_video_only=False,
            )
        return cls(
            vid_in_channels=int(kwargs.get("vid_in_channels", 33)),
            vid_out_channels=int(kwargs.get("vid_out_channels", 16)),
            vid_dim=int(kwargs["vid_dim"]),
            txt_in_dim=int(kwargs["txt_in_dim"]),
            txt_dim=int(kwargs.get("txt_dim") or kwargs["vid_dim"]),
            emb_dim=int(kwargs["emb_dim"]),
            heads=int(kwargs["heads"]),
            head_dim=int(kwargs["head_dim"]),
            expand_ratio=int(kwargs["expand_ratio"]),
            norm_eps=float(kwargs["norm_eps"]),
            num_layers=num_layers,
            mlp_type=kwargs.get("mlp_type", "normal"),
            window=tuple(tuple(int(n) for n in w) for w in window),
            window_method=tuple(window_method),
            patch_size=tuple(kwargs.get("patch_size", PATCH_SIZE)),
            **extra,
        )

    @classmethod
    def from_state_dict_shapes(cls, shapes: Mapping[str, Sequence[int]]) -> "NaDiTConfig":
        """Detect the architecture and every size from tensor names and shapes (rope buffers optional).

        Windows are not stored in checkpoints: the released (4,3,3) counts with alternating win/swin are used.
        """
        shapes = {key: tuple(int(n) for n in shape) for key, shape in shapes.items()}
        _require_nadit_keys(shapes)

        vid_dim, patch_features = shapes["vid_in.proj.weight"]
        txt_dim, txt_in_dim = shapes["txt_in.weight"]
        emb_dim = shapes["emb_in.proj_out.weight"][0]
        patch_area = PATCH_SIZE[1] * PATCH_SIZE[2]
        vid_in_channels, vid_out_channels = patch_features // patch_area, shapes["vid_out.proj.weight"][0] // patch_area

        layers = sorted({int(m.group(1)) for key in shapes if (m := re.match(r"blocks\.(\d+)\.", key))})
        num_layers = len(layers)
        if layers != list(range(num_layers)):
            raise ValueError(f"NaDiT state dict has non-contiguous block indices {layers[:8]}...")
        separate = [f"blocks.{i}.attn.proj_qkv.vid.weight" in shapes for i in layers]
        for i, is_separate in enumerate(separate):
            stream = "vid" if is_separate else "all"
            if f"blocks.{i}.attn.proj_qkv.{stream}.weight" not in shapes:
                raise ValueError(f"block {i} has neither 'vid' nor 'all' attention weights "
                                 f"(expected blocks.{i}.attn.proj_qkv.vid.weight or .all.weight)")
        mm_layers = sum(separate)
        if separate != [True] * mm_layers + [False] * (num_layers - mm_layers):
            raise ValueError("NaDiT state dict mixes separate and shared blocks in an unsupported order: "
                             "separate ('vid'/'txt') blocks must come first, shared ('all') blocks after")

        stream = "vid" if separate[0] else "all"
        head_dim = shapes[f"blocks.0.attn.norm_q.{stream}.weight"][0]
        heads = shapes[f"blocks.0.attn.proj_qkv.{stream}.weight"][0] // (3 * head_dim)
        mlp = f"blocks.0.mlp.{stream}."
        mlp_type = "swiglu" if mlp + "proj_in_gate.weight" in shapes else "normal"
        expand_ratio = _detect_expand_ratio(vid_dim, shapes[mlp + "proj_in.weight"][0], mlp_type)

        vid_out_norm = "vid_out_norm.weight" in shapes
        last = num_layers - 1
        last_without_text_mlp = separate[last] and not any(k.startswith(f"blocks.{last}.mlp.txt.") for k in shapes)
        # Only the 3B line (models/dit_v2) has an output norm, shared blocks or a video-only last block.
        is_3b_line = vid_out_norm or mm_layers < num_layers or last_without_text_mlp
        if is_3b_line:
            rope_type, rope_dims = "mmrope3d", (head_dim, head_dim // 2)
        else:
            rope_type, rope_dims = "rope3d", (head_dim // 2,)
        rope_dim = _detect_rope_dim(shapes, rope_dims)

        return cls(
            vid_in_channels=vid_in_channels,
            vid_out_channels=vid_out_channels,
            vid_dim=vid_dim,
            txt_in_dim=txt_in_dim,
            txt_dim=txt_dim,
            emb_dim=emb_dim,
            heads=heads,
            head_dim=head_dim,
            expand_ratio=expand_ratio,
            norm_eps=RELEASED_NORM_EPS,
            num_layers=num_layers,
            mm_layers=mm_layers,
            mlp_type=mlp_type,
            window=(RELEASED_WINDOW,) * num_layers,
            window_method=tuple(WIN if i % 2 == 0 else SWIN for i in range(num_layers)),
            rope_type=rope_type,
            rope_dim=rope_dim,
            vid_out_norm=vid_out_norm,
            last_layer_video_only=is_3b_line,
        )


def _per_layer(value: Any, num_layers: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != num_layers:
            raise ValueError(f"{name} has {len(value)} entries but num_layers is {num_layers}")
        return list(value)
    return [value] * num_layers


def _require_nadit_keys(shapes: Mapping[str, tuple]) -> None:
    unexpected = [key for key in shapes if not key.startswith(_NADIT_KEY_PREFIXES)]
    missing = [key for key in _REQUIRED_KEYS if key not in shapes]
    if not any(key.startswith("blocks.0.") for key in shapes):
        missing.append("blocks.0.*")
    if missing or unexpected:
        hint = ""
        if any(key.startswith(("encoder.", "decoder.")) for key in unexpected):
            hint = " It looks like a VAE checkpoint: load it with the VAE loader."
        elif unexpected:
            hint = " If the keys carry a wrapper prefix (e.g. 'model.'), strip it before loading."
        raise ValueError(
            "not a SeedVR2 NaDiT state dict: "
            + (f"missing {missing[:4]}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected keys such as {unexpected[:5]}" if unexpected else "")
            + "." + hint
        )


def _detect_expand_ratio(dim: int, hidden: int, mlp_type: str) -> int:
    if mlp_type == "normal":
        if hidden % dim:
            raise ValueError(f"MLP hidden width {hidden} is not a multiple of the model width {dim}")
        return hidden // dim
    # SwiGLU rounds the hidden width up to 256, so several ratios may fit: prefer the released 4.
    fitting = [r for r in range(1, 17) if swiglu_hidden_dim(dim, r) == hidden]
    if not fitting:
        raise ValueError(f"SwiGLU hidden width {hidden} matches no expand_ratio for width {dim}")
    return 4 if 4 in fitting else fitting[0]


def _detect_rope_dim(shapes: Mapping[str, tuple], candidates: tuple[int, ...]) -> int:
    stored = [shape for key, shape in shapes.items() if key.endswith(".attn.rope.rope.freqs")]
    if not stored:
        return candidates[0]
    count = stored[0][0]
    for rope_dim in candidates:
        if rope_dim // 3 // 2 == count:
            return rope_dim
    raise ValueError(f"rope buffers hold {count} frequencies, which fits no supported rope layout "
                     f"(expected {candidates[0] // 3 // 2}); drop the 'rope.rope.freqs' keys to use the default")
