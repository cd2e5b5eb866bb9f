"""The OpenAI-compatible server, run for real with uvicorn on a free local port and the `tiny-random` model.

The official `openai` client talks to it (streaming and not, with a base64 image); the oracle for the
answers is vlmkit.generate run directly on the same prompt, and for the usage counts the hand count of
the tiny model's image tokens. Bad requests each get a 4xx in OpenAI's error shape and the server keeps
answering.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import uvicorn
from PIL import Image

from vlmkit.cli import build_parser
from vlmkit.generate import generate
from vlmkit.image.load import load_image
from vlmkit.load import LoadedModel, load_model
from vlmkit.sampling import GenerationConfig
from vlmkit.serve import Limits, create_app

SHAPES = Path(__file__).resolve().parent.parent / "examples" / "shapes.png"
MODEL = "tiny-random"
KEY = "sk-test-key"


class Server:
    """A uvicorn server in a background thread on a free 127.0.0.1 port."""

    def __init__(self, app) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def request(url: str, body: bytes | str | dict | None = None, key: str | None = None,
            method: str | None = None) -> tuple[int, dict | str]:
    """(status, parsed JSON or raw text) of one HTTP request."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body.encode() if isinstance(body, str) else body
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


SHAPES_URL = "data:image/png;base64," + base64.b64encode(SHAPES.read_bytes()).decode()


@pytest.fixture(scope="module")
def loaded():
    return load_model(MODEL)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("serve")
    root = base / "root"
    root.mkdir()
    (root / "shapes.png").write_bytes(SHAPES.read_bytes())
    (base / "outside.png").write_bytes(SHAPES.read_bytes())
    (root / "link.png").symlink_to(base / "outside.png")
    return root


@pytest.fixture(scope="module")
def server(loaded, image_root) -> Iterator[Server]:
    limits = Limits(max_images=2, max_image_pixels=400 * 300, max_tokens=64, max_request_bytes=2_000_000)
    s = Server(create_app(loaded, model_name=MODEL, allow_local_images_root=image_root, limits=limits))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def keyed_server(loaded) -> Iterator[Server]:
    s = Server(create_app(loaded, model_name=MODEL, api_key=KEY))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def user(text: str, *urls: str) -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u}} for u in urls),
                                         {"type": "text", "text": text}]}]


def direct(loaded, text: str, images: list[Image.Image], cfg: GenerationConfig) -> tuple[list[int], str, str]:
    """(prompt ids, text, finish reason) from vlmkit.generate without the server: the oracle."""
    messages = [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": text}]}]
    plans = loaded.plan_images(images)
    ids = loaded.prompt_ids(messages, plans)
    result = generate(loaded.model, [ids], cfg, prefill_inputs=loaded.image_inputs(plans), tokenizer=loaded.tokenizer)
    return ids, result.texts[0], result.finish_reasons[0]


def test_health_and_models(server, client):
    status, health = request(server.url + "/health")
    assert status == 200 and set(health.pop("image_cache")) == {"max_bytes", "entries", "bytes", "hits", "misses",
                                                                "evictions"}  # test_serve_image_cache.py
    assert health == {"status": "ok", "model": MODEL, "dtype": "float32", "device": "cpu", "active_requests": 0,
                      "queued_requests": 0}
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "vlmkit"


def test_openai_client_with_image(loaded, client):
    response = client.chat.completions.create(model=MODEL, messages=user("What is here?", SHAPES_URL),
                                              max_tokens=20, temperature=0, seed=0)
    ids, text, reason = direct(loaded, "What is here?", [load_image(SHAPES)],
                               GenerationConfig(max_new_tokens=20, temperature=0, seed=0))
    assert response.choices[0].message.content == text
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].finish_reason == reason
    assert response.usage.prompt_tokens == len(ids)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    # Image tokens count as prompt tokens: the 32-px tower with 8-px patches gives (32 / 8)^2 = 16 tokens,
    # and the chatml template writes "<image>\n" (the placeholder, one newline character) before the text.
    text_only = client.chat.completions.create(model=MODEL, messages=user("What is here?"), max_tokens=1)
    assert response.usage.prompt_tokens - text_only.usage.prompt_tokens == 16 + 1


def test_openai_client_streaming(loaded, client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=user("Colours?", SHAPES_URL), max_tokens=24,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    _, text, reason = direct(loaded, "Colours?", [load_image(SHAPES)], GenerationConfig(max_new_tokens=24))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(deltas) == text and len([d for d in deltas if d]) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_sse_wire_format_ends_with_done(server):
    status, text = request(server.url + "/v1/chat/completions",
                           {"model": MODEL, "messages": user("hi"), "stream": True, "max_tokens": 5})
    assert status == 200
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_sampling_settings(loaded, client):
    def ask(**settings):
        return client.chat.completions.create(model=MODEL, messages=user("Say something."), **settings)
    greedy = ask(max_tokens=30, temperature=0)
    full = greedy.choices[0].message.content
    # A stop string ends the text just before its first occurrence (finish "stop").
    stop = full[5]
    stopped = ask(max_tokens=30, temperature=0, stop=[stop, "\x0b\x0c"])
    assert stopped.choices[0].message.content == full[:full.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    # max_tokens caps the completion.
    short = ask(max_tokens=3, temperature=0)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    # A seed makes sampling repeatable; it matches vlmkit.generate with the same settings.
    a, b = (ask(max_tokens=20, temperature=1.5, top_p=0.9, seed=7).choices[0].message.content for _ in range(2))
    _, expected, _ = direct(loaded, "Say something.", [],
                            GenerationConfig(max_new_tokens=20, temperature=1.5, top_p=0.9, seed=7))
    assert a == b == expected


def test_local_image_inside_root(loaded, server, image_root):
    body = {"model": MODEL, "messages": user("Here?", "shapes.png"), "max_tokens": 8, "temperature": 0}
    status, answer = request(server.url + "/v1/chat/completions", body)
    assert status == 200
    assert answer["choices"][0]["message"]["content"] == direct(loaded, "Here?", [load_image(SHAPES)],
                                                                GenerationConfig(max_new_tokens=8))[1]
    body["messages"] = user("Here?", f"file://{image_root / 'shapes.png'}")
    assert request(server.url + "/v1/chat/completions", body)[0] == 200


def _truncated_png() -> str:
    data = SHAPES.read_bytes()
    return "data:image/png;base64," + base64.b64encode(data[:len(data) // 2]).decode()


BAD_REQUESTS = {
    "malformed JSON": ('{"model": "tiny-random", "messages": [', 400, "not valid JSON"),
    "body not an object": ("[1, 2]", 400, "JSON object"),
    "messages not a list": ({"model": MODEL, "messages": "hi"}, 400, "'messages' must be"),
    "content wrong type": ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "content must be"),
    "unknown role": ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "role must be"),
    "temperature a string": ({"model": MODEL, "messages": user("x"), "temperature": "hot"}, 400, "'temperature'"),
    "max_tokens over the limit": ({"model": MODEL, "messages": user("x"), "max_tokens": 65}, 400, "limit of 64"),
    "stream not a boolean": ({"model": MODEL, "messages": user("x"), "stream": "yes"}, 400, "'stream'"),
    "stop wrong type": ({"model": MODEL, "messages": user("x"), "stop": [1]}, 400, "'stop'"),
    "non-image data URL": ({"model": MODEL, "messages": user("x", "data:text/plain;base64,aGVsbG8=")}, 400,
                           "not an image type"),
    "truncated PNG": ({"model": MODEL, "messages": user("x", _truncated_png())}, 400, "truncated or corrupt"),
    "too many images": ({"model": MODEL, "messages": user("x", SHAPES_URL, SHAPES_URL, SHAPES_URL)}, 400,
                        "too many images"),
    "too many pixels": ({"model": MODEL, "messages": user("x", png_data_url(Image.new("RGB", (401, 300))))}, 400,
                        "exceeds the limit of 120000"),
    "path outside the root": ({"model": MODEL, "messages": user("x", "../outside.png")}, 403, "outside the directory"),
    "symlink out of the root": ({"model": MODEL, "messages": user("x", "link.png")}, 403, "outside the directory"),
    "http URL": ({"model": MODEL, "messages": user("x", "https://example.com/a.png")}, 400, "not fetched"),
    "unknown model": ({"model": "gpt-4o", "messages": user("x")}, 404, "does not exist"),
    "prompt over the context": ({"model": MODEL, "messages": user("x" * 480), "max_tokens": 64}, 400,
                                "context of 512 tokens"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_request_gets_4xx_and_server_goes_on(server, name):
    body, status, phrase = BAD_REQUESTS[name]
    got, answer = request(server.url + "/v1/chat/completions", body)
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert phrase in error["message"], error["message"]
    assert request(server.url + "/health")[0] == 200
    assert request(server.url + "/v1/chat/completions", {"model": MODEL, "messages": user("ok"),
                                                          "max_tokens": 2})[0] == 200


def test_body_over_the_byte_limit_refused_before_it_is_read(server):
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 2000001\r\n\r\n{")  # the limit is 2_000_000 bytes; 1 byte sent
        reply = b""
        while b"}}" not in reply and (data := conn.recv(65536)):
            reply += data
    head, _, body = reply.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 413")
    assert "larger than this server's limit of 2000000 bytes" in json.loads(body)["error"]["message"]
    assert request(server.url + "/health")[0] == 200


def test_local_paths_refused_without_root(keyed_server):
    body = {"model": MODEL, "messages": user("x", str(SHAPES))}
    status, answer = request(keyed_server.url + "/v1/chat/completions", body, key=KEY)
    assert status == 403 and "--allow-local-images" in answer["error"]["message"]


def test_api_key(keyed_server):
    url = keyed_server.url
    body = {"model": MODEL, "messages": user("hi"), "max_tokens": 2}
    for key in (None, "wrong"):
        status, answer = request(url + "/v1/chat/completions", body, key=key)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
        assert request(url + "/v1/models", key=key)[0] == 401
    assert request(url + "/health")[0] == 200
    assert request(url + "/v1/chat/completions", body, key=KEY)[0] == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0).models.list().data[0].id == MODEL


def test_unknown_route_is_openai_shaped_404(server):
    status, answer = request(server.url + "/v1/nothing")
    assert status == 404 and answer["error"]["type"] == "not_found_error"


class BrokenModel(LoadedModel):
    """A model whose prompt building has a bug (not a ValueError)."""

    def prompt_ids(self, messages, plans=()):
        raise RuntimeError("a bug")


def test_a_bug_is_a_500_in_openai_shape_and_the_server_goes_on(loaded):
    broken = BrokenModel(loaded.name, loaded.model, loaded.tokenizer, loaded.chat_template)
    s = Server(create_app(broken, model_name=MODEL))
    try:
        status, answer = request(s.url + "/v1/chat/completions", {"model": MODEL, "messages": user("x")})
        assert status == 500 and answer["error"]["type"] == "server_error"
        assert "RuntimeError" in answer["error"]["message"]
        assert request(s.url + "/health")[0] == 200
    finally:
        s.stop()


def test_serve_flags():
    args = build_parser().parse_args(["serve", "--model", MODEL])
    assert (args.host, args.port, args.allow_local_images) == ("127.0.0.1", 8000, None)
    assert args.max_images == Limits().max_images
