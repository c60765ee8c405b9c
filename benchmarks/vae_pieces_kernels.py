"""VAE alone at 1080p (33 frames <-> 9 latents): piece size, Triton kernels and the shuffle GEMM vs time and peak.

Scratch measurement kept with its results in docs/results/; run from the repo root with PYTHONPATH=. on a CUDA GPU."""
import argparse
import time, torch
from src.benchmark.random_weights import random_vae
from src.optimization.vae_optimizer import optimize_vae


def main(argv=None) -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    dev = torch.device("cuda")
    vae = random_vae(dev, torch.bfloat16)
    z = torch.randn(1, 16, 9, 136, 240, device=dev, dtype=torch.bfloat16)
    x = torch.rand(1, 3, 33, 1088, 1920, device=dev, dtype=torch.bfloat16) * 2 - 1

    def timed(label, direction, runs=2):
        for i in range(runs):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            with torch.no_grad():
                out = vae.decode(z) if direction == "decode" else vae.encode(x)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
            del out
            print(f"{label} {direction} run {i}: {dt:.3f} s peak {torch.cuda.max_memory_allocated()/2**30:.1f} GiB", flush=True)

    for gib in (2, 4, 1):
        print(optimize_vae(vae, piece_bytes=gib << 30).summary(), flush=True)
        timed(f"piece {gib} GiB", "decode", 3 if gib == 2 else 2)
        timed(f"piece {gib} GiB", "encode", 3 if gib == 2 else 2)
    optimize_vae(vae, piece_bytes=2 << 30)
    vae.executor.runtime.shuffle_gemm = False
    timed("no shuffle gemm", "decode")
    vae.executor.runtime.shuffle_gemm = True
    vae.executor.runtime.triton_kernels = False
    t = time.perf_counter()
    timed("compiled GN (first run compiles)", "decode", 1)
    print("compile+run", time.perf_counter() - t)
    timed("compiled GN", "decode")
    timed("compiled GN", "encode", 3)


if __name__ == "__main__":
    main()
