"""conv_out (128 -> 3 channels) and conv_in (3 -> 128) at 1080p: channel padding vs time (cuDNN's kernel choice).

Scratch measurement kept with its results in docs/results/; run from the repo root with PYTHONPATH=. on a CUDA GPU."""
import argparse

import torch, torch.nn.functional as F

from src.benchmark.timer import cuda_time


def main(argv=None) -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    dev = torch.device("cuda")
    def bench(fn) -> float:
        return cuda_time(fn, dev) * 1e3  # median milliseconds
    LAST = torch.channels_last_3d
    x = torch.randn(1, 128, 4, 1088, 1920, device=dev, dtype=torch.bfloat16).to(memory_format=LAST)
    for out_ch in (8, 16, 32, 64):
        w = torch.randn(out_ch, 128, 3, 3, 3, device=dev, dtype=torch.bfloat16).to(memory_format=LAST)
        ms = bench(lambda: F.conv3d(x, w, None, 1, (0, 1, 1)))
        print(f"conv_out 128->{out_ch} (2 new frames of 4): {ms:.2f} ms per call", flush=True)
    del x
    for in_ch in (8, 16):
        x = torch.randn(1, in_ch, 6, 1088, 1920, device=dev, dtype=torch.bfloat16).to(memory_format=LAST)
        w = torch.randn(128, in_ch, 3, 3, 3, device=dev, dtype=torch.bfloat16).to(memory_format=LAST)
        ms = bench(lambda: F.conv3d(x, w, None, 1, (0, 1, 1)))
        print(f"conv_in {in_ch}->128 (4 out frames): {ms:.2f} ms per call", flush=True)


if __name__ == "__main__":
    main()
