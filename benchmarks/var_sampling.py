"""Where a next-scale (VAR) model's FID is lost, and the sampling settings that win it back.

    python benchmarks/var_sampling.py MODEL [-n 5000] [--seed 0] [--forced]
                                      [--settings "cfg=2" "cfg=2,cfg_schedule=linear,last_scale_temperature=0" ...]

- **--forced**: the FID (against the test split, the shipped judge) of images whose first k
  scales are the tokens of real training images and whose finer scales the model draws
  (genfast.load's settings), for k = 0 (the model alone) to every scale (the tokenizer's round
  trip). The step from k to k + 1 is what drawing scale k + 1 costs: a large last step says
  the finest scale's tokens, drawn together, are where the images go wrong.
- **--settings**: `genfast eval`'s FID and class accuracy (metrics.evaluate, n images, the
  seed's noise) under each set of sampling settings (genfast.load's keys, comma-separated).

Prints markdown tables, the rows of BENCHMARKS.md's "Next-scale prediction" section.
"""

from __future__ import annotations

import argparse

import torch

import genfast
from genfast import config as configlib
from genfast import data, images, metrics
from genfast.families.ar import decoders
from genfast.families.ar.model import ScaleCache


def settings_of(text: str) -> dict[str, str]:
    """'cfg=2,last_scale_temperature=0' -> {'cfg': '2', 'last_scale_temperature': '0'}: genfast.load
    parses the values as a command line's."""
    return configlib.parse_pairs([pair for pair in text.split(",") if pair])


@torch.inference_mode()
def forced_decode(generator, prefix: torch.Tensor, source: torch.Tensor, forced: int,
                  uniforms: torch.Tensor) -> torch.Tensor:
    """decoders.scales with the first `forced` scales' tokens taken from `source`."""
    net, tokenizer, options = generator.net, generator.tokenizer, generator.options
    d = decoders.Decoder(net, prefix, options)
    cache, drawn, accumulated = ScaleCache(), [], tokenizer.empty_grid(d.batch)
    for scale, span in enumerate(tokenizer.spans):
        x = net.wte(d.rows(tokenizer.scale_input(accumulated, scale)))
        if scale == 0:
            x = torch.cat([d.prefix, x], 1)
        end = net.prefix_tokens + span.stop
        logits = net.step(x, cache, torch.arange(end - x.shape[1], end))[:, -(span.stop - span.start):]
        probs = d.probs(logits, decoders.scale_options(options, scale, len(tokenizer.spans)))
        tokens = source[:, span] if scale < forced else decoders.draw(probs, uniforms[:, span])
        drawn.append(tokens)
        accumulated = accumulated + tokenizer.contribution(tokens, scale)
    return torch.cat(drawn, 1)


def forced_table(model: str, n: int, seed: int, settings: dict) -> None:
    sampler = genfast.load(model, **settings)
    generator, dataset = sampler.module, sampler.info["dataset"]
    judge = metrics.load_judge(dataset, None, "cpu", sampler.image_shape)
    test, train = data.load(dataset, "test"), data.load(dataset, "train")
    real, _ = judge.embed((images.to_float(test.images[i:i + 500]) for i in range(0, len(test), 500)), len(test),
                          "features: test split", False)
    random = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(train), generator=random)[:n]
    labels = train.labels[pick]
    with torch.inference_mode():
        source = torch.cat([generator.tokenizer.encode(images.to_float(train.images[pick[i:i + 500]]))
                            for i in range(0, n, 500)])
    uniforms = torch.rand(n, generator.tokenizer.tokens_per_image, generator=random)
    print(f"\n{model} {settings or ''}: the first k scales a training image's own, the rest drawn (n {n})\n")
    print("| scales given | FID | class accuracy |\n| ---: | ---: | ---: |")
    for forced in range(len(generator.tokenizer.spans) + 1):
        made = [generator.tokenizer.decode(forced_decode(generator, generator.net.prefix(labels[i:i + 250]),
                                                         source[i:i + 250], forced, uniforms[i:i + 250]))
                for i in range(0, n, 250)]
        fake, predicted = judge.embed((batch.clamp(-1, 1) for batch in made), n, "features: made", False)
        accuracy = (predicted == labels).float().mean().item()
        print(f"| {forced} | {metrics.fid_kid(real, fake, seed)['fid']:.2f} | {accuracy:.3f} |", flush=True)


def settings_table(model: str, n: int, seed: int, all_settings: list[dict]) -> None:
    print(f"\n{model}: genfast eval -n {n} --seed {seed} under each setting\n")
    print("| settings | FID | class accuracy |\n| --- | ---: | ---: |")
    for settings in all_settings:
        result = metrics.evaluate(genfast.load(model, **settings), n=n, seed=seed, progress=False)
        shown = ", ".join(f"{key}={value}" for key, value in settings.items()) or "the model's own"
        print(f"| {shown} | {result['fid']:.2f} ± {result['fid_std']:.2f} | {result.get('accuracy', 0):.3f} |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("-n", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--forced", action="store_true", help="the table of scales given against FID")
    parser.add_argument("--forced-settings", default="", help="the sampling settings of the --forced table")
    parser.add_argument("--settings", nargs="*", default=[], help="comma-separated key=value sets, one per row")
    args = parser.parse_args()
    if args.forced:
        forced_table(args.model, args.n, args.seed, settings_of(args.forced_settings))
    if args.settings:
        settings_table(args.model, args.n, args.seed, [settings_of(text) for text in args.settings])


if __name__ == "__main__":
    main()
