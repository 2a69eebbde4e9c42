"""`genfast serve`: an HTTP image-generation service with dynamic batching.

FastAPI on uvicorn. Models are loaded once, at start-up, under short names; a request
names one of those, never a file. Each model has a `Batcher`: requests that arrive
together are coalesced into one forward pass of up to `max_batch` images, waiting at
most `max_wait_ms` for company after the first; the result is split back to the
requests. A request larger than a batch is cut into chunks. The network runs on one
worker thread per model, off the event loop, so the server keeps accepting while it
computes. A request's images are those of `genfast sample` for the same seed: image i of
a seed has the same noise whatever batch it travels in (Sampler.noise), and the results
agree up to the rounding that depends on the batch size (a pixel may differ by one level;
an ar model may, rarely, sample a near-tie token the other way: BENCHMARKS.md).

Limits: `n` at most `max_n`; at most `max_queue` chunks waiting per model (then 429
with Retry-After); `timeout_s` per request (then 504); a body over `max_body_bytes`
is a 413, found out before more than that is read; a malformed field is a 422 that names
it, with at most a short, escaped excerpt of what was sent. /metrics serves Prometheus
counters of requests, images, batch sizes, queue depth and latency.
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
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
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

from genfast import engines, images, pretrained
from genfast.errors import GenfastError
from genfast.families.base import Sampler
from genfast.seeding import MAX_SEED


@dataclass
class ServeOptions:
    engine: str = "eager"
    device: str = "cpu"
    max_batch: int = 64        # images in one forward pass
    # How long the first request of a batch waits for others (0: batches are what queued during the last pass).
    max_wait_ms: float = 0.0
    batching: bool = True      # False: every chunk is its own forward pass (the baseline)
    max_n: int = 64            # images per request
    max_queue: int = 256       # chunks waiting per model before 429
    timeout_s: float = 30.0    # per request, then 504
    # The largest legitimate body, a 4000-character prompt written as JSON escapes (12 bytes
    # for a character outside the BMP), is under 50 KB.
    max_body_bytes: int = 64 * 1024


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


@dataclass
class _Chunk:
    """Up to max_batch images of one request, waiting for a forward pass."""
    noise: torch.Tensor
    condition: torch.Tensor | None  # class ids (long), prompt embeddings (float) or None
    done: asyncio.Future

    @property
    def kind(self) -> tuple:
        """Chunks batch together when their conditions stack into one tensor."""
        return (None,) if self.condition is None else (self.condition.dtype, *self.condition.shape[1:])


class _Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("genfast_requests", "Generate requests by model and HTTP status",
                                ["model", "status"], registry=self.registry)
        self.images = Counter("genfast_images", "Images generated", ["model"], registry=self.registry)
        self.batch_images = Histogram("genfast_batch_images", "Images per forward pass", ["model"],
                                      buckets=[2 ** k for k in range(11)], registry=self.registry)
        self.queue_depth = Gauge("genfast_queue_depth", "Chunks waiting for a forward pass", ["model"],
                                 registry=self.registry)
        self.latency = Histogram("genfast_request_seconds", "Time from a request's arrival to its images",
                                 ["model"], buckets=[.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30],
                                 registry=self.registry)


@dataclass
class Batcher:
    """The queue and the forward passes of one model."""

    name: str
    sampler: Sampler   # with the engine applied: what the forward passes run
    plain: Sampler     # as loaded: what the model is (text or not) and how prompts are encoded
    options: ServeOptions
    metrics: _Metrics
    queue: deque = field(default_factory=deque)
    _ready: asyncio.Event | None = None
    _task: asyncio.Task | None = None
    _worker: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1))

    def start(self) -> None:
        """The batching loop, on the running event loop (once per loop: a test client may
        bring a new one)."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.get_loop() is not loop or self._task.done():
            self._ready = asyncio.Event()
            self._task = loop.create_task(self._loop())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._worker.shutdown(wait=False, cancel_futures=True)
        # A fresh executor (its thread starts with its first pass): an app whose lifespan ended
        # may be served again, as a test client that starts and ends one per test does.
        self._worker = ThreadPoolExecutor(1)

    async def generate(self, noise: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        """Images for these rows of noise (and conditions), in order."""
        self.start()
        step = self.options.max_batch
        loop = asyncio.get_running_loop()
        chunks = [_Chunk(noise[i:i + step], None if condition is None else condition[i:i + step],
                         loop.create_future()) for i in range(0, len(noise), step)]
        if len(chunks) > self.options.max_queue:
            raise _invalid("n", f"{len(noise)} images need {len(chunks)} passes of --max-batch "
                                f"{self.options.max_batch}, more than the queue holds (--max-queue "
                                f"{self.options.max_queue}); ask for fewer")
        if len(self.queue) + len(chunks) > self.options.max_queue:
            raise HTTPException(429, f"the queue of {self.name} is full; retry shortly",
                                headers={"Retry-After": "1"})
        self.queue.extend(chunks)
        self.metrics.queue_depth.labels(self.name).set(len(self.queue))
        self._ready.set()
        try:
            parts = await asyncio.gather(*(c.done for c in chunks), return_exceptions=True)
        finally:
            for chunk in chunks:  # a request that timed out: its chunks are skipped
                chunk.done.cancel()
        for part in parts:  # every chunk's outcome is collected; the first failure is the request's
            if isinstance(part, BaseException):
                raise part
        return torch.cat(parts)

    def _next_batch(self) -> list[_Chunk]:
        """Queued chunks of one kind, in order, up to max_batch images (at least one chunk)."""
        batch = [self.queue.popleft()]
        size = len(batch[0].noise)
        while self.options.batching and self.queue and self.queue[0].kind == batch[0].kind \
                and size + len(self.queue[0].noise) <= self.options.max_batch:
            size += len(self.queue[0].noise)
            batch.append(self.queue.popleft())
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self.queue:
                if self.options.batching and self.options.max_wait_ms > 0:
                    # Company for the first chunk: wait until the batch is full or the time is up.
                    deadline = loop.time() + self.options.max_wait_ms / 1000
                    while sum(len(c.noise) for c in self.queue) < self.options.max_batch and loop.time() < deadline:
                        self._ready.clear()
                        try:
                            await asyncio.wait_for(self._ready.wait(), deadline - loop.time())
                        except TimeoutError:
                            break
                batch = [c for c in self._next_batch() if not c.done.done()]
                self.metrics.queue_depth.labels(self.name).set(len(self.queue))
                if not batch:
                    continue
                try:
                    pixels = await loop.run_in_executor(self._worker, self._forward, batch)
                except Exception as e:  # noqa: BLE001 - the requests get the error, the loop goes on
                    for chunk in batch:
                        if not chunk.done.done():
                            chunk.done.set_exception(e)
                    continue
                self.metrics.batch_images.labels(self.name).observe(len(pixels))
                for chunk, part in zip(batch, pixels.split([len(c.noise) for c in batch])):
                    if not chunk.done.done():
                        chunk.done.set_result(part)

    def _forward(self, batch: list[_Chunk]) -> torch.Tensor:
        noise = torch.cat([c.noise for c in batch])
        condition = None if batch[0].condition is None else torch.cat([c.condition for c in batch])
        return self.sampler(noise, condition).float().cpu()


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
                        ("--max-queue", options.max_queue), ("max_body_bytes", options.max_body_bytes)):
        if value < 1:
            raise GenfastError(f"{name} must be at least 1, got {value}")
    if not options.timeout_s > 0:  # written so, NaN fails too
        raise GenfastError(f"--timeout must be more than 0 seconds, got {options.timeout_s:g}")
    if not 0 <= options.max_wait_ms < math.inf:
        raise GenfastError(f"--max-wait-ms must be a finite number of milliseconds from 0 up, "
                           f"got {options.max_wait_ms:g}")


def create_app(models: list[str], options: ServeOptions | None = None) -> FastAPI:
    """The service for these models (shipped names or checkpoint paths), loaded now."""
    options = options or ServeOptions()
    _check_options(options)
    metrics = _Metrics()
    batchers: dict[str, Batcher] = {}
    for model in models:
        key = model_key(model)
        if key in batchers:
            raise GenfastError(f"two models would be served as '{key}'; serve one of them, or rename a run folder")
        plain = pretrained.load(model, device=options.device)
        batchers[key] = Batcher(key, engines.apply(plain, options.engine), plain, options, metrics)
    prompts: OrderedDict[str, torch.Tensor] = OrderedDict()  # the embeddings of recent prompts

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        for batcher in batchers.values():  # the batching loops end with the server
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
        return {"models": [describe(b) for b in batchers.values()], "max_n": options.max_n}

    def describe(batcher: Batcher) -> dict:
        sampler = batcher.plain
        return {"name": batcher.name, "family": sampler.info.get("family"), "dataset": sampler.info.get("dataset"),
                "classes": list(sampler.class_names), "text": sampler.takes_prompts,
                "image_shape": list(sampler.image_shape), "engine": options.engine}

    @app.post("/v1/generate", responses={200: {"content": {"image/png": {}, "application/zip": {}}},
                                         400: {"description": "The body is no JSON text (not UTF-8, or nested "
                                                              "too deeply)"},
                                         413: {"description": "The request body is over the server's limit"},
                                         429: {"description": "The model's queue is full; retry after a while"},
                                         504: {"description": "No images within the server's timeout"}})
    async def generate(body: GenerateRequest) -> Response:
        arrived = time.perf_counter()
        status = 200
        try:
            batcher = batchers.get(body.model)
            if batcher is None:
                raise _invalid("model", f"unknown model {_excerpt(body.model)}; this server has: "
                                        f"{', '.join(batchers)}")
            if body.n > options.max_n:
                raise _invalid("n", f"at most {options.max_n} images a request (--max-n), got {_excerpt(body.n)}")
            seed = secrets.randbelow(MAX_SEED + 1) if body.seed is None else body.seed
            condition = await _condition(batcher.plain, body)
            noise = batcher.sampler.noise(body.n, seed)
            try:
                pixels = await asyncio.wait_for(batcher.generate(noise, condition), options.timeout_s)
            except TimeoutError:
                raise HTTPException(504, f"no images within {options.timeout_s:g} s (--timeout); the server is "
                                         f"overloaded, retry later or ask for fewer") from None
            milliseconds = (time.perf_counter() - arrived) * 1000
            metrics.images.labels(body.model).inc(body.n)
            metrics.latency.labels(body.model).observe(milliseconds / 1000)
            headers = {"X-Genfast-Seed": str(seed), "X-Genfast-Server-Ms": f"{milliseconds:.1f}"}
            return await asyncio.to_thread(_encode, pixels, body, batcher.sampler, seed, milliseconds, headers,
                                           condition)
        except HTTPException as e:
            status = e.status_code
            raise
        except Exception:
            status = 500
            raise
        finally:
            metrics.requests.labels(body.model if body.model in batchers else "unknown", str(status)).inc()

    async def _condition(sampler: Sampler, body: GenerateRequest) -> torch.Tensor | None:
        if body.prompt is not None:
            if body.class_ is not None:
                raise _invalid("prompt", "give a class or a prompt, not both")
            if not sampler.takes_prompts:
                raise _invalid("prompt", f"model '{body.model}' takes classes, not prompts")
            if body.prompt not in prompts:  # MiniLM: tens of ms, off the event loop
                prompts[body.prompt] = await asyncio.to_thread(sampler.prompt_condition, body.prompt, 1)
                while len(prompts) > 1024:
                    prompts.popitem(last=False)
            prompts.move_to_end(body.prompt)
            return prompts[body.prompt].expand(body.n, -1)
        try:
            return sampler.labels(body.n, body.class_)
        except GenfastError as e:
            raise _invalid("class", str(e)) from None

    @app.exception_handler(GenfastError)
    async def genfast_error(request: Request, error: GenfastError) -> JSONResponse:
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
        if len(errors) > _ERRORS_SHOWN:  # a body of thousands of unknown keys
            detail.append({"loc": ["body"], "msg": f"and {len(errors) - _ERRORS_SHOWN} more errors",
                           "type": "value_error"})
        return JSONResponse({"detail": detail}, status_code=422)

    return app


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
        response = JSONResponse({"detail": f"the request body is over this server's limit of {self.limit} bytes"},
                                status_code=413)
        await response(scope, receive, send)


def _invalid(field_name: str, message: str) -> HTTPException:
    """A 422 in FastAPI's own shape: which field, and what is wrong with it."""
    return HTTPException(422, [{"loc": ["body", field_name], "msg": message, "type": "value_error"}])


def _encode(pixels: torch.Tensor, body: GenerateRequest, sampler: Sampler, seed: int, milliseconds: float,
            headers: dict, condition: torch.Tensor | None) -> Response:
    """The images as a PNG grid, an .npz (uint8 images, labels) or JSON of base64 PNGs."""
    pixels = images.to_uint8(pixels)
    if body.format == "png":
        nrow = sampler.num_classes if (body.class_ is None and body.prompt is None and sampler.conditional
                                       and body.n % sampler.num_classes == 0) else None
        return Response(images.png_bytes(images.make_grid(pixels, nrow)), media_type="image/png", headers=headers)
    if body.format == "npz":
        labels = condition if condition is not None and not condition.is_floating_point() else torch.empty(0)
        buffer = io.BytesIO()
        np.savez(buffer, images=pixels.numpy(), labels=labels.numpy())
        return Response(buffer.getvalue(), media_type="application/zip", headers=headers)
    encoded = [base64.b64encode(images.png_bytes(image.permute(1, 2, 0).numpy())).decode() for image in pixels]
    return JSONResponse({"model": body.model, "seed": seed, "n": body.n, "server_ms": round(milliseconds, 1),
                         "images": encoded}, headers=headers)


def serve(models: list[str], options: ServeOptions, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    if not 1 <= port <= 65535:
        raise GenfastError(f"--port must be in 1..65535, got {port}")
    app = create_app(models, options)
    # The socket is bound here, not by uvicorn, which logs a refused bind and exits: a port in
    # use is one line, and the socket that serves is the one that was checked (no race).
    with _listen(host, port) as listening:
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
    listening = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind((host, port))
        listening.listen()
    except OSError as e:  # in use, not permitted (below 1024), not this machine's address, no such host
        listening.close()
        raise GenfastError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return listening
