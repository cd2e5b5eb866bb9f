"""Qwen-VL-Chat's prompt: a query with images and boxes -> text, and a conversation -> ChatML prompt ids.

    query = qwen_vl_query([{"image": "cat.jpg"}, {"text": "What is it?"}])
    # 'Picture 1:<img>cat.jpg</img>\\nWhat is it?'
    text, ids = qwen_chat_prompt(tok, query, history=[(old_query, old_answer)])
    # '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n...<|im_start|>assistant\\n'

Qwen-VL-Chat's remote code writes a query with `QWenTokenizer.from_list_format` and turns a conversation
into prompt ids with `make_context` (qwen_generation_utils.py, chat_format "chatml"), which `model.chat`
calls with the system text "You are a helpful assistant.". These two functions give the same text and ids:

- an image is `Picture N:<img>path</img>\\n` (N counts the query's images from 1; no space after the colon),
  a box `<box>(x1,y1),(x2,y2)</box>` on the 0-1000 grid, after `<ref>name</ref>` when the part names one;
- every turn is `<|im_start|>role\\ncontent<|im_end|>`, turns joined by a newline, and the prompt ends with
  `<|im_start|>assistant\\n`. Each piece is encoded on its own: `<|im_start|>`/`<|im_end|>` are inserted as
  ids, and the content is encoded with only the image and box tags special, so a user writing
  `<|im_end|>` gets plain text, not a turn end;
- history turns are kept from the most recent back while the prompt stays under max_window_size ids;
  a turn whose answer is None is a user turn left unanswered.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from vlmkit.text.qwen_tiktoken import IM_END, IM_START, IMAGE_TAG_DEFAULTS, QwenTiktokenTokenizer

DEFAULT_SYSTEM = "You are a helpful assistant."  # Qwen-VL-Chat's model.chat
MAX_WINDOW_SIZE = 6144  # generation_config.json of Qwen-VL-Chat


def qwen_vl_query(parts: Sequence[Mapping[str, Any]], tokenizer: QwenTiktokenTokenizer | None = None) -> str:
    """The query text of parts, each {"image": path}, {"text": str} or {"box": [(x1, y1, x2, y2), ...]} with an
    optional "ref": the name the boxes show (a part holding several keys counts as the first of image, text,
    box, as the reference reads it). The tags are the tokenizer's (Qwen-VL's defaults without one)."""
    tags = tokenizer.image_tags if tokenizer is not None else IMAGE_TAG_DEFAULTS
    img, img_end = tags["image_start_tag"], tags["image_end_tag"]
    ref, ref_end = tags["ref_start_tag"], tags["ref_end_tag"]
    box, box_end = tags["box_start_tag"], tags["box_end_tag"]
    text, images = "", 0
    for i, part in enumerate(parts):
        if "image" in part:
            images += 1
            text += f"Picture {images}:{img}{part['image']}{img_end}\n"
        elif "text" in part:
            text += part["text"]
        elif "box" in part:
            if "ref" in part:
                text += f"{ref}{part['ref']}{ref_end}"
            for corners in part["box"]:
                if len(corners) != 4:
                    raise ValueError(f"part {i}: a box is (x1, y1, x2, y2) on the 0-1000 grid, got {corners!r}")
                text += box + "(%d,%d),(%d,%d)" % tuple(corners) + box_end
        else:
            raise ValueError(f"part {i} {dict(part)!r} is none of {{'image': path}}, {{'text': str}}, "
                             "{'box': [(x1, y1, x2, y2), ...], 'ref': optional name}")
    return text


def query_parts(query: str, tags: Mapping[str, str] = IMAGE_TAG_DEFAULTS) -> tuple[list[dict[str, str]], list[str]]:
    """A query with its images written in the text, as Qwen-VL's documentation writes them (`<img>path</img>`,
    from_list_format's `Picture N:<img>path</img>\\n`) -> (chat content parts with an image part at each image,
    the paths in order). The "Picture N:" before a tag and the newline after it are the image part's own text in
    the qwen_vl template, so the parts render back to the query (with the paths left out).

        >>> query_parts("Picture 1: <img>cat.jpg</img>\\nWhat is it?")
        ([{'type': 'image'}, {'type': 'text', 'text': 'What is it?'}], ['cat.jpg'])
    """
    start, end = re.escape(tags["image_start_tag"]), re.escape(tags["image_end_tag"])
    parts: list[dict[str, str]] = []
    paths: list[str] = []
    at = 0
    for m in re.finditer(rf"(?:Picture \d+: ?)?{start}(.*?){end}\n?", query, flags=re.S):
        if m.start() > at:
            parts.append({"type": "text", "text": query[at:m.start()]})
        if not m.group(1).strip():
            raise ValueError(f"the prompt has an image tag without a path at character {m.start()}; write "
                             f"{tags['image_start_tag']}path{tags['image_end_tag']}")
        parts.append({"type": "image"})
        paths.append(m.group(1).strip())
        at = m.end()
    if at < len(query) or not parts:
        parts.append({"type": "text", "text": query[at:]})
    return parts, paths


def qwen_chat_prompt(tokenizer: QwenTiktokenTokenizer, query: str,
                     history: Sequence[tuple[str, str | None]] = (), system: str = DEFAULT_SYSTEM,
                     max_window_size: int = MAX_WINDOW_SIZE) -> tuple[str, list[int]]:
    """(prompt text, prompt ids) of a Qwen-VL-Chat conversation: history's (query, answer) turns, oldest first,
    then query, ending where the assistant's answer begins."""
    tags = set(tokenizer.image_tags.values())
    start, end = [tokenizer.im_start_id], [tokenizer.im_end_id]
    newline = tokenizer.encode("\n")

    def turn(role: str, content: str) -> tuple[str, list[int]]:
        ids = (tokenizer.encode(role, allowed_special=tags) + newline
               + tokenizer.encode(content, allowed_special=tags))
        return f"{IM_START}{role}\n{content}{IM_END}", start + ids + end

    system_text, system_ids = turn("system", system)
    text, ids = "", []
    for past_query, answer in reversed(history):
        query_text, query_ids = turn("user", past_query)
        if answer is None:
            more_text, more_ids = f"\n{query_text}\n", newline + query_ids + newline
        else:
            answer_text, answer_ids = turn("assistant", answer)
            more_text, more_ids = f"\n{query_text}\n{answer_text}", newline + query_ids + newline + answer_ids
        if len(system_ids) + len(more_ids) + len(ids) >= max_window_size:
            break
        text, ids = more_text + text, more_ids + ids
    query_text, query_ids = turn("user", query)
    text = f"{system_text}{text}\n{query_text}\n{IM_START}assistant\n"
    ids = system_ids + ids + newline + query_ids + newline + start + tokenizer.encode("assistant") + newline
    return text, ids
