"""Images/s of each engine against eager, side by side in one run (the start of `genfast bench`).

    python benchmarks/engines.py [--models gan-fashion-mnist vae-fashion-mnist] [--batch-size 256]

Per engine: one-off cost (wrapping + first call: folding, compilation), then the median
of --repeats timed calls of one batch, after warm-up; images/s, the ratio to eager
measured in the same run, and the max |pixel difference| to eager on the same noise.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import genfast
from genfast import engines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gan-fashion-mnist", "vae-fashion-mnist"])
    parser.add_argument("--engines", nargs="+", default=list(engines.ENGINES))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}\n")
    print("| model | engine | one-off s | median ms | images/s | vs eager | max abs diff |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name in args.models:
        sampler = genfast.load(name)
        noise, labels = sampler.noise(args.batch_size, 0), sampler.labels(args.batch_size)
        expected = sampler(noise, labels)
        base = None
        for engine in args.engines:
            start = time.perf_counter()
            fast = engines.apply(sampler, engine)
            out = fast(noise, labels)
            one_off = time.perf_counter() - start
            for _ in range(3):
                fast(noise, labels)
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                fast(noise, labels)
                times.append(time.perf_counter() - t)
            median = statistics.median(times)
            rate = args.batch_size / median
            base = base or rate
            print(f"| {name} | {engine} | {one_off:.2f} | {1000 * median:.2f} | {rate:,.0f} | {rate / base:.2f}x "
                  f"| {(out - expected).abs().max():.2e} |", flush=True)


if __name__ == "__main__":
    main()
