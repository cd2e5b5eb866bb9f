"""The web chat page of `vlmkit serve`: static HTML/JS/CSS shipped in the package, served at `/`.

    register_web_page(app)     # create_app calls it
    GET /                      static/index.html
    GET /static/chat.js        the page's code: sends the conversation to /v1/chat/completions (stream: true)
    GET /static/style.css

The page needs no API key to load; its requests to /v1 send the key typed into its settings. It
learns the model's name from /health, or, on a server with an API key (whose /health says only "ok"),
from /v1/models with that key. Its temperature starts at 0 (greedy), the API's and the CLI's default. Only the files listed in PAGE_FILES are served, each with a fixed content type (not guessed
from the system's MIME table) and a Content-Security-Policy that lets the page load nothing and
connect nowhere but this server, so it works offline and cannot leak a conversation elsewhere.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response
from starlette.exceptions import HTTPException

STATIC_PACKAGE = "vlmkit.serve"
STATIC_DIR = "static"
PAGE_FILES = {  # file name in static/ -> content type
    "index.html": "text/html; charset=utf-8",
    "chat.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# img-src data: is for the image thumbnails (data URLs) and the empty favicon.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def read_page_files() -> dict[str, bytes]:
    """The bytes of every file in PAGE_FILES, read from the installed package."""
    folder = resources.files(STATIC_PACKAGE).joinpath(STATIC_DIR)
    files = {}
    for name in PAGE_FILES:
        path = folder.joinpath(name)
        if not path.is_file():
            raise FileNotFoundError(f"the web page file {STATIC_DIR}/{name} is missing from the installed "
                                    f"{STATIC_PACKAGE} package; reinstall vlmkit (its package data ships it)")
        files[name] = path.read_bytes()
    return files


def register_web_page(app: FastAPI) -> None:
    """Add GET / (the chat page) and GET /static/{name} (the files of PAGE_FILES) to app."""
    files = read_page_files()  # read once: a few kilobytes

    def page_file(name: str) -> Response:
        headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
        if name == "index.html":
            headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        return Response(files[name], media_type=PAGE_FILES[name], headers=headers)

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return page_file("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in PAGE_FILES:
            raise HTTPException(404, f"no page file {name!r}; this server serves /, /static/chat.js and "
                                     "/static/style.css")
        return page_file(name)
