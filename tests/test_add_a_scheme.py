"""A new image scheme is one module and one registry line: tests/halves_scheme.py (left and right halves),
registered here, planned, trained into a `-small` model, saved, reloaded and asked, touching no file of vlmkit.

The oracles: the plan's views are the two halves prepared by hand (crop, pad square with the mean colour,
bicubic resize, normalise: preprocess_pad's steps, written out), its count is twice the tower's 576 patches,
`vlmkit tokens` reports that count, the encoded rows are the tower and projector run on each half alone,
and a model trained to name the colour of an image's LEFT half (the two training images are mirror images
of each other, so it must tell the halves apart) answers both correctly after `vlmkit train` saved it and
`load_model` read it back.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_add_a_scheme.py
"""

from __future__ import annotations

import dataclasses
import json
import string

import numpy as np
import pytest
import torch
from PIL import Image

from halves_scheme import HALVES, halves
from vlmkit.cli import main
from vlmkit.generate import GenerationConfig, generate
from vlmkit.load import load_model
from vlmkit.models.image_model import build_model
from vlmkit.presets import get_preset
from vlmkit.schemes import register_scheme
from vlmkit.text.tokenizer import DEFAULT_SPECIAL_TOKENS, CharTokenizer
from vlmkit.train.run import RunConfig, run_training
from vlmkit.weights import save_pretrained

register_scheme(HALVES)  # the one registry line

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}
QUESTION = "What colour is the left half?"


def two_colour_image(left: str, right: str) -> Image.Image:
    """A 64 x 32 image: its left 32 x 32 in one colour, its right in the other."""
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:, :32], pixels[:, 32:] = COLOURS[left], COLOURS[right]
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def cfg():
    """llava-1.5-small (a 336-px CLIP tower of 14-px patches, 576 tokens a view, 32 wide) under the halves scheme."""
    return dataclasses.replace(get_preset("llava-1.5-small"), image_scheme="halves")


def test_the_plan_is_the_two_halves_prepared_by_hand(cfg):
    image = two_colour_image("red", "blue")
    plan = HALVES.plan(cfg, image)
    assert plan.parts == {"left": 576, "right": 576} and plan.num_tokens == 1152  # (336 / 14)**2 per half
    mean, std = np.array(cfg.vision.image_mean), np.array(cfg.vision.image_std)
    for view, colour in zip(plan.pixel_values, ("red", "blue")):
        # a one-colour half stays one colour through padding to its own square (it is square) and resizing
        expected = (np.array(COLOURS[colour]) / 255 - mean) / std  # (3,)
        assert torch.allclose(view, torch.tensor(expected, dtype=torch.float32)[:, None, None].expand_as(view),
                              atol=1e-6)
    odd = Image.new("RGB", (5, 2))
    odd.putpixel((2, 0), (255, 255, 255))  # the middle column of an odd width is in both halves
    left, right = halves(odd)
    assert left.getpixel((2, 0)) == right.getpixel((0, 0)) == (255, 255, 255)


def test_tokens_cli_reads_the_registry(tmp_path, capsys):
    path = tmp_path / "wide.png"
    two_colour_image("red", "blue").save(path)
    assert main(["tokens", str(path), "--scheme", "halves", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)[0]
    assert summary["parts"] == {"left": 576, "right": 576} and summary["grid"] == [1, 2]  # LLaVA-1.5's tower


def test_rows_are_each_half_through_the_tower_alone(cfg):
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(cfg, image_token_id=cfg.lm.vocab_size - 1)).eval()
    plans = model.plan_images([two_colour_image("red", "blue"), two_colour_image("blue", "red")])
    with torch.no_grad():
        rows = model.encode_images(**model.image_inputs(plans))
        for plan, image_rows in zip(plans, rows):
            alone = [model.projector(model.vision.features(view[None]))[0] for view in plan.pixel_values]
            assert torch.allclose(image_rows, torch.cat(alone), atol=1e-6)


def test_train_save_reload_generate(cfg, tmp_path):
    tokenizer = CharTokenizer(string.printable, DEFAULT_SPECIAL_TOKENS, chat_template="chatml")
    fresh = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, vocab_size=tokenizer.vocab_size),
                                image_token_id=tokenizer.token_to_id("<image>"))
    torch.manual_seed(0)
    start = tmp_path / "fresh"
    save_pretrained(build_model(fresh), start, tokenizer=tokenizer)  # vlmkit's own format: halves is no llava
    records = []
    for left, right in (("red", "blue"), ("blue", "red")):
        two_colour_image(left, right).save(tmp_path / f"{left}.png")
        records.append({"image": f"{left}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": left}]})
    (tmp_path / "data.json").write_text(json.dumps(records))
    result = run_training(RunConfig(model=str(start), data=str(tmp_path / "data.json"), out=str(tmp_path / "run"),
                                    stage="full", steps=40, batch_size=2, lr=3e-3, progress=False))
    assert sum(result.train.losses[-5:]) < 0.2 * sum(result.train.losses[:5])
    loaded = load_model(str(tmp_path / "run"))
    assert loaded.model.scheme is HALVES and loaded.model.cfg.image_scheme == "halves"
    for colour in COLOURS:
        image = Image.open(tmp_path / f"{colour}.png")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
        plans = loaded.plan_images([image])
        answer = generate(loaded.model, [loaded.prompt_ids(messages, plans)], GenerationConfig(max_new_tokens=6),
                          prefill_inputs=loaded.image_inputs(plans), tokenizer=loaded.tokenizer).texts[0]
        assert answer.startswith(colour), (colour, answer)
