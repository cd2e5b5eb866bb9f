"""`vlmkit serve`: an OpenAI-compatible HTTP server over one loaded model (app.py), with request
checking and OpenAI's error shape in requests.py."""

from vlmkit.serve.app import DEFAULT_HOST, DEFAULT_PORT, create_app, run_server
from vlmkit.serve.requests import Limits, RequestError, parse_chat_request

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "Limits", "RequestError", "create_app", "parse_chat_request", "run_server"]
