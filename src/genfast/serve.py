"""`genfast serve`: an HTTP image-generation service with dynamic batching.

FastAPI on uvicorn. Models are loaded once, at start-up, under short names; a request
names one of those, never a file. Two ways to ask: genfast's own `POST /v1/generate`
(a PNG grid, an npz or JSON) and `POST /v1/images/generations`, the OpenAI Images API as
its official client sends it (the prompt is the text, the class name or, for an
unconditional model, ignored; errors in that API's shape).

Each model has a `Batcher`: one worker thread that plans a forward pass from what is
waiting, runs it, and hands each request its images, while the event loop only parses,
queues and answers. A pass holds up to `max_batch` images; the first request may wait
`max_wait_ms` for company. Fairness: a pass is shared out among the *clients* waiting
(the `user` a request names, else its connection), each getting an equal share of the
pass's images (what one needs less is shared by the others) and their own requests in
order; so a client queueing many large requests delays another's single image by one
pass at most (the pass running when it arrives; while at most max_batch clients wait), not
by everything queued before it.

A request's images are those of `genfast sample` for the same seed: image i of a seed has
the same noise whatever pass it travels in (Sampler.noise), and the results agree up to the
rounding that depends on the batch size (a pixel may differ by one level; an ar model may,
rarely, sample a near-tie token the other way: BENCHMARKS.md).

Limits: `n` at most `max_n`; at most `max_queue` passes' worth of images (`max_queue` x
`max_batch`) waiting per model (then 429 with Retry-After); `timeout_s` per request (then
504); a body over `max_body_bytes` is a 413, found out before more than that is read; a
malformed field is a 422 (400 on the OpenAI route) that names it, with at most a short,
escaped excerpt of what was sent. /metrics serves Prometheus counters of requests, images,
batch sizes, queue depth and latency.

The engine `auto` (the default of `genfast serve`) is decided at start-up, per model, for
passes of `max_batch` images and a job without end (the fastest stack per image, its one-off
cost aside), with the thread count the passes run with; each model's choice is one line on
stderr, and /v1/models names the stack it runs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import math
import reprlib
import secrets
import socket
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers

from genfast import checkpoint, engines, images, pretrained
from genfast.engines import auto
from genfast.errors import GenfastError
from genfast.families import get_family
from genfast.families.base import Sampler
from genfast.seeding import MAX_SEED


@dataclass
class ServeOptions:
    engine: str = "eager"      # the command's default is auto; here the caller says what it wants
    device: str = "cpu"
    max_batch: int = 64        # images in one forward pass
    # How long the first request of a pass waits for others (0: a pass takes what queued during the last one).
    max_wait_ms: float = 0.0
    batching: bool = True      # False: every pass is one chunk of one request (the baseline)
    max_n: int = 64            # images per request
    max_queue: int = 256       # passes' worth of images waiting per model before 429
    timeout_s: float = 30.0    # per request, then 504
    # torch's threads for the forward passes (None: torch's own choice). On a machine whose
    # cores also run the event loop (and here the load generator), 2 threads made a pass of 4
    # images 30x slower than 1 (BENCHMARKS.md, issue 19). Set by serve(): it is per process.
    threads: int | None = None
    # The largest legitimate body, a 4000-character prompt written as JSON escapes (12 bytes
    # for a character outside the BMP), is under 50 KB.
    max_body_bytes: int = 64 * 1024
    # How the models that take them sample (ar: decode, cfg); None: each model's own.
    decode: str | None = None
    cfg: float | None = None


class GenerateRequest(BaseModel):
    # strict: a field takes the JSON type its schema names and nothing coerced to it
    # (true or 1.0 are no count of images and no class index, "3" no count).
    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)

    model: str = Field(description="a name from GET /v1/models")
    n: int = Field(1, ge=1, description="number of images")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="default: a random seed, returned")
    class_: int | str | None = Field(None, alias="class", description="class index or name (conditional models)")
    prompt: str | None = Field(None, max_length=4000, description="text models: what to draw")
    format: Literal["png", "npz", "json"] = "png"
    user: str | None = Field(None, max_length=256, description="who asks: requests of one user share its "
                                                               "fair share of the passes (default: the connection)")


class ImagesRequest(BaseModel):
    """The body of the OpenAI Images API's `images.generate`, as far as a model here can
    honour it; a field it cannot (quality, style, ...) is refused by name, not ignored."""
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(max_length=4000, description="a text model: what to draw; a class-conditional one: a class "
                                                     "name (or index); an unconditional one: ignored")
    model: str | None = Field(None, description="a name from GET /v1/models (default: the only one served)")
    n: int | None = Field(1, ge=1, description="number of images")
    size: str | None = Field(None, description="WIDTHxHEIGHT: the model's own size, or auto")
    response_format: str | None = Field(None, description="b64_json, the only one served")
    user: str | None = Field(None, max_length=256, description="who asks: the unit of fairness")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="genfast's: the seed (default random, returned)")


@dataclass(eq=False)
class _Job:
    """One request's images, handed to forward passes a slice at a time. `taken` belongs to
    whoever holds the batcher's lock; `noise` and `parts` to the worker thread alone."""
    client: Hashable
    seed: int
    n: int
    condition: torch.Tensor | None  # class ids (long), prompt embeddings (float) or None, one row per image
    done: asyncio.Future
    taken: int = 0                  # images handed to passes so far
    noise: torch.Tensor | None = None
    parts: list[torch.Tensor] = field(default_factory=list)

    @property
    def kind(self) -> tuple:
        """Jobs share a pass when their conditions stack into one tensor."""
        return (None,) if self.condition is None else (self.condition.dtype, *self.condition.shape[1:])


class _Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("genfast_requests", "Generate requests by model and HTTP status",
                                ["model", "status"], registry=self.registry)
        self.images = Counter("genfast_images", "Images generated", ["model"], registry=self.registry)
        self.batch_images = Histogram("genfast_batch_images", "Images per forward pass", ["model"],
                                      buckets=[2 ** k for k in range(11)], registry=self.registry)
        self.queue_depth = Gauge("genfast_queue_depth", "Images waiting for a forward pass", ["model"],
                                 registry=self.registry)
        self.latency = Histogram("genfast_request_seconds", "Time from a request's arrival to its images",
                                 ["model"], buckets=[.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30],
                                 registry=self.registry)


def fair_shares(demands: list[int], capacity: int) -> list[int]:
    """Max-min fair shares of `capacity` images among clients wanting `demands`, in turn
    order: each gets an equal part, and what one needs less of is shared by the rest (the
    first in turn gets the odd image)."""
    shares = [0] * len(demands)
    left, unserved = capacity, len(demands)
    for i in sorted(range(len(demands)), key=demands.__getitem__):  # stable: ties keep turn order
        shares[i] = min(demands[i], -(-left // unserved))
        left -= shares[i]
        unserved -= 1
    return shares


class Batcher:
    """The queue and the forward passes of one model.

    The worker thread plans each pass itself (under the lock), so it never waits for the
    event loop between passes; the loop only queues jobs and receives finished ones."""

    def __init__(self, name: str, sampler: Sampler, plain: Sampler, options: ServeOptions, metrics: _Metrics):
        self.name = name
        self.sampler = sampler  # with the engine applied: what the forward passes run
        self.plain = plain      # as loaded: what the model is (text or not) and how prompts are encoded
        self.options, self.metrics = options, metrics
        self._lock = threading.Condition()
        self._waiting: OrderedDict[Hashable, deque[_Job]] = OrderedDict()  # clients with work, in turn order
        self._queued = 0  # images waiting (not yet in a pass)
        self._thread: threading.Thread | None = None
        self._stopping = False

    def start(self) -> None:
        """The worker thread (again after stop: an app whose lifespan ended may be served
        again, as a test client that starts and ends one per test does)."""
        with self._lock:
            self._stopping = False  # a worker that has not yet seen a stop goes on
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=f"genfast-{self.name}", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()

    @property
    def queued(self) -> int:
        """Images waiting for a pass."""
        return self._queued

    async def generate(self, client: Hashable, seed: int, n: int, condition: torch.Tensor | None) -> torch.Tensor:
        """Images 0..n-1 of `seed` (with these conditions), uint8, in order."""
        self.start()
        passes = -(-n // self.options.max_batch)
        if passes > self.options.max_queue:
            raise _invalid("n", f"{n} images need {passes} passes of --max-batch {self.options.max_batch}, more "
                                f"than the queue holds (--max-queue {self.options.max_queue}); ask for fewer")
        job = _Job(client, seed, n, condition, asyncio.get_running_loop().create_future())
        with self._lock:
            if self._queued + n > self.options.max_queue * self.options.max_batch:
                raise HTTPException(429, f"the queue of {self.name} is full; retry shortly",
                                    headers={"Retry-After": "1"})
            self._waiting.setdefault(client, deque()).append(job)
            self._queued += n
            self._lock.notify()
        self.metrics.queue_depth.labels(self.name).set(self._queued)
        try:
            return await job.done
        finally:
            job.done.cancel()  # nothing, if it was answered
            if job.done.cancelled():  # timed out: what is not yet in a pass leaves the queue
                self._withdraw(job)

    def _withdraw(self, job: _Job) -> None:
        with self._lock:
            jobs = self._waiting.get(job.client)
            if jobs is not None and job in jobs:
                jobs.remove(job)
                self._queued -= job.n - job.taken
                if not jobs:
                    del self._waiting[job.client]

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queued and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    self._thread = None  # under the lock: the next start() starts another
                    return
                self._wait_for_company()
                slices = self._next_pass() if self._queued else []  # all withdrawn while it waited: none
            self.metrics.queue_depth.labels(self.name).set(self._queued)
            if not slices:
                continue
            try:
                pixels = self._forward(slices)
            except Exception as e:  # noqa: BLE001 - the requests get the error, the worker goes on
                for job in {job: None for job, _, _ in slices}:
                    self._withdraw(job)  # its other images would be made for nobody
                    _hand_back(job, None, e)
                continue
            self.metrics.batch_images.labels(self.name).observe(len(pixels))
            self._deliver(slices, pixels)

    def _wait_for_company(self) -> None:
        """Under the lock: until a pass is full or the first image has waited max_wait_ms."""
        if not (self.options.batching and self.options.max_wait_ms > 0):
            return
        deadline = time.monotonic() + self.options.max_wait_ms / 1000
        while self._queued < self.options.max_batch and not self._stopping and time.monotonic() < deadline:
            self._lock.wait(deadline - time.monotonic())

    def _next_pass(self) -> list[tuple[_Job, int, int]]:
        """Under the lock: the (job, first image, count) slices of the next pass. Batching:
        the clients whose next job is of the kind of the first one's share max_batch images
        fairly (`fair_shares`); off, one chunk of the first client's job. Clients served
        go to the back of the turn order."""
        first_kind = next(iter(self._waiting.values()))[0].kind
        clients = [c for c, jobs in self._waiting.items() if jobs[0].kind == first_kind]
        if self.options.batching:
            demands = [sum(job.n - job.taken for job in _same_kind_run(self._waiting[c])) for c in clients]
        else:
            clients = clients[:1]
            demands = [self._waiting[clients[0]][0].n - self._waiting[clients[0]][0].taken]
        slices = []
        for client, share in zip(clients, fair_shares(demands, self.options.max_batch)):
            jobs = self._waiting[client]
            while share:
                job = jobs[0]
                count = min(share, job.n - job.taken)
                slices.append((job, job.taken, count))
                job.taken += count
                share -= count
                if job.taken == job.n:
                    jobs.popleft()
            if jobs:
                self._waiting.move_to_end(client)
            else:
                del self._waiting[client]
        self._queued -= sum(count for _, _, count in slices)
        return slices

    def _forward(self, slices: list[tuple[_Job, int, int]]) -> torch.Tensor:
        """One pass over the slices' images, as uint8 on the CPU. A job's noise is drawn here,
        off the event loop, once (it was a sixth of the loop's time under load)."""
        for job, _, _ in slices:
            if job.noise is None:
                job.noise = self.sampler.noise(job.n, job.seed)
        noise = torch.cat([job.noise[start:start + count] for job, start, count in slices])
        condition = None if slices[0][0].condition is None else \
            torch.cat([job.condition[start:start + count] for job, start, count in slices])
        return images.to_uint8(self.sampler(noise, condition))

    def _deliver(self, slices: list[tuple[_Job, int, int]], pixels: torch.Tensor) -> None:
        """Each slice's images to its job; a job with all its images goes back to its loop."""
        for (job, _, _), part in zip(slices, pixels.split([count for _, _, count in slices])):
            job.parts.append(part)
            if sum(len(p) for p in job.parts) == job.n:
                _hand_back(job, torch.cat(job.parts), None)


def _same_kind_run(jobs: deque[_Job]) -> list[_Job]:
    """The jobs at the head of a client's queue that can share a pass with its first."""
    run = []
    for job in jobs:
        if job.kind != jobs[0].kind:
            break
        run.append(job)
    return run


def _hand_back(job: _Job, result: torch.Tensor | None, error: BaseException | None) -> None:
    """From the worker: the job's outcome to its event loop, unless that loop has closed
    (a client that went away; the worker must not die of it)."""
    with contextlib.suppress(RuntimeError):
        job.done.get_loop().call_soon_threadsafe(_settle, job.done, result, error)


def _settle(done: asyncio.Future, result, error: BaseException | None) -> None:
    """On the future's loop: its result or error, unless it was cancelled (timed out)."""
    if not done.done():
        if error is None:
            done.set_result(result)
        else:
            done.set_exception(error)


def model_key(name_or_path: str) -> str:
    """The name requests use: a shipped model's own, or a checkpoint's run folder (or file) name."""
    path = Path(name_or_path)
    if not path.is_file():
        return str(name_or_path)
    return path.parent.name if path.stem == "checkpoint" else path.stem


def _check_options(options: ServeOptions) -> None:
    """A GenfastError for a setting no server could run with (a timeout of 0 would answer
    every request 504), before anything loads or listens."""
    for name, value in (("--max-batch", options.max_batch), ("--max-n", options.max_n),
                        ("--max-queue", options.max_queue), ("max_body_bytes", options.max_body_bytes),
                        ("--threads", 1 if options.threads is None else options.threads)):
        if value < 1:
            raise GenfastError(f"{name} must be at least 1, got {value}")
    if not options.timeout_s > 0:  # written so, NaN fails too
        raise GenfastError(f"--timeout must be more than 0 seconds, got {options.timeout_s:g}")
    if not 0 <= options.max_wait_ms < math.inf:
        raise GenfastError(f"--max-wait-ms must be a finite number of milliseconds from 0 up, "
                           f"got {options.max_wait_ms:g}")


OPENAI_IMAGES = "/v1/images/generations"


class _OpenAIError(Exception):
    """An error of the OpenAI route, answered in that API's shape (its client raises the
    exception class of the status: BadRequestError, NotFoundError, RateLimitError, ...)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    @classmethod
    def of(cls, error: HTTPException) -> _OpenAIError:
        """The same refusal as genfast's own route gives, in OpenAI's terms (its 400 for a
        field's 422)."""
        if isinstance(error.detail, list):  # _invalid's: one field and what is wrong with it
            return cls(400, error.detail[0]["msg"], param=error.detail[0]["loc"][-1])
        return cls(error.status_code, error.detail, headers=error.headers)

    def response(self) -> JSONResponse:
        kind = {429: "rate_limit_error"}.get(self.status, "server_error" if self.status >= 500
                                             else "invalid_request_error")
        return JSONResponse({"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}},
                            status_code=self.status, headers=self.headers)


def create_app(models: list[str], options: ServeOptions | None = None) -> FastAPI:
    """The service for these models (shipped names or checkpoint paths), loaded now."""
    options = options or ServeOptions()
    _check_options(options)
    metrics = _Metrics()
    batchers: dict[str, Batcher] = {}
    settings = {key: value for key, value in (("decode", options.decode), ("cfg", options.cfg)) if value is not None}
    for model in models:
        key = model_key(model)
        if key in batchers:
            raise GenfastError(f"two models would be served as '{key}'; serve one of them, or rename a run folder")
        takes = get_family(checkpoint.read_header(model)["family"]).sampling_keys
        plain = pretrained.load(model, device=options.device,
                                **{name: value for name, value in settings.items() if name in takes})
        batchers[key] = Batcher(key, _with_engine(key, plain, options, settings), plain, options, metrics)
    if settings and not any(batcher.plain.loops for batcher in batchers.values()):
        raise GenfastError(f"--{' and --'.join(settings)} apply to ar models, which decode token by token; "
                           f"none of these models is one")
    prompts: OrderedDict[str, torch.Tensor] = OrderedDict()  # the embeddings of recent prompts
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        for batcher in batchers.values():  # the worker threads end with the server
            batcher.stop()

    app = FastAPI(title="genfast", summary="Image generation with dynamic batching", lifespan=lifespan)
    app.state.batchers = batchers
    app.add_middleware(_BodyLimit, limit=options.max_body_bytes)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return (resources.files("genfast") / "web" / "index.html").read_text()

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "models": len(batchers)}

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    def list_models() -> dict:
        """genfast's listing (`models`, `max_n`: the page reads them) and OpenAI's (`object`,
        `data`: its client's models.list() reads them), side by side."""
        return {"object": "list", "data": [openai_model(name) for name in batchers],
                "models": [describe(b) for b in batchers.values()], "max_n": options.max_n}

    @app.get("/v1/models/{name}", responses={404: {"description": "No such model here"}})
    def retrieve_model(name: str) -> dict:
        if name not in batchers:
            raise _OpenAIError(404, unknown_model(name), param="model", code="model_not_found")
        return openai_model(name)

    def openai_model(name: str) -> dict:
        return {"id": name, "object": "model", "created": started, "owned_by": "genfast"}

    def describe(batcher: Batcher) -> dict:
        sampler = batcher.plain
        return {"name": batcher.name, "family": sampler.info.get("family"), "dataset": sampler.info.get("dataset"),
                "classes": list(sampler.class_names), "text": sampler.takes_prompts,
                "image_shape": list(sampler.image_shape), "engine": batcher.sampler.info["engine"]}

    def unknown_model(name: str) -> str:
        return f"unknown model {_excerpt(name)}; this server has: {', '.join(batchers)}"

    @contextlib.contextmanager
    def counted(model: str):
        """The request in /metrics, by model and the status it was answered with."""
        status = 200
        try:
            yield
        except HTTPException as e:
            status = e.status_code
            raise
        except _OpenAIError as e:
            status = e.status
            raise
        except Exception:
            status = 500
            raise
        finally:
            metrics.requests.labels(model if model in batchers else "unknown", str(status)).inc()

    async def made(batcher: Batcher, client: Hashable, seed: int, n: int, condition: torch.Tensor | None,
                   arrived: float) -> tuple[torch.Tensor, dict]:
        """The images (uint8) and the headers that say their seed and the server's time."""
        try:
            pixels = await asyncio.wait_for(batcher.generate(client, seed, n, condition), options.timeout_s)
        except TimeoutError:
            raise HTTPException(504, f"no images within {options.timeout_s:g} s (--timeout); the server is "
                                     f"overloaded, retry later or ask for fewer") from None
        seconds = time.perf_counter() - arrived
        metrics.images.labels(batcher.name).inc(n)
        metrics.latency.labels(batcher.name).observe(seconds)
        return pixels, {"X-Genfast-Seed": str(seed), "X-Genfast-Server-Ms": f"{seconds * 1000:.1f}"}

    @app.post("/v1/generate", responses={200: {"content": {"image/png": {}, "application/zip": {}}},
                                         400: {"description": "The body is no JSON text (not UTF-8, or nested "
                                                              "too deeply)"},
                                         413: {"description": "The request body is over the server's limit"},
                                         429: {"description": "The model's queue is full; retry after a while"},
                                         504: {"description": "No images within the server's timeout"}})
    async def generate(body: GenerateRequest, request: Request) -> Response:
        arrived = time.perf_counter()
        with counted(body.model):
            batcher = batchers.get(body.model)
            if batcher is None:
                raise _invalid("model", unknown_model(body.model))
            if body.n > options.max_n:
                raise _invalid("n", f"at most {options.max_n} images a request (--max-n), got {_excerpt(body.n)}")
            seed = secrets.randbelow(MAX_SEED + 1) if body.seed is None else body.seed
            condition = await _condition(batcher.plain, body)
            pixels, headers = await made(batcher, _client(request, body.user), seed, body.n, condition, arrived)
            return await asyncio.to_thread(_encode, pixels, body, batcher.plain, seed, headers, condition)

    async def _condition(sampler: Sampler, body: GenerateRequest) -> torch.Tensor | None:
        if body.prompt is not None:
            if body.class_ is not None:
                raise _invalid("prompt", "give a class or a prompt, not both")
            if not sampler.takes_prompts:
                raise _invalid("prompt", f"model '{body.model}' takes classes, not prompts")
            return (await prompt_embedding(sampler, body.prompt)).expand(body.n, -1)
        try:
            return sampler.labels(body.n, body.class_)
        except GenfastError as e:
            raise _invalid("class", str(e)) from None

    async def prompt_embedding(sampler: Sampler, prompt: str) -> torch.Tensor:
        """The (1, D) condition row of a prompt, kept for the 1024 most recent."""
        if prompt not in prompts:  # MiniLM: tens of ms, off the event loop
            prompts[prompt] = await asyncio.to_thread(sampler.prompt_condition, prompt, 1)
            while len(prompts) > 1024:
                prompts.popitem(last=False)
        prompts.move_to_end(prompt)
        return prompts[prompt]

    @app.post(OPENAI_IMAGES, responses={400: {"description": "A field this server cannot honour, or no JSON"},
                                        404: {"description": "No such model here"},
                                        413: {"description": "The request body is over the server's limit"},
                                        429: {"description": "The model's queue is full; retry after a while"},
                                        504: {"description": "No images within the server's timeout"}})
    async def images_generations(body: ImagesRequest, request: Request) -> JSONResponse:
        """The OpenAI Images API: `{"created", "data": [{"b64_json"}, ...]}`, one PNG per
        image, plus `seed` (image i is image i of that seed, as `genfast sample` makes it)."""
        arrived = time.perf_counter()
        name = body.model if body.model is not None else next(iter(batchers)) if len(batchers) == 1 else None
        with counted(name or "unknown"):
            if name is None:
                raise _OpenAIError(400, f"name a model: this server has {', '.join(batchers)}", param="model")
            batcher = batchers.get(name)
            if batcher is None:
                raise _OpenAIError(404, unknown_model(name), param="model", code="model_not_found")
            n = 1 if body.n is None else body.n
            if n > options.max_n:
                raise _OpenAIError(400, f"at most {options.max_n} images a request (--max-n), got {n}", param="n")
            _, height, width = batcher.plain.image_shape
            if body.size not in (None, "auto", f"{width}x{height}"):
                raise _OpenAIError(400, f"model '{name}' makes {width}x{height} images; ask for size "
                                        f"'{width}x{height}' (or leave size out), not {_excerpt(body.size)}",
                                   param="size")
            if body.response_format not in (None, "b64_json"):
                raise _OpenAIError(400, f"response_format {_excerpt(body.response_format)} is not served: this "
                                        f"server sends the images in its answer; use response_format 'b64_json'",
                                   param="response_format")
            seed = secrets.randbelow(MAX_SEED + 1) if body.seed is None else body.seed
            try:
                condition = await prompt_condition(batcher.plain, name, body.prompt, n)
                pixels, headers = await made(batcher, _client(request, body.user), seed, n, condition, arrived)
            except HTTPException as e:
                raise _OpenAIError.of(e) from None
            encoded = await asyncio.to_thread(_base64_pngs, pixels)
            return JSONResponse({"created": int(time.time()), "data": [{"b64_json": png} for png in encoded],
                                 "seed": seed}, headers=headers)

    async def prompt_condition(sampler: Sampler, name: str, prompt: str, n: int) -> torch.Tensor | None:
        """What the prompt asks of this model: a text model draws it; a class-conditional one
        draws the class it names; an unconditional one has nothing to ask."""
        if sampler.takes_prompts:
            return (await prompt_embedding(sampler, prompt)).expand(n, -1)
        if not sampler.conditional:
            return None
        try:
            return sampler.labels(n, sampler.class_index(prompt))
        except GenfastError as e:
            raise _OpenAIError(400, f"model '{name}' draws the class its prompt names: {e}", param="prompt") from None

    @app.exception_handler(_OpenAIError)
    async def openai_error(request: Request, error: _OpenAIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(GenfastError)
    async def genfast_error(request: Request, error: GenfastError) -> JSONResponse:
        if request.url.path == OPENAI_IMAGES:
            return _OpenAIError(400, str(error)).response()
        return JSONResponse({"detail": str(error)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, error: RequestValidationError) -> JSONResponse:
        """FastAPI's own handler echoes each field's input whole: the body once more, and a
        500 when it cannot be encoded (1e400 is inf, "\\ud800" a lone surrogate)."""
        errors = error.errors()
        detail = [{"loc": [part if isinstance(part, int) else _excerpt(part, plain=True) for part in e["loc"]],
                   "msg": _excerpt(e["msg"] + (f": {e['ctx']['error']}" if e["type"] == "json_invalid" else ""),
                                   plain=True, limit=200),
                   "type": e["type"], "input": _excerpt(e.get("input"))} for e in errors[:_ERRORS_SHOWN]]
        if request.url.path == OPENAI_IMAGES:
            return _openai_malformed(request, detail[0], len(errors)).response()
        if len(errors) > _ERRORS_SHOWN:  # a body of thousands of unknown keys
            detail.append({"loc": ["body"], "msg": f"and {len(errors) - _ERRORS_SHOWN} more errors",
                           "type": "value_error"})
        return JSONResponse({"detail": detail}, status_code=422)

    return app


def _client(request: Request, user: str | None) -> Hashable:
    """Who a request is from, the unit of fairness: the user it names, else its connection
    (an HTTP/1.1 connection has one request in flight at a time)."""
    return ("user", user) if user is not None else ("connection", request.client)


def _openai_malformed(request: Request, first: dict, count: int) -> _OpenAIError:
    """A body the OpenAI route cannot read, as one 400: its first error, and how many more."""
    content_type = request.headers.get("content-type", "")
    if first["loc"] == ["body"] and first["type"] in ("model_attributes_type", "dict_type") \
            and "json" not in content_type:
        message = f"send the body as JSON (Content-Type: application/json), not {_excerpt(content_type or 'none')}"
        return _OpenAIError(400, message)
    where = first["loc"][1:] if first["loc"][:1] == ["body"] else first["loc"]
    if first["type"] == "json_invalid":  # its place is a character's position, not a field
        return _OpenAIError(400, f"{first['msg']} at character {where[0]}")
    param = where[-1] if where and isinstance(where[-1], str) else None
    message = f"{'.'.join(map(str, where)) or 'body'}: {first['msg']}" + \
        (f" (and {count - 1} more errors)" if count > 1 else "")
    return _OpenAIError(400, message, param=param)


_ERRORS_SHOWN = 10
_short = reprlib.Repr()  # bounded work as well as bounded text, however large the input
_short.maxstring = _short.maxother = _short.maxlong = 80


def _excerpt(value, plain: bool = False, limit: int = 80) -> str:
    """At most `limit` characters of `value` that always encode: its repr (which escapes lone
    surrogates and control characters), or, `plain`, the text itself where it is printable."""
    text = value if plain and isinstance(value, str) and value[:limit + 1].isprintable() else _short.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class _BodyLimit:
    """An ASGI middleware: a request body over `limit` bytes is a 413, known from its
    Content-Length when it has one and counted as it arrives otherwise (chunked); the body
    is read here, at most the limit and one chunk of it, and handed on whole."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdecimal() and int(declared) > self.limit:
            return await self._too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._too_large(scope, receive, send)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:  # after the body, what the server says next (a disconnect)
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send) -> None:
        message = f"the request body is over this server's limit of {self.limit} bytes"
        response = _OpenAIError(413, message).response() if scope["path"] == OPENAI_IMAGES else \
            JSONResponse({"detail": message}, status_code=413)
        await response(scope, receive, send)


def _invalid(field_name: str, message: str) -> HTTPException:
    """A 422 in FastAPI's own shape: which field, and what is wrong with it."""
    return HTTPException(422, [{"loc": ["body", field_name], "msg": message, "type": "value_error"}])


def _encode(pixels: torch.Tensor, body: GenerateRequest, sampler: Sampler, seed: int, headers: dict,
            condition: torch.Tensor | None) -> Response:
    """uint8 images as a PNG grid, an .npz (images, labels) or JSON of base64 PNGs."""
    if body.format == "png":
        nrow = sampler.num_classes if (body.class_ is None and body.prompt is None and sampler.conditional
                                       and body.n % sampler.num_classes == 0) else None
        return Response(images.png_bytes(images.make_grid(pixels, nrow)), media_type="image/png", headers=headers)
    if body.format == "npz":
        labels = condition if condition is not None and not condition.is_floating_point() else torch.empty(0)
        buffer = io.BytesIO()
        np.savez(buffer, images=pixels.numpy(), labels=labels.numpy())
        return Response(buffer.getvalue(), media_type="application/zip", headers=headers)
    return JSONResponse({"model": body.model, "seed": seed, "n": body.n,
                         "server_ms": float(headers["X-Genfast-Server-Ms"]), "images": _base64_pngs(pixels)},
                        headers=headers)


def _with_engine(key: str, plain: Sampler, options: ServeOptions, settings: dict) -> Sampler:
    """A model through the server's engine; auto decides for passes of max_batch images, without end."""
    if options.engine != "auto":
        return engines.apply(plain, options.engine)
    fast, choice = auto.resolve(plain, options.max_batch, engines.apply, settings=settings)
    print(f"{key}: {choice.line()}", file=sys.stderr, flush=True)
    return fast


def _base64_pngs(pixels: torch.Tensor) -> list[str]:
    """uint8 (N, C, H, W) -> one base64 PNG per image, the bytes `genfast sample` writes
    into a folder (images.png_bytes either way)."""
    return [base64.b64encode(images.png_bytes(image)).decode() for image in pixels.permute(0, 2, 3, 1).numpy()]


def serve(models: list[str], options: ServeOptions, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    if not 1 <= port <= 65535:
        raise GenfastError(f"--port must be in 1..65535, got {port}")
    if options.threads is not None:  # before the models load: auto decides with the threads the passes get
        torch.set_num_threads(options.threads)
    # The socket is bound here, not by uvicorn, which logs a refused bind and exits: a port in
    # use is one line, and the socket that serves is the one that was checked (no race). It is
    # bound first, so that a port in use is said at once, not after the models load and auto decides.
    with _listen(host, port) as listening:
        app = create_app(models, options)
        print(f"serving {', '.join(model_key(m) for m in models)} on http://{host}:{port}/ "
              f"(engine {options.engine}, batches of up to {options.max_batch} images, "
              f"{'waiting ' + format(options.max_wait_ms, 'g') + ' ms' if options.batching else 'batching off'})",
              flush=True)
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        # uvicorn raises the Ctrl-C it caught again once it has shut down (uvicorn.run swallows it too).
        with contextlib.suppress(KeyboardInterrupt):
            server.run(sockets=[listening])


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, made as uvicorn makes its own (Config.bind_socket)."""
    # IPPROTO_TCP named, not left 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on
    # connections whose socket says TCP, and with it on, each answer waited ~40 ms for the
    # client's delayed ACK between its headers and its body (BENCHMARKS.md, issue 19).
    listening = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM,
                              socket.IPPROTO_TCP)
    try:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind((host, port))
        listening.listen()
    except OSError as e:  # in use, not permitted (below 1024), not this machine's address, no such host
        listening.close()
        raise GenfastError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return listening
