"""The server's edges (issue 14, section 5 and the server part of section 3), on real uvicorn servers
(free local ports, the `tiny-random` model) and once through `vlmkit serve` itself.

Hostile bodies get a 4xx, never a 500: JSON nested 100,000 deep, a 20 MB text (refused before it is
tokenized: the model's prompt builder is watched), a 5,000-character or NUL-holding image name. The
Host header guards against DNS rebinding (foreign names refused, localhost names, IP addresses and
--allowed-hosts accepted), a text/plain POST is a 415, /health tells a caller without the API key only
"ok". A request without `temperature` is greedy, like the CLI and the web page. One log line per request,
none with --quiet.

Oracles: the nesting depth and the character bound are counted by hand (tiny-random's longest
vocabulary entry is `<|im_start|>`, 12 characters); greedy is the answer to temperature 0.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_serve import KEY, MODEL, SHAPES, Server, user

from vlmkit.cli import build_parser
from vlmkit.load import LoadedModel, load_model
from vlmkit.serve import Limits, RequestError, create_app
from vlmkit.serve.guard import host_name, parse_allowed_hosts
from vlmkit.serve.requests import MAX_JSON_DEPTH, parse_json_body

LONGEST_TOKEN = len("<|im_start|>")  # tiny-random's CharTokenizer: its longest entry, a special token


class WatchedModel(LoadedModel):
    """tiny-random, counting the calls that tokenize a prompt."""

    tokenized = 0

    def prompt_ids(self, messages, plans=()):
        type(self).tokenized += 1
        return super().prompt_ids(messages, plans)


@pytest.fixture(scope="module")
def loaded() -> WatchedModel:
    plain = load_model(MODEL)
    return WatchedModel(plain.name, plain.model, plain.tokenizer, plain.chat_template)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    (root / "shapes.png").write_bytes(SHAPES.read_bytes())
    return root


@pytest.fixture(scope="module")
def server(loaded, image_root) -> Iterator[Server]:
    """Default limits (32 MB bodies, 8192 prompt tokens); an API key; local images under image_root."""
    log: list[str] = []
    s = Server(create_app(loaded, model_name=MODEL, api_key=KEY, allow_local_images_root=image_root,
                          request_log=log.append))
    s.log = log
    yield s
    s.stop()


@pytest.fixture(scope="module")
def small_server(loaded) -> Iterator[Server]:
    """max_prompt_tokens 40, so the character bound is 40 x 12 = 480; an extra allowed host name."""
    s = Server(create_app(loaded, model_name=MODEL, limits=Limits(max_prompt_tokens=40),
                          allowed_hosts=["myhost.lan"]))
    yield s
    s.stop()


def call(url: str, body: bytes | dict | None = None, *, key: str | None = KEY, host: str | None = None,
         content_type: str | None = "application/json") -> tuple[int, dict]:
    """(status, parsed JSON) of one request; host and content_type replace the usual headers (None: left out)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data)
    if content_type is not None:
        req.add_header("Content-Type", content_type)
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    if host is not None:
        req.add_header("Host", host)  # urllib then sends this one instead of its own
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            status, text = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read()
    return status, json.loads(text) if not text.startswith(b"data: ") else {"events": text.decode()}


def chat(s: Server, **fields) -> tuple[int, dict]:
    body = {"model": MODEL, "messages": user("Say something."), "max_tokens": 12, **fields}
    return call(s.url + "/v1/chat/completions", body)


def nested(levels: int) -> str:
    return "[" * levels + "]" * levels


# ----------------------------------------------------------------------------- nested JSON


def test_json_nested_100000_deep_is_a_400_and_the_server_goes_on(server):
    raw = ('{"model": "tiny-random", "messages": ' + nested(100_000) + "}").encode()
    status, answer = call(server.url + "/v1/chat/completions", raw)
    assert status == 400, answer
    assert f"more than {MAX_JSON_DEPTH} deep" in answer["error"]["message"]
    assert chat(server)[0] == 200


def test_depth_limit_is_exactly_32_and_brackets_in_text_do_not_count(server):
    # The body object is level 1, so an extra field holding 31 nested arrays reaches 32 (unknown fields are
    # ignored); 32 arrays reach 33.
    assert chat(server, extra=json.loads(nested(31)))[0] == 200
    status, answer = chat(server, extra=json.loads(nested(32)))
    assert status == 400 and "more than 32 deep" in answer["error"]["message"]
    # 100 brackets and escaped quotes inside strings are text, not nesting.
    text = 'say \\"' + "[{" * 50 + '\\" please'
    raw = ('{"model": "tiny-random", "max_tokens": 2, "messages": [{"role": "user", "content": "' + text + '"}]}')
    assert call(server.url + "/v1/chat/completions", raw.encode())[0] == 200


def test_parse_json_body_counts_depth():
    assert parse_json_body(nested(32).encode()) == json.loads(nested(32))
    assert parse_json_body(b'{"a": [1, {"b": [2]}]}', max_depth=4) == {"a": [1, {"b": [2]}]}
    with pytest.raises(RequestError, match="more than 3 deep"):
        parse_json_body(b'{"a": [1, {"b": [2]}]}', max_depth=3)
    with pytest.raises(RequestError, match="more than 32 deep"):
        parse_json_body(("[" * 100_000).encode())  # unbalanced, still refused for its depth
    with pytest.raises(RequestError, match="not valid JSON"):
        parse_json_body(b'{"a": ')


# ----------------------------------------------------------------------------- text bound


def test_20mb_text_is_refused_before_it_is_tokenized(server, loaded):
    before = type(loaded).tokenized
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 20_000_000}]}
    start = time.monotonic()
    status, answer = call(server.url + "/v1/chat/completions", json.dumps(body).encode())
    assert status == 400 and answer["error"]["code"] == "context_length_exceeded", answer
    assert "20000000 characters" in answer["error"]["message"]
    assert f"hold at most {8192 * LONGEST_TOKEN}" in answer["error"]["message"]  # 98304
    assert type(loaded).tokenized == before
    assert time.monotonic() - start < 10


def test_character_bound_refuses_no_text_that_could_fit(small_server, loaded):
    """At 480 characters (40 tokens x 12) the text is tokenized and the token limit answers; at 481 the
    character bound answers without tokenizing."""
    def ask(text: str) -> tuple[int, str]:
        status, answer = call(small_server.url + "/v1/chat/completions",
                              {"model": MODEL, "messages": [{"role": "user", "content": [
                                  {"type": "text", "text": text[:100]}, {"type": "text", "text": text[100:]}]}],
                               "max_tokens": 2})
        return status, answer.get("error", {}).get("message", "")

    before = type(loaded).tokenized
    assert ask("hi")[0] == 200
    status, message = ask("x" * 480)
    assert status == 400 and "the prompt has" in message and "limit of 40" in message
    assert type(loaded).tokenized == before + 2
    status, message = ask("x" * 481)
    assert status == 400 and "481 characters" in message and "hold at most 480" in message
    assert type(loaded).tokenized == before + 2


# ----------------------------------------------------------------------------- local image names


@pytest.mark.parametrize("name", ["a" * 5000, "a\x00b.png", "file:///tmp/%00.png", "x/" * 3000 + "a.png"],
                         ids=["5000 characters", "NUL byte", "file URL with %00", "6005-character path"])
def test_unusable_local_image_name_is_a_400(server, name):
    status, answer = chat(server, messages=user("x", name))
    assert status == 400, answer
    assert answer["error"]["code"] == "invalid_image"
    assert "is not a usable image path" in answer["error"]["message"]
    assert len(answer["error"]["message"]) < 600  # the name is shortened in the message
    assert chat(server, messages=user("x", "shapes.png"))[0] == 200


# ----------------------------------------------------------------------------- Host header


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io"])
def test_foreign_host_is_refused(server, host):
    for path in ("/health", "/", "/v1/models"):
        status, answer = call(server.url + path, host=host)
        assert status == 403 and answer["error"]["code"] == "host_not_allowed", (path, answer)
        assert "--allowed-hosts" in answer["error"]["message"]
    status, _ = call(server.url + "/v1/chat/completions", {"model": MODEL, "messages": user("x")}, host=host)
    assert status == 403


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:1234", "localhost.", "127.0.0.1:80", "[::1]:8000",
                                  "[::1]", "192.168.1.5", "10.0.0.2:8000"])
def test_localhost_names_and_ip_addresses_are_accepted(server, host):
    assert call(server.url + "/health", host=host)[0] == 200


def test_allowed_hosts_adds_names_and_star_allows_any(small_server, loaded):
    assert call(small_server.url + "/health", host="myhost.lan:8000")[0] == 200
    assert call(small_server.url + "/health", host="MyHost.Lan")[0] == 200
    assert call(small_server.url + "/health", host="other.lan")[0] == 403
    anyone = Server(create_app(loaded, model_name=MODEL, allowed_hosts=["*"]))
    try:
        assert call(anyone.url + "/health", host="evil.example")[0] == 200
    finally:
        anyone.stop()


def test_request_without_host_header_is_refused(server):
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        reply = b""
        while data := conn.recv(65536):
            reply += data
    assert reply.startswith(b"HTTP/1.1 400") and b"no Host header" in reply


def test_allowed_hosts_flag():
    assert parse_allowed_hosts("a.lan, B.Lan.,[::1],10.0.0.2") == ["a.lan", "b.lan", "::1", "10.0.0.2"]
    assert parse_allowed_hosts("*") == ["*"]
    for bad in ("http://a.lan", "a.lan:8000", " , "):
        with pytest.raises(ValueError, match="--allowed-hosts"):
            parse_allowed_hosts(bad)
    assert host_name("[::1]:8000") == "::1" and host_name("LocalHost.:80") == "localhost"
    args = build_parser().parse_args(["serve", "--model", MODEL, "--allowed-hosts", "a.lan,b.lan", "--quiet"])
    assert (args.allowed_hosts, args.quiet) == (["a.lan", "b.lan"], True)
    assert build_parser().parse_args(["serve", "--model", MODEL]).allowed_hosts == []


# ----------------------------------------------------------------------------- content type


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          None, "application/jsonp"])
def test_post_that_is_not_application_json_is_a_415(server, loaded, content_type):
    before = type(loaded).tokenized
    body = json.dumps({"model": MODEL, "messages": user("x"), "max_tokens": 2}).encode()
    status, answer = call(server.url + "/v1/chat/completions", body, content_type=content_type)
    assert status == 415 and answer["error"]["code"] == "unsupported_media_type", answer
    assert "Content-Type: application/json" in answer["error"]["message"]
    assert type(loaded).tokenized == before  # not processed
    status, _ = call(server.url + "/v1/chat/completions", body, content_type="Application/JSON; charset=utf-8")
    assert status == 200


# ----------------------------------------------------------------------------- /health and the key


def test_health_without_the_key_says_only_ok(server):
    for key in (None, "wrong"):
        assert call(server.url + "/health", key=key) == (200, {"status": "ok"})
    status, health = call(server.url + "/health", key=KEY)
    assert status == 200 and health["model"] == MODEL and "active_requests" in health and "image_cache" in health


# ----------------------------------------------------------------------------- default temperature


def test_omitted_temperature_is_greedy_in_the_api_the_cli_and_the_page(server):
    greedy = chat(server, temperature=0, max_tokens=24)[1]["choices"][0]["message"]["content"]
    for seed in (None, 1, 2):
        fields = {} if seed is None else {"seed": seed}
        assert chat(server, max_tokens=24, **fields)[1]["choices"][0]["message"]["content"] == greedy
    # The comparison can fail: sampling at temperature 1 (OpenAI's default) gives other answers.
    sampled = {chat(server, temperature=1, seed=s, max_tokens=24)[1]["choices"][0]["message"]["content"]
               for s in (1, 2)}
    assert greedy not in sampled
    assert build_parser().parse_args(["generate", "--model", MODEL, "--prompt", "x"]).temperature == 0
    with urllib.request.urlopen(server.url + "/", timeout=10) as page:
        html = page.read().decode()
    assert re.search(r'<input id="temperature"[^>]* value="0"', html)


# ----------------------------------------------------------------------------- request log


def wait_for_log(log: list[str], lines: int) -> None:
    """Wait until log has lines lines: a line is written after the response is sent."""
    deadline = time.monotonic() + 10
    while len(log) < lines:
        assert time.monotonic() < deadline, log
        time.sleep(0.01)


def test_one_log_line_per_request(server):
    # The earlier tests' last line may come in late: wait for a marker request's line, then start afresh.
    call(server.url + "/v1/models/marker")
    while not any(line.startswith("GET /v1/models/marker 404 ") for line in server.log):
        wait_for_log(server.log, len(server.log) + 1)
    server.log.clear()
    call(server.url + "/health")
    assert chat(server, stream=True)[1]["events"].endswith("data: [DONE]\n\n")
    call(server.url + "/health", host="evil.example")
    call(server.url + "/v1/chat/completions", b"{}", content_type="text/plain")
    wait_for_log(server.log, 4)
    assert [re.sub(r" \d+ ms$", " N ms", line) for line in server.log] == [
        "GET /health 200 N ms", "POST /v1/chat/completions 200 N ms", "GET /health 403 N ms",
        "POST /v1/chat/completions 415 N ms"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vlmkit_serve_logs_each_request_and_checks_hosts_unless_quiet():
    """The real command: --allowed-hosts reaches the guard; the log is on stderr, off with --quiet."""
    ports = [_free_port(), _free_port()]
    env = {name: value for name, value in os.environ.items() if name != "VLMKIT_API_KEY"}  # no key
    procs = [subprocess.Popen([sys.executable, "-m", "vlmkit.cli", "serve", "--model", MODEL, "--port", str(port),
                               "--allowed-hosts", "myhost.lan", *extra], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)
             for port, extra in zip(ports, ([], ["--quiet"]), strict=True)]
    try:
        for port, proc in zip(ports, procs, strict=True):
            url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
            while True:
                assert proc.poll() is None, proc.communicate()
                try:
                    if call(url + "/health", key=None)[0] == 200:
                        break
                except (urllib.error.URLError, ConnectionError):
                    assert time.monotonic() < deadline, "vlmkit serve did not start"
                    time.sleep(0.2)
            assert call(url + "/health", key=None, host="myhost.lan")[0] == 200
            assert call(url + "/health", key=None, host="evil.example")[0] == 403
    finally:
        for proc in procs:
            proc.terminate()
    (_, logged), (_, quiet) = (proc.communicate(timeout=30) for proc in procs)
    assert logged.count("GET /health 200 ") == 2 and len(re.findall(r"^GET /health 403 \d+ ms$", logged, re.MULTILINE)) == 1
    assert "GET /health" not in quiet and "Uvicorn running" in quiet
