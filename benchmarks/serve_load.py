"""Load test of `genfast serve`: dynamic batching on against off, side by side.

Starts `genfast serve MODEL` on loopback (once with batching, once with --no-batching),
then C concurrent clients (C = 1, 8, 64; spread over up to 4 client processes) each ask
for 1-8 images at a time (seeded, so the run is reproducible) until the run has sent
--requests requests or --seconds have passed. Reports throughput, p50/p99 latency, 5xx responses, and whether
every response's
images are exactly what `genfast sample` makes offline for its seed (none lost or mixed
up), then the ratio of batching on to off at each C.

`--mixed` measures the fairness rule instead (batching on): the p99 of single-image requests
from one client alone, then with C clients of which half ask for 1 image and half for 64
(each its own `user`), and the ratio of the two.

    python benchmarks/serve_load.py [--model gan-fashion-mnist] [--clients 1 8 64] [--requests 2000]
    python benchmarks/serve_load.py --mixed --clients 64
"""

from __future__ import annotations

import argparse
import asyncio
import io
import multiprocessing
import random
import shlex
import socket
import subprocess
import sys
import time

import httpx
import numpy as np

from genfast import images, pretrained


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(genfast: list[str], model: str, batching: bool, options: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [*genfast, "serve", model, "--port", str(port), *options]
    server = subprocess.Popen(command + ([] if batching else ["--no-batching"]), stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                return server, url
        except httpx.TransportError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("the server did not start")


def ask(index: int, pick: random.Random, mixed: bool) -> dict:
    """What client `index` asks next: 1-8 images; or, mixed, 1 (even clients) or 64 (odd
    ones), each client under its own `user`, the server's unit of fairness."""
    if not mixed:
        return {"n": pick.randint(1, 8)}
    return {"n": 64 if index % 2 else 1, "user": f"client-{index}"}


async def load(url: str, model: str, clients: int, requests: int, seconds: float,
               first_seed: int = 0, mixed: bool = False) -> tuple[list, float]:
    """(n, seed, status, latency, body) of every request, and the wall time of the run."""
    results: list[tuple[int, int, int, float, bytes]] = []
    stop = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        async def one_client(index: int) -> None:
            pick = random.Random(first_seed + index)
            while len(results) < requests and time.monotonic() < stop:
                body = ask(first_seed + index, pick, mixed) | {"model": model, "seed": pick.randrange(2**32),
                                                                "format": "npz"}
                start = time.perf_counter()
                response = await client.post("/v1/generate", json=body)
                results.append((body["n"], body["seed"], response.status_code, time.perf_counter() - start,
                                response.content))

        start = time.perf_counter()
        await asyncio.gather(*(one_client(i) for i in range(clients)))
        return results, time.perf_counter() - start


def load_in_processes(url: str, model: str, clients: int, requests: int, seconds: float,
                      processes: int, mixed: bool = False) -> tuple[list, float]:
    """`load` split over client processes: one Python client process cannot keep up with
    a server that answers many requests at once (measured: it halved the throughput)."""
    processes = min(processes, clients)
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        start = time.perf_counter()
        parts = pool.starmap(_load_part, [(url, model, clients // processes + (i < clients % processes),
                                           -(-requests // processes), seconds, i, mixed) for i in range(processes)])
        wall = time.perf_counter() - start
    return [r for part in parts for r in part], wall


def _load_part(url: str, model: str, clients: int, requests: int, seconds: float, part: int, mixed: bool) -> list:
    # Client indices stay distinct across processes (and even for the single-image clients of --mixed).
    return asyncio.run(load(url, model, clients, requests, seconds, first_seed=1000 * part, mixed=mixed))[0]


def check(results: list, model: str) -> tuple[int, int]:
    """(responses whose images are unlike their seed's offline ones, the largest pixel
    difference of the others). A pass over another batch size may round a pixel the other
    way (1 level of 255); a request's images handed to another differ everywhere. (An ar
    model's images can also differ for a third reason: in another batch a near-tie token
    may be sampled the other way, and the rest of the image follows it; measured without
    the server, about 1 image in 100.)"""
    sampler = pretrained.load(model)
    mixed_up = largest = 0
    for n, seed, status, _, body in results:
        if status == 200:
            expected = images.to_uint8(sampler.generate(n, seed=seed)).numpy().astype(int)
            difference = np.abs(np.load(io.BytesIO(body))["images"].astype(int) - expected)
            if difference.mean() > 0.5:
                mixed_up += 1
            else:
                largest = max(largest, int(difference.max()))
    return mixed_up, largest


def compare_batching(args, genfast: list[str]) -> None:
    print(f"genfast serve {args.model} {' '.join(args.server)}; clients ask for 1-8 images each; "
          f"at most {args.requests} requests or {args.seconds:g} s a run\n")
    print("| clients | batching | requests | images/s | p50 ms | p99 ms | 5xx | unlike offline | max pixel diff "
          "| on/off |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for clients in args.clients:
        throughput = {}
        for batching in (False, True):
            server, url = start_server(genfast, args.model, batching, args.server)
            try:
                asyncio.run(load(url, args.model, clients, min(20, args.requests), 5))  # warm-up
                results, wall = load_in_processes(url, args.model, clients, args.requests, args.seconds,
                                                  args.client_processes)
            finally:
                server.terminate()
                server.wait()
            latencies = np.array([r[3] for r in results]) * 1000
            throughput[batching] = sum(r[0] for r in results if r[2] == 200) / wall
            errors = sum(r[2] >= 500 for r in results)
            ratio = f"{throughput[True] / throughput[False]:.2f}x" if batching else ""
            print(f"| {clients} | {'on' if batching else 'off'} | {len(results)} | {throughput[batching]:,.0f} | "
                  f"{np.percentile(latencies, 50):.1f} | {np.percentile(latencies, 99):.1f} | {errors} | "
                  f"{' | '.join(map(str, check(results, args.model)))} | {ratio} |", flush=True)


def measure_fairness(args, genfast: list[str]) -> None:
    """Single-image latency alone, then beside clients asking for 64 images, on one server."""
    print(f"genfast serve {args.model} {' '.join(args.server)}; half the clients ask for 1 image, half for 64; "
          f"at most {args.requests} requests or {args.seconds:g} s a run\n")
    print("| clients | 1-image requests | 1-image p50 ms | 1-image p99 ms | 64-image requests | 64-image p99 ms "
          "| images/s | 5xx | unlike offline | max pixel diff | 1-image p99 / alone |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    server, url = start_server(genfast, args.model, True, args.server)
    try:
        asyncio.run(load(url, args.model, 8, min(20, args.requests), 5, mixed=True))  # warm-up
        runs = [(clients, *load_in_processes(url, args.model, clients, args.requests, args.seconds,
                                             args.client_processes, mixed=True)) for clients in [1, *args.clients]]
    finally:
        server.terminate()
        server.wait()
    alone = None
    for clients, results, wall in runs:
        single = np.array([r[3] for r in results if r[0] == 1]) * 1000
        large = np.array([r[3] for r in results if r[0] == 64]) * 1000
        alone = alone or np.percentile(single, 99)
        large_p99 = f"{np.percentile(large, 99):.1f}" if len(large) else ""
        print(f"| {clients} | {len(single)} | {np.percentile(single, 50):.1f} | {np.percentile(single, 99):.1f} | "
              f"{len(large)} | {large_p99} | {sum(r[0] for r in results if r[2] == 200) / wall:,.0f} | "
              f"{sum(r[2] >= 500 for r in results)} | {' | '.join(map(str, check(results, args.model)))} | "
              f"{np.percentile(single, 99) / alone:.2f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gan-fashion-mnist")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--requests", type=int, default=2000, help="per run, at most")
    parser.add_argument("--seconds", type=float, default=30, help="per run, at most")
    parser.add_argument("--client-processes", type=int, default=4, help="processes the clients are spread over")
    parser.add_argument("--mixed", action="store_true", help="measure fairness: 1-image beside 64-image requests")
    parser.add_argument("--genfast", default=f"{shlex.quote(sys.executable)} -m genfast",
                        help="the command that runs genfast (another checkout's: to compare before and after)")
    parser.add_argument("--server", nargs=argparse.REMAINDER, default=["--max-batch", "256", "--max-wait-ms", "0",
                                                                      "--max-queue", "4096"],
                        help="options for genfast serve (last on the line)")
    args = parser.parse_args()
    (measure_fairness if args.mixed else compare_batching)(args, shlex.split(args.genfast))


if __name__ == "__main__":
    main()
