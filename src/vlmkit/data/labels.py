"""Training examples: a conversation -> token ids and labels that teach only the assistant's replies.

    example = build_training_example(tokenizer, template, messages, image_token_id, plans)
    example.input_ids, example.labels, example.plans     # labels: IGNORE_INDEX except on the replies

The labelled tokens of an assistant message are those the model must generate after the
inference prompt: its reply and the end-of-turn text that closes it (`</s>`, `<|im_end|>`,
`<|end|>`), so the model learns to stop. Whitespace the template writes after that token
(chatml's newline) is the separator before the next turn and is not labelled. The `llava`
template closes replies with a space only, so its labels are the reply alone.

How the reply is found, for any template (built-in or jinja): render the conversation up to
message i-1 with the generation prompt (`before`) and up to message i (`through`). The template
must render prefixes as prefixes (`before` and `through` start the full rendering), else
ValueError. The reply is the text between `len(before)` and the end of `through` minus its
trailing whitespace.

How characters become token positions: the full conversation is tokenized in ONE pass by
prompt.build_prompt (image placeholders expanded from the plans), so training ids are the ids
inference sees. The two boundary texts are tokenized the same way and compared to the full ids:
a boundary lies where the prefix's ids stop agreeing with the full ids. This needs no character
offsets (CharTokenizer has none; tokenizers' offsets are trimmed by some byte-level
post-processors) and the reply starts exactly after the ids of the inference prompt. When a token
of the full ids straddles a boundary (e.g. the prompt's "\\n" merged with a reply's leading "\\n"),
decoded lengths decide: a token is labelled when it holds at least one reply character.
Tokenizing segment by segment instead would give different ids than inference for
tokenizers that mark the start of every encode (sentencepiece's Metaspace "first" scheme).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from vlmkit.image.plan import ImagePlan
from vlmkit.models.lm import IGNORE_INDEX
from vlmkit.prompt import (
    NUMBERED_PLACEHOLDER,
    ImageText,
    MediaPlans,
    build_prompt,
    encode_with_image_runs,
    flatten_media,
    image_texts_prompt,
)
from vlmkit.text.chat import ChatTemplate, Message
from vlmkit.text.tokenizer import Tokenizer


@dataclass
class TrainingExample:
    """One conversation ready for training: ids, labels (IGNORE_INDEX where no loss is taken) and
    the plans of its image-token runs in prompt order (for vlmkit.schemes.image_inputs)."""

    input_ids: list[int]
    labels: list[int]
    plans: list[ImagePlan]

    def __len__(self) -> int:
        return len(self.input_ids)


class _PrefixEncoder:
    """Tokenizes text prefixes of the rendered conversation exactly as build_prompt tokenizes the whole:
    a prefix holds the first m image placeholders, which take the first m runs."""

    def __init__(self, tokenizer: Tokenizer, image_token_id: int | None, plans: Sequence[ImagePlan],
                 segment_special_tokens: bool = False, image_placeholder: str | None = None,
                 image_text: ImageText | None = None) -> None:
        self.tokenizer, self.image_token_id, self.plans = tokenizer, image_token_id, list(plans)
        self.runs = [p.num_tokens for p in self.plans]
        self.segment_special_tokens, self.image_text = segment_special_tokens, image_text
        self.pattern = None
        if image_token_id is not None:
            try:
                plain = re.escape(image_placeholder or tokenizer.id_to_token(image_token_id)) + "|"
            except ValueError:
                plain = ""
            self.pattern = re.compile(plain + NUMBERED_PLACEHOLDER)

    def __call__(self, text: str) -> list[int]:
        if self.pattern is None:
            return self.tokenizer.encode(text, add_special_tokens=self.segment_special_tokens)
        segments, start = [], 0
        for match in self.pattern.finditer(text):
            segments.append(text[start:match.start()])
            start = match.end()
        segments.append(text[start:])
        if self.image_text is not None and len(segments) > 1:
            written = image_texts_prompt(self.tokenizer, segments, self.plans[:len(segments) - 1],
                                         self.image_token_id, self.image_text)
            if written is not None:
                return written.ids
        return encode_with_image_runs(self.tokenizer, segments, self.runs[:len(segments) - 1], self.image_token_id,
                                      self.segment_special_tokens)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _boundary(tokenizer: Tokenizer, full: list[int], prefix: list[int], first_reply_token: bool) -> int:
    """Index into full where the text of prefix ends. If the ids part before the end of prefix (a token of
    full straddles the boundary), the straddling tokens count as reply: a start boundary skips only
    the tokens that end inside prefix's text, an end boundary takes every token that begins inside it."""
    n = _common_prefix(full, prefix)
    if n == len(prefix):
        return n
    length = len(tokenizer.decode(prefix))
    if first_reply_token:
        while n < len(full) and len(tokenizer.decode(full[:n + 1])) <= length:
            n += 1
    else:
        while n < len(full) and len(tokenizer.decode(full[:n])) < length:
            n += 1
    return n


def _reply_spans(template: ChatTemplate, messages: Sequence[Message], full: str) -> list[tuple[str, str]]:
    """For every assistant message, (rendered text up to its generation prompt, rendered text through its
    reply and end-of-turn token), both checked to be prefixes of full."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = template.render(messages[:i], add_generation_prompt=True)
        through = template.render(messages[:i + 1], add_generation_prompt=False).rstrip()
        for name, text in (("up to its generation prompt", before), ("through the reply", through)):
            if not full.startswith(text):
                raise ValueError(f"the chat template renders message {i} (assistant) differently {name} than "
                                 "in the whole conversation, so its reply cannot be located; labels need a "
                                 "template that renders a conversation's prefixes as prefixes")
        if len(through) < len(before):
            raise ValueError(f"assistant message {i} renders to nothing after the generation prompt; "
                             "give it a non-empty reply")
        spans.append((before, through))
    return spans


def build_training_example(tokenizer: Tokenizer, template: ChatTemplate, messages: Sequence[Message],
                           image_token_id: int | None = None, plans: Sequence[MediaPlans] = (),
                           segment_special_tokens: bool = False, image_placeholder: str | None = None,
                           image_text: ImageText | None = None) -> TrainingExample:
    """Ids of the whole conversation (rendered without a generation prompt, image placeholders expanded
    from plans, as prompt.build_prompt does) and labels: IGNORE_INDEX everywhere except on the tokens of
    each assistant reply and the end-of-turn token closing it. See the module docstring for the method.

    Raises ValueError when no message is an assistant reply (nothing to learn) or when the template does
    not render prefixes of the conversation as prefixes of the whole. segment_special_tokens, image_placeholder
    and image_text as build_prompt's.
    """
    if not any(m.get("role") == "assistant" for m in messages):
        raise ValueError("the conversation has no assistant message, so nothing would be trained; "
                         "add the reply as {'role': 'assistant', 'content': ...}")
    prompt = build_prompt(tokenizer, template, messages, image_token_id, plans, add_generation_prompt=False,
                          segment_special_tokens=segment_special_tokens, image_placeholder=image_placeholder,
                          image_text=image_text)
    flat_messages, _ = flatten_media(messages, plans)
    full_text = template.render(flat_messages, add_generation_prompt=False)
    encode = _PrefixEncoder(tokenizer, image_token_id, prompt.plans, segment_special_tokens, image_placeholder,
                            image_text)
    ids = prompt.ids
    labels = [IGNORE_INDEX] * len(ids)
    for before, through in _reply_spans(template, flat_messages, full_text):
        start = _boundary(tokenizer, ids, encode(before), first_reply_token=True)
        end = _boundary(tokenizer, ids, encode(through), first_reply_token=False)
        labels[start:end] = ids[start:end]
    return TrainingExample(ids, labels, prompt.plans)
