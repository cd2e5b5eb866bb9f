"""An OpenAI chat-completions request body -> vlmkit messages, decoded images and a GenerationConfig.

    request = parse_chat_request(body, model_name="tiny-random", limits=Limits())
    request.messages   # [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}]
    request.images     # PIL images, in the order of the image parts
    request.config     # GenerationConfig(max_new_tokens=..., temperature=..., top_p=..., stop_strings=..., seed=...)

Every problem raises `RequestError`, which carries the HTTP status and OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}`, `param` naming the field at fault
(e.g. `messages[0].content[1].image_url.url`).

Images come as `image_url` parts. A base64 data URL is decoded here. A remote http(s) URL is never
fetched (400). A local path (`/abs/a.png`, `rel/a.png` or `file:///abs/a.png`) is read only when the
server was given a root directory, and only if the path, symlinks resolved, lies inside that root (403
otherwise); a path the system cannot look up (too long, a NUL byte) is a 400.
Limits (image count, pixels per image, max_tokens, the text's length) are checked before any image is decoded.

The body is parsed by `parse_json_body`: JSON nested deeper than MAX_JSON_DEPTH arrays and objects is
refused (400) before the parser recurses into it. The text of the messages is bounded before it is
tokenized: a prompt of at most max_prompt_tokens tokens holds at most max_prompt_tokens x (the longest
vocabulary entry, in characters) characters (each token stands for at most its entry's characters), so
a longer text is refused (400) without tokenizing it, and no text that would fit is.

`temperature` defaults to 0 (greedy), as in `vlmkit generate` and the web page; OpenAI's default is 1.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
from PIL import Image

from vlmkit.image.load import ImageLoadError, load_image
from vlmkit.sampling import GenerationConfig, is_int
from vlmkit.text.chat import Message
from vlmkit.text.tokenizer import Tokenizer

MAX_REQUEST_BYTES = 32 * 1024 * 1024  # a request body larger than this is refused (413)
MAX_IMAGES = 8  # image parts per request
MAX_IMAGE_PIXELS = 4096 * 4096  # width x height of one image, checked from its header before decoding
MAX_PROMPT_TOKENS = 8192  # prompt tokens, image tokens included
MAX_TOKENS = 2048  # the largest max_tokens a request may ask for
DEFAULT_MAX_TOKENS = 256  # max_tokens when a request gives none (capped by Limits.max_tokens)
MAX_STOP_STRINGS = 4  # OpenAI's limit on `stop`
MAX_JSON_DEPTH = 32  # nested arrays and objects in a request body; a chat request needs 5
DEFAULT_TEMPERATURE = 0.0  # greedy when a request gives no temperature, as `vlmkit generate` and the web page

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Fields that would change what is returned in ways this server does not implement: refused, not ignored.
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "logit_bias", "audio", "modalities",
               "prediction")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; the defaults are the module's named constants."""

    max_request_bytes: int = MAX_REQUEST_BYTES
    max_images: int = MAX_IMAGES
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_prompt_tokens: int = MAX_PROMPT_TOKENS
    max_tokens: int = MAX_TOKENS

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not is_int(value) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive int, got {value!r}")


class RequestError(Exception):
    """A request the server refuses: HTTP status + OpenAI's error fields."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               413: "invalid_request_error", 415: "invalid_request_error", 500: "server_error",
               503: "server_error"}


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass
class ChatRequest:
    """A checked chat-completions request."""

    messages: list[Message]
    images: list[Image.Image]
    config: GenerationConfig
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk carries the usage counts


# A JSON string (escapes included): removed before counting brackets, so brackets inside text do not count.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKETS = b"[]{}"
_NOT_BRACKETS = bytes(b for b in range(256) if b not in _BRACKETS)
_SCAN_CHUNK = 1 << 20  # brackets per step of the depth scan


def parse_json_body(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The JSON value of a request body; RequestError (400) when it is not JSON or nests arrays and objects
    deeper than max_depth (checked before parsing, so the parser never recurses that deep)."""
    if raw.count(b"[") + raw.count(b"{") > max_depth:  # else it cannot nest deeper: skip the scan
        brackets = np.frombuffer(_JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS), dtype=np.uint8)
        depth = 0
        for start in range(0, brackets.size, _SCAN_CHUNK):  # in chunks: a few MB at a time, whatever the body
            part = brackets[start:start + _SCAN_CHUNK]
            steps = ((part == ord("[")) | (part == ord("{"))).astype(np.int64) * 2 - 1  # open +1, close -1
            depths = depth + np.cumsum(steps)
            if int(depths.max()) > max_depth:
                raise RequestError(f"the request body nests arrays and objects more than {max_depth} deep; "
                                   f"this server accepts at most {max_depth} levels (a chat request needs 5)")
            depth = int(depths[-1])
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON ({e})") from e
    except RecursionError as e:  # the scan above missed it (e.g. a UTF-16 body with quote-like bytes)
        raise RequestError(f"the request body nests arrays and objects too deep; this server accepts at most "
                           f"{max_depth} levels (a chat request needs 5)") from e


def parse_chat_request(body: Any, *, model_name: str, limits: Limits, local_images_root: Path | None = None,
                       max_text_chars: int | None = None) -> ChatRequest:
    """Check body (the parsed JSON) and turn it into a ChatRequest; raises RequestError.

    max_text_chars: refuse messages whose text is longer (the server passes the bound its tokenizer and
    max_prompt_tokens give, see the module's docstring); None: no bound here."""
    if not isinstance(body, Mapping):
        raise RequestError(f"the request body must be a JSON object, got {_json_type(body)}")
    model = body.get("model")
    if not isinstance(model, str):
        raise RequestError(f"'model' is required and must be a string (this server serves {model_name!r})",
                           param="model")
    if model != model_name:
        raise RequestError(f"the model {model!r} does not exist; this server serves {model_name!r} "
                           "(see GET /v1/models)", status=404, param="model", code="model_not_found")
    for name in UNSUPPORTED:
        if body.get(name) is not None:
            raise RequestError(f"'{name}' is not supported by this server; leave it out", param=name)
    n = body.get("n")
    if n is not None and n != 1:
        raise RequestError(f"'n' must be 1 (one choice per request), got {n!r}", param="n")
    if body.get("logprobs"):
        raise RequestError("'logprobs' is not supported by this server; leave it out", param="logprobs")
    for name in ("frequency_penalty", "presence_penalty"):
        if _number(body, name, -2.0, 2.0, default=0.0) != 0.0:
            raise RequestError(f"'{name}' is not supported by this server; leave it out or set it to 0",
                               param=name)
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise RequestError("only response_format {'type': 'text'} is supported", param="response_format")

    stream = _bool(body, "stream")
    stream_options = body.get("stream_options")
    if stream_options is not None and (not stream or not isinstance(stream_options, Mapping)):
        raise RequestError("'stream_options' must be an object and goes with stream: true", param="stream_options")
    include_usage = _bool(stream_options or {}, "include_usage", "stream_options.include_usage")

    config = GenerationConfig(
        max_new_tokens=_max_tokens(body, limits),
        temperature=_number(body, "temperature", 0.0, 2.0, default=DEFAULT_TEMPERATURE),
        top_p=_number(body, "top_p", 0.0, 1.0, default=1.0, open_low=True),
        stop_strings=_stop(body.get("stop")),
        seed=_seed(body.get("seed")),
    )
    messages, sources = _messages(body.get("messages"), limits)
    if max_text_chars is not None:
        _check_text_length(messages, limits, max_text_chars)
    images = [_image(url, param, limits, local_images_root) for url, param in sources]
    return ChatRequest(messages, images, config, stream, include_usage)


# ----------------------------------------------------------------------------- fields


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
             type(None): "null"}
    return "an object" if isinstance(value, Mapping) else names.get(type(value), type(value).__name__)


def _bool(body: Mapping[str, Any], name: str, param: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"'{param or name}' must be a boolean, got {_json_type(value)}", param=param or name)
    return value


def _number(body: Mapping[str, Any], name: str, low: float, high: float, default: float,
            open_low: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"'{name}' must be a number, got {_json_type(value)}", param=name)
    if value < low or value > high or (open_low and value == low):
        bounds = f"{'(' if open_low else '['}{low:g}, {high:g}]"
        raise RequestError(f"'{name}' must be in {bounds}, got {value}", param=name)
    return float(value)


def _max_tokens(body: Mapping[str, Any], limits: Limits) -> int:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(name)
    if value is None:
        return min(DEFAULT_MAX_TOKENS, limits.max_tokens)
    if not is_int(value) or value < 1:
        raise RequestError(f"'{name}' must be a positive integer, got {value!r}", param=name)
    if value > limits.max_tokens:
        raise RequestError(f"'{name}' is {value}, more than this server's limit of {limits.max_tokens}",
                           param=name)
    return value


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError("'stop' must be a non-empty string or a list of non-empty strings", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(f"'stop' has {len(stops)} strings; at most {MAX_STOP_STRINGS} are allowed", param="stop")
    return tuple(stops)


def _seed(value: Any) -> int | None:
    if value is None:
        return None
    if not is_int(value) or value < 0:
        raise RequestError(f"'seed' must be a non-negative integer, got {value!r}", param="seed")
    return value


# ----------------------------------------------------------------------------- messages and images


def longest_token_chars(tokenizer: Tokenizer) -> int:
    """The length in characters of the tokenizer's longest vocabulary entry (special tokens included)."""
    longest = 1
    for token_id in range(tokenizer.vocab_size):
        try:
            longest = max(longest, len(tokenizer.id_to_token(token_id)))
        except ValueError:  # an id the vocabulary skips
            continue
    return longest


def _check_text_length(messages: list[Message], limits: Limits, max_text_chars: int) -> None:
    """Refuse messages whose text cannot fit in max_prompt_tokens tokens, before it is tokenized."""
    chars = sum(len(m["content"]) if isinstance(m["content"], str)
                else sum(len(part.get("text", "")) for part in m["content"]) for m in messages)
    if chars > max_text_chars:
        raise RequestError(f"the messages hold {chars} characters of text; {limits.max_prompt_tokens} prompt tokens "
                           f"(this server's limit) hold at most {max_text_chars}, so the prompt cannot fit; send "
                           "less text", param="messages", code="context_length_exceeded")


def _messages(value: Any, limits: Limits) -> tuple[list[Message], list[tuple[str, str]]]:
    """vlmkit messages and, for each image part in order, (its url, its param path)."""
    if not isinstance(value, list) or not value:
        raise RequestError("'messages' must be a non-empty array of {role, content} objects", param="messages")
    messages: list[Message] = []
    sources: list[tuple[str, str]] = []
    for i, message in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise RequestError(f"{param} must be an object with 'role' and 'content', got {_json_type(message)}",
                               param=param)
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(f"{param}.role must be one of {', '.join(ROLES)}, got {role!r}", param=f"{param}.role")
        content = message.get("content")
        if isinstance(content, str):
            messages.append({"role": ROLES[role], "content": content})
            continue
        if not isinstance(content, list):
            raise RequestError(f"{param}.content must be a string or an array of content parts, got "
                               f"{_json_type(content)}", param=f"{param}.content")
        parts = []
        for j, part in enumerate(content):
            part_param = f"{param}.content[{j}]"
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise RequestError(f"{part_param}.text must be a string", param=f"{part_param}.text")
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                if role != "user":
                    raise RequestError(f"{part_param}: images go in user messages, not {role}", param=part_param)
                image_url = part.get("image_url")
                url = image_url.get("url") if isinstance(image_url, Mapping) else image_url
                if not isinstance(url, str) or not url:
                    raise RequestError(f"{part_param}.image_url must be {{'url': '<data URL>'}}",
                                       param=f"{part_param}.image_url")
                sources.append((url, f"{part_param}.image_url.url"))
                if len(sources) > limits.max_images:
                    raise RequestError(f"too many images: more than this server's limit of {limits.max_images} "
                                       "per request", param="messages", code="too_many_images")
                parts.append({"type": "image"})
            else:
                raise RequestError(f"{part_param} must be a {{'type': 'text', 'text': ...}} or "
                                   "{'type': 'image_url', 'image_url': {'url': ...}} part", param=part_param)
        messages.append({"role": ROLES[role], "content": parts})
    return messages, sources


def _image(url: str, param: str, limits: Limits, root: Path | None) -> Image.Image:
    """Decode one image_url: a data URL, or a local path inside root."""
    if url.startswith(("http://", "https://")):
        raise RequestError(f"{param}: remote image URLs are not fetched by this server; send the image as a "
                           "base64 data URL (data:image/png;base64,...)", param=param, code="remote_url_not_allowed")
    if url.startswith("data:"):
        source: str | Path = url
    else:
        source = _local_path(url, param, limits, root)
    try:
        return load_image(source, max_pixels=limits.max_image_pixels)
    except ImageLoadError as e:
        raise RequestError(f"{param}: {e}", param=param, code="invalid_image") from e


def _local_path(url: str, param: str, limits: Limits, root: Path | None) -> Path:
    """The resolved path of a local image reference, checked to lie inside root."""
    if root is None:
        raise RequestError(f"{param}: local image paths are turned off on this server (start it with "
                           "--allow-local-images ROOT); send the image as a base64 data URL", status=403,
                           param=param, code="local_images_disabled")
    if "://" in url and not url.startswith("file://"):
        raise RequestError(f"{param}: unsupported URL scheme {url.split('://')[0]!r}; send a base64 data URL",
                           param=param)
    path = Path(unquote(url.removeprefix("file://")) if url.startswith("file://") else url)
    shown = url if len(url) <= 200 else f"{url[:100]}...({len(url)} characters)"
    try:
        root = root.resolve()
        resolved = (path if path.is_absolute() else root / path).resolve()  # symlinks and .. resolved
        if not resolved.is_relative_to(root):
            raise RequestError(f"{param}: {shown} is outside the directory this server may read images from",
                               status=403, param=param, code="path_not_allowed")
        if not resolved.is_file():
            raise RequestError(f"{param}: no image file at {shown} (under the server's image root)", param=param,
                               code="invalid_image")
        size = resolved.stat().st_size
    except (OSError, ValueError) as e:  # a name too long, a NUL byte, a loop of symlinks, ...
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise RequestError(f"{param}: {shown} is not a usable image path ({reason}); name an image file under "
                           "the server's image root", param=param, code="invalid_image") from e
    if size > limits.max_request_bytes:
        raise RequestError(f"{param}: {shown} is larger than this server's limit of {limits.max_request_bytes} "
                           "bytes", param=param, code="invalid_image")
    return resolved
