"""Batched serving: concurrent requests decode together and each gets what it would get alone.

A real uvicorn server on a free port runs the `tiny-random` model. A forward pre-hook on the model
records the batch size of every decoding pass (and can slow each pass down, so that requests
overlap for sure and a long generation is still running when a test acts on it). The oracle for an
answer is vlmkit.generate run on the request's prompt alone; for the queue bound, OpenAI's error
shape and the HTTP status the server documents (503); for a disconnect, the server's own counters.
The Batcher is also driven directly (no HTTP) for what the API does not expose: a repetition
penalty, a cache that must grow, and Qwen2-VL's per-row M-RoPE offsets.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import torch
from PIL import Image
from test_serve import SHAPES, SHAPES_URL, Server, direct, request, user

from vlmkit.cli import build_parser
from vlmkit.config import LMConfig
from vlmkit.generate import generate
from vlmkit.image.load import load_image
from vlmkit.load import load_model
from vlmkit.sampling import GenerationConfig
from vlmkit.models.qwen2_vl import Qwen2VL, Qwen2VLConfig, Qwen2VLVisionConfig
from vlmkit.serve import Limits, create_app
from vlmkit.serve.batcher import CACHE_GROWTH, MAX_BATCH_SIZE, MAX_QUEUE, Batcher

MODEL = "tiny-random"


class Recorder:
    """Records the batch size of every decoding pass (a pass over a filled cache); sleeps `delay` s per pass."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.decode_sizes: list[int] = []
        self.delay = 0.0
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs) -> None:
        cache = kwargs.get("cache")
        if cache is not None and cache.length > 0:
            self.decode_sizes.append(kwargs["input_ids"].shape[0])
        time.sleep(self.delay)


def sharpen(model: torch.nn.Module) -> torch.nn.Module:
    """Redraw the LM's matrices at std 0.1: at the default small init a random model's greedy answers
    hardly depend on the prompt, which would hide rows of a batch being mixed up."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("lm.") and p.dim() == 2:
                p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def loaded():
    loaded = load_model(MODEL)
    sharpen(loaded.model)
    return loaded


def run_batcher(model, tokenizer, jobs: list[tuple[list[int], list | None, GenerationConfig]],
                max_batch_size: int) -> list:
    """The GenerationResult of each job, submitted to one Batcher 2 ms apart (so later ones join a running batch)."""
    async def main() -> list:
        batcher = Batcher(model, tokenizer, max_batch_size=max_batch_size, max_queue=len(jobs))

        async def one(i: int):
            await asyncio.sleep(0.002 * i)
            return await batcher.submit(*jobs[i]).complete()

        try:
            return await asyncio.gather(*(one(i) for i in range(len(jobs))))
        finally:
            batcher.stop()
    return asyncio.run(main())


def test_batcher_rows_equal_generate_alone_with_penalty_and_a_growing_cache(loaded):
    tok = loaded.tokenizer
    prompts = ["Hello there", "x", "What colour is the sky on a clear day?", "abc", "long " * 12]
    jobs = [(tok.encode(p), None, GenerationConfig(max_new_tokens=CACHE_GROWTH + 40 + 9 * i,
                                                   temperature=0.9 * (i % 2), seed=i,
                                                   repetition_penalty=1.3 if i < 3 else 1.0))
            for i, p in enumerate(prompts)]
    results = run_batcher(loaded.model, tok, jobs, max_batch_size=3)
    for (ids, _, cfg), got in zip(jobs, results):
        alone = generate(loaded.model, [ids], cfg, tokenizer=tok)
        assert (got.token_ids, got.texts, got.finish_reasons) == (alone.token_ids, alone.texts, alone.finish_reasons)
    assert max(len(r.token_ids[0]) for r in results) > CACHE_GROWTH  # the batch cache had to grow


def test_batcher_carries_qwen2_vl_rope_deltas():
    """Qwen2-VL's cache keeps per-row M-RoPE offsets (non-zero after an image); they must follow their rows."""
    lm = LMConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                  qkv_bias=True, rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]})
    vision = Qwen2VLVisionConfig(depth=2, embed_dim=32, num_heads=4, out_hidden_size=64)
    model = sharpen(Qwen2VL(Qwen2VLConfig(vision=vision, lm=lm, image_token_id=99)).eval())
    noise = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (56, 84, 3), dtype=torch.uint8, generator=noise).numpy()
    plans = model.plan_images([Image.fromarray(pixels)])  # 4 x 6 patches of 14 px, merged 2 x 2: 6 tokens
    assert plans[0].extra["image_grid_thw"] == (1, 4, 6)
    jobs = [([5, 6, 7, 8, 9, 10, 11], None, GenerationConfig(max_new_tokens=20)),
            ([1, 2] + [99] * 6 + [3], plans, GenerationConfig(max_new_tokens=24)),
            ([4, 3], None, GenerationConfig(max_new_tokens=16, temperature=1.0, seed=5))]
    results = run_batcher(model, None, jobs, max_batch_size=3)
    for ids, images, cfg in jobs:
        prefill = model.image_inputs(images) if images else None
        assert results.pop(0).token_ids == generate(model, [ids], cfg, prefill_inputs=prefill).token_ids


@pytest.fixture
def recorder(loaded) -> Iterator[Recorder]:
    r = Recorder(loaded.model)
    yield r
    r.handle.remove()


def serve(loaded, **options) -> Server:
    return Server(create_app(loaded, model_name=MODEL, limits=Limits(max_tokens=480), **options))


# Eight different requests: greedy and seeded sampling with different settings, stop strings,
# max_tokens, an image, prompts of different lengths (so rows are left-padded differently).
CASES = [
    ("What is here?", [SHAPES_URL], dict(max_tokens=30, temperature=0)),
    ("Say something.", [], dict(max_tokens=40, temperature=1.5, top_p=0.9, seed=7)),
    ("x", [], dict(max_tokens=25, temperature=0.8, seed=1)),
    ("A much longer prompt than the others, to pad the rest of the batch.", [], dict(max_tokens=35,
                                                                                     temperature=0)),
    ("Colours?", [SHAPES_URL], dict(max_tokens=20, temperature=1.0, top_p=0.5, seed=3)),
    ("Stop early", [], dict(max_tokens=40, temperature=1.2, seed=11, stop=[":", "@@"])),
    ("Count", [], dict(max_tokens=8, temperature=0)),
    ("Same seed, other settings", [], dict(max_tokens=30, temperature=0.7, top_p=0.95, seed=7)),
]


def expected(loaded, text: str, urls: list[str], settings: dict) -> tuple[str, str]:
    cfg = GenerationConfig(max_new_tokens=settings["max_tokens"], temperature=settings["temperature"],
                           top_p=settings.get("top_p", 1.0), seed=settings.get("seed"),
                           stop_strings=tuple(settings.get("stop", ())))
    _, answer, reason = direct(loaded, text, [load_image(SHAPES)] * len(urls), cfg)
    return answer, reason


def ask_all(client: openai.OpenAI, cases: list, stream_every_other: bool = True) -> list[tuple[str, str]]:
    """Send every case at once from its own thread; (text, finish reason) of each."""
    answers: list = [None] * len(cases)
    barrier = threading.Barrier(len(cases))

    def ask(i: int) -> None:
        text, urls, settings = cases[i]
        barrier.wait()
        if stream_every_other and i % 2:
            chunks = list(client.chat.completions.create(model=MODEL, messages=user(text, *urls), stream=True,
                                                         **settings))
            answers[i] = ("".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
                          [c.choices[0].finish_reason for c in chunks if c.choices][-1])
        else:
            choice = client.chat.completions.create(model=MODEL, messages=user(text, *urls), **settings).choices[0]
            answers[i] = (choice.message.content, choice.finish_reason)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return answers


def test_eight_concurrent_requests_equal_each_alone(loaded, recorder):
    recorder.delay = 0.01  # keep the first rows decoding while the others arrive
    s = serve(loaded)
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        answers = ask_all(client, CASES)
    finally:
        s.stop()
    alone = [expected(loaded, *case) for case in CASES]
    assert answers == alone
    assert len({text for text, _ in alone}) == len(CASES)  # a mix-up of rows could not go unseen
    assert {reason for _, reason in alone} == {"stop", "length"}
    assert max(recorder.decode_sizes) > 4  # the requests really shared forward passes


def test_max_batch_size_is_respected(loaded, recorder):
    recorder.delay = 0.005
    s = serve(loaded, max_batch_size=2)
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        answers = ask_all(client, CASES[:5])
    finally:
        s.stop()
    assert answers == [expected(loaded, *case) for case in CASES[:5]]
    assert max(recorder.decode_sizes) == 2


def wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def health(s: Server) -> dict:
    return request(s.url + "/health")[1]


def open_stream(s: Server, max_tokens: int, events: int, stream: bool = True) -> socket.socket:
    """A raw streaming request whose first `events` server-sent events have been read
    (with stream=False: a non-streaming request, nothing read)."""
    body = json.dumps({"model": MODEL, "messages": user("Tell me a long story."), "stream": stream,
                       "max_tokens": max_tokens, "temperature": 0}).encode()
    host, port = s.url.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)), timeout=10)
    conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    if not stream:
        return conn
    received = b""
    while received.count(b"data: ") < events:
        received += conn.recv(65536)
    assert received.startswith(b"HTTP/1.1 200")
    return conn


def test_client_that_disconnects_mid_stream_frees_its_row(loaded, recorder):
    recorder.delay = 0.02  # 400 tokens would take 8 s
    s = serve(loaded)
    try:
        conn = open_stream(s, max_tokens=400, events=4)
        assert health(s)["active_requests"] == 1
        passes = len(recorder.decode_sizes)
        conn.close()
        wait_for(lambda: health(s)["active_requests"] == 0, timeout=2)
        assert s.server.config.app.state.batcher.cancelled_requests == 1
        assert len(recorder.decode_sizes) - passes < 50  # the row left long before its 400 tokens
        start = time.monotonic()
        assert request(s.url + "/v1/chat/completions", {"model": MODEL, "messages": user("hi"),
                                                         "max_tokens": 5})[0] == 200
        assert time.monotonic() - start < 2
        # A non-streaming client that goes away frees its row too.
        conn = open_stream(s, max_tokens=400, events=0, stream=False)
        wait_for(lambda: health(s)["active_requests"] == 1, timeout=2)
        conn.close()
        wait_for(lambda: health(s)["active_requests"] == 0, timeout=2)
        assert s.server.config.app.state.batcher.cancelled_requests == 2
    finally:
        s.stop()


def test_full_queue_is_a_503_in_openai_shape_and_the_server_goes_on(loaded, recorder):
    recorder.delay = 0.02
    s = serve(loaded, max_batch_size=1, max_queue=1)
    try:
        running = open_stream(s, max_tokens=400, events=2)
        waiting = threading.Thread(target=request, args=(s.url + "/v1/chat/completions",
                                                         {"model": MODEL, "messages": user("w"), "max_tokens": 3}))
        waiting.start()
        wait_for(lambda: health(s)["queued_requests"] == 1)
        body = json.dumps({"model": MODEL, "messages": user("one too many"), "max_tokens": 3}).encode()
        status, headers, answer = urllib_request(s.url + "/v1/chat/completions", body)
        assert status == 503 and headers.get("Retry-After") == "1"
        assert set(answer["error"]) == {"message", "type", "param", "code"}
        assert answer["error"]["code"] == "server_overloaded" and answer["error"]["type"] == "server_error"
        assert "busy" in answer["error"]["message"]
        with pytest.raises(openai.InternalServerError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0).chat.completions.create(
                model=MODEL, messages=user("again"), max_tokens=3)
        running.close()  # frees the row: the waiting request runs, then new ones are taken again
        waiting.join(timeout=10)
        wait_for(lambda: (health(s)["active_requests"], health(s)["queued_requests"]) == (0, 0))
        assert request(s.url + "/v1/chat/completions", {"model": MODEL, "messages": user("ok"),
                                                         "max_tokens": 3})[0] == 200
    finally:
        s.stop()


def urllib_request(url: str, body: bytes) -> tuple[int, Any, dict]:
    """(status, headers, parsed JSON) of one POST, error statuses included."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def test_batch_flags():
    args = build_parser().parse_args(["serve", "--model", MODEL])
    assert (args.max_batch_size, args.max_queue) == (MAX_BATCH_SIZE, MAX_QUEUE)
    args = build_parser().parse_args(["serve", "--model", MODEL, "--max-batch-size", "4", "--max-queue", "0"])
    assert (args.max_batch_size, args.max_queue) == (4, 0)
