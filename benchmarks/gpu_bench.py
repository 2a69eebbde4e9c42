"""Everything issues 4 and 5 ask of a GPU, checked and timed in one run (device time is scarce).

    python benchmarks/gpu_bench.py --out DIR            # on the GPU machine, ~5-8 min
    python benchmarks/gpu_bench.py --device cpu --quick  # a dry run of the same code here

For the seed's DCGAN generator and the VAE decoder (Fashion-MNIST): every engine
and stack of engines against eager fp32 on the same noise (max |pixel difference|),
then images/s and latency over batch sizes from 1 to 65,536 through `genfast bench`'s
code (interleaved, CUDA events), and the fraction of the card's compute ceiling each
row reaches. Then the token transformers (when shipped): every decoding strategy at
batch 1, 64 and 1,024, the static step eager and compiled, the whole static decode
graph-captured (its compiled steps too), and next-scale's whole decode compiled and
graph-captured (issue 18). Writes
DIR/gpu_bench.md and DIR/<model>.json; prints the tables as it goes, so a run cut
short still reports what it measured.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import genfast
from genfast import bench, memory

# Engines and stacks worth timing on a GPU: the "best recipe" is the last.
ENGINES = ["eager", "fused", "bf16", "fp16", "fused+bf16", "fused+bf16+cudagraph", "fused+bf16+compile+cudagraph",
           "onnx"]
MODELS = ["gan-fashion-mnist", "vae-fashion-mnist"]
BATCHES = [1, 256, 16384, 65536]  # each a torch.compile bucket: ~10-30 s of compiling apiece
# cudagraph records the static decoder's whole decode (issue 15's targets: batch 1 <= 2 ms
# per image, batch 1,024 >= 100,000 images/s); compile+cudagraph records compiled steps.
AR_RUNS = [("ar-text-fashion-mnist", ["eager", "compile", "cudagraph", "compile+cudagraph"],
            ["naive", "kv", "static", "jacobi"]),
           ("maskgit-text-fashion-mnist", ["eager"], ["parallel"]),
           # issue 18: next-scale's whole decode (5 passes) compiled as one program and graph-captured
           ("var-text-fashion-mnist", ["eager", "bf16", "compile", "cudagraph", "compile+cudagraph"],
            ["scales", "scales-naive"])]
AR_BATCHES = [1, 64, 1024]
H200_BF16_FLOPS = 778e12  # dense bf16 tensor-core ceiling (the figure)


def flops_per_image(sampler) -> float:
    """Multiply-adds x 2 of the network's Linear and (transposed) convolution layers, counted
    from their shapes by running one image with forward hooks."""
    total = 0.0

    def count(layer, inputs, output):
        nonlocal total
        if isinstance(layer, torch.nn.Linear):
            total += 2 * layer.in_features * layer.out_features
        elif isinstance(layer, torch.nn.Conv2d):
            kernel = layer.kernel_size[0] * layer.kernel_size[1]
            total += 2 * output[0].numel() * layer.in_channels // layer.groups * kernel
        elif isinstance(layer, torch.nn.ConvTranspose2d):
            total += 2 * inputs[0][0].numel() * layer.out_channels * layer.kernel_size[0] * layer.kernel_size[1]

    hooks = [m.register_forward_hook(count) for m in sampler.module.modules()]
    sampler(sampler.noise(1, 0), sampler.labels(1))
    for hook in hooks:
        hook.remove()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path("gpu-bench"))
    parser.add_argument("--quick", action="store_true", help="small batches, few repeats: check the script runs")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    memory.reuse_freed_memory()
    batches = [1, 16, 64] if args.quick else BATCHES
    repeats = 3 if args.quick else args.repeats
    args.out.mkdir(parents=True, exist_ok=True)
    name_of_device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    report = [f"# gpu_bench: {name_of_device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}", ""]

    def publish(model: str, rows: list, lines: list[str]) -> None:
        """Print a model's tables and write them at once: a run cut short keeps what it measured."""
        print("\n".join(lines), flush=True)
        report.extend(lines + [""])
        bench.write_json(rows, args.out / f"{model}.json")
        (args.out / "gpu_bench.md").write_text("\n".join(report) + "\n")

    for model in MODELS:
        sampler = genfast.load(model, device=args.device)
        flops = flops_per_image(sampler)
        started = time.perf_counter()
        rows = bench.measure(sampler, ENGINES, batches, repeats=repeats, progress=False)
        lines = [f"## {model}: {flops / 1e6:.1f} MFLOP per image ({time.perf_counter() - started:.0f} s)", "",
                 bench.markdown(rows), "", "| engine | batch | images/s | latency us | fraction of bf16 ceiling |",
                 "| --- | ---: | ---: | ---: | ---: |"]
        for r in rows:
            if r.images_per_s:
                lines.append(f"| {r.engine} | {r.batch_size} | {r.images_per_s:,.0f} | {1000 * r.median_ms:,.1f} | "
                             f"{r.images_per_s * flops / H200_BF16_FLOPS:.2%} |")
        publish(model, rows, lines)
    # The token transformers: decoding strategies x step engines (issue 5's GPU table).
    for model, engines, decodes in AR_RUNS:
        if model not in genfast.shipped():
            continue
        started = time.perf_counter()
        rows = bench.measure(genfast.load(model, device=args.device), engines, [1, 64] if args.quick else AR_BATCHES,
                             repeats=min(repeats, 10), progress=False, decodes=decodes)
        publish(model, rows, [f"## {model} ({time.perf_counter() - started:.0f} s)", "", bench.markdown(rows)])


if __name__ == "__main__":
    main()
