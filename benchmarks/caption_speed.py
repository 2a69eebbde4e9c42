"""Captions per second of a captioner, at batch 1 and 256: greedy over the KV cache (what `genfast
caption` runs) beside the full pass recomputed for every piece (no cache), on the test split's images.

    python benchmarks/caption_speed.py [--models captioner-fashion-mnist captioner-mnist]
                                       [--batch-sizes 1 256] [--images 512] [--repeats 3]

Each row captions the same `--images` test images in batches of its size; the time is the median of
`--repeats` passes after one warm-up pass. The machine (CPU model and ISA flags, threads) heads the table.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from genfast import data, images, memory, timing
from genfast.caption import load_captioner
from genfast.families.captioner import decode
from genfast.machine import current


def captions_per_s(net, pixels: torch.Tensor, batch: int, cached: bool, repeats: int) -> tuple[float, float]:
    """(captions per second, pieces per caption) over `pixels`, `batch` images at a time."""
    def one_pass() -> list[torch.Tensor]:
        return [decode(net, pixels[start:start + batch], cached=cached) for start in range(0, len(pixels), batch)]

    tokens = one_pass()  # warm-up, and the captions' lengths
    pieces = sum(int((t != 0).sum()) for t in tokens) / len(pixels)
    times = [timing.seconds(one_pass, torch.device("cpu")) for _ in range(repeats)]
    return len(pixels) / statistics.median(times), pieces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["captioner-fashion-mnist", "captioner-mnist"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--images", type=int, default=512, help="test images captioned per row")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    memory.reuse_freed_memory()
    print(f"machine: {current().describe()}\n")
    print("| captioner | batch | decode | captions/s | ms per caption | pieces per caption |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for name in args.models:
        captioner = load_captioner(name)
        net = captioner.modules["captioner"].eval()
        test = data.load(captioner.dataset, "test")
        pixels = images.to_float(test.images[:args.images])
        for batch in args.batch_sizes:
            for cached in (True, False):
                rate, pieces = captions_per_s(net, pixels, batch, cached, args.repeats)
                print(f"| {name} | {batch} | {'KV cache' if cached else 'no cache'} | {rate:,.0f} | "
                      f"{1000 / rate:.2f} | {pieces:.1f} |", flush=True)


if __name__ == "__main__":
    main()
