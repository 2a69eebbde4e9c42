"""Peak memory of a folder job against its size: it must be flat in n (issue 14).

    python benchmarks/bulk_memory.py [--model gan-fashion-mnist] [--counts 10000 100000 1000000]
                                     [--format npz] [--folder /tmp/genfast-bulk-memory]

Each count is one `genfast sample MODEL -n N --out FOLDER` in a fresh process (its own
interpreter, so one job's memory does not carry into the next); the peak resident set
size of that process (its own ru_maxrss, from wait4) and the wall time are printed
as a markdown table. The folder is removed after each job.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gan-fashion-mnist")
    parser.add_argument("--counts", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--format", default="npz", choices=["npz", "png"])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/genfast-bulk-memory"))
    args = parser.parse_args()
    print(f"| images | peak RSS MB | seconds | images/s |  ({args.model}, --format {args.format})")
    print("| ---: | ---: | ---: | ---: |")
    for n in args.counts:
        shutil.rmtree(args.folder, ignore_errors=True)
        start = time.perf_counter()
        job = subprocess.Popen([sys.executable, "-m", "genfast", "sample", args.model, "-n", str(n), "--format",
                                args.format, "--out", str(args.folder), "-q"], stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(job.pid, 0)  # this child's own resource usage (ru_maxrss in KiB)
        job.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        if job.returncode:
            raise SystemExit(f"the job of {n} images failed (status {job.returncode})")
        print(f"| {n:,} | {usage.ru_maxrss / 1024:.0f} | {seconds:.1f} | {n / seconds:,.0f} |", flush=True)
        shutil.rmtree(args.folder, ignore_errors=True)


if __name__ == "__main__":
    main()
