"""genfast serve's OpenAI-compatible Images API, through the official `openai` client as a
user's script calls it: the PNGs it brings back are, byte for byte, those `genfast sample`
writes for the same seed; each refusal is the client's own exception with our message.
Then what the client cannot send (malformed JSON, another content type), over plain HTTP."""

from __future__ import annotations

import base64
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="genfast serve needs the [serve] extra")
openai = pytest.importorskip("openai")
import uvicorn  # noqa: E402

from genfast import pretrained  # noqa: E402
from genfast.cli import main  # noqa: E402
from genfast.serve import ServeOptions, create_app, model_key  # noqa: E402

from test_serve import call  # noqa: E402

MAX_N = 8


@pytest.fixture(scope="module")
def models(tiny_gan, tiny_cgan, tiny_text_ar) -> dict[str, str]:
    """Served name -> checkpoint path: an unconditional, a class-conditional and a text model."""
    return {model_key(str(path)): str(path) for path in (tiny_gan, tiny_cgan, tiny_text_ar)}


@pytest.fixture(scope="module")
def client(models):
    """The official client of a server listening on a loopback port (no retries: a refusal
    is seen once, as it was answered)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(list(models.values()), ServeOptions(max_n=MAX_N)),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="not-checked", max_retries=0) as client:
        yield client
    server.should_exit = True
    thread.join(10)


def sampled(tmp_path, path: str, n: int, seed: int, *options: str) -> list[bytes]:
    """The PNG files `genfast sample` writes into a folder for this seed."""
    out = tmp_path / "sampled"
    assert main(["sample", path, "-n", str(n), "--seed", str(seed), "--out", str(out), "--quiet", *options]) == 0
    return [png.read_bytes() for png in sorted(out.glob("*.png"))]


def test_models_list_names_every_served_model(client, models):
    assert [model.id for model in client.models.list()] == list(models)
    assert client.models.retrieve(next(iter(models))).owned_by == "genfast"


@pytest.mark.parametrize("which, prompt, options", [
    (0, "ignored by a model without conditions", ()),
    (1, "class3", ("--class", "class3")),
    (2, "a small boot", ("--prompt", "a small boot")),
], ids=["unconditional", "class", "text"])
def test_the_client_gets_the_pngs_genfast_sample_writes(client, models, tmp_path, which, prompt, options):
    name, path = list(models.items())[which]
    response = client.images.generate(model=name, prompt=prompt, n=4, response_format="b64_json",
                                      extra_body={"seed": 11})
    assert response.seed == 11 and response.created > 0
    assert [base64.b64decode(image.b64_json) for image in response.data] == sampled(tmp_path, path, 4, 11, *options)


def test_without_a_seed_a_random_one_is_returned_and_reproduces(client, models, tmp_path):
    name, path = list(models.items())[1]
    raw = client.images.with_raw_response.generate(model=name, prompt="class0", n=2, response_format="b64_json")
    response = raw.parse()
    assert raw.headers["x-genfast-seed"] == str(response.seed)
    assert [base64.b64decode(image.b64_json) for image in response.data] == \
        sampled(tmp_path, path, 2, response.seed, "--class", "0")


def test_each_refusal_is_the_clients_own_exception_with_our_message(client, models):
    gan, cgan, _ = models
    classes = ", ".join(f"{i}={name}" for i, name in enumerate(pretrained.load(models[cgan]).class_names))
    _, height, width = pretrained.load(models[gan]).image_shape
    refusals = [
        (openai.NotFoundError, "model", dict(model="dall-e-3", prompt="a cat"),
         "unknown model 'dall-e-3'; this server has: " + ", ".join(models)),
        (openai.BadRequestError, "size", dict(model=gan, prompt="x", size="1024x1024"),
         f"model '{gan}' makes {width}x{height} images; ask for size '{width}x{height}' (or leave size out), "
         f"not '1024x1024'"),
        (openai.BadRequestError, "response_format", dict(model=gan, prompt="x", response_format="url"),
         "response_format 'url' is not served: this server sends the images in its answer; use response_format "
         "'b64_json'"),
        (openai.BadRequestError, "n", dict(model=gan, prompt="x", n=MAX_N + 1),
         f"at most {MAX_N} images a request (--max-n), got {MAX_N + 1}"),
        (openai.BadRequestError, "prompt", dict(model=cgan, prompt=""),
         f"model '{cgan}' draws the class its prompt names: unknown class ''; this model's classes: {classes}"),
        (openai.BadRequestError, "prompt", dict(model=cgan, prompt="a zebra"),
         f"model '{cgan}' draws the class its prompt names: unknown class 'a zebra'; this model's classes: "
         f"{classes}"),
        (openai.BadRequestError, "quality", dict(model=gan, prompt="x", quality="hd"),
         "quality: Extra inputs are not permitted"),
    ]
    for exception, param, arguments, message in refusals:
        with pytest.raises(exception) as refused:
            client.images.generate(**arguments)
        error = refused.value.body
        assert error == {"message": message, "type": "invalid_request_error", "param": param,
                         "code": "model_not_found" if exception is openai.NotFoundError else None}, arguments
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("dall-e-3")


@pytest.fixture(scope="module")
def app(models):
    return create_app(list(models.values()), ServeOptions(max_n=MAX_N, max_body_bytes=1000))


@pytest.mark.parametrize("body, headers, status, param, message", [
    (b'{"prompt": "x" "n": 2}', None, 400, None, "JSON decode error: Expecting ',' delimiter at character 15"),
    (b'{"model": "M", "prompt": "x"}', {"content-type": "text/plain"}, 400, None,
     "send the body as JSON (Content-Type: application/json), not 'text/plain'"),
    (b'{"model": "M", "prompt": "x"}', {"content-type": "application/x-www-form-urlencoded"}, 400, None,
     "send the body as JSON (Content-Type: application/json), not 'application/x-www-form-urlencoded'"),
    (b'{"model": "M"}', None, 400, "prompt", "prompt: Field required"),
    (b'{"model": "M", "prompt": "x", "n": 1e400}', None, 400, "n", "n: Input should be a valid integer"),
    (b'{"model": "M", "prompt": "x", "n": "2"}', None, 400, "n", "n: Input should be a valid integer"),
    (b'{"model": "M", "prompt": "\\ud800"}', None, 400, "prompt", None),
    (b'{"model": "M", "prompt": "' + b"x" * 2000 + b'"}', None, 413, None,
     "the request body is over this server's limit of 1000 bytes"),
    (b'[1, 2]', None, 400, None, "body: Input should be a valid dictionary or object to extract fields from"),
], ids=["malformed", "text-plain", "form", "no-prompt", "inf", "string-n", "surrogate", "too-large", "array"])
def test_what_the_client_cannot_send_is_one_short_error_never_a_500(app, models, body, headers, status, param,
                                                                    message):
    gan = next(iter(models))
    sent = body.replace(b'"M"', f'"{gan}"'.encode())
    response, = call(app, ("POST", "/v1/images/generations", sent) if headers is None else
                     ("POST", "/v1/images/generations", (sent, headers)))
    assert response.status_code == status and len(response.content) < 1000, response.content[:1000]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert message is None or error["message"] == message, error["message"]
