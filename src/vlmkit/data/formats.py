r"""Dataset files: LLaVA-style JSON / JSONL records -> validated, normalised `Sample`s, and back.

    samples, problems = load_dataset("train.jsonl", policy="skip")
    for p in problems:
        print(p)          # train.jsonl:17: record 'abc': 2 <image> placeholder(s) but 1 image(s) ...
    write_llava_json(samples, "copy.json")

Two record forms are read, in one file or mixed:

- conversations (LLaVA):
  {"id": ..., "image": "a.png" | "images": ["a.png", ...],
   "conversations": [{"from": "human" | "gpt" | "system", "value": "<image>\nWhat is it?"}, ...]}
- messages: {"id": ..., "images": [...],
   "messages": [{"role": "system" | "user" | "assistant",
                 "content": str | [{"type": "text", "text": str} | {"type": "image"}, ...]}, ...]}

The file layout: a `.jsonl` / `.ndjson` file holds one record per line (blank lines are
skipped); any other file whose first character is `[` is a JSON array of records, else it is
read as JSONL. A problem's line is the JSONL line, or for an array the line where the record's
`{` stands. A syntax error inside an array makes the rest of that array unreadable; the error
is reported and the records before it are kept (JSONL loses only the broken line).

Normalised form (`Sample.messages`, the chat form of `vlmkit.text.chat`): roles
system/user/assistant; content is always a list of parts. Every `<image>` in a text becomes an
{"type": "image"} part and one newline right after it is dropped (the chat templates write an
image part as its placeholder and a newline); adjacent text parts are merged and empty ones
dropped. `Sample.images` holds absolute paths: relative ones are resolved against `image_root`
(default: the dataset file's folder). Image parts take the images in order.

Validation, one `Problem(file, line, record_id, cause)` per fault, every fault of every record:
unreadable JSON or text (also a record nested deeper than Python's JSON reader goes, or a number with
more digits than Python converts: that record alone is lost, in a JSON array too); keys, roles or part
types that are not those above; text holding a lone surrogate (a JSON escape such as "\ud800" that is no
character and cannot be written as UTF-8); a missing image, or an image path the system refuses (e.g.
too long) (or, with check_images=True, an image `vlmkit.image.load.load_image` cannot read); a number of
`<image>` placeholders / image parts different from the number of images; an image in an
assistant turn; an empty turn; a conversation not following the turn rule (`TURN_RULE`); a
record over `max_chars` characters or, given a tokenizer, over `max_tokens` tokens (both count
the text of the turns only, not the chat template's markers or the image tokens). A bad record
is never repaired or replaced: policy "fail" raises one `DatasetError` listing every problem,
"skip" drops the bad records and returns the problems beside the good samples.
"""

from __future__ import annotations

import json
import os
import re
import reprlib
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmkit.image.load import ImageLoadError, load_image
from vlmkit.options import option
from vlmkit.text.tokenizer import Tokenizer

IMAGE_TOKEN = "<image>"
CONVERSATION_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}  # LLaVA "from" -> role
ROLE_TO_FROM = {role: name for name, role in CONVERSATION_ROLES.items()}
ROLES = ("system", "user", "assistant")
RECORD_KEYS = {"id", "image", "images", "conversations", "messages"}
TURN_RULE = ("an optional system turn first, then user and assistant turns alternating, "
             "starting with user and ending with assistant")
POLICIES = ("fail", "skip")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # a str from JSON holds one only for an unpaired escape
_STRUCTURE = re.compile(r'[\[\]{}",]')  # what _value_end counts
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string, quotes included
_SHOW = reprlib.Repr()  # values in messages: bounded in length and depth, whatever the record holds
_SHOW.maxstring = _SHOW.maxother = 80

Part = dict[str, str]
Message = dict[str, Any]  # {"role": str, "content": list[Part]}


@dataclass
class Sample:
    """One conversation: id, absolute image paths, and messages in vlmkit's chat form.

    Content is always a list of parts (build it from LLaVA text with `content_parts`), so samples
    made in code compare equal to the same samples written and loaded again. file and line say
    where it was read from; they do not take part in equality.
    """

    id: str
    images: list[Path]
    messages: list[Message]
    file: str = field(default="", compare=False)
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Problem:
    """A bad record: where it is (file, 1-based line), its id when known, and what is wrong."""

    file: str
    line: int
    record_id: str | None
    cause: str

    def __str__(self) -> str:
        record = f" record {_show(self.record_id)}:" if self.record_id is not None else ""
        return f"{self.file}:{self.line}:{record} {self.cause}"


class DatasetError(ValueError):
    """A dataset has bad records; `problems` lists every one."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        files = sorted({p.file for p in problems})
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {', '.join(files)}:\n{lines}\n"
                         f"Fix these records, or pass {option('data_policy_skip')} to drop them and get this list back.")


def load_dataset(path: str | os.PathLike, image_root: str | os.PathLike | None = None, policy: str = "fail",
                 check_images: bool = False, max_chars: int | None = None, tokenizer: Tokenizer | None = None,
                 max_tokens: int | None = None) -> tuple[list[Sample], list[Problem]]:
    """Read and validate a JSON / JSONL dataset: (good samples in record order, problems).

    image_root: folder relative image paths are resolved against (default: the file's folder).
    policy: "fail" raises DatasetError listing every problem; "skip" drops bad records and reports them.
    check_images: decode every image with load_image (default: only check that the file exists).
    max_chars / tokenizer + max_tokens: refuse records whose turns' text is longer.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if (tokenizer is None) != (max_tokens is None):
        raise ValueError("pass tokenizer and max_tokens together (the limit is counted in that tokenizer's tokens)")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} not found")
    root = Path(image_root) if image_root is not None else path.parent
    checker = _RecordChecker(str(path), root, check_images, max_chars, tokenizer, max_tokens)
    samples: list[Sample] = []
    problems: list[Problem] = []
    for line, record, error in _records(path):
        if error is not None:
            problems.append(Problem(str(path), line, None, error))
            continue
        sample, faults = checker.check(record, line)
        if faults:
            problems.extend(Problem(str(path), line, _raw_id(record), cause) for cause in faults)
        else:
            samples.append(sample)
    if not samples and not problems:
        problems.append(Problem(str(path), 1, None, "the file holds no records"))
    if problems and policy == "fail":
        raise DatasetError(problems)
    return samples, problems


def print_problems(problems: Sequence[Problem], where: str = "") -> None:
    """Tell stderr which records --data-policy skip dropped (where: e.g. the file that also lists them)."""
    print(f"skipped {len(problems)} bad record(s){where}:", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)


def write_llava_json(samples: Iterable[Sample], path: str | os.PathLike,
                     image_root: str | os.PathLike | None = None) -> None:
    """Write samples in the LLaVA conversations form: a JSON array, or JSONL when path ends in .jsonl.

    Image paths are written relative to image_root (default: the file's folder), so
    load_dataset(path, image_root) gives back equal samples. The file is replaced atomically.
    """
    path = Path(path)
    root = Path(os.path.abspath(image_root if image_root is not None else path.parent))
    records = [_to_record(sample, root) for sample in samples]
    if path.suffix in (".jsonl", ".ndjson"):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    else:
        text = json.dumps(records, ensure_ascii=False, indent=1) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def content_parts(text: str) -> list[Part]:
    r"""Text with `<image>` placeholders -> content parts (one newline after each placeholder dropped).

        >>> content_parts("<image>\nWhat is it?")
        [{'type': 'image'}, {'type': 'text', 'text': 'What is it?'}]
    """
    parts: list[Part] = []
    for i, piece in enumerate(text.split(IMAGE_TOKEN)):
        if i > 0:
            parts.append({"type": "image"})
            piece = piece.removeprefix("\n")
        _append_text(parts, piece)
    return parts


def parts_text(parts: Iterable[Part]) -> str:
    r"""Content parts -> LLaVA text: each image part as `<image>` and a newline (inverse of content_parts)."""
    return "".join(IMAGE_TOKEN + "\n" if p["type"] == "image" else p["text"] for p in parts)


def _append_text(parts: list[Part], text: str) -> None:
    if not text:
        return
    if parts and parts[-1]["type"] == "text":
        parts[-1] = {"type": "text", "text": parts[-1]["text"] + text}
    else:
        parts.append({"type": "text", "text": text})


def _records(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line, record, None) for each record of the file, or (line, None, cause) where one cannot be read."""
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    if path.suffix not in (".jsonl", ".ndjson") and data.lstrip()[:1] == b"[":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            yield data[:e.start].count(b"\n") + 1, None, f"not UTF-8 text (byte {e.start}); save the file as UTF-8"
            return
        yield from _array_records(text)
        return
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            yield number, json.loads(raw.decode("utf-8")), None
        except UnicodeDecodeError as e:
            yield number, None, f"not UTF-8 text (byte {e.start} of the line); save the file as UTF-8"
        except json.JSONDecodeError as e:
            yield number, None, f"bad JSON at column {e.colno}: {e.msg}"
        except (ValueError, RecursionError) as e:
            yield number, None, _unreadable(e)


def _array_records(text: str) -> Iterator[tuple[int, Any, str | None]]:
    """The records of a JSON array, each with the line its value starts on (decoded one by one)."""
    decoder = json.JSONDecoder()
    counted, line = 0, 1

    def line_at(index: int) -> int:  # indexes only grow, so newlines are counted once
        nonlocal counted, line
        line += text.count("\n", counted, index)
        counted = index
        return line

    index = _skip_space(text, _skip_space(text, 0) + 1)  # past the '['
    while not text.startswith("]", index):
        record_line = line_at(index)
        try:
            record, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError as e:
            yield record_line, None, (f"bad JSON at line {e.lineno} column {e.colno}: {e.msg}; the records after "
                                      "it in this array cannot be read (in JSONL one bad line costs one record)")
            return
        except (ValueError, RecursionError) as e:  # well-formed but unreadable: skip to the record's end
            end = _value_end(text, index)
            yield record_line, None, _unreadable(e) + ("" if end is not None else
                                                       "; it never ends, so the rest of the array cannot be read")
            if end is None:
                return
            index = end
        else:
            yield record_line, record, None
        index = _skip_space(text, index)
        if text.startswith(",", index):
            index = _skip_space(text, index + 1)
        elif not text.startswith("]", index):
            yield line_at(index), None, "bad JSON: expected ',' or ']' after the record; the rest cannot be read"
            return
    rest = _skip_space(text, index + 1)
    if rest < len(text):
        yield line_at(rest), None, "bad JSON: extra data after the closing ']' of the array"


def _unreadable(error: ValueError | RecursionError) -> str:
    """The cause for a record json cannot read though its syntax is fine: nested too deep for Python's
    reader (RecursionError), or holding an integer with more digits than Python converts (ValueError)."""
    if isinstance(error, RecursionError):
        return ("the record is nested too deeply for Python's JSON reader (RecursionError); records hold "
                "objects and lists a few levels deep")
    cause = str(error).split(";")[0]  # Python's advice after the ';' (sys.set_int_max_str_digits) is not the user's
    return f"a number in the record cannot be read ({cause}); write long numbers, such as ids, as strings"


def _value_end(text: str, index: int) -> int | None:
    """The index just past the JSON value starting at text[index], found by counting brackets outside
    strings (no recursion, so any depth), or None when the text ends first."""
    depth = 0
    while (mark := _STRUCTURE.search(text, index)) is not None:
        char, index = mark.group(), mark.start()
        if char == '"':
            string = _STRING.match(text, index)
            if string is None:
                return None
            index = string.end()
            if depth == 0:
                return index
            continue
        if char in "[{":
            depth += 1
        elif depth == 0:  # a ',' or a closing bracket after a value that is not an object or array
            return index
        elif char in "]}":
            depth -= 1
            if depth == 0:
                return index + 1
        index += 1
    return None


def _skip_space(text: str, index: int) -> int:
    while index < len(text) and text[index] in " \t\r\n":
        index += 1
    return index


def _show(value: Any) -> str:
    """value's repr for a message, shortened (long strings, deep or long lists and objects elided)."""
    return _SHOW.repr(value)


def _check_unicode(what: str, text: str, faults: list[str]) -> None:
    """A fault when text holds a lone surrogate: JSON lets "\\ud800" through, but it is no character, so the
    text could not be trained on and written back (the tokenizer, the outputs) as UTF-8."""
    lone = _LONE_SURROGATE.search(text)
    if lone is not None:
        faults.append(f"{what} holds a lone surrogate {_show(lone.group())} at character {lone.start()} (an "
                      "unpaired JSON escape, no character); fix the text (a pair such as \"\\ud83d\\ude00\" is fine)")


def _raw_id(record: Any) -> str | None:
    value = record.get("id") if isinstance(record, Mapping) else None
    return str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None


class _RecordChecker:
    """Turns one decoded record into a Sample, collecting every fault found on the way."""

    def __init__(self, file: str, root: Path, check_images: bool, max_chars: int | None,
                 tokenizer: Tokenizer | None, max_tokens: int | None):
        self.file = file
        self.root = root
        self.check_images = check_images
        self.max_chars = max_chars
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self._image_faults: dict[Path, str | None] = {}  # images shared by many records are checked once

    def check(self, record: Any, line: int) -> tuple[Sample | None, list[str]]:
        """(the sample, []) for a good record, (None or a partial sample, faults) for a bad one."""
        if not isinstance(record, Mapping):
            return None, [f"a record must be a JSON object, got {type(record).__name__}"]
        faults = [f"unknown key {_show(key)}; record keys are {sorted(RECORD_KEYS)}" for key in record
                  if key not in RECORD_KEYS]
        record_id = _raw_id(record)
        if "id" in record and record_id is None:
            faults.append(f"'id' must be a string or an integer, got {_show(record['id'])}")
        elif record_id is not None:
            _check_unicode("'id'", record_id, faults)
        images = self._images(record, faults)
        if ("conversations" in record) == ("messages" in record):
            faults.append("a record needs exactly one of 'conversations' (LLaVA form) or 'messages'")
            return None, faults
        if "conversations" in record:
            messages = self._conversations(record["conversations"], faults)
        else:
            messages = self._messages(record["messages"], faults)
        if messages is not None:
            self._check_turns(messages, images, faults)
        sample = Sample(record_id if record_id is not None else f"{Path(self.file).name}:{line}",
                        images or [], messages or [], self.file, line)
        return sample, faults

    def _images(self, record: Mapping[str, Any], faults: list[str]) -> list[Path] | None:
        """The record's image paths (None when 'image' / 'images' are malformed)."""
        if "image" in record and "images" in record:
            faults.append("give either 'image' (one path) or 'images' (a list), not both")
            return None
        names = [record["image"]] if "image" in record else record.get("images", [])
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            faults.append(f"'image' must be a path and 'images' a list of paths, got {_show(names)}")
            return None
        paths = [Path(os.path.abspath(self.root / name)) for name in names]
        for name, path in zip(names, paths):
            if path not in self._image_faults:
                self._image_faults[path] = self._image_fault(name, path)
            if self._image_faults[path] is not None:
                faults.append(f"image {_show(name)}: {self._image_faults[path]}")
        return paths

    def _image_fault(self, name: str, path: Path) -> str | None:
        lone = _LONE_SURROGATE.search(name)
        if lone is not None:
            return f"the path holds a lone surrogate {_show(lone.group())}, which no file name can hold"
        try:
            found = path.is_file()
        except OSError as e:  # e.g. a name too long for the file system
            return f"the system refuses the path ({e.strerror})"
        if not found:
            return (f"no such file {path} (relative paths are resolved against {self.root}; pass "
                    f"{option('image_root')})")
        if self.check_images:
            try:
                load_image(path)
            except ImageLoadError as e:
                return f"unreadable ({e})"
        return None

    def _conversations(self, turns: Any, faults: list[str]) -> list[Message] | None:
        if not isinstance(turns, list):
            faults.append(f"'conversations' must be a list of turns, got {type(turns).__name__}")
            return None
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, Mapping):
                faults.append(f"turn {i} must be an object {{'from': ..., 'value': ...}}, got {_show(turn)}")
                continue
            faults.extend(f"turn {i}: unknown key {_show(key)}; turn keys are ['from', 'value']" for key in turn
                          if key not in ("from", "value"))
            name, value = turn.get("from"), turn.get("value")
            if name not in CONVERSATION_ROLES:
                faults.append(f"turn {i}: 'from' is {_show(name)}; it must be one of {list(CONVERSATION_ROLES)}")
            if not isinstance(value, str):
                faults.append(f"turn {i}: 'value' must be a string, got {_show(value)}")
            if name in CONVERSATION_ROLES and isinstance(value, str):
                messages.append({"role": CONVERSATION_ROLES[name], "content": content_parts(value)})
        return messages if len(messages) == len(turns) else None

    def _messages(self, turns: Any, faults: list[str]) -> list[Message] | None:
        if not isinstance(turns, list):
            faults.append(f"'messages' must be a list of messages, got {type(turns).__name__}")
            return None
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, Mapping):
                faults.append(f"message {i} must be an object {{'role': ..., 'content': ...}}, got {_show(turn)}")
                continue
            faults.extend(f"message {i}: unknown key {_show(key)}; message keys are ['role', 'content']"
                          for key in turn if key not in ("role", "content"))
            role = turn.get("role")
            if role not in ROLES:
                faults.append(f"message {i}: role is {_show(role)}; it must be one of {list(ROLES)}")
            parts = self._content(turn.get("content"), i, faults)
            if role in ROLES and parts is not None:
                messages.append({"role": role, "content": parts})
        return messages if len(messages) == len(turns) else None

    def _content(self, content: Any, index: int, faults: list[str]) -> list[Part] | None:
        if isinstance(content, str):
            return content_parts(content)
        if not isinstance(content, list):
            faults.append(f"message {index}: content must be a string or a list of parts, got {_show(content)}")
            return None
        parts: list[Part] = []
        ok = True
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "image" and set(part) == {"type"}:
                parts.append({"type": "image"})
            elif (isinstance(part, Mapping) and part.get("type") == "text" and set(part) == {"type", "text"}
                  and isinstance(part["text"], str)):
                for piece in content_parts(part["text"]):
                    if piece["type"] == "text":
                        _append_text(parts, piece["text"])
                    else:
                        parts.append(piece)
            else:
                faults.append(f"message {index}: content part {_show(part)} is not {{'type': 'text', 'text': str}} "
                              "or {'type': 'image'} (images come from the record's 'images', in order)")
                ok = False
        return parts if ok else None

    def _check_turns(self, messages: list[Message], images: list[Path] | None, faults: list[str]) -> None:
        placeholders = sum(p["type"] == "image" for m in messages for p in m["content"])
        if images is not None and placeholders != len(images):
            faults.append(f"{placeholders} <image> placeholder(s) but {len(images)} image(s); each image needs "
                          "exactly one <image> (or image part), in the order of 'images'")
        for i, m in enumerate(messages):
            _check_unicode(f"turn {i} ({m['role']})", "".join(p.get("text", "") for p in m["content"]), faults)
            if not any(p["type"] == "image" or p["text"].strip() for p in m["content"]):
                faults.append(f"turn {i} ({m['role']}) is empty")
            if m["role"] == "assistant" and any(p["type"] == "image" for p in m["content"]):
                faults.append(f"turn {i} (assistant) holds an image; images belong in user or system turns")
        roles = [m["role"] for m in messages]
        body = roles[1:] if roles[:1] == ["system"] else roles
        expected = ["user" if k % 2 == 0 else "assistant" for k in range(len(body))]
        if not body or body != expected or body[-1] != "assistant":
            faults.append(f"turn roles {roles} do not follow the rule: {TURN_RULE}")
        text = "".join(p["text"] for m in messages for p in m["content"] if p["type"] == "text")
        if self.max_chars is not None and len(text) > self.max_chars:
            faults.append(f"too long: {len(text)} characters of text, over max_chars={self.max_chars}")
        if self.tokenizer is not None and self.max_tokens is not None:
            count = sum(len(self.tokenizer.encode(p["text"])) for m in messages for p in m["content"]
                        if p["type"] == "text")
            if count > self.max_tokens:
                faults.append(f"too long: {count} tokens of text, over max_tokens={self.max_tokens}")


def _to_record(sample: Sample, root: Path) -> dict[str, Any]:
    """A sample as a LLaVA conversations record with image paths relative to root."""
    names = [Path(os.path.relpath(p, root)).as_posix() for p in sample.images]
    record: dict[str, Any] = {"id": sample.id}
    if len(names) == 1:
        record["image"] = names[0]
    elif names:
        record["images"] = names
    record["conversations"] = [{"from": ROLE_TO_FROM[m["role"]], "value": parts_text(m["content"])}
                               for m in sample.messages]
    return record
