"""The quality table of BENCHMARKS.md: `genfast eval` of every shipped generator.

    python benchmarks/quality.py [-n 10000] [--json-dir DIR] [--judges DIR] [MODEL ...]

For each model (default: every shipped generator): FID (± bootstrap std) and KID
against the test split, the same for real training images (the scale), FID as a
multiple of that baseline, class accuracy for conditional models, prompt accuracy for
text models (in the JSON). Same seed, same
numbers. `--judges DIR` takes the feature networks from DIR/classifier-DATASET.safetensors
instead of the shipped ones (to set a new yardstick's figures beside an old one's).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import genfast
from genfast import metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-dir", type=Path)
    parser.add_argument("--per-prompt", type=int, default=50, help="text models: images per prompt")
    parser.add_argument("--judges", type=Path, help="folder of classifier-DATASET.safetensors (default: shipped)")
    parser.add_argument("models", nargs="*", help="default: every shipped generator")
    args = parser.parse_args()
    print("| model | data | FID | KID | real-vs-real FID | FID / real | class accuracy (real test) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name in args.models or genfast.shipped(generative=True):
        sampler = genfast.load(name)
        judge = args.judges / f"classifier-{sampler.info['dataset']}.safetensors" if args.judges else None
        r = metrics.evaluate(sampler, n=args.n, seed=args.seed, classifier=judge and str(judge), progress=False)
        if sampler.takes_prompts:  # ar-text: do images show the prompt?
            r["prompt_accuracy"] = metrics.prompt_accuracy(sampler, args.per_prompt, args.seed,
                                                           judge and str(judge), progress=False)
        accuracy = f"{r['accuracy']:.4f} ({r['real_accuracy']:.4f})" if "accuracy" in r else "-"
        print(f"| {name} | {r['dataset']} | {r['fid']:.2f} ± {r['fid_std']:.2f} | {r['kid']:.4f} ± {r['kid_std']:.4f} "
              f"| {r['real_fid']:.2f} ± {r['real_fid_std']:.2f} | {r['fid_ratio_to_real']:.1f}x | {accuracy} |",
              flush=True)
        if args.json_dir:
            args.json_dir.mkdir(parents=True, exist_ok=True)
            (args.json_dir / f"{name}.json").write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
