"""`vlmkit serve`: serve a model over HTTP with OpenAI's chat-completions API (vlmkit/serve/)."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from vlmkit.commands.common import add_model_flag, load_model_of
from vlmkit.serve import DEFAULT_HOST, DEFAULT_PORT, Limits, create_app, run_server
from vlmkit.serve.batcher import MAX_BATCH_SIZE, MAX_QUEUE, PREFILL_BATCH
from vlmkit.serve.guard import parse_allowed_hosts
from vlmkit.serve.image_cache import IMAGE_CACHE_MB, MB
from vlmkit.serve.requests import MAX_IMAGE_PIXELS, MAX_IMAGES, MAX_PROMPT_TOKENS, MAX_REQUEST_BYTES, MAX_TOKENS


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register `serve`."""
    p = sub.add_parser("serve", help="serve a model over HTTP with OpenAI's chat-completions API",
                       description="Serve a model at /v1/chat/completions (OpenAI's format: text and base64 "
                                   "image_url parts, streaming), /v1/models and /health. Concurrent requests "
                                   "decode together in one batch (continuous batching); a full queue is a 503.")
    add_model_flag(p)
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})")
    p.add_argument("--allowed-hosts", type=_allowed_hosts, default=[], metavar="NAMES",
                   help="host names (comma-separated) the server answers to besides localhost, IP addresses and "
                        "--host, e.g. the name you reach it by on your network; '*' accepts any. Other Host "
                        "headers get 403, which stops DNS-rebinding pages (default: none)")
    p.add_argument("--api-key", default=os.environ.get("VLMKIT_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $VLMKIT_API_KEY, else none)")
    p.add_argument("--allow-local-images", default=None, metavar="ROOT",
                   help="let image_url parts name files inside this directory (default: base64 data URLs only)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the --model value)")
    p.add_argument("--max-request-bytes", type=int, default=MAX_REQUEST_BYTES,
                   help=f"largest request body (default {MAX_REQUEST_BYTES})")
    p.add_argument("--max-images", type=int, default=MAX_IMAGES, help=f"images per request (default {MAX_IMAGES})")
    p.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS,
                   help=f"width x height of one image (default {MAX_IMAGE_PIXELS})")
    p.add_argument("--max-prompt-tokens", type=int, default=MAX_PROMPT_TOKENS,
                   help=f"prompt tokens, image tokens included (default {MAX_PROMPT_TOKENS})")
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS,
                   help=f"largest max_tokens a request may ask for (default {MAX_TOKENS})")
    p.add_argument("--max-batch-size", type=int, default=MAX_BATCH_SIZE,
                   help=f"requests decoded together in one forward pass (default {MAX_BATCH_SIZE})")
    p.add_argument("--max-queue", type=int, default=MAX_QUEUE,
                   help=f"requests that may wait for a batch row; more get 503 (default {MAX_QUEUE})")
    p.add_argument("--prefill-batch", type=_positive, default=PREFILL_BATCH, metavar="N",
                   help="requests arriving together are prefilled together, up to N in one forward pass with their "
                        "images encoded in one vision batch; 1 prefills each request alone "
                        f"(default {PREFILL_BATCH})")
    p.add_argument("--prefill-wait-ms", type=_milliseconds, default=0.0, metavar="MS",
                   help="how long an idle server waits for --prefill-batch requests before it prefills the ones it "
                        "has: requests sent together arrive spread over the time their images take to decode; "
                        "adds up to MS to a lone request's first token (default 0)")
    p.add_argument("--image-cache-mb", type=_megabytes, default=IMAGE_CACHE_MB, metavar="MB",
                   help="memory for the encoded features of recently seen images, so that an image a client "
                        "sends again (every turn of a chat) skips the vision tower; 0 turns the cache off "
                        f"(default {IMAGE_CACHE_MB})")
    p.add_argument("--quiet", action="store_true",
                   help="no request log (by default one line per request on stderr: method, path, status, time)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    limits = Limits(max_request_bytes=args.max_request_bytes, max_images=args.max_images,
                    max_image_pixels=args.max_image_pixels, max_prompt_tokens=args.max_prompt_tokens,
                    max_tokens=args.max_tokens)
    app = create_app(load_model_of(args), model_name=args.model_name or args.model, api_key=args.api_key,
                     allow_local_images_root=args.allow_local_images, limits=limits,
                     max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                     image_cache_bytes=int(args.image_cache_mb * MB), prefill_batch=args.prefill_batch,
                     prefill_wait=args.prefill_wait_ms / 1000,
                     allowed_hosts=[args.host, *args.allowed_hosts],
                     request_log=None if args.quiet else _log_to_stderr)
    run_server(app, host=args.host, port=args.port)
    return 0


def _log_to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _allowed_hosts(text: str) -> list[str]:
    try:
        return parse_allowed_hosts(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(text: str) -> int:
    """--prefill-batch: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give e.g. 8, or 1 to prefill each "
                                         "request alone") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1; give e.g. 8, or 1 to prefill each request alone")
    return value


def _milliseconds(text: str) -> float:
    """--prefill-wait-ms: a number of milliseconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of milliseconds; give e.g. 50, or 0") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} milliseconds is not a time >= 0; give e.g. 50, or 0 not to wait")
    return value


def _megabytes(text: str) -> float:
    """--image-cache-mb: a number of megabytes (MiB) >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of megabytes; give e.g. 256, 0.5 or 0") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} megabytes is not a size >= 0; give e.g. 256, or 0 to turn the "
                                         "cache off")
    return value
