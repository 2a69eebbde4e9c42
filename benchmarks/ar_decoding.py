"""Issue 5's table: every decoding strategy of the text-conditioned models, speed and quality.

    python benchmarks/ar_decoding.py [--fid-n 2000] [--per-prompt 20] [--batch-sizes 1 64] [--quality-only]
                                     [--decodes naive kv static jacobi parallel]

Speed through `genfast bench`'s code, one run per model with its strategies interleaved,
each eager and compiled where its shapes are fixed: the causal model (ar-text-...) with
naive, kv, static and jacobi; the masked model (maskgit-text-...) with parallel. Then
quality per strategy: FID against the test split (n = --fid-n, the same seed for all; the
class-conditioned samples eval makes) and prompt accuracy on the training phrasings and on
held-out ones. Ratios to naive are same-run for the causal model; the parallel row's ratio
crosses two back-to-back runs.
"""

from __future__ import annotations

import argparse

import genfast
from genfast import bench, memory, metrics

CAUSAL = ["naive", "kv", "static", "jacobi"]  # the strategies of the causal model (ar-text-...)
MASKED = ["parallel"]                          # and of the masked one (maskgit-text-...)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fid-n", type=int, default=2000)
    parser.add_argument("--per-prompt", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quality-only", action="store_true", help="the quality table alone (no timings)")
    parser.add_argument("--decodes", nargs="+", default=[*CAUSAL, *MASKED], choices=[*CAUSAL, *MASKED],
                        help="the strategies of the quality table (default: all)")
    args = parser.parse_args()
    memory.reuse_freed_memory()
    causal = genfast.load(f"ar-text-{args.data}", device=args.device)
    masked = genfast.load(f"maskgit-text-{args.data}", device=args.device)
    if not args.quality_only:
        speed(causal, masked, args)
    quality(causal, masked, args)


def speed(causal, masked, args: argparse.Namespace) -> None:
    rows = bench.measure(causal, ["eager", "compile"], args.batch_sizes, repeats=args.repeats, progress=False,
                         decodes=CAUSAL)
    rows += bench.measure(masked, ["eager", "compile"], args.batch_sizes, repeats=args.repeats, progress=False,
                          decodes=MASKED)
    naive = {r.batch_size: r.images_per_s for r in rows if (r.engine, r.decode) == ("eager", "naive")}
    for r in rows:
        if r.images_per_s:
            r.speedup_vs_naive = r.images_per_s / naive[r.batch_size]
    print(bench.markdown([r for r in rows if r.status == "ok"]), flush=True)


def quality(causal, masked, args: argparse.Namespace) -> None:
    print(f"\n| model | decode | FID (n={args.fid_n}) | class accuracy | prompt accuracy, training phrasings "
          "| prompt accuracy, held-out phrasings |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for sampler, decodes in ((causal, CAUSAL), (masked, MASKED)):
        for decode in (d for d in decodes if d in args.decodes):
            variant = sampler.with_decoding(decode)
            scores = metrics.evaluate(variant, n=args.fid_n, progress=False)
            prompts = metrics.prompt_accuracy(variant, args.per_prompt, progress=False)
            held_out = prompts.get("held_out_phrasings", {}).get("accuracy")
            print(f"| {sampler.info['model']} | {decode} | {scores['fid']:.2f} ± {scores['fid_std']:.2f} | "
                  f"{scores['accuracy']:.3f} | {prompts['train_phrasings']['accuracy']:.3f} | "
                  f"{'-' if held_out is None else format(held_out, '.3f')} |", flush=True)


if __name__ == "__main__":
    main()
