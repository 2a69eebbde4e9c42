"""The CPU's own fast paths (issue 17), side by side in one bench run.

    python benchmarks/fast_paths.py freeze --model gan-fashion-mnist [--batch-sizes 1 256] [--engines ...]
    python benchmarks/fast_paths.py int8 --model gan-fashion-mnist [--fid-n 10000] [--fake-vnni]

`freeze`: compile as it is (each bucket frozen or not, whichever is faster) against compile as
it was (never frozen: `compile-unfrozen`, registered here only), beside eager, fused and the
bf16 stacks. `int8`: ONNX Runtime's int8 against PyTorch's (int8-inductor) with FID;
`--fake-vnni` lets int8-inductor run on a CPU without VNNI (oneDNN's int8 then runs, slowly:
its error and FID are what such a run tells). Every table carries the machine and its peak.
"""

from __future__ import annotations

import argparse

import genfast
from genfast import bench, engines, machine, memory, peak
from genfast.engines.compiled import Bucketed


def unfrozen(sampler):
    """compile before issue 17: bucketed, never frozen."""
    bucketed = Bucketed(sampler.module, freezing=(False,))
    return engines.rewrap(sampler, bucketed, bucketed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["freeze", "int8"])
    parser.add_argument("--model", default="gan-fashion-mnist")
    parser.add_argument("--engines", nargs="+", help="in place of the mode's own list")
    parser.add_argument("--batch-sizes", nargs="+", type=int)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--fid-n", type=int, default=10_000)
    parser.add_argument("--fake-vnni", action="store_true")
    args = parser.parse_args()
    memory.reuse_freed_memory()
    if args.what == "freeze":
        engines.ENGINES["compile-unfrozen"] = unfrozen
        names = ["eager", "fused", "compile-unfrozen", "compile", "fused+compile", "bf16", "fused+bf16+compile"]
        batch_sizes, fid_n = args.batch_sizes or [1, 256], 0
    else:
        names, batch_sizes, fid_n = ["eager", "int8", "int8-inductor"], args.batch_sizes or [256], args.fid_n
    names = args.engines or names
    here = machine.current()
    if args.fake_vnni:
        machine._cpu = lambda: (here.cpu, (*here.flags, "avx512_vnni"))
    sampler = genfast.load(args.model)
    measured = peak.measured(sampler.device)
    rows = bench.measure(sampler, names, batch_sizes, repeats=args.repeats, fid_n=fid_n, progress=False,
                         peak=measured)
    print(bench.header(args.model, here, measured))
    if args.fake_vnni:
        print("(avx512_vnni faked: int8-inductor runs on this CPU's int8 kernels, whatever their speed)")
    print(bench.markdown(rows))


if __name__ == "__main__":
    main()
