"""Training labels: exactly the assistant replies and their end-of-turn token are unmasked, per template.

The oracle is hand-written text: the labelled tokens of each reply, decoded, must read as the reply
plus the template's end token; everything else must be IGNORE_INDEX.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_labels.py
"""

from __future__ import annotations

import string

import pytest
import torch
from tokenizers import AddedToken

from vlmkit.data.labels import build_training_example
from vlmkit.image.plan import ImagePlan
from vlmkit.models.lm import IGNORE_INDEX
from vlmkit.prompt import build_prompt
from vlmkit.text.chat import chat_template_for, get_chat_template
from vlmkit.text.tokenizer import CharTokenizer, HFTokenizer
from vlmkit.weights.gguf import smollm2_gguf_path

TOK = CharTokenizer(string.printable)
IMAGE_ID = TOK.token_to_id("<image>")
CONVERSATION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
    {"role": "assistant", "content": "A cat."},
    {"role": "user", "content": "Colour?"},
    {"role": "assistant", "content": "Black."},
]


def _plan(tokens: int) -> ImagePlan:
    return ImagePlan("pad", torch.zeros(1, 3, 4, 4), (4, 4), (4, 4), (1, 1), {"features": tokens})


def _labelled_runs(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """Decoded text of every maximal run of labelled positions, in order."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(tokenizer.decode(current))
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + ([tokenizer.decode(current)] if current else [])


@pytest.mark.parametrize("name, expected", [
    ("vicuna_v1", [" A cat.</s>", " Black.</s>"]),  # the prompt ends "ASSISTANT:": the space is generated
    ("chatml", ["A cat.<|im_end|>", "Black.<|im_end|>"]),
    ("phi3", ["A cat.<|end|>", "Black.<|end|>"]),
    ("llava", [" A cat.", " Black."]),  # llava closes a reply with a space only: no end token to learn
])
def test_builtin_templates_label_replies_and_end_token(name, expected):
    template = get_chat_template(name)
    example = build_training_example(TOK, template, CONVERSATION, IMAGE_ID, [_plan(3)])
    assert _labelled_runs(TOK, example.input_ids, example.labels) == expected
    assert example.input_ids.count(IMAGE_ID) == 3
    assert len(example.plans) == 1
    # The ids are the full conversation's prompt ids, and the first reply starts right after the inference prompt.
    full = build_prompt(TOK, template, CONVERSATION, IMAGE_ID, [_plan(3)], add_generation_prompt=False).ids
    assert example.input_ids == full
    prompt = build_prompt(TOK, template, CONVERSATION[:1], IMAGE_ID, [_plan(3)]).ids
    assert example.input_ids[:len(prompt)] == prompt
    assert example.labels[len(prompt) - 1] == IGNORE_INDEX != example.labels[len(prompt)]


def test_image_in_a_later_turn_and_text_only_model():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]},
                {"role": "assistant", "content": "A dog."}]
    example = build_training_example(TOK, get_chat_template("phi3"), messages, IMAGE_ID, [_plan(2)])
    assert _labelled_runs(TOK, example.input_ids, example.labels) == ["Hello.<|end|>", "A dog.<|end|>"]
    assert all(label == IGNORE_INDEX for t, label in zip(example.input_ids, example.labels) if t == IMAGE_ID)
    text_only = build_training_example(TOK, get_chat_template("chatml"), messages[:2])
    assert _labelled_runs(TOK, text_only.input_ids, text_only.labels) == ["Hello.<|im_end|>"]


@pytest.fixture(scope="module")
def smollm2():
    tokenizer = HFTokenizer.from_gguf(smollm2_gguf_path())
    tokenizer.backend.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    return tokenizer, chat_template_for(tokenizer, flatten_content=True)


def test_smollm2_jinja_template(smollm2):
    tokenizer, template = smollm2
    image_id = tokenizer.token_to_id("<image>")
    example = build_training_example(tokenizer, template, CONVERSATION, image_id, [_plan(4)])
    assert _labelled_runs(tokenizer, example.input_ids, example.labels) == ["A cat.<|im_end|>", "Black.<|im_end|>"]
    assert example.input_ids.count(image_id) == 4
    assert tokenizer.decode(example.input_ids[:3]) == "<|im_start|>system\n"  # the template's default system turn


def test_token_straddling_the_prompt_boundary_is_labelled(smollm2):
    # "<|im_start|>assistant\n" + "  Hello" tokenizes as ... "\n ", " Hello": the "\n " token holds a reply
    # character, so it is labelled; the inference prompt's own last token "\n" is not in the full ids.
    tokenizer, template = smollm2
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  Hello"}]
    example = build_training_example(tokenizer, template, messages)
    assert _labelled_runs(tokenizer, example.input_ids, example.labels) == ["\n  Hello<|im_end|>"]


def test_errors():
    with pytest.raises(ValueError, match="no assistant message"):
        build_training_example(TOK, get_chat_template("chatml"), CONVERSATION[:1], IMAGE_ID, [_plan(1)])
    # A template that renders the last message differently (here: only the last reply is upper-cased).
    shifty = get_chat_template("{% for m in messages %}{{ m['content'] | upper if loop.last else m['content'] }}"
                               "{% endfor %}")
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                {"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(ValueError, match="prefixes as prefixes"):
        build_training_example(TOK, shifty, messages)
