"""How far the token decoders are from the hardware (issue 15): each decode's achieved
GFLOP/s against this machine's measured fp32 matmul peak, beside its speed-up over naive.

    python benchmarks/ar_peak.py [--model ar-text-fashion-mnist] [--batch-sizes 1 64]
                                 [--decodes naive kv static jacobi] [--engines eager compile onnx]
                                 [--repeats 10]

The peak: genfast.peak's fp32 matrix-product probe (the fastest of a few timed products,
all of torch's threads), what `genfast bench` holds its fp32 rows to. A decode's
arithmetic: the transformer's multiply-adds per token (2 x its linear layers' weights,
the head included, plus attention over the cache), times tokens and rows (guidance
doubles them); the naive decoder's recomputation is not counted as useful work, so its
GFLOP/s is the same useful work over its longer time.
Speeds come from `genfast bench`'s code (interleaved timed calls, one run); every row's
ratio is to eager naive at its batch size (the engines have no naive decode of their own);
the pixel difference is to eager under the same strategy, on the same noise.
"""

from __future__ import annotations

import argparse

import torch

import genfast
from genfast import bench, machine, memory
from genfast import peak as peak_module


def flops_per_token(net) -> float:
    """Multiply-adds x 2 of one token through the GPT: its linear layers and the attention
    over the full cache (an upper bound per token, as the static cache attends every slot)."""
    linear = sum(m.weight.numel() for m in net.modules() if isinstance(m, torch.nn.Linear))
    attention = 2 * net.layers * (net.prefix_tokens + net.sequence_length) * net.width
    return 2 * (linear + attention)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ar-text-fashion-mnist")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--decodes", nargs="+", default=["naive", "kv", "static", "jacobi"])
    parser.add_argument("--engines", nargs="+", default=["eager", "compile", "onnx"])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    memory.reuse_freed_memory()
    sampler = genfast.load(args.model)
    net = sampler.module.net
    peak = peak_module.measured().gflops["fp32 matmul"]
    per_image = flops_per_token(net) * net.sequence_length * (2 if sampler.module.options.cfg != 1.0 else 1)
    print(f"{args.model} on {machine.current().describe()}; "
          f"fp32 matmul peak {peak:.1f} GFLOP/s; {per_image / 1e6:.1f} MFLOP of useful work per image")
    rows = bench.measure(sampler, args.engines, args.batch_sizes, repeats=args.repeats, progress=False,
                         decodes=args.decodes)
    naive = {row.batch_size: row.median_ms for row in rows
             if row.decode == "naive" and row.engine == "eager" and row.status == "ok"}
    print("| decode | engine | batch | ms per call | vs eager naive | passes | GFLOP/s | of peak | max pixel diff |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        if row.status != "ok":
            print(f"| {row.decode} | {row.engine} | {row.batch_size} | {row.status} | | | | | |")
            continue
        gflops = per_image * row.batch_size / (row.median_ms / 1000) / 1e9
        ratio = f"{naive[row.batch_size] / row.median_ms:.2f}x" if row.batch_size in naive else "-"
        print(f"| {row.decode} | {row.engine} | {row.batch_size} | {row.median_ms:.1f} | {ratio} "
              f"| {row.forward_passes_per_image} | {gflops:.2f} | {gflops / peak:.1%} | {row.max_abs_diff:.3g} |")


if __name__ == "__main__":
    main()
