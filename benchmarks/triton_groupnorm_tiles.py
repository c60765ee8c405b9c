"""Triton GroupNorm/residual tile sizes: GB/s at the decoder's three widths (2 frames per call).

Scratch measurement kept with its results in docs/results/; run from the repo root with PYTHONPATH=. on a CUDA GPU."""
import argparse
from functools import partial

import torch

from src.benchmark.timer import cuda_time
from src.optimization import vae_triton
from src.optimization.vae_optimizer import compiled_normalize, _frames


def main(argv=None) -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    dev = torch.device("cuda")
    LAST = torch.channels_last_3d
    bench = partial(cuda_time, device=dev)  # median seconds
    for c, h, w in ((128, 1088, 1920), (256, 544, 960), (512, 272, 480)):
        x = torch.randn(1, c, 2, h, w, device=dev, dtype=torch.bfloat16).to(memory_format=LAST)
        padded = torch.empty(1, c, 4, h, w, device=dev, dtype=torch.bfloat16).to(memory_format=LAST)
        out = padded[:, :, 2:]
        weight, bias, shift = (torch.randn(c, device=dev, dtype=torch.bfloat16) for _ in range(3))
        bytes_norm = 3 * x.numel() * 2
        def compiled():
            for xf, of in _frames(x, out):
                compiled_normalize(xf, weight, bias, of, 32, 1e-6, True, shift)
        s = bench(compiled)
        print(f"C={c} {h}x{w}: compiled per frame {bytes_norm / s / 1e9:.0f} GB/s", flush=True)
        for warps in (4, 8):
            vae_triton.NORM_WARPS = vae_triton.RESIDUAL_WARPS = warps
            for tile in (2048, 4096, 8192, 16384):
                try:
                    s = bench(lambda: vae_triton.normalize_into(x, weight, bias, out, 32, 1e-6, True, shift, tile_elements=tile))
                    r = bench(lambda: vae_triton.add_residual(out, x, shift.float(), tile_elements=tile))
                    print(f"C={c} warps {warps} tile {tile}: norm {bytes_norm / s / 1e9:.0f} GB/s, residual {bytes_norm / r / 1e9:.0f} GB/s", flush=True)
                except Exception as e:
                    print(f"C={c} warps {warps} tile {tile}: {type(e).__name__} {str(e)[:100]}", flush=True)


if __name__ == "__main__":
    main()
