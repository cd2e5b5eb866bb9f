"""What `vlmkit generate` / `chat` and the OpenAI server answer for a checkpoint fixture's two-photo prompt:
shared by the tests of the original-layout checkpoints (tests/test_checkpoint_*.py), which compare these
answers with the reference's greedy tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from vlmkit.cli import main


def save_photos(folder: Path, images: list[Image.Image]) -> list[str]:
    """The images as PNG files in folder (PNG: the same pixels back)."""
    paths = []
    for i, image in enumerate(images):
        paths.append(str(folder / f"photo{i}.png"))
        image.save(paths[-1])
    return paths


def cli_answer(verb: str, model: Path, photo_files: list[str], question: str, capsys: Any,
               max_new_tokens: int = 20) -> dict:
    """`vlmkit VERB --json` with the photos and question, run in process (test_cli runs a subprocess)."""
    images = [arg for path in photo_files for arg in ("--image", path)]
    status = main([verb, "--model", str(model), *images, "--prompt", question, "--max-new-tokens",
                   str(max_new_tokens), "--json"])
    out = capsys.readouterr()
    assert status == 0, out.err
    return json.loads(out.out)


def serve_answer(loaded: Any, images: list[Image.Image], question: str, name: str, max_tokens: int = 20) -> dict:
    """The server's /v1/chat/completions answer at temperature 0 (asserting status 200)."""
    from test_serve import Server, png_data_url, request

    from vlmkit.serve import create_app

    server = Server(create_app(loaded, model_name=name))
    try:
        content = [{"type": "image_url", "image_url": {"url": png_data_url(image)}} for image in images]
        body = {"model": name, "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]}
        status, answer = request(server.url + "/v1/chat/completions", body)
    finally:
        server.stop()
    assert status == 200, answer
    return answer
