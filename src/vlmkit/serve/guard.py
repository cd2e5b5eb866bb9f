"""What every HTTP request to `vlmkit serve` passes before a route sees it (an ASGI middleware).

    app.add_middleware(Guard, allowed_hosts=["myhost.lan"], request_log=print)   # create_app does this

- The Host header must name this server: a localhost name (localhost, 127.0.0.1, [::1]), an IP address,
  or a name in allowed_hosts (`vlmkit serve --host` and `--allowed-hosts`; `*` allows any). Anything else
  is a 403. This stops DNS rebinding: a page on evil.example whose name is made to resolve to 127.0.0.1
  reaches the port, but its requests carry `Host: evil.example`. An IP address cannot be rebound (a page
  at http://<ip>/ is that machine's own page), so any IP is accepted, and a server bound to 0.0.0.0
  answers on its LAN address without more flags.
- A POST must say `Content-Type: application/json` (415 otherwise). A page on another origin can send a
  `text/plain` POST without asking; a JSON one needs a CORS preflight, which this server never grants.
- With request_log, one line per request: `METHOD /path STATUS DURATION ms` (the duration runs until the
  last byte of the response, a stream's included; status 499: the client left first).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterable
from typing import Any

from fastapi.responses import JSONResponse

from vlmkit.serve.requests import RequestError

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
ANY_HOST = "*"


def host_name(value: str) -> str:
    """The name in a Host header (or an --allowed-hosts entry): lower case, without port, brackets or a
    trailing dot. `[::1]:8000` -> `::1`, `LocalHost.:80` -> `localhost`."""
    value = value.strip().lower()
    if value.startswith("["):  # an IPv6 address, maybe with a port
        end = value.find("]")
        return value[1:end] if end > 0 else value
    if value.count(":") == 1:  # name:port (an IPv6 address without brackets has more colons)
        value = value.partition(":")[0]
    return value.rstrip(".")


def parse_allowed_hosts(text: str) -> list[str]:
    """--allowed-hosts: comma-separated host names or IP addresses, or `*`; ValueError for a URL or a port."""
    names = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        if "/" in entry or (entry.count(":") == 1 and not entry.startswith("[")):
            raise ValueError(f"--allowed-hosts takes host names without scheme or port (e.g. myhost.lan), "
                             f"got {entry!r}")
        names.append(entry if entry == ANY_HOST else host_name(entry))
    if not names:
        raise ValueError("--allowed-hosts is empty; give host names separated by commas, or '*' for any")
    return names


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Guard:
    """The Host check, the JSON content type of POSTs and the request log line, around an ASGI app."""

    def __init__(self, app: Any, allowed_hosts: Iterable[str] = (),
                 request_log: Callable[[str], None] | None = None) -> None:
        self.app, self.request_log = app, request_log
        self.allowed = {host_name(h) if h != ANY_HOST else h for h in allowed_hosts} | set(LOCAL_HOSTS)

    def refusal(self, scope: dict[str, Any]) -> RequestError | None:
        """Why the request may not go on, or None."""
        headers = [(k.lower(), v.decode("latin-1")) for k, v in scope["headers"]]
        hosts = [v for k, v in headers if k == b"host"]
        if not hosts:
            return RequestError("the request has no Host header; send one (HTTP/1.1 clients do)", status=400,
                                code="host_not_allowed")
        if ANY_HOST not in self.allowed:
            for host in hosts:
                name = host_name(host)
                if name not in self.allowed and not _is_ip(name):
                    return RequestError(
                        f"the Host header {host[:100]!r} is not a name this server answers to (a guard against "
                        f"DNS rebinding); if you reach it by that name, start it with --allowed-hosts {name[:100]} "
                        "(or --allowed-hosts '*' to accept any)", status=403, code="host_not_allowed")
        if scope["method"] == "POST":
            content_type = next((v for k, v in headers if k == b"content-type"), "")
            if content_type.partition(";")[0].strip().lower() != "application/json":
                shown = repr(content_type[:100]) if content_type else "none"
                return RequestError(f"a POST body must be JSON sent with 'Content-Type: application/json' "
                                    f"(got {shown})", status=415, code="unsupported_media_type")
        return None

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), None

        async def send_noting_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refused = self.refusal(scope)
            if refused is None:
                await self.app(scope, receive, send_noting_status)
            else:
                response = JSONResponse(refused.body(), status_code=refused.status)
                await response(scope, receive, send_noting_status)
        except BaseException:
            status = status or 500  # the server's error handler, outside this middleware, answers 500
            raise
        finally:
            if self.request_log is not None:
                milliseconds = (time.perf_counter() - start) * 1000
                self.request_log(f"{scope['method']} {scope['path']} {status or '-'} {milliseconds:.0f} ms")
