"""The OpenAI-compatible HTTP server: a FastAPI app over one loaded model, run by uvicorn.

    app = create_app(load_model("tiny-random"), model_name="tiny-random")
    run_server(app, host="127.0.0.1", port=8000)      # or: vlmkit serve --model tiny-random

    GET  /health               {"status": "ok", "model": ...}   (no API key needed)
    GET  /v1/models            OpenAI's model list (one model)
    GET  /v1/models/{id}
    POST /v1/chat/completions  OpenAI's chat completions: text and image_url parts, stream: true as
                               server-sent events ending with `data: [DONE]`, usage counts

Request checking lives in requests.py. Every refusal is a 4xx JSON body in OpenAI's error shape; an
unexpected ValueError from the model side becomes a 400 (logged with its traceback), any other
exception a 500 whose traceback uvicorn logs. With `api_key`, the /v1 routes need
`Authorization: Bearer <api_key>` (401 otherwise).

Concurrency: one generation at a time. Requests are parsed and their images decoded concurrently
in worker threads, then wait for the model lock (an asyncio.Lock, without a bound on how many
wait); generation runs in a worker thread so the event loop keeps answering /health. A streaming
client that disconnects cancels its response, which releases the lock after the current decoding
step. Batching concurrent requests into shared forward passes is not done here.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from vlmkit.generate import GenerationResult, generate, stream
from vlmkit.load import LoadedModel
from vlmkit.sampling import GenerationConfig
from vlmkit.serve.requests import ERROR_TYPES, ChatRequest, Limits, RequestError, error_body, parse_chat_request

DEFAULT_HOST = "127.0.0.1"  # local only unless asked otherwise
DEFAULT_PORT = 8000

logger = logging.getLogger("vlmkit.serve")


@dataclass
class _Job:
    """A request ready to generate: prompt ids (image tokens expanded), prefill inputs, settings."""

    ids: list[int]
    prefill: dict[str, Any] | None
    config: GenerationConfig


class _Engine:
    """The loaded model behind a lock: turns checked requests into prompts and generates for them."""

    def __init__(self, loaded: LoadedModel, limits: Limits) -> None:
        self.loaded, self.limits = loaded, limits
        self.context_length = _context_length(loaded.model)
        self.lock = asyncio.Lock()

    def prepare(self, chat: ChatRequest) -> _Job:
        """Plan the images and build the prompt ids; check the prompt-token limits."""
        try:
            plans = self.loaded.plan_images(chat.images)
            ids = self.loaded.prompt_ids(chat.messages, plans)
            prefill = self.loaded.image_inputs(plans)
        except ValueError as e:
            raise RequestError(f"could not build the prompt: {e}", param="messages") from e
        if len(ids) > self.limits.max_prompt_tokens:
            raise RequestError(f"the prompt has {len(ids)} tokens (image tokens included), more than this "
                               f"server's limit of {self.limits.max_prompt_tokens}; send less text or fewer or "
                               "smaller images", param="messages", code="context_length_exceeded")
        wanted = len(ids) + chat.config.max_new_tokens
        if self.context_length is not None and wanted > self.context_length:
            raise RequestError(f"the prompt ({len(ids)} tokens) plus max_tokens ({chat.config.max_new_tokens}) "
                               f"is {wanted}, more than the model's context of {self.context_length} tokens; "
                               "lower max_tokens or shorten the conversation", param="max_tokens",
                               code="context_length_exceeded")
        return _Job(ids, prefill, chat.config)

    async def complete(self, job: _Job) -> GenerationResult:
        """Generate the whole answer (in a worker thread, holding the lock)."""
        async with self.lock:
            return await run_in_threadpool(generate, self.loaded.model, [job.ids], job.config,
                                           prefill_inputs=job.prefill, tokenizer=self.loaded.tokenizer)

    async def pieces(self, job: _Job) -> AsyncIterator[str | GenerationResult]:
        """The answer's text pieces as they become final, then the GenerationResult (holding the lock)."""
        async with self.lock:
            text = stream(self.loaded.model, job.ids, job.config, self.loaded.tokenizer, prefill_inputs=job.prefill)
            while (piece := await run_in_threadpool(next, text, None)) is not None:
                yield piece
            yield text.result


def create_app(loaded: LoadedModel, *, model_name: str | None = None, api_key: str | None = None,
               allow_local_images_root: str | Path | None = None, limits: Limits = Limits()) -> FastAPI:
    """The server app for loaded, answering as model_name (default: loaded.name).

    api_key: require `Authorization: Bearer <api_key>` on /v1 routes. allow_local_images_root: let
    image_url parts name local files, only inside this directory (symlinks resolved); None: data URLs only.
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
    engine = _Engine(loaded, limits)
    created = int(time.time())
    app = FastAPI(title="vlmkit", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestError)
    async def _refused(request: Request, e: RequestError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

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

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise RequestError("missing or wrong API key: send the header 'Authorization: Bearer <key>' with the "
                               "key the server was started with", status=401, code="invalid_api_key")

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "vlmkit"}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": model_name}

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
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"the request body is not valid JSON ({e})") from e
        chat = await run_in_threadpool(parse_chat_request, body, model_name=model_name, limits=limits,
                                       local_images_root=root)
        job = await run_in_threadpool(engine.prepare, chat)
        completion_id, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if chat.stream:
            events = _events(engine, job, completion_id, now, model_name, chat.include_usage)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        result = await engine.complete(job)
        return {"id": completion_id, "object": "chat.completion", "created": now, "model": model_name,
                "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.texts[0]},
                             "logprobs": None, "finish_reason": result.finish_reasons[0]}],
                "usage": _usage(job, result)}

    return app


def run_server(app: FastAPI, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Serve app with uvicorn until interrupted."""
    uvicorn.run(app, host=host, port=port, log_level="info")


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


async def _events(engine: _Engine, job: _Job, completion_id: str, created: int, model_name: str,
                  include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chat.completion.chunk format, ending with `data: [DONE]`."""
    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        event = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                 "system_fingerprint": None, "choices": choices}
        if include_usage:
            event["usage"] = usage
        return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"

    def choice(delta: dict[str, str], finish_reason: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]

    yield chunk(choice({"role": "assistant", "content": ""}))
    try:
        async for item in engine.pieces(job):
            if isinstance(item, str):
                yield chunk(choice({"content": item}))
            else:
                result = item
    except Exception:  # the status line is sent: report in the stream, keep the traceback in the log
        logger.exception("generation failed during a streamed response")
        yield f"data: {json.dumps(error_body('generation failed; see the server log', 'server_error'))}\n\n"
        return
    yield chunk(choice({}, result.finish_reasons[0]))
    if include_usage:
        yield chunk([], _usage(job, result))
    yield "data: [DONE]\n\n"


def _usage(job: _Job, result: GenerationResult) -> dict[str, int]:
    """OpenAI's usage counts; the prompt's image tokens count as prompt tokens."""
    completion = len(result.token_ids[0])
    return {"prompt_tokens": len(job.ids), "completion_tokens": completion, "total_tokens": len(job.ids) + completion}


def _context_length(model: nn.Module) -> int | None:
    """The language model's max_position_embeddings (a VLM's config holds it under .lm), or None."""
    cfg = getattr(model, "cfg", None)
    return getattr(getattr(cfg, "lm", cfg), "max_position_embeddings", None)
