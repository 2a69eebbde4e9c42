"""What keeping freed memory (genfast.memory.reuse_freed_memory) does to sampling on the CPU.

    python benchmarks/allocator.py [--model gan-fashion-mnist] [--rounds 5]

glibc's setting is per process and cannot be put back as it was, so each side runs in
its own child process; the children take turns (default, reuse, default, reuse, ...)
so that a machine that speeds up or slows down skews neither. Prints images/s and
minor page faults per call for each side and batch size, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = """
import json, resource, sys, time, genfast
from genfast import engines, memory
model, engine, mode, batch, calls = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
if mode == "reuse":
    memory.reuse_freed_memory()
sampler = engines.apply(genfast.load(model), engine)
noise, labels = sampler.noise(batch, 0), sampler.labels(batch)
for _ in range(3):
    sampler(noise, labels)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
times = []
for _ in range(calls):
    start = time.perf_counter()
    sampler(noise, labels)
    times.append(time.perf_counter() - start)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / calls
print(json.dumps({"seconds": times, "faults": faults}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gan-fashion-mnist")
    parser.add_argument("--engine", default="eager")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 256, 1024])
    parser.add_argument("--rounds", type=int, default=5, help="child processes per side and batch size")
    parser.add_argument("--calls", type=int, default=10, help="timed calls per child")
    args = parser.parse_args()
    print(f"{args.model}, {args.engine} engine: glibc default against reuse_freed_memory")
    print("| batch | default images/s | faults/call | reuse images/s | faults/call | reuse / default |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for batch in args.batch_sizes:
        seconds: dict[str, list[float]] = {"default": [], "reuse": []}
        faults: dict[str, list[float]] = {"default": [], "reuse": []}
        for _ in range(args.rounds):
            for mode in seconds:
                result = json.loads(subprocess.run(
                    [sys.executable, "-c", CHILD, args.model, args.engine, mode, str(batch), str(args.calls)],
                    capture_output=True, text=True, check=True).stdout)
                seconds[mode] += result["seconds"]
                faults[mode].append(result["faults"])
        rate = {mode: batch / statistics.median(times) for mode, times in seconds.items()}
        print(f"| {batch} | {rate['default']:,.0f} | {statistics.median(faults['default']):,.0f} | "
              f"{rate['reuse']:,.0f} | {statistics.median(faults['reuse']):,.0f} | "
              f"{rate['reuse'] / rate['default']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
