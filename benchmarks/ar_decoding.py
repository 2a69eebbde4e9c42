"""Issues 5 and 18's table: every decoding strategy of the text-conditioned models, speed and quality.

    python benchmarks/ar_decoding.py [--fid-n 2000] [--per-prompt 20] [--batch-sizes 1 64] [--quality-only]
                                     [--engines eager compile onnx] [--cfg 2]
                                     [--decodes naive kv static jacobi parallel scales scales-naive]

Speed through `genfast bench`'s code, one run per model with its strategies interleaved,
through each engine where its shapes allow one (a strategy an engine cannot take has no
row): the causal model (ar-text-...) with naive, kv, static and jacobi; the masked model
(maskgit-text-...) with parallel; the next-scale model (var-text-...) with scales and
scales-naive. Then quality per strategy: FID against the test split (n = --fid-n, the same
seed for all; the class-conditioned samples eval makes) and prompt accuracy on the training
phrasings and on held-out ones. Every model at the same guidance (--cfg; default: each
model's own). Ratios to naive are same-run for the causal model; the other models' rows'
ratios cross back-to-back runs.
"""

from __future__ import annotations

import argparse

import genfast
from genfast import bench, memory, metrics

# Each model's name before the dataset's, and its strategies.
STRATEGIES = {"ar-text": ["naive", "kv", "static", "jacobi"],   # the causal model
              "maskgit-text": ["parallel"],                     # the masked one
              "var-text": ["scales", "scales-naive"]}           # the next-scale one
ALL = [decode for decodes in STRATEGIES.values() for decode in decodes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fid-n", type=int, default=2000)
    parser.add_argument("--per-prompt", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quality-only", action="store_true", help="the quality table alone (no timings)")
    parser.add_argument("--decodes", nargs="+", default=ALL, choices=ALL,
                        help="the strategies of the quality table (default: all)")
    parser.add_argument("--engines", nargs="+", default=["eager", "compile", "onnx"], help="engines of the speed table")
    parser.add_argument("--cfg", type=float, help="guidance of every model (default: each model's own)")
    args = parser.parse_args()
    memory.reuse_freed_memory()
    models = {name: genfast.load(f"{name}-{args.data}", device=args.device, cfg=args.cfg) for name in STRATEGIES}
    if not args.quality_only:
        speed(models, args)
    quality(models, args)


def speed(models: dict, args: argparse.Namespace) -> None:
    rows = []
    for name, sampler in models.items():
        rows += bench.measure(sampler, args.engines, args.batch_sizes, repeats=args.repeats, progress=False,
                              decodes=STRATEGIES[name])
    naive = {r.batch_size: r.images_per_s for r in rows if (r.engine, r.decode) == ("eager", "naive")}
    for r in rows:
        if r.images_per_s:
            r.speedup_vs_naive = r.images_per_s / naive[r.batch_size]
    print(bench.markdown([r for r in rows if r.status == "ok"]), flush=True)


def quality(models: dict, args: argparse.Namespace) -> None:
    print(f"\n| model | decode | FID (n={args.fid_n}) | class accuracy | prompt accuracy, training phrasings "
          "| prompt accuracy, held-out phrasings |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name, sampler in models.items():
        for decode in (d for d in STRATEGIES[name] if d in args.decodes):
            variant = sampler.with_decoding(decode)
            scores = metrics.evaluate(variant, n=args.fid_n, progress=False)
            prompts = metrics.prompt_accuracy(variant, args.per_prompt, progress=False)
            held_out = prompts.get("held_out_phrasings", {}).get("accuracy")
            print(f"| {sampler.info['model']} | {decode} | {scores['fid']:.2f} ± {scores['fid_std']:.2f} | "
                  f"{scores['accuracy']:.3f} | {prompts['train_phrasings']['accuracy']:.3f} | "
                  f"{'-' if held_out is None else format(held_out, '.3f')} |", flush=True)


if __name__ == "__main__":
    main()
