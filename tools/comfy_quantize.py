"""Write a SeedVR2 DiT in the layout of ComfyUI's ``Comfy-Org/SeedVR2`` files (fp16, fp8_e4m3fn,
int8_convrot, mxfp8, nvfp4), from any weight file this pack loads.

    python tools/comfy_quantize.py seedvr2_ema_3b_fp16.safetensors seedvr2_3b_nvfp4.safetensors --format nvfp4

The encoders follow the formats as documented in ``docs/model-files.md`` and are written independently of
the pack's decoders (``src/models/quant_formats.py``), so the tests that build files with this tool and load
them with the pack check one against the other.  Quantized: every Linear layer inside ``blocks.`` (as the
public ComfyUI quantization tools do), except the blocks named by ``--keep-blocks`` (the "mixed_block35"
files keep block 35 of the 7B in 16 bit).  The conditioning buffers are added from
``assets/text_embeddings.safetensors`` unless ``--no-conditioning``.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path

import torch

FORMATS = ("fp16", "fp8_e4m3fn", "int8_convrot", "mxfp8", "nvfp4")
E4M3_MAX = 448.0
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def marker(config: dict) -> torch.Tensor:
    """The ``<layer>.comfy_quant`` tensor: the JSON text as uint8 bytes."""
    return torch.tensor(list(json.dumps(config).encode("utf-8")), dtype=torch.uint8)


def _pad(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    out = torch.zeros(-(-w.shape[0] // rows) * rows, -(-w.shape[1] // cols) * cols, dtype=w.dtype, device=w.device)
    out[: w.shape[0], : w.shape[1]] = w
    return out


def tile_128x4(scales: torch.Tensor) -> torch.Tensor:
    """(rows, cols) block scales -> the cuBLAS tiled layout, written element by element from its definition:
    the scale of (r, c) goes to tile (r // 128, c // 4), offset (r % 32)·16 + ((r % 128) // 32)·4 + c % 4."""
    rows, cols = scales.shape
    padded_rows, padded_cols = -(-rows // 128) * 128, -(-cols // 4) * 4
    col_tiles = padded_cols // 4
    out = torch.zeros(padded_rows * padded_cols, dtype=scales.dtype, device=scales.device)
    r = torch.arange(rows, device=scales.device).reshape(-1, 1).expand(rows, cols)
    c = torch.arange(cols, device=scales.device).reshape(1, -1).expand(rows, cols)
    tile = (r // 128) * col_tiles + c // 4
    offset = tile * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4
    out[offset.reshape(-1)] = scales.reshape(-1)
    return out.reshape(padded_rows, padded_cols)


@functools.lru_cache(maxsize=8)
def hadamard_rows(size: int) -> torch.Tensor:
    """The normalized ConvRot Hadamard matrix, entry by entry: H4[i][j] is -1 on the anti-diagonal (i+j = 3),
    and H_size[i][j] is the product of H4 over the base-4 digits of i and j."""
    h4 = [[-1.0 if i + j == 3 else 1.0 for j in range(4)] for i in range(4)]
    digits = int(round(math.log(size, 4)))
    out = torch.empty(size, size, dtype=torch.float64)
    for i in range(size):
        for j in range(size):
            value, a, b = 1.0, i, j
            for _ in range(digits):
                value *= h4[a % 4][b % 4]
                a, b = a // 4, b // 4
            out[i, j] = value
    return out / math.sqrt(size)


def convrot_group(in_features: int) -> int | None:
    """The largest of 256, 64, 16 dividing the input count (as quant_int8_convrot.py chooses)."""
    return next((g for g in (256, 64, 16) if in_features % g == 0), None)


# ------------------------------------------------------------------------------------------------ encoders
def encode_fp8(w: torch.Tensor) -> tuple[dict, torch.Tensor]:
    scale = (w.abs().max().double() / E4M3_MAX).clamp(min=1e-12)
    q = (w.double() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    ref = q.double() * scale
    return {"weight": q, "weight_scale": scale.float().reshape(())}, ref


def encode_int8_convrot(w: torch.Tensor, group: int) -> tuple[dict, torch.Tensor]:
    h = hadamard_rows(group).to(w.device)
    rotated = (w.double().reshape(w.shape[0], -1, group) @ h.T).reshape(w.shape)
    scale = (rotated.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-30)
    q = torch.round(rotated / scale).clamp(-128, 127).to(torch.int8)
    ref = ((q.double() * scale).reshape(w.shape[0], -1, group) @ h).reshape(w.shape)   # H·H = identity
    return {"weight": q, "weight_scale": scale.float()}, ref


def _e2m1_code(v: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 code (sign in bit 3); a tie goes to the smaller magnitude."""
    grid = torch.tensor(E2M1_GRID, dtype=torch.float64, device=v.device)
    magnitude = torch.argmin((v.abs().unsqueeze(-1) - grid).abs(), dim=-1)
    return (magnitude | (v < 0).to(torch.int64) << 3).to(torch.uint8)


def encode_nvfp4(w: torch.Tensor) -> tuple[dict, torch.Tensor]:
    rows, cols = w.shape
    wp = _pad(w.double(), 16, 16)
    tensor_scale = (w.abs().max().double() / (E4M3_MAX * 6.0)).clamp(min=1e-12).float().double()
    blocks = wp.reshape(wp.shape[0], -1, 16)
    block_scale = (blocks.abs().amax(dim=-1) / 6.0 / tensor_scale).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    total = block_scale.double() * tensor_scale
    scaled = torch.where(total.unsqueeze(-1) > 0, blocks / total.unsqueeze(-1).clamp(min=1e-300), 0.0)
    codes = _e2m1_code(scaled.clamp(-6, 6)).reshape(wp.shape)
    grid = torch.tensor(E2M1_GRID + tuple(-g for g in E2M1_GRID), dtype=torch.float64, device=w.device)
    ref = (grid[codes.long()].reshape(blocks.shape) * total.unsqueeze(-1)).reshape(wp.shape)[:rows, :cols]
    packed = (codes[:, 0::2] << 4) | codes[:, 1::2]          # the even-indexed value in the high nibble
    return {"weight": packed, "weight_scale": tile_128x4(block_scale.view(torch.uint8)).view(torch.float8_e4m3fn),
            "weight_scale_2": tensor_scale.float().reshape(())}, ref


def encode_mxfp8(w: torch.Tensor) -> tuple[dict, torch.Tensor]:
    rows, cols = w.shape
    wp = _pad(w.double(), 32, 32)
    blocks = wp.reshape(wp.shape[0], -1, 32)
    amax = blocks.abs().amax(dim=-1)
    exponent = torch.ceil(torch.log2((amax / E4M3_MAX).clamp(min=2.0 ** -127))).clamp(-127, 127)
    code = torch.where(amax > 0, exponent + 127, torch.zeros_like(exponent)).to(torch.uint8)
    scale = torch.where(amax > 0, torch.exp2(exponent), torch.ones_like(exponent))
    q = (blocks / scale.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    ref = (q.double() * scale.unsqueeze(-1)).reshape(wp.shape)[:rows, :cols]
    return {"weight": q.reshape(wp.shape), "weight_scale": tile_128x4(code)}, ref


# --------------------------------------------------------------------------------------------- conversion
def linear_layers(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the DiT's Linear layers (read from the model this pack builds for these tensors)."""
    repo = Path(__file__).resolve().parents[1]
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    from src.models.dit import NaDiT, NaDiTConfig

    with torch.device("meta"):
        model = NaDiT(NaDiTConfig.from_state_dict_shapes({k: tuple(v.shape) for k, v in state.items()}))
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def convert(state: dict[str, torch.Tensor], fmt: str, *, keep_blocks: tuple[int, ...] = (),
            conditioning: tuple[torch.Tensor, torch.Tensor] | None = None, layers: list[str] | None = None,
            keep_reference: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(file tensors, reference weights): the state dict in ``fmt``'s layout, and the float64 weights the
    encoders actually stored (what a correct decoder must reproduce; empty unless ``keep_reference``).
    Tensors stay on their device (encode full-size models on a GPU); the file tensors on the CPU."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    layers = linear_layers(state) if layers is None else layers
    out: dict[str, torch.Tensor] = {}
    reference: dict[str, torch.Tensor] = {}
    quantize = {
        name for name in layers
        if name.startswith("blocks.") and int(name.split(".")[1]) not in keep_blocks and fmt != "fp16"
    }
    for key, value in state.items():
        layer = key.removesuffix(".weight")
        if key.endswith(".weight") and layer in quantize:
            w = value.double()
            if fmt == "fp8_e4m3fn":
                tensors, ref = encode_fp8(w)
                config = {"format": "float8_e4m3fn"}
            elif fmt == "int8_convrot":
                group = convrot_group(w.shape[1])
                if group is None:
                    out[key] = value.half().cpu()
                    if keep_reference:
                        reference[key] = value.half().double()
                    continue
                tensors, ref = encode_int8_convrot(w, group)
                config = {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": group}
            elif fmt == "mxfp8":
                tensors, ref = encode_mxfp8(w)
                config = {"format": "mxfp8"}
            else:
                tensors, ref = encode_nvfp4(w)
                config = {"format": "nvfp4"}
            for name, tensor in tensors.items():
                out[f"{layer}.{name}"] = tensor.contiguous().cpu()
            out[f"{layer}.comfy_quant"] = marker(config)
            if keep_reference:
                reference[key] = ref
        else:
            stored = value.half() if value.is_floating_point() else value
            out[key] = stored.cpu()
            if keep_reference:
                reference[key] = stored.double() if stored.is_floating_point() else stored
    if conditioning is not None:
        out["positive_conditioning"], out["negative_conditioning"] = (c.half() for c in conditioning)
    return out, reference


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a SeedVR2 DiT weight file (.safetensors / .pth)")
    parser.add_argument("output", help="the .safetensors file to write")
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument("--keep-blocks", type=int, nargs="*", default=[], help="blocks kept in fp16, e.g. 35")
    parser.add_argument("--no-conditioning", action="store_true", help="do not add the conditioning buffers")
    args = parser.parse_args(argv)
    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo))
    from safetensors.torch import load_file, save_file

    from src.models.checkpoint import iter_tensors

    state = dict(iter_tensors(args.source))
    conditioning = None
    if not args.no_conditioning:
        embeddings = load_file(str(repo / "assets" / "text_embeddings.safetensors"))
        conditioning = embeddings["pos"], embeddings["neg"]
    tensors, _ = convert(state, args.format, keep_blocks=tuple(args.keep_blocks), conditioning=conditioning)
    save_file(tensors, args.output)
    print(f"wrote {args.output}: {len(tensors)} tensors, format {args.format}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
