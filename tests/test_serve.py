"""genfast serve: endpoints, dynamic batching that hands each request its own images,
the limits (413, 422, 429, 504), hostile bodies answered short, settings and ports refused
in one line, and the web page in a real headless Chromium."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import os
import shutil
import signal
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="genfast serve needs the [serve] extra")
import httpx  # noqa: E402

from genfast import images, pretrained
from genfast.errors import GenfastError
from genfast.families.base import Sampler
from genfast.serve import ServeOptions, _listen, create_app, fair_shares, model_key, serve


def call(app, *requests: tuple[str, str, dict | bytes | tuple[bytes, dict] | None]) -> list[httpx.Response]:
    """Send the requests at the same time (one event loop, as a server would see them); a body
    of bytes is sent as it is, as JSON text (httpx's encoder refuses NaN and lone surrogates),
    or with the headers paired with it."""
    def sent(body):
        if isinstance(body, tuple):
            return {"content": body[0], "headers": body[1]}
        if isinstance(body, bytes):
            return {"content": body, "headers": {"content-type": "application/json"}}
        return {"json": body}

    async def send():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://genfast") as client:
            return await asyncio.gather(*(client.request(method, url, **sent(body)) for method, url, body in requests))
    return asyncio.run(send())


def offline(path, n: int, seed: int, class_index=None) -> np.ndarray:
    return images.to_uint8(pretrained.load(path).generate(n, seed=seed, class_index=class_index)).numpy()


def test_endpoints(tiny_gan, tiny_cgan):
    app = create_app([str(tiny_gan), str(tiny_cgan)])
    gan, cgan = model_key(str(tiny_gan)), model_key(str(tiny_cgan))
    health, listing, page = call(app, ("GET", "/healthz", None), ("GET", "/v1/models", None), ("GET", "/", None))
    assert health.json() == {"status": "ok", "models": 2}
    models = {m["name"]: m for m in listing.json()["models"]}
    assert models[gan]["classes"] == [] and len(models[cgan]["classes"]) == 10
    assert models[cgan]["image_shape"] == [1, 28, 28] and not models[cgan]["text"]
    assert page.headers["content-type"].startswith("text/html") and "/v1/generate" in page.text

    png, npz, js = call(app, ("POST", "/v1/generate", {"model": cgan, "n": 20, "seed": 4}),
                        ("POST", "/v1/generate", {"model": cgan, "n": 3, "seed": 4, "class": 2, "format": "npz"}),
                        ("POST", "/v1/generate", {"model": gan, "n": 2, "format": "json"}))
    grid = np.asarray(Image.open(io.BytesIO(png.content)))
    assert png.headers["content-type"] == "image/png" and grid.shape == (2 * 30 + 2, 10 * 30 + 2)
    assert png.headers["x-genfast-seed"] == "4" and float(png.headers["x-genfast-server-ms"]) > 0
    arrays = np.load(io.BytesIO(npz.content))
    assert np.array_equal(arrays["images"], offline(tiny_cgan, 3, 4, 2)) and arrays["labels"].tolist() == [2, 2, 2]
    body = js.json()  # no seed asked: a random one, returned, that gives the same images offline
    pixels = [np.asarray(Image.open(io.BytesIO(__import__("base64").b64decode(b)))) for b in body["images"]]
    assert np.array_equal(np.stack(pixels)[:, None], offline(tiny_gan, 2, body["seed"]))

    metrics = call(app, ("GET", "/metrics", None))[0].text
    assert f'genfast_requests_total{{model="{cgan}",status="200"}} 2.0' in metrics
    assert f'genfast_images_total{{model="{cgan}"}} 23.0' in metrics
    assert "genfast_queue_depth" in metrics and "genfast_request_seconds_bucket" in metrics


def test_concurrent_requests_share_batches_and_get_their_own_images(tiny_cgan):
    app = create_app([str(tiny_cgan)], ServeOptions(max_batch=32, max_wait_ms=200))
    key = model_key(str(tiny_cgan))
    asks = [{"model": key, "n": 1 + i % 8, "seed": 100 + i, "format": "npz"} | ({"class": i % 10} if i % 2 else {})
            for i in range(12)]
    responses = call(app, *(("POST", "/v1/generate", ask) for ask in asks))
    for ask, response in zip(asks, responses):
        assert response.status_code == 200
        got = np.load(io.BytesIO(response.content))["images"]
        assert np.array_equal(got, offline(tiny_cgan, ask["n"], ask["seed"], ask.get("class")))
    batches = app.state.batchers[key].metrics.batch_images.labels(key)
    total = sum(ask["n"] for ask in asks)
    assert batches._sum.get() == total
    passes = sum(bucket.get() for bucket in batches._buckets)
    assert passes < len(asks)  # coalesced: fewer forward passes than requests


def test_a_request_larger_than_a_batch_is_chunked(tiny_gan):
    app = create_app([str(tiny_gan)], ServeOptions(max_batch=8, max_n=64))
    key = model_key(str(tiny_gan))
    response, = call(app, ("POST", "/v1/generate", {"model": key, "n": 20, "seed": 9, "format": "npz"}))
    assert np.array_equal(np.load(io.BytesIO(response.content))["images"], offline(tiny_gan, 20, 9))
    batches = app.state.batchers[key].metrics.batch_images.labels(key)
    assert sum(bucket.get() for bucket in batches._buckets) == 3  # 8 + 8 + 4


@pytest.mark.parametrize("body, field", [
    ({"n": 1}, "model"),
    ({"model": "gan-cifar"}, "model"),
    ({"model": "M", "n": 0}, "n"),
    ({"model": "M", "n": 65}, "n"),
    ({"model": "M", "n": "many"}, "n"),
    ({"model": "M", "seed": -1}, "seed"),
    ({"model": "M", "seed": 2**32}, "seed"),
    ({"model": "M", "class": 10}, "class"),
    ({"model": "M", "class": "Sneakerz"}, "class"),
    ({"model": "M", "prompt": "a boot"}, "prompt"),
    ({"model": "M", "format": "gif"}, "format"),
    ({"model": "M", "path": "/etc/passwd"}, "path"),
])
def test_each_malformed_field_is_a_422_that_names_it(tiny_cgan, body, field):
    app = create_app([str(tiny_cgan)])
    body = {k: model_key(str(tiny_cgan)) if v == "M" else v for k, v in body.items()}
    response, = call(app, ("POST", "/v1/generate", body))
    assert response.status_code == 422
    assert any(detail["loc"][-1] in (field, f"{field}_") or detail["loc"][1] == field
               for detail in response.json()["detail"]), response.json()


SHORT = 1000  # bytes: an answer that says what is wrong, not one that repeats the request


@pytest.mark.parametrize("body, field", [
    (b'{"model": "M", "n": 1e400}', "n"),                       # inf, which JSON cannot write back
    (b'{"model": "M", "n": NaN}', "n"),
    (b'{"model": "M", "seed": -Infinity}', "seed"),
    (b'{"model": "M", "prompt": "\\ud800"}', "prompt"),         # a lone surrogate, which UTF-8 cannot write
    (b'{"model": "M", "\\udfff": 1}', "body"),                  # a key UTF-8 cannot write
    (b'{"model": "M", "class": "\\u00b2"}', "class"),           # "²".isdigit(), but int("²") fails
    (b'{"model": "M", "class": true}', "class"),                # once read as class 1
    (b'{"model": "M", "class": 2.0}', "class"),                 # once read as class 2
    (b'{"model": "M", "class": 1.5}', "class"),
    (b'{"model": "M", "n": true}', "n"),                        # once read as one image
    (b'{"model": "M", "n": "2"}', "n"),
    (b'{"model": "M", "n": 1' + b"0" * 4000 + b"}", "n"),       # once echoed in the message
    (b'{"model": "' + b"m" * 60_000 + b'"}', "model"),
    (b'{"model": "M", "pad": "' + b"x" * 60_000 + b'"}', "pad"),  # once echoed whole as the input
    (b'{"model": "M", "n": 2', "body"),                         # cut short: no JSON
])
def test_hostile_json_is_a_short_422_that_names_the_field(tiny_cgan, body, field):
    app = create_app([str(tiny_cgan)])
    response, = call(app, ("POST", "/v1/generate", body.replace(b'"M"', f'"{model_key(str(tiny_cgan))}"'.encode())))
    assert response.status_code == 422 and len(response.content) < SHORT, response.content[:SHORT]
    detail = response.json()["detail"]
    assert any(field in d["loc"] for d in detail), detail
    assert all(len(d.get("input", "")) <= 80 for d in detail)


def test_a_json_syntax_error_says_where_and_what(tiny_cgan):
    app = create_app([str(tiny_cgan)])
    response, = call(app, ("POST", "/v1/generate", b'{"model": "x" "n": 2}'))
    assert response.status_code == 422
    assert response.json()["detail"] == [{"loc": ["body", 14], "msg": "JSON decode error: Expecting ',' delimiter",
                                          "type": "json_invalid", "input": "{}"}]


def test_a_body_of_many_errors_is_answered_with_the_first_ten(tiny_cgan):
    app = create_app([str(tiny_cgan)])
    unknown = {f"k{i}": 0 for i in range(5000)}
    response, = call(app, ("POST", "/v1/generate", {"model": model_key(str(tiny_cgan))} | unknown))
    assert response.status_code == 422 and len(response.content) < 2 * SHORT
    detail = response.json()["detail"]
    assert [d["loc"] for d in detail[:10]] == [["body", f"k{i}"] for i in range(10)]
    assert detail[10:] == [{"loc": ["body"], "msg": "and 4990 more errors", "type": "value_error"}]


def test_a_lone_surrogate_never_reaches_the_tokenizer(tiny_text_ar):
    app = create_app([str(tiny_text_ar)])
    response, = call(app, ("POST", "/v1/generate",
                           f'{{"model": "{model_key(str(tiny_text_ar))}", "prompt": "a \\ud83d boot"}}'.encode()))
    assert response.status_code == 422 and len(response.content) < SHORT
    assert response.json()["detail"][0]["loc"] == ["body", "prompt"]


def test_a_body_over_the_limit_is_a_413_and_is_read_no_further(tiny_cgan):
    key = model_key(str(tiny_cgan))
    app = create_app([str(tiny_cgan)], ServeOptions(max_body_bytes=1000))
    exact = json.dumps({"model": key, "n": 2, "seed": 1, "format": "npz"}).encode().ljust(1000)
    fits, over = call(app, ("POST", "/v1/generate", exact), ("POST", "/v1/generate", exact + b" "))
    assert fits.status_code == 200
    assert over.status_code == 413 and len(over.content) < SHORT and "1000 bytes" in over.json()["detail"]

    sent = []

    async def chunks():  # no Content-Length: the body comes chunked, 100 kB if all of it were read
        for _ in range(1000):
            sent.append(100)
            yield b" " * 100

    async def chunked(length: str | None = None):
        headers = {"content-type": "application/json"} | ({"content-length": length} if length else {})
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://genfast") as client:
            return await client.post("/v1/generate", content=chunks(), headers=headers)

    response = asyncio.run(chunked())
    assert response.status_code == 413 and "content-length" not in response.request.headers
    assert sum(sent) <= 1100  # the limit and the chunk that crossed it
    sent.clear()
    response = asyncio.run(chunked("100000"))
    assert response.status_code == 413 and sent == []  # refused on its word, before a byte is read

    # The default admits the largest legitimate body: 4000 characters, each a 12-byte JSON escape.
    prompt = json.dumps({"model": key, "prompt": "\U0001f462" * 4000}).encode()
    assert len(prompt) > 48_000
    response, = call(create_app([str(tiny_cgan)]), ("POST", "/v1/generate", prompt))
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "prompt"]  # takes classes


def test_the_app_serves_again_after_its_lifespan_ended(tiny_gan):
    from starlette.testclient import TestClient

    app = create_app([str(tiny_gan)])
    with TestClient(app):  # starts and ends the lifespan, as schemathesis does for each test
        pass
    response, = call(app, ("POST", "/v1/generate", {"model": model_key(str(tiny_gan)), "n": 2, "format": "npz"}))
    assert response.status_code == 200


@pytest.mark.parametrize("options, message", [
    (dict(timeout_s=0), "--timeout must be more than 0 seconds, got 0"),
    (dict(timeout_s=math.nan), "--timeout must be more than 0 seconds, got nan"),
    (dict(max_wait_ms=-1), "--max-wait-ms must be a finite number of milliseconds from 0 up, got -1"),
    (dict(max_wait_ms=math.inf), "--max-wait-ms must be a finite number of milliseconds from 0 up, got inf"),
    (dict(max_batch=0), "--max-batch must be at least 1, got 0"),
    (dict(max_n=0), "--max-n must be at least 1, got 0"),
    (dict(max_queue=0), "--max-queue must be at least 1, got 0"),
    (dict(max_body_bytes=0), "max_body_bytes must be at least 1, got 0"),
    (dict(threads=0), "--threads must be at least 1, got 0"),
])
def test_settings_no_server_could_run_with_are_refused_in_one_line(options, message):
    with pytest.raises(GenfastError) as refused:
        create_app([], ServeOptions(**options))
    assert str(refused.value) == message


@pytest.fixture
def busy_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


@pytest.mark.parametrize("host, port, message", [
    ("127.0.0.1", -1, "--port must be in 1..65535, got -1"),
    ("127.0.0.1", 65536, "--port must be in 1..65535, got 65536"),
    ("127.0.0.1", "busy", "cannot listen on 127.0.0.1:{port}: Address already in use"),
    ("192.0.2.1", 8000, "cannot listen on 192.0.2.1:8000: Cannot assign requested address"),  # TEST-NET: not here
])
def test_a_port_serve_cannot_listen_on_is_one_line(tiny_gan, busy_port, capsys, host, port, message):
    from genfast.cli import main

    port = busy_port if port == "busy" else port
    assert main(["serve", str(tiny_gan), "--host", host, "--port", str(port)]) == 1
    assert capsys.readouterr().err == f"genfast: error: {message.format(port=port)}\n"


def test_serves_connections_with_nagles_algorithm_off():
    """Else each answer waits for the client's delayed ACK between its headers and its body
    (~40 ms a request on Linux): asyncio sets TCP_NODELAY only where the socket says TCP."""
    async def accepted_nodelay(listening: socket.socket) -> int:
        loop = asyncio.get_running_loop()
        connected = loop.create_future()

        class Accept(asyncio.Protocol):
            def connection_made(self, transport):
                connected.set_result(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP,
                                                                                  socket.TCP_NODELAY))

        server = await loop.create_server(Accept, sock=listening)  # as uvicorn serves the socket it is given
        _, writer = await asyncio.open_connection(*listening.getsockname())
        nodelay = await asyncio.wait_for(connected, 10)
        writer.close()
        server.close()
        return nodelay

    assert asyncio.run(accepted_nodelay(_listen("127.0.0.1", 0))) == 1


def test_serve_answers_on_its_port_and_ends_on_ctrl_c(tiny_gan, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    answers = {}

    def client():  # serve() holds the main thread, which is where uvicorn takes its signals
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # until serve() listens; then requests wait for uvicorn
                with contextlib.suppress(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port)):
                    break
                time.sleep(0.05)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
                answers["health"] = http.get("/healthz")
                answers["over"] = http.post("/v1/generate", content=b" " * 1001)
                answers["chunked"] = http.post("/v1/generate", content=iter([b" " * 100] * 100))
        finally:
            os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        serve([str(tiny_gan)], ServeOptions(max_body_bytes=1000), port=port)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C ended serve() with a KeyboardInterrupt, which the CLI shows as a traceback")
    thread.join(30)
    assert answers["health"].json() == {"status": "ok", "models": 1}
    assert answers["over"].status_code == 413 and answers["chunked"].status_code == 413
    assert f"on http://127.0.0.1:{port}/" in capsys.readouterr().out


def test_prompts_and_classes_of_a_text_model_batch_apart_and_match_offline(tiny_text_ar):
    app = create_app([str(tiny_text_ar)], ServeOptions(max_wait_ms=100))
    key = model_key(str(tiny_text_ar))
    asks = [{"model": key, "n": 3, "seed": 2, "prompt": "a small boot", "format": "npz"},
            {"model": key, "n": 2, "seed": 3, "class": 1, "format": "npz"},
            {"model": key, "n": 2, "seed": 4, "prompt": "", "format": "npz"}]
    responses = call(app, *(("POST", "/v1/generate", ask) for ask in asks))
    sampler = pretrained.load(tiny_text_ar)
    expected = [sampler.generate(3, seed=2, condition=sampler.prompt_condition("a small boot", 3)),
                sampler.generate(2, seed=3, class_index=1),
                sampler.generate(2, seed=4, condition=sampler.prompt_condition("", 2))]
    for response, images_of in zip(responses, expected):
        assert response.status_code == 200
        assert np.array_equal(np.load(io.BytesIO(response.content))["images"], images.to_uint8(images_of).numpy())
    both, = call(app, ("POST", "/v1/generate", {"model": key, "prompt": "a boot", "class": 1}))
    assert both.status_code == 422 and both.json()["detail"][0]["loc"] == ["body", "prompt"]


class Gate:
    """A sampler whose forward passes wait until the test opens the gate."""

    def __init__(self, sampler: Sampler):
        self.inner, self.open = sampler, threading.Event()

    def __call__(self, noise, labels=None):
        assert self.open.wait(30)
        return self.inner(noise, labels)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.slow
def test_a_full_queue_is_a_429_and_a_slow_request_a_504(tiny_gan):
    app = create_app([str(tiny_gan)], ServeOptions(max_batch=4, max_queue=2, timeout_s=2.0, max_wait_ms=0))
    key = model_key(str(tiny_gan))
    gate = app.state.batchers[key].sampler = Gate(app.state.batchers[key].sampler)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://genfast") as client:
            def post(n):
                return client.post("/v1/generate", json={"model": key, "n": n, "seed": 1, "format": "npz"})

            running = asyncio.create_task(post(2))   # taken into a forward pass, which waits at the gate
            await asyncio.sleep(1.0)
            queued = asyncio.create_task(post(8))    # two chunks fill the queue; its deadline is 1 s later
            await asyncio.sleep(0.2)
            refused = await post(2)                  # no room
            too_big = await post(12)                 # three chunks: more than the queue ever holds
            timed_out = await running                # the gate stays shut past the timeout
            gate.open.set()
            return refused, too_big, timed_out, await queued

    refused, too_big, timed_out, queued = asyncio.run(scenario())
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert too_big.status_code == 422 and too_big.json()["detail"][0]["loc"] == ["body", "n"]
    assert timed_out.status_code == 504 and "timeout" in timed_out.json()["detail"]
    assert queued.status_code == 200  # once the gate opened, within its own timeout
    assert np.array_equal(np.load(io.BytesIO(queued.content))["images"], offline(tiny_gan, 8, 1))
    response, = call(app, ("POST", "/v1/generate", {"model": key, "n": 2, "seed": 1, "format": "npz"}))
    assert response.status_code == 200  # the server recovers
    assert np.array_equal(np.load(io.BytesIO(response.content))["images"], offline(tiny_gan, 2, 1))


@pytest.mark.parametrize("demands, capacity, shares", [
    ([24, 1], 8, [7, 1]),               # the single image is in; the rest of the pass is the other's
    ([64, 64, 64], 10, [4, 3, 3]),      # equal parts, the odd image to the first in turn
    ([2, 100, 5], 64, [2, 57, 5]),      # what two need less of goes to the third
    ([3, 4], 64, [3, 4]),               # room for all
    ([1] * 10, 4, [1] * 4 + [0] * 6),   # more clients than images: the first in turn, the rest next pass
])
def test_fair_shares(demands, capacity, shares):
    assert fair_shares(demands, capacity) == shares


class PassGate:
    """A sampler that lets a forward pass through only when the test releases one, and
    records the number of images each pass was asked for."""

    def __init__(self, sampler: Sampler):
        self.inner, self.sizes, self.allowed = sampler, [], threading.Semaphore(0)

    def __call__(self, noise, labels=None):
        self.sizes.append(len(noise))
        assert self.allowed.acquire(timeout=30)
        return self.inner(noise, labels)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_client_queueing_large_requests_delays_another_clients_image_by_one_pass_at_most(tiny_gan):
    """The documented rule: a client with nothing else waiting gets its image into the pass
    after the one running when it arrived, however much another client has queued."""
    app = create_app([str(tiny_gan)], ServeOptions(max_batch=8, max_n=8))
    key = model_key(str(tiny_gan))
    batcher = app.state.batchers[key]
    gate = batcher.sampler = PassGate(batcher.sampler)

    async def until(condition) -> None:  # no timing assumed: each step waits for the state it needs
        while not condition():
            await asyncio.sleep(0.01)

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://genfast") as client:
            def post(user: str, n: int, seed: int) -> asyncio.Task:
                return asyncio.create_task(client.post("/v1/generate", json={
                    "model": key, "n": n, "seed": seed, "user": user, "format": "npz"}))

            large = [post("bulk", 8, 0)]
            await until(lambda: gate.sizes == [8])           # the first pass is held at the gate
            large += [post("bulk", 8, seed) for seed in (1, 2, 3)]
            await until(lambda: batcher.queued == 24)        # three passes' worth queued behind it
            single = post("single", 1, 99)
            await until(lambda: batcher.queued == 25)
            gate.allowed.release(2)                          # the running pass and the next one, no more
            answered = await asyncio.wait_for(single, 30)
            waiting = [not task.done() for task in large]
            gate.allowed.release(3)
            return answered, await asyncio.gather(*large), waiting

    answered, large, waiting = asyncio.run(scenario())
    assert np.array_equal(np.load(io.BytesIO(answered.content))["images"], offline(tiny_gan, 1, 99))
    assert waiting[-2:] == [True, True]                      # answered while two large requests still waited
    assert gate.sizes == [8, 8, 8, 8, 1]                     # pass 2: the single image and 7 of the next large
    for seed, response in enumerate(large):
        assert np.array_equal(np.load(io.BytesIO(response.content))["images"], offline(tiny_gan, 8, seed))


def test_a_request_that_timed_out_leaves_the_queue(tiny_gan):
    app = create_app([str(tiny_gan)], ServeOptions(max_batch=4, timeout_s=1.0))
    key = model_key(str(tiny_gan))
    batcher = app.state.batchers[key]
    gate = batcher.sampler = PassGate(batcher.sampler)

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://genfast") as client:
            def post(n: int) -> asyncio.Task:
                return asyncio.create_task(client.post("/v1/generate", json={"model": key, "n": n, "format": "npz"}))

            running = post(2)
            while gate.sizes != [2]:  # held at the gate
                await asyncio.sleep(0.01)
            queued = await post(8)    # two passes' worth behind it, until its timeout
            left = batcher.queued
            gate.allowed.release(10)
            return await running, queued, left

    running, queued, left = asyncio.run(scenario())
    assert running.status_code == queued.status_code == 504
    assert left == 0 and gate.sizes == [2]  # none of the timed-out request's images was made


CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.mark.slow
@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver (.ci/run "
                                                               "installs them)")
def test_the_page_generates_in_headless_chromium(tiny_cgan):
    import uvicorn
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app([str(tiny_cgan)]), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        while not server.started:
            time.sleep(0.05)
        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: len(Select(b.find_element(By.ID, "class")).options) == 11)
        Select(browser.find_element(By.ID, "class")).select_by_visible_text("class3")
        for field, value in (("n", "5"), ("seed", "7")):
            browser.find_element(By.ID, field).clear()
            browser.find_element(By.ID, field).send_keys(value)
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#images img")) == 5)
        status = browser.find_element(By.ID, "status").text
        assert "5 images" in status and "seed 7" in status and "ms on the server" in status
        # What the page shows is what the model makes for that seed and class.
        sources = [img.get_attribute("src") for img in browser.find_elements(By.CSS_SELECTOR, "#images img")]
        shown = np.stack([np.asarray(Image.open(io.BytesIO(__import__("base64").b64decode(src.split(",", 1)[1]))))
                          for src in sources])
        assert np.array_equal(shown[:, None], offline(tiny_cgan, 5, 7, 3))

        # The server's refusal is shown, field first (the browser itself stops n < 1 or n > max_n).
        browser.find_element(By.ID, "seed").clear()
        browser.find_element(By.ID, "seed").send_keys(str(2**32))
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda b: "error 422: seed:" in b.find_element(By.ID, "status").text)
    finally:
        browser.quit()
        server.should_exit = True
        thread.join(10)


def test_serve_refuses_unknown_or_clashing_models_in_one_line(tiny_gan, capsys):
    from genfast.cli import main

    assert main(["serve", "gan-cifar"]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["serve", str(tiny_gan), str(tiny_gan)]) == 1
    assert "two models would be served as" in capsys.readouterr().err


def test_an_ar_model_is_served_with_the_decode_and_engine_asked(tiny_ar, tiny_gan):
    """--decode and --cfg reach the models that take them (the GAN beside it ignores them),
    and the static decoder's step runs in ONNX Runtime: the images are kv's, offline."""
    app = create_app([str(tiny_ar), str(tiny_gan)], ServeOptions(engine="onnx", decode="static", cfg=2.0))
    ar = app.state.batchers[model_key(str(tiny_ar))]
    assert ar.sampler.module.decode == "static" and ar.sampler.module.options.cfg == 2.0
    response, = call(app, ("POST", "/v1/generate", {"model": model_key(str(tiny_ar)), "n": 3, "seed": 5,
                                                   "format": "npz"}))
    expected = images.to_uint8(pretrained.load(tiny_ar, decode="kv", cfg=2.0).generate(3, seed=5)).numpy()
    assert np.array_equal(np.load(io.BytesIO(response.content))["images"], expected)
    with pytest.raises(GenfastError, match="--decode apply to ar models, which decode token by token; none of"):
        create_app([str(tiny_gan)], ServeOptions(decode="static"))
