"""genfast serve: endpoints, dynamic batching that hands each request its own images,
the limits (422, 429, 504), and the web page in a real headless Chromium."""

from __future__ import annotations

import asyncio
import io
import shutil
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="genfast serve needs the [serve] extra")
import httpx  # noqa: E402

from genfast import images, pretrained
from genfast.families.base import Sampler
from genfast.serve import ServeOptions, create_app, model_key


def call(app, *requests: tuple[str, str, dict | None]) -> list[httpx.Response]:
    """Send the requests at the same time (one event loop, as a server would see them)."""
    async def send():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://genfast") as client:
            return await asyncio.gather(*(client.request(method, url, json=body) for method, url, body in requests))
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
