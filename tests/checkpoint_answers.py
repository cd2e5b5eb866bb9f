"""What the tests/test_checkpoint_*.py files share: the two-photo prompt; the checks that vlmkit's generate, CLI
and server answer with the reference's greedy tokens (the shared tests at the end, collected in each module
that imports them); and the checks of a checkpoint saved back in its layout, of `vlmkit inspect` on a config
without weights and of a changed config.

The shared tests and tests/conftest.py's fixtures read the importing module's FIXTURES (its folder under
tests/fixtures/, holding reference.safetensors), TINY (the tiny checkpoint), PROMPT_PHOTOS and QUESTION."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from vlmkit.cli import main
from vlmkit.describe import describe_model
from vlmkit.generate import generate
from vlmkit.load import LoadedModel
from vlmkit.sampling import GenerationConfig


def two_photo_messages(question: str) -> list[dict]:
    """The reference's prompt: one user turn with two images, then the question."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": question}]}]


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


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """folder/model.safetensors as stored (its dtypes kept)."""
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)


def check_same_tensors(saved: Path, original: Path, dtype: torch.dtype | None = None) -> None:
    """saved/model.safetensors holds original's tensor names, each equal to original's (read as dtype if given)."""
    tensors, want = read_tensors(saved), read_tensors(original)
    assert sorted(tensors) == sorted(want)
    for name, tensor in want.items():
        assert torch.equal(tensors[name], tensor if dtype is None else tensor.to(dtype)), name


def check_same_json(saved: Path, original: Path, unread: set[str], file: str = "config.json") -> dict:
    """saved/file holds every key of original/file but those in unread, with the same value; saved's contents."""
    config, want = (json.loads((folder / file).read_text()) for folder in (saved, original))
    assert set(want) - unread <= set(config)
    for key in set(want) - unread:
        assert config[key] == want[key], key
    return config


def check_inspect_report(folder: Path, model_type: str, parameters: float) -> None:
    """`vlmkit inspect` of a config without weights: its model_type and a parameter count within 2% of parameters
    (a model card's total), two bytes each in bfloat16."""
    report = describe_model(str(folder))
    assert report.model_type == model_type
    assert report.loader is None and "no safetensors" in report.problem
    assert abs(report.parameters - parameters) / parameters < 0.02, report.parameters
    assert report.memory["bfloat16"] == 2 * report.parameters


def write_checkpoint(folder: Path, tiny: Path, config: dict, files: tuple[str, ...] = ("model.safetensors",)) -> Path:
    """folder holding config as config.json and copies of tiny's files; folder."""
    (folder / "config.json").write_text(json.dumps(config))
    for name in files:
        (folder / name).write_bytes((tiny / name).read_bytes())
    return folder


# The shared tests: a module collects them by importing them (`from checkpoint_answers import test_...`).

def test_twenty_greedy_tokens_match_the_reference(request, loaded, reference, two_photos):
    plans = loaded.plan_images(two_photos)
    ids = loaded.prompt_ids(two_photo_messages(request.module.QUESTION), plans)
    result = generate(loaded.model, [ids], GenerationConfig(max_new_tokens=20),
                      prefill_inputs=loaded.image_inputs(plans))  # no tokenizer: no stop ids, as the reference ran
    assert result.token_ids[0] == reference["greedy_ids"].tolist()


@pytest.mark.parametrize("verb", ["generate", "chat"])
def test_cli_answers_with_the_reference_tokens(request, reference, photo_files, answer_text, verb, capsys):
    module = request.module
    check_cli_answer(verb, module.TINY, photo_files, module.QUESTION, capsys, len(reference["input_ids"]), answer_text)


def test_serve_answers_with_the_reference_tokens(request, loaded, reference, two_photos, answer_text):
    check_serve_answer(loaded, two_photos, request.module.QUESTION, len(reference["input_ids"]), answer_text)
