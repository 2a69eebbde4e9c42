"""How far the token decoders are from the hardware (issue 15): each decode's achieved
GFLOP/s against this machine's measured fp32 matmul peak, beside its speed-up over naive.

    python benchmarks/ar_peak.py [--model ar-text-fashion-mnist] [--batch-sizes 1 64]
                                 [--decodes naive kv static jacobi] [--engines eager compile onnx]
                                 [--repeats 10]

The peak: the best of a few timed 2048x2048 fp32 matrix products (torch.mm, all of
torch's threads). A decode's arithmetic: the transformer's multiply-adds per token
(2 x its linear layers' weights, the head included, plus attention over the cache),
times tokens and rows (guidance doubles them); the naive decoder's recomputation is not
counted as useful work, so its GFLOP/s is the same useful work over its longer time.
Speeds come from `genfast bench`'s code (interleaved timed calls, one run); every row's
ratio is to eager naive at its batch size (the engines have no naive decode of their own);
the pixel difference is to eager under the same strategy, on the same noise.
"""

from __future__ import annotations

import argparse
import time

import torch

import genfast
from genfast import bench, memory


def matmul_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    best = min(_seconds(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _seconds(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def flops_per_token(net) -> float:
    """Multiply-adds x 2 of one token through the GPT: its linear layers and the attention
    over the full cache (an upper bound per token, as the static cache attends every slot)."""
    linear = sum(m.weight.numel() for m in net.modules() if isinstance(m, torch.nn.Linear))
    attention = 2 * net.layers * (net.prefix_tokens + net.sequence_length) * net.width
    return 2 * (linear + attention)


def cpu() -> str:
    flags = set()
    model = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    shown = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8") if f in flags]
    return f"{model} ({', '.join(shown)})"


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
    peak = matmul_peak_gflops()
    per_image = flops_per_token(net) * net.sequence_length * (2 if sampler.module.options.cfg != 1.0 else 1)
    print(f"{args.model} on {cpu()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
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
