"""Can the causal convolutions' look-back copies hide behind the convolutions?  One full-resolution decoder
convolution (128 -> 128 channels, 2 look-back + 2 new frames of 1920x1088, channels_last_3d bf16) alone, then
with the copies of one piece (2 frames into the padded input, 2 frames out of it) on the same stream, and on
a side stream that runs while the convolution does.

Scratch measurement kept with its results in docs/results/; run from the repo root with PYTHONPATH=. on a CUDA GPU."""
import argparse

import torch
import torch.nn.functional as F

from src.benchmark.timer import cuda_time


def main(argv=None) -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    dev = torch.device("cuda")
    LAST = torch.channels_last_3d
    x = torch.randn(1, 128, 4, 1088, 1920, device=dev, dtype=torch.bfloat16).contiguous(memory_format=LAST)
    w = torch.randn(128, 128, 3, 3, 3, device=dev, dtype=torch.bfloat16).contiguous(memory_format=LAST)
    history = torch.empty_like(x[:, :, :2])
    side = torch.cuda.Stream(dev)

    def conv():
        return F.conv3d(x, w, None, 1, (0, 1, 1))

    def copies():
        x[:, :, :2].copy_(history)  # look-back in
        return x[:, :, 2:].clone()  # look-back out

    def serial():
        copies()
        conv()

    def overlapped():
        current = torch.cuda.current_stream(dev)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            tail = x[:, :, 2:].clone()
            history.copy_(tail)
        conv()
        current.wait_stream(side)

    def ms(fn):
        return cuda_time(fn, dev) * 1e3

    results = {name: ms(fn) for name, fn in [("conv", conv), ("copies", copies), ("serial", serial),
                                             ("overlapped", overlapped)]}
    for name, value in results.items():
        print(f"{name:>10}: {value:.2f} ms", flush=True)
    print(f"hidden by the side stream: {results['serial'] - results['overlapped']:.2f} of {results['copies']:.2f} ms")


if __name__ == "__main__":
    main()
