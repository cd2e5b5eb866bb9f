"""What `vlmkit generate` / `chat` and the server answer with a checkpoint fixture and two photos: the helpers the
tests/test_checkpoint_*.py files share to check that each answers with the reference's greedy tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from vlmkit.cli import main
from vlmkit.generate import generate
from vlmkit.load import LoadedModel
from vlmkit.sampling import GenerationConfig


def greedy_answer_text(loaded: LoadedModel, messages: list[dict], images: list[Image.Image],
                       greedy_ids: list[int]) -> str:
    """The text vlmkit's generate decodes from the reference's greedy tokens (checked to be those tokens, all
    len(greedy_ids) of them): what the CLI and the server must answer."""
    plans = loaded.plan_images(images)
    ids = loaded.prompt_ids(messages, plans)
    result = generate(loaded.model, [ids], GenerationConfig(max_new_tokens=len(greedy_ids)),
                      prefill_inputs=loaded.image_inputs(plans), tokenizer=loaded.tokenizer)
    assert result.token_ids[0] == greedy_ids and result.finish_reasons[0] == "length"
    return result.texts[0]


def save_photos(folder: Path, images: list[Image.Image]) -> list[str]:
    """The images as PNG files in folder (the same pixels back), their paths in order."""
    paths = []
    for i, image in enumerate(images):
        paths.append(str(folder / f"photo{i}.png"))
        image.save(paths[-1])
    return paths


def check_cli_answer(verb: str, model: Path, photo_files: list[str], question: str, capsys: Any,
                     prompt_tokens: int, text: str, max_new_tokens: int = 20) -> None:
    """`vlmkit VERB --json` run in-process (test_cli runs a subprocess) with the photos and question answers
    text in max_new_tokens tokens after a prompt of prompt_tokens."""
    images = [arg for path in photo_files for arg in ("--image", path)]
    status = main([verb, "--model", str(model), *images, "--prompt", question,
                   "--max-new-tokens", str(max_new_tokens), "--json"])
    out = capsys.readouterr()
    assert status == 0, out.err
    answer = json.loads(out.out)
    assert (answer["prompt_tokens"], answer["completion_tokens"]) == (prompt_tokens, max_new_tokens)
    assert answer["text"] == text


def check_serve_answer(loaded: LoadedModel, images: list[Image.Image], question: str, prompt_tokens: int, text: str,
                       max_tokens: int = 20) -> None:
    """The server's /v1/chat/completions answer (greedy) to the photos as data URLs and the question is text in
    max_tokens tokens after a prompt of prompt_tokens."""
    from test_serve import Server, png_data_url, request

    from vlmkit.serve import create_app

    server = Server(create_app(loaded, model_name="fixture"))
    try:
        content = [{"type": "image_url", "image_url": {"url": png_data_url(image)}} for image in images]
        body = {"model": "fixture", "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]}
        status, answer = request(server.url + "/v1/chat/completions", body)
    finally:
        server.stop()
    assert status == 200, answer
    assert (answer["usage"]["prompt_tokens"], answer["usage"]["completion_tokens"]) == (prompt_tokens, max_tokens)
    assert answer["choices"][0]["message"]["content"] == text
