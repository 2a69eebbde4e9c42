"""Style transfer's table in BENCHMARKS.md: is the target reached, and is the style kept?

    python benchmarks/transfer_quality.py [--pairs 1000] [--strengths 0 0.2 ... 1] [--cfgs 5 1] [--seed 0]
                                          [--json FILE] [MODEL ...]

For each model (default: the shipped CVAEs and token models), `pairs` test-split images,
each sent to a class other than its own (picked by the seed), through genfast.transfer as
`genfast transfer` runs it (the CVAE reads each source's class itself, as it must for a
user's PNG). Then:

- **target accuracy**: the share of outputs the shipped judge (classifier-<data set>, as
  `genfast eval` loads it) labels as the target class; a text model is sent to its class by
  a prompt, its first training phrasing ("a sandal", "the digit seven"), and at the
  default strength also by a held-out one ("beach sandals", "a scribbled seven");
- **style kept**: per attribute (attributes.py), Pearson r between the source's value and
  the output's, each standardised within its class (the source's class for the source,
  the target's for the output), so r asks whether a thick three became a thick seven, not
  whether sevens are thicker than threes; the raw r (without that) beside it in the JSON.
  "worded" is the mean over the attributes the caption corpus has words for on that
  data set (corpus.ADJECTIVES): the ones that are style there.

Token models are measured at every strength of --strengths and every guidance scale of
--cfgs (default: transfer's own, then none): the curves behind the defaults. At the end, the
tables of BENCHMARKS.md in markdown (a curve's cells: target accuracy / worded r).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from genfast import attributes, corpus, data, metrics, transfer
from genfast.families.ar import text

MODELS = ["cvae-fashion-mnist", "cvae-mnist", "ar-fashion-mnist", "ar-text-fashion-mnist",
          "maskgit-text-fashion-mnist", "var-fashion-mnist", "var-text-fashion-mnist", "ar-mnist", "ar-text-mnist",
          "var-mnist", "var-text-mnist"]
STRENGTHS = [0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def pairs(dataset: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n test images picked by the seed, their labels, and for each a target class other than its own."""
    test = data.load(dataset, "test")
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(test), generator=generator)[:n]
    labels = test.labels[pick]
    targets = (labels + 1 + torch.randint(test.num_classes - 1, (len(pick),), generator=generator)) % test.num_classes
    return test.images[pick], labels, targets


def transferred(model: transfer.Transfer, pixels: torch.Tensor, targets: torch.Tensor, strength: float | None,
                seed: int, prompts: list[str] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each source under its own target (by class, or by the class's prompt), and the class
    the CVAE read each source as (-1 for a token model, which reads none)."""
    made = torch.empty(len(pixels), *model.sampler.image_shape)
    read_as = torch.full((len(pixels),), -1)
    for target in targets.unique().tolist():
        mine = targets == target
        sources = transfer.Sources(pixels[mine], [str(i) for i in range(int(mine.sum()))], [""] * int(mine.sum()))
        wanted = model.targets([prompts[target] if prompts else str(target)])
        result = model.run(sources, wanted, strength, seed)
        made[mine] = result.images[:, 0]
        if result.source_classes:
            read_as[mine] = torch.tensor([model.sampler.class_names.index(c) for c in result.source_classes])
    return made, read_as


def standardised(values: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Values as z-scores within their class."""
    out = torch.empty_like(values)
    for c in classes.unique():
        mine = classes == c
        out[mine] = (values[mine] - values[mine].mean()) / values[mine].std().clamp_min(1e-8)
    return out


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


def scores(judge: metrics.Judge, dataset: str, pixels: torch.Tensor, labels: torch.Tensor, made: torch.Tensor,
           targets: torch.Tensor) -> dict:
    predicted = judge.embed([made], len(made), "judge", progress=False)[1]
    before, after = attributes.measure(pixels), attributes.measure(made)
    within = {name: pearson(standardised(before[name], labels), standardised(after[name], targets))
              for name in attributes.ATTRIBUTES}
    worded = list(corpus.ADJECTIVES[dataset])
    return {"target_accuracy": float((predicted == targets).double().mean()),
            "source_class_kept": float((predicted == labels).double().mean()),
            "r_within_class": within, "r_raw": {name: pearson(before[name], after[name]) for name in before},
            "r_worded_mean": sum(within[name] for name in worded) / len(worded), "worded": worded}


def measure(name: str, n: int, strengths: list[float], cfgs: list[float], seed: int) -> dict:
    model = transfer.load(name)
    dataset = model.dataset
    judge = metrics.load_judge(dataset)
    pixels, labels, targets = pairs(dataset, n, seed)
    report = {"model": name, "dataset": dataset, "pairs": len(pixels), "seed": seed}
    if isinstance(model, transfer.LatentTransfer):
        made, read_as = transferred(model, pixels, targets, None, seed, None)
        report["read_as_accuracy"] = float((read_as == labels).double().mean())
        report["cvae"] = scores(judge, dataset, pixels, labels, made, targets)
        return report
    prompts = [phrasings[0] for phrasings in text.CAPTIONS[dataset]] if model.config.text else None
    report |= {"prompts": prompts, "default_strength": model.checked_strength(None), "default_cfg": model.options.cfg,
               "curves": {}}
    for cfg in cfgs:
        guided = transfer.load(name, cfg=cfg)
        curve = report["curves"][str(cfg)] = {}
        for strength in strengths:
            made, _ = transferred(guided, pixels, targets, strength, seed, prompts)
            curve[str(strength)] = scores(judge, dataset, pixels, labels, made, targets)
            print(f"  {name} cfg {cfg:g} strength {strength:g}: {summary(curve[str(strength)])}", flush=True)
    if prompts:  # the defaults, by held-out phrasings
        held_out = [phrasings[0] for phrasings in text.HELD_OUT[dataset]]
        made, _ = transferred(model, pixels, targets, None, seed, held_out)
        report["held_out_prompts"] = held_out
        report["held_out"] = scores(judge, dataset, pixels, labels, made, targets)
    return report


def summary(result: dict) -> str:
    each = ", ".join(f"{name} {r:.2f}" for name, r in result["r_within_class"].items())
    return f"target {result['target_accuracy']:.3f}, worded r {result['r_worded_mean']:.2f} ({each})"


def tables(reports: list[dict]) -> str:
    """The markdown of BENCHMARKS.md: the CVAEs, the token models at their defaults, and the curves."""
    columns = " | ".join(attributes.ATTRIBUTES)
    lines = [f"| model | target accuracy | source class read | worded r | {columns} |",
             "| --- | ---: | ---: | ---: |" + " ---: |" * len(attributes.ATTRIBUTES)]
    for report in (r for r in reports if "cvae" in r):
        result = report["cvae"]
        lines.append(f"| {report['model']} | {result['target_accuracy']:.3f} | {report['read_as_accuracy']:.3f} | "
                     f"{result['r_worded_mean']:.2f} | " + " | ".join(
                         f"{result['r_within_class'][name]:.2f}" for name in attributes.ATTRIBUTES) + " |")
    tokens = [r for r in reports if "curves" in r]
    lines += ["", f"| model | strength, cfg | target accuracy | held-out prompts | worded r | {columns} |",
              "| --- | --- | ---: | ---: | ---: |" + " ---: |" * len(attributes.ATTRIBUTES)]
    for report in tokens:
        result = report["curves"].get(str(report["default_cfg"]), {}).get(str(report["default_strength"]))
        if result is None:  # its defaults were not among the --strengths and --cfgs measured
            continue
        held_out = f"{report['held_out']['target_accuracy']:.3f}" if "held_out" in report else "-"
        lines.append(f"| {report['model']} | {report['default_strength']:g}, {report['default_cfg']:g} | "
                     f"{result['target_accuracy']:.3f} | {held_out} | {result['r_worded_mean']:.2f} | " + " | ".join(
                         f"{result['r_within_class'][name]:.2f}" for name in attributes.ATTRIBUTES) + " |")
    if tokens:
        strengths = list(next(iter(tokens[0]["curves"].values())))
        lines += ["", "| model | cfg | " + " | ".join(f"{float(s):g}" for s in strengths) + " |",
                  "| --- | ---: |" + " ---: |" * len(strengths)]
        for report in tokens:
            for cfg, curve in report["curves"].items():
                lines.append(f"| {report['model']} | {float(cfg):g} | " + " | ".join(
                    f"{curve[s]['target_accuracy']:.2f} / {curve[s]['r_worded_mean']:.2f}" for s in strengths) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--strengths", type=float, nargs="+", default=STRENGTHS)
    parser.add_argument("--cfgs", type=float, nargs="+", default=[transfer.DEFAULT_CFG, 1.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("models", nargs="*", default=MODELS)
    args = parser.parse_args()
    reports = []
    for name in args.models:
        reports.append(measure(name, args.pairs, args.strengths, args.cfgs, args.seed))
        report = reports[-1]
        if "cvae" in report:
            print(f"{name}: read-as accuracy {report['read_as_accuracy']:.3f}; {summary(report['cvae'])}", flush=True)
        elif "held_out" in report:
            print(f"{name}: held-out prompts at strength {report['default_strength']:g}, cfg "
                  f"{report['default_cfg']:g}: {summary(report['held_out'])}", flush=True)
    print(tables(reports))
    if args.json:
        args.json.write_text(json.dumps(reports, indent=2) + "\n")


if __name__ == "__main__":
    main()
