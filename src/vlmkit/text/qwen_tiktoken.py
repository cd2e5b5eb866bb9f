"""Qwen-1's tokenizer: a `qwen.tiktoken` rank file run by the `tiktoken` library, as Qwen(-VL)'s own code runs it.

    tok = QwenTiktokenTokenizer.from_dir("Qwen-VL-Chat/")       # qwen.tiktoken (+ tokenizer_config.json)
    tok.encode("Picture 1: <img>cat.jpg</img>\\nWhat is it?")   # the path's bytes, then <imgpad> up to 256
    tok.decode(ids)                                             # errors="replace": a cut character is U+FFFD
    tok.save_pretrained("out/")                                 # qwen.tiktoken + tokenizer_config.json again

Qwen-1 checkpoints (Qwen-7B, Qwen-VL, Vary) ship no tokenizer.json: their remote code `tokenization_qwen.py`
(QWenTokenizer) reads `qwen.tiktoken`, one `<base64 token> <rank>` line per byte sequence, the rank being the
id and the merge priority of tiktoken's byte-level BPE. This class follows that file of Qwen-VL-Chat:

- text is NFC-normalized, split by Qwen's regex (PAT below, the same as Qwen2's) and BPE-encoded by tiktoken;
- the special tokens come after the ranks, in this order: `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`,
  `<|extra_0|>` .. `<|extra_204|>`, then Qwen-VL's `<ref>` `</ref>` `<box>` `</box>` `<quad>` `</quad>`
  `<img>` `</img>` `<imgpad>` (with the real file: 151643 .. 151859);
- by default every special token written in the text is one id (allowed_special="all", disallowed_special=());
- `<img>path</img>` becomes `<img>`, one id per byte of the path *whose value is the byte* (not the byte's
  rank), `<imgpad>` up to image_span (256) ids, `</img>`: the model overwrites these positions with the
  image's features. decode turns such a span back into `<img>path</img>`. A span holding only `<imgpad>`
  tokens stays as it is: `<img><imgpad></img>` is the placeholder of an image given apart from the text (the
  chat templates qwen_vl and vary write it and vlmkit.prompt widens the `<imgpad>` to the image's 256, the
  reference's ids for an empty path), and Vary writes its images as `<img>` + 256 x `<imgpad>` + `</img>`
  (its tokenizer being Qwen-7B's with these tags as plain special tokens), text Qwen-VL's tokenizer cannot encode;
- decode joins the tokens' bytes and decodes UTF-8 with errors="replace"; skip_special_tokens drops every id
  from `<|endoftext|>` on.
Where the reference raises (an `<img>` without `</img>`, a path longer than image_span bytes, a span without
`<imgpad>` to decode), this class raises ValueError saying what was wrong.
"""

from __future__ import annotations

import base64
import binascii
import json
import unicodedata
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any, Literal

from vlmkit.files import write_text_atomically
from vlmkit.text.gguf_vocab import byte_level_alphabet
from vlmkit.text.tokenizer import TOKENIZER_CONFIG_FILE, Tokenizer, _read_json

VOCAB_FILE = "qwen.tiktoken"
# Qwen's split regex (tokenization_qwen.py PAT_STR): contractions, letters with one leading non-letter, single
# digits, punctuation runs, newlines, other whitespace.
PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
       r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
EXTRA_TOKENS = tuple(f"<|extra_{i}|>" for i in range(205))
# Qwen-VL's tags by their tokenizer_config.json keys (QWenTokenizer's keyword arguments), in id order.
IMAGE_TAG_DEFAULTS = {
    "ref_start_tag": "<ref>", "ref_end_tag": "</ref>", "box_start_tag": "<box>", "box_end_tag": "</box>",
    "quad_start_tag": "<quad>", "quad_end_tag": "</quad>",
    "image_start_tag": "<img>", "image_end_tag": "</img>", "image_pad_tag": "<imgpad>",
}
IMAGE_SPAN = 256  # ids between <img> and </img>: the resampler's 256 queries (QWenTokenizer's IMG_TOKEN_SPAN)

AllowedSpecial = Literal["all"] | Collection[str]


def read_ranks(file: str | Path) -> dict[bytes, int]:
    """The `<base64 token> <rank>` lines of a tiktoken rank file as {token bytes: rank}. ValueError naming the
    line when one is malformed or repeats a token or a rank, or when the ranks are not 0..n-1."""
    file = Path(file)
    ranks: dict[bytes, int] = {}
    seen: set[int] = set()
    for number, line in enumerate(file.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected 2 fields")
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, binascii.Error) as e:
            raise ValueError(f"{file}:{number}: not a '<base64 token> <rank>' line ({e}): {line[:80]!r}") from e
        if token in ranks or rank in seen:
            raise ValueError(f"{file}:{number}: token {token!r} or rank {rank} appears twice; "
                             "a tiktoken rank file lists each once")
        ranks[token] = rank
        seen.add(rank)
    if seen != set(range(len(ranks))):
        missing = sorted(set(range(len(ranks))) - seen)[:5]
        raise ValueError(f"{file}: the ranks are not 0..{len(ranks) - 1} (missing e.g. {missing}); "
                         "the special tokens' ids follow the last rank, so the ranks must have no gaps")
    return ranks


class QwenTiktokenTokenizer(Tokenizer):
    """Qwen-1 / Qwen-VL's tokenizer over tiktoken (see the module docstring for what it does)."""

    def __init__(self, ranks: dict[bytes, int], image_tags: dict[str, str] | None = None,
                 image_span: int = IMAGE_SPAN, chat_template: str | None = None, errors: str = "replace",
                 config: dict[str, Any] | None = None) -> None:
        """ranks: {token bytes: rank} (read_ranks). image_tags: overrides of IMAGE_TAG_DEFAULTS by key.
        chat_template: jinja source or a built-in name; None means the built-in "qwen_vl" (make_context's).
        errors: how decode treats bytes that are not UTF-8 (bytes.decode's errors; Qwen's default "replace").
        config: the tokenizer_config.json it was read from, written back by save_pretrained."""
        try:
            import tiktoken
        except ImportError as e:
            raise ImportError("reading a qwen.tiktoken vocabulary needs the tiktoken package: "
                              "pip install 'vlmkit[tiktoken]' (or pip install tiktoken)") from e
        tags = {**IMAGE_TAG_DEFAULTS, **(image_tags or {})}
        unknown = sorted(set(tags) - set(IMAGE_TAG_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown image tags {unknown}; the tags are {list(IMAGE_TAG_DEFAULTS)}")
        if errors not in ("replace", "strict", "ignore", "backslashreplace", "surrogateescape"):
            raise ValueError(f"errors={errors!r} is not a way to decode bytes; use 'replace' (Qwen's), 'strict', "
                             "'ignore', 'backslashreplace' or 'surrogateescape'")
        if image_span < 1:
            raise ValueError(f"image_span must be a positive number of ids, got {image_span}")
        self.ranks = ranks
        self.image_tags = tags
        self.image_span = image_span
        specials = (ENDOFTEXT, IM_START, IM_END, *EXTRA_TOKENS, *tags.values())
        if len(set(specials)) != len(specials):
            raise ValueError(f"image tags {list(tags.values())} repeat a special token; each must be distinct")
        self.special_tokens = {token: len(ranks) + i for i, token in enumerate(specials)}
        self._special_of_id = {i: token for token, i in self.special_tokens.items()}
        self.errors = errors
        self.encoding = tiktoken.Encoding("Qwen", pat_str=PAT, mergeable_ranks=ranks,
                                          special_tokens=self.special_tokens)
        self._token_of_id = {rank: token for token, rank in ranks.items()}
        self._spelling = byte_level_alphabet()  # byte -> character, to write a token's bytes as a string
        self._byte_of_char = {c: b for b, c in self._spelling.items()}
        self.eod_id = self.special_tokens[ENDOFTEXT]
        self.im_start_id, self.im_end_id = self.special_tokens[IM_START], self.special_tokens[IM_END]
        self.img_start_id = self.special_tokens[tags["image_start_tag"]]
        self.img_end_id = self.special_tokens[tags["image_end_tag"]]
        self.img_pad_id = self.special_tokens[tags["image_pad_tag"]]
        self._chat_template = chat_template
        self._config = dict(config or {})

    @classmethod
    def from_dir(cls, path: str | Path, image_span: int = IMAGE_SPAN) -> QwenTiktokenTokenizer:
        """Read a Qwen-1 tokenizer directory: qwen.tiktoken, and tokenizer_config.json when present (its image
        tag names, decoding errors and chat template, if it sets them, as QWenTokenizer's arguments)."""
        path = Path(path)
        file = path / VOCAB_FILE
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: a Qwen-1 tokenizer directory holds qwen.tiktoken")
        config = _read_json(path / TOKENIZER_CONFIG_FILE)  # {} when absent; ValueError naming a broken file
        tags = {key: config[key] for key in IMAGE_TAG_DEFAULTS if key in config}
        return cls(read_ranks(file), tags, image_span, config.get("chat_template"), config.get("errors", "replace"),
                   config)

    def save_pretrained(self, folder: str | Path) -> list[str]:
        """qwen.tiktoken (the ranks, one `<base64> <rank>` line each, by rank) and tokenizer_config.json (the
        one it was read from, else Qwen-VL-Chat's), the files QWenTokenizer and from_dir read."""
        from vlmkit.text.chat import BUILTIN_TEMPLATES  # text.chat is a sibling; imported where it is needed

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        lines = [f"{base64.b64encode(token).decode('ascii')} {rank}\n"
                 for token, rank in sorted(self.ranks.items(), key=lambda item: item[1])]
        config = dict(self._config or {"model_max_length": 8192, "tokenizer_class": "QWenTokenizer"})
        config.update({key: tag for key, tag in self.image_tags.items() if tag != IMAGE_TAG_DEFAULTS[key]})
        if self.errors != "replace":
            config["errors"] = self.errors
        if self._chat_template is not None and self._chat_template not in BUILTIN_TEMPLATES:
            config["chat_template"] = self._chat_template
        write_text_atomically(folder / VOCAB_FILE, "".join(lines))
        write_text_atomically(folder / TOKENIZER_CONFIG_FILE, json.dumps(config, ensure_ascii=False, indent=2) + "\n")
        return [VOCAB_FILE, TOKENIZER_CONFIG_FILE]

    # --- text -> ids ----------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False, *, allowed_special: AllowedSpecial = "all",
               disallowed_special: AllowedSpecial = ()) -> list[int]:
        """Ids of text (NFC-normalized first). allowed_special: the special tokens that are single ids when
        written in the text ("all", the default, or a collection; the others are encoded as plain text);
        disallowed_special: those whose appearance raises ValueError ("all" or a collection), as tiktoken
        takes them. add_special_tokens adds nothing: Qwen puts no BOS or EOS around a sequence."""
        text = unicodedata.normalize("NFC", text)
        allowed = allowed_special if allowed_special == "all" else set(allowed_special)
        disallowed = disallowed_special if disallowed_special == "all" else set(disallowed_special)
        ids = self.encoding.encode(text, allowed_special=allowed, disallowed_special=disallowed)
        return self._expand_images(ids)

    def _expand_images(self, ids: list[int]) -> list[int]:
        """Each `<img>` .. `</img>` span: the bytes of the ids between become ids equal to the byte values,
        padded with `<imgpad>` to image_span ids."""
        out: list[int] = []
        start = 0
        for begin, end in self._image_spans(ids, "text"):
            inner = ids[begin + 1:end]
            if inner and all(i == self.img_pad_id for i in inner):  # an image's placeholder or its run (Vary's
                continue  # prompts); vlmkit.prompt widens one <imgpad> to the image's run (templates qwen_vl, vary)
            special = [i for i in inner if i >= self.eod_id]
            if special:
                raise ValueError(f"the image path between {self.image_tags['image_start_tag']} and "
                                 f"{self.image_tags['image_end_tag']} holds the special token "
                                 f"{self.id_to_token(special[0])!r}; write the path without special tokens")
            path = b"".join(self._token_of_id[i] for i in inner)
            if len(path) > self.image_span:
                raise ValueError(f"the image path {path[:40].decode('utf-8', 'replace')!r}... is {len(path)} bytes; "
                                 f"at most {self.image_span} fit between {self.image_tags['image_start_tag']} and "
                                 f"{self.image_tags['image_end_tag']}")
            out += ids[start:begin + 1] + list(path) + [self.img_pad_id] * (self.image_span - len(path))
            start = end
        return out + ids[start:]

    def _image_spans(self, ids: list[int], what: str) -> list[tuple[int, int]]:
        """(index of <img>, index of the first </img> after it) for each image, left to right."""
        spans = []
        begin = _find(ids, self.img_start_id, 0)
        while begin != -1:
            end = _find(ids, self.img_end_id, begin)
            if end == -1:
                raise ValueError(f"the {what} has an image start {self.image_tags['image_start_tag']} without "
                                 f"{self.image_tags['image_end_tag']} after it; close the image's path with it")
            spans.append((begin, end))
            begin = _find(ids, self.img_start_id, end + 1)
        return spans

    # --- ids -> text ----------------------------------------------------------------------------------

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ids: the tokens' bytes decoded as UTF-8 with errors="replace" (a cut multi-byte character
        is U+FFFD; `errors` chooses another way); an image span reads `<img>path</img>`; skip_special_tokens drops every special token."""
        ids = [int(i) for i in ids]
        out: list[int] = []
        start = 0
        for begin, end in self._image_spans(ids, "ids"):
            inner = ids[begin + 1:end]
            if self.img_pad_id not in inner:
                raise ValueError(f"the image span at position {begin} has no {self.image_tags['image_pad_tag']}; "
                                 "an encoded image is its path's bytes then padding")
            raw = inner[:inner.index(self.img_pad_id)]
            bad = [i for i in raw if not 0 <= i < 256]
            if bad:
                raise ValueError(f"the image span at position {begin} holds id {bad[0]}, not a byte value")
            try:
                path = bytes(raw).decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"the image path at position {begin} is not UTF-8: {e}") from e
            out += ids[start:begin + 1] + self.encoding.encode(path) + [self.img_end_id]
            start = end + 1
        out += ids[start:]
        if skip_special_tokens:
            out = [i for i in out if i < self.eod_id]
        bad = [i for i in out if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"id {bad[0]} is outside the vocabulary (size {self.vocab_size})")
        return self.encoding.decode(out, errors=self.errors)

    # --- vocabulary -----------------------------------------------------------------------------------

    def token_to_id(self, token: str) -> int:
        """Id of a special token, or of a rank file token spelled in GPT-2's byte alphabet (as id_to_token
        writes it, and as Qwen2's tokenizer.json spells the same tokens)."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        if all(c in self._byte_of_char for c in token):
            rank = self.ranks.get(bytes(self._byte_of_char[c] for c in token))
            if rank is not None:
                return rank
        raise ValueError(f"token {token!r} is not in the vocabulary")

    def id_to_token(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id in self._token_of_id:
            return "".join(self._spelling[b] for b in self._token_of_id[token_id])
        if token_id in self._special_of_id:
            return self._special_of_id[token_id]
        raise ValueError(f"id {token_id} is outside the vocabulary (size {self.vocab_size})")

    @property
    def vocab_size(self) -> int:
        return len(self.ranks) + len(self.special_tokens)

    @property
    def bos_token_id(self) -> None:
        return None

    @property
    def eos_token_id(self) -> int:
        return self.eod_id

    @property
    def pad_token_id(self) -> None:
        return None

    @property
    def chat_template(self) -> str:
        """The tokenizer_config.json's template, else the built-in "qwen_vl": Qwen-(VL-)Chat's make_context."""
        return self._chat_template or "qwen_vl"

    @property
    def own_chat_template(self) -> str | None:
        """The template tokenizer_config.json names (jinja or a built-in name), None when it names none: then the
        model's scheme may pick its family's (Vary's "vary", schemes/dual.py) over the default chat_template."""
        return self._chat_template


def _find(ids: list[int], target: int, start: int) -> int:
    try:
        return ids.index(target, start)
    except ValueError:
        return -1
