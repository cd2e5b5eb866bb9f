"""The OpenAI-compatible HTTP server: a FastAPI app over one loaded model, run by uvicorn.

    app = create_app(load_model("tiny-random"), model_name="tiny-random")
    run_server(app, host="127.0.0.1", port=8000)      # or: vlmkit serve --model tiny-random

    GET  /health               {"status": "ok", "model": ..., "dtype": "float32", "device": "cpu", "active_requests": n,
                                "queued_requests": n,
                                "image_cache": {"max_bytes", "entries", "bytes", "hits", "misses", "evictions"}}
                               (with an API key set, a request without it gets only {"status": "ok"})
    GET  /v1/models            OpenAI's model list (one model)
    GET  /v1/models/{id}
    POST /v1/chat/completions  OpenAI's chat completions: text and image_url parts, stream: true as
                               server-sent events ending with `data: [DONE]`, usage counts

Request checking lives in requests.py. Every refusal is a 4xx (or 503) JSON body in OpenAI's error shape; an
unexpected ValueError from the model side becomes a 400 (logged with its traceback), any other
exception a 500 whose traceback uvicorn logs. With `api_key`, the /v1 routes need
`Authorization: Bearer <api_key>` (401 otherwise). Before any route, guard.py checks the Host header
(DNS rebinding; `allowed_hosts` adds names), that a POST is `application/json` (415), and writes the
request log line. A request that gives no `temperature` is answered greedily (temperature 0).

Concurrency: requests are parsed and their images decoded concurrently in worker threads, then
handed to the Batcher (batcher.py): up to max_batch_size requests decode together in one forward
pass per step, joining and leaving between steps (continuous batching), each with its own settings
and seed, so an answer is the same as when its request runs alone. Requests admitted together are
prefilled together, up to prefill_batch in one forward pass with their images encoded in one
vision batch (`--prefill-batch`; 1 prefills each request alone; `--prefill-wait-ms` lets an idle
server wait for requests sent together, whose parsing spreads their arrivals). At most max_queue more wait for
a row; beyond that a request is refused with 503 (OpenAI's error shape, code "server_overloaded",
a Retry-After header): the server is overloaded, not the client over a quota (that would be 429).
A client that disconnects, streaming or not, frees its row or its queue place at the next step.

Images: a chat client resends the conversation's images every turn. The server keeps their encoded
rows in an LRU bounded by bytes (image_cache.py; image_cache_bytes, `--image-cache-mb`, 0 turns it
off), keyed by a hash of each image's plan, which the request thread computes. The prefill inputs
of a group of requests are then made by the batcher's worker thread at admission: the cached rows,
with the images the cache lacks (of every request of the group) encoded in one encode_images call,
passed to forward as image_embeds (plus the position inputs such as Qwen2-VL's image_grid_thw).
With the cache off, the group's plans become the scheme's pixel inputs (the model's image_inputs)
and forward encodes them. Answers are the same either way.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from vlmkit.generate import GenerationResult, _long_rope_threshold
from vlmkit.load import LoadedModel
from vlmkit.prompt import flat_plans
from vlmkit.sampling import GenerationConfig
from vlmkit.serve.batcher import (
    MAX_BATCH_SIZE,
    MAX_QUEUE,
    PREFILL_BATCH,
    Batcher,
    QueueFull,
    Ticket,
)
from vlmkit.serve.guard import Guard
from vlmkit.serve.image_cache import (
    IMAGE_CACHE_MB,
    MB,
    CachedImageEncoder,
    ImageFeatureCache,
    plan_key,
)
from vlmkit.serve.requests import (
    ERROR_TYPES,
    ChatRequest,
    Limits,
    RequestError,
    error_body,
    longest_token_chars,
    parse_chat_request,
    parse_json_body,
)
from vlmkit.serve.web import register_web_page

DEFAULT_HOST = "127.0.0.1"  # local only unless asked otherwise
DEFAULT_PORT = 8000

logger = logging.getLogger("vlmkit.serve")


@dataclass
class _Job:
    """A request ready to generate: prompt ids (image tokens expanded), its images in placeholder order as the
    batcher's images function takes them (plans, or (cache key, plan) pairs with the image cache on), settings."""

    ids: list[int]
    images: list[Any]
    config: GenerationConfig


class _Engine:
    """The loaded model behind the batcher: turns checked requests into prompts and queues them."""

    def __init__(self, loaded: LoadedModel, limits: Limits, max_batch_size: int, max_queue: int,
                 image_cache_bytes: int, prefill_batch: int, prefill_wait: float) -> None:
        self.loaded, self.limits = loaded, limits
        self.context_length = _context_length(loaded)
        # Text longer than this cannot fit in max_prompt_tokens (requests.py): refused before tokenizing.
        self.max_text_chars = limits.max_prompt_tokens * longest_token_chars(loaded.tokenizer)
        self.image_cache = ImageFeatureCache(image_cache_bytes)
        self.encoder = (CachedImageEncoder(loaded, self.image_cache)
                        if loaded.takes_images and self.image_cache.enabled else None)
        images = self.encoder.prefill if self.encoder is not None else None  # None: the model's image_inputs
        self.batcher = Batcher(loaded.model, loaded.tokenizer, max_batch_size, max_queue, prefill_batch, images,
                               prefill_wait)

    def prepare(self, chat: ChatRequest) -> _Job:
        """Plan the images and build the prompt ids; check the prompt-token limits; then the images for the
        batcher: the plans, or with the image cache on, each plan with its key for the batcher to look up."""
        try:
            plans = self.loaded.plan_images(chat.images)
            ids = self.loaded.prompt_ids(chat.messages, plans)  # placeholders show the plans in order
        except ValueError as e:
            raise RequestError(f"could not build the prompt: {e}", param="messages") from e
        if len(ids) > self.limits.max_prompt_tokens:
            raise RequestError(f"the prompt has {len(ids)} tokens (image tokens included), more than this "
                               f"server's limit of {self.limits.max_prompt_tokens}; send less text or fewer or "
                               "smaller images", param="messages", code="context_length_exceeded")
        wanted = len(ids) + chat.config.max_new_tokens
        if self.context_length is not None and wanted > self.context_length:
            raise RequestError(f"the prompt ({len(ids)} tokens) plus max_tokens ({chat.config.max_new_tokens}) "
                               f"is {wanted}, more than the context of {self.context_length} tokens this server "
                               "runs the model with; lower max_tokens or shorten the conversation", param="max_tokens",
                               code="context_length_exceeded")
        flat = flat_plans(plans)
        if self.encoder is None:
            return _Job(ids, flat, chat.config)
        return _Job(ids, [(plan_key(plan), plan) for plan in flat], chat.config)

    def submit(self, job: _Job) -> Ticket:
        """Queue the job for the batcher; a 503 when it is full."""
        try:
            return self.batcher.submit(job.ids, job.images, job.config)
        except QueueFull as e:
            raise RequestError(str(e), status=503, code="server_overloaded") from e


def create_app(loaded: LoadedModel, *, model_name: str | None = None, api_key: str | None = None,
               allow_local_images_root: str | Path | None = None, limits: Limits = Limits(),
               max_batch_size: int = MAX_BATCH_SIZE, max_queue: int = MAX_QUEUE,
               image_cache_bytes: int = IMAGE_CACHE_MB * MB, allowed_hosts: Iterable[str] = (),
               request_log: Callable[[str], None] | None = None, prefill_batch: int = PREFILL_BATCH,
               prefill_wait: float = 0.0) -> FastAPI:
    """The server app for loaded, answering as model_name (default: loaded.name).

    api_key: require `Authorization: Bearer <api_key>` on /v1 routes. allow_local_images_root: let
    image_url parts name local files, only inside this directory (symlinks resolved); None: data URLs only.
    max_batch_size: requests decoded together; max_queue: requests that may wait for a row (then 503).
    image_cache_bytes: bound of the encoded-image cache (image_cache.py); 0 turns it off.
    prefill_batch: requests admitted together that are prefilled in one forward pass (1: each alone);
    prefill_wait: seconds an idle server waits for that many requests before it prefills the ones it has.
    allowed_hosts: Host names accepted besides localhost names and IP addresses ("*": any; guard.py).
    request_log: called with one line per request (`POST /v1/chat/completions 200 153 ms`); None: no log.
    The batcher's worker thread starts with the first request and stops when the app shuts down.
    """
    model_name = model_name or loaded.name
    root = None
    if allow_local_images_root is not None:
        root = Path(allow_local_images_root).resolve()
        if not root.is_dir():
            raise ValueError(f"the local image root {allow_local_images_root} is not a directory; "
                             "give an existing folder")
    if api_key is not None and not api_key:
        raise ValueError("the API key is empty; give a non-empty key or none")
    engine = _Engine(loaded, limits, max_batch_size, max_queue, image_cache_bytes, prefill_batch, prefill_wait)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(engine.batcher.stop)

    app = FastAPI(title="vlmkit", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.batcher = engine.batcher
    app.add_middleware(Guard, allowed_hosts=list(allowed_hosts), request_log=request_log)
    app.state.image_cache = engine.image_cache

    @app.exception_handler(RequestError)
    async def _refused(request: Request, e: RequestError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 503 else None  # overloaded: try again shortly
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
        kind = ERROR_TYPES.get(e.status_code, "invalid_request_error")
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(ValueError)
    async def _bad_value(request: Request, e: ValueError) -> JSONResponse:
        logger.warning("request refused with a ValueError raised outside request checking", exc_info=e)
        return JSONResponse(error_body(str(e)), status_code=400)

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> JSONResponse:
        # Starlette re-raises after sending this response, so uvicorn logs the traceback.
        return JSONResponse(error_body(f"internal server error ({type(e).__name__}); see the server log",
                                       "server_error"), status_code=500)

    def has_key(request: Request) -> bool:
        if api_key is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())

    def check_key(request: Request) -> None:
        if not has_key(request):
            raise RequestError("missing or wrong API key: send the header 'Authorization: Bearer <key>' with the "
                               "key the server was started with", status=401, code="invalid_api_key")

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "vlmkit"}

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        if not has_key(request):  # alive, nothing more: the model and its load are for key holders
            return {"status": "ok"}
        return {"status": "ok", "model": model_name, "dtype": str(engine.loaded.dtype).removeprefix("torch."),
                "device": str(engine.loaded.device), "active_requests": engine.batcher.active,
                "queued_requests": engine.batcher.queued, "image_cache": engine.image_cache.stats()}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict[str, Any]:
        check_key(request)
        if model_id != model_name:
            raise RequestError(f"the model {model_id!r} does not exist; this server serves {model_name!r}",
                               status=404, param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        check_key(request)
        raw = await _read_body(request, limits.max_request_bytes)
        body = await run_in_threadpool(parse_json_body, raw)
        chat = await run_in_threadpool(parse_chat_request, body, model_name=model_name, limits=limits,
                                       local_images_root=root, max_text_chars=engine.max_text_chars)
        job = await run_in_threadpool(engine.prepare, chat)
        completion_id, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        ticket = engine.submit(job)
        if chat.stream:
            events = _events(request, ticket, job, completion_id, now, model_name, chat.include_usage)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.create_task(_cancel_on_disconnect(request, ticket))
        try:
            result = await ticket.complete()
        finally:
            watcher.cancel()
        if result is None:  # the client went away; nobody reads this
            return Response(status_code=499)
        return {"id": completion_id, "object": "chat.completion", "created": now, "model": model_name,
                "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.texts[0]},
                             "logprobs": None, "finish_reason": result.finish_reasons[0]}],
                "usage": _usage(job, result)}

    register_web_page(app)  # GET /: the chat page (web.py)
    return app


def run_server(app: FastAPI, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Serve app with uvicorn until interrupted."""
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)  # create_app's request_log logs


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed limit bytes."""
    too_big = RequestError(f"the request body is larger than this server's limit of {limit} bytes; send smaller "
                           "or fewer images", status=413, code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def _cancel_on_disconnect(request: Request, ticket: Ticket) -> None:
    """Cancel ticket when the client disconnects (the body is read: the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    ticket.cancel()


async def _events(request: Request, ticket: Ticket, job: _Job, completion_id: str, created: int,
                  model_name: str, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chat.completion.chunk format, ending with `data: [DONE]`.

    The ticket is cancelled when the client disconnects (watched while the stream runs) or when
    the response is closed early for any other reason."""
    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        event = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                 "system_fingerprint": None, "choices": choices}
        if include_usage:
            event["usage"] = usage
        return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"

    def choice(delta: dict[str, str], finish_reason: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]

    watcher = asyncio.create_task(_cancel_on_disconnect(request, ticket))
    try:
        yield chunk(choice({"role": "assistant", "content": ""}))
        try:
            async for piece in ticket:
                yield chunk(choice({"content": piece}))
        except Exception:  # the status line is sent: report in the stream, keep the traceback in the log
            logger.exception("generation failed during a streamed response")
            yield f"data: {json.dumps(error_body('generation failed; see the server log', 'server_error'))}\n\n"
            return
    finally:
        watcher.cancel()
        if ticket.result is None:
            ticket.cancel()
    result = ticket.result
    if result is None:  # cancelled: the client is gone
        return
    yield chunk(choice({}, result.finish_reasons[0]))
    if include_usage:
        yield chunk([], _usage(job, result))
    yield "data: [DONE]\n\n"


def _usage(job: _Job, result: GenerationResult) -> dict[str, int]:
    """OpenAI's usage counts; the prompt's image tokens count as prompt tokens."""
    completion = len(result.token_ids[0])
    return {"prompt_tokens": len(job.ids), "completion_tokens": completion, "total_tokens": len(job.ids) + completion}


def _context_length(loaded: LoadedModel) -> int | None:
    """The language model's context (LoadedModel.context_length), or None.

    A longrope (Phi-3) model is held to original_max_position_embeddings: past it the RoPE factors
    change for the whole batch (see batcher.py), and rows of a batch must not affect each other."""
    limits = [loaded.context_length, _long_rope_threshold(loaded.model)]
    return min((n for n in limits if n is not None), default=None)
