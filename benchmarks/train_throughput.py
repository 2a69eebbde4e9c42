"""Training throughput of the seed DCGAN and the cGAN, through the real trainer.

Runs `genfast.train` for a few hundred steps per variant in one process, side by
side, and reads back what the trainer measured: images/s of the optimisation
steps, and the share of wall time spent cutting and scaling batches (the data
pipeline; it must not starve the model). Ratios between variants are the numbers
to trust on a shared machine; absolute figures drift.

    python benchmarks/train_throughput.py [--data fashion-mnist] [--steps 200] [--device cpu]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import genfast
from genfast import checkpoint


def run(data: str, steps: int, device: str, conditional: bool, precision: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        options = genfast.TrainOptions(out=Path(out), data=data, steps=steps, device=device, precision=precision,
                                       progress=False, sample_every=10**9, checkpoint_every=10**9)
        path = genfast.train("gan", options, conditional=conditional)
        return checkpoint.read_header(path)["extra"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"{args.steps} steps of batch 128 on {args.data}\n")
    print("| model | precision | images/s | data pipeline share | vs fp32 |")
    print("| --- | --- | ---: | ---: | ---: |")
    for conditional in (False, True):
        base = None
        for precision in ("fp32", "bf16"):
            extra = run(args.data, args.steps, args.device, conditional, precision)
            base = base or extra["images_per_s"]
            print(f"| {'cgan' if conditional else 'gan'} | {precision} | {extra['images_per_s']:.0f} | "
                  f"{100 * extra['data_fraction']:.2f}% | {extra['images_per_s'] / base:.2f}x |")


if __name__ == "__main__":
    main()
