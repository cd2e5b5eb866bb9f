r"""Dataset files: both record forms, every validation fault at its file:line, policies, the round trip.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_data_formats.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vlmkit.data.formats import (
    TURN_RULE,
    DatasetError,
    Problem,
    Sample,
    content_parts,
    load_dataset,
    write_llava_json,
)
from vlmkit.text.tokenizer import CharTokenizer

IMG = {"type": "image"}


def _text(s: str) -> dict:
    return {"type": "text", "text": s}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """tmp_path with two real PNGs in img/ and a file that is not an image."""
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 6), (255, 0, 0)).save(tmp_path / "img" / "a.png")
    Image.new("RGB", (4, 4), (0, 0, 255)).save(tmp_path / "img" / "b.png")
    (tmp_path / "img" / "broken.png").write_bytes(b"this is not a png")
    return tmp_path


def _expected_good(folder: Path) -> Sample:
    """The sample both good records below describe, written out by hand."""
    return Sample(
        id="good-1",
        images=[folder / "img" / "a.png", folder / "img" / "b.png"],
        messages=[
            {"role": "system", "content": [_text("你是一个有帮助的助手。")]},
            {"role": "user", "content": [IMG, _text("这张图片里写了什么？")]},
            {"role": "assistant", "content": [_text("红色。")]},
            {"role": "user", "content": [_text("Compare with "), IMG, _text("What changed?")]},
            {"role": "assistant", "content": [_text("The colour: it is blue now.")]},
        ],
    )


GOOD_CONVERSATIONS = {
    "id": "good-1",
    "images": ["img/a.png", "img/b.png"],
    "conversations": [
        {"from": "system", "value": "你是一个有帮助的助手。"},
        {"from": "human", "value": "<image>\n这张图片里写了什么？"},
        {"from": "gpt", "value": "红色。"},
        {"from": "human", "value": "Compare with <image>\nWhat changed?"},
        {"from": "gpt", "value": "The colour: it is blue now."},
    ],
}

GOOD_MESSAGES = {
    "id": "good-1",
    "images": ["img/a.png", "img/b.png"],
    "messages": [
        {"role": "system", "content": "你是一个有帮助的助手。"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "这张图片里写了什么？"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "红色。"}]},
        {"role": "user", "content": [{"type": "text", "text": "Compare with "}, {"type": "image"},
                                     {"type": "text", "text": "What changed?"}]},
        {"role": "assistant", "content": "The colour: it is blue now."},
    ],
}


def _jsonl(path: Path, lines: list) -> Path:
    """Write one line per item: a dict/list is dumped as JSON, a str is written as is."""
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n"
                            for x in lines), encoding="utf-8")
    return path


def test_content_parts_worked_examples():
    assert content_parts("<image>\nWhat is it?") == [IMG, _text("What is it?")]
    assert content_parts("a<image>b") == [_text("a"), IMG, _text("b")]
    assert content_parts("<image>\n<image>\n\nx") == [IMG, IMG, _text("\nx")]  # one newline per image is dropped
    assert content_parts("Describe.\n<image>") == [_text("Describe.\n"), IMG]
    assert content_parts("") == []


def test_conversations_json_multi_turn_multi_image(folder: Path):
    path = folder / "data.json"
    path.write_text(json.dumps([GOOD_CONVERSATIONS, {**GOOD_CONVERSATIONS, "id": "good-2"}],
                               ensure_ascii=False, indent=2), encoding="utf-8")
    samples, problems = load_dataset(path)
    assert problems == []
    assert [s.id for s in samples] == ["good-1", "good-2"]
    assert samples[0] == _expected_good(folder)
    record_starts = [n for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if text == "  {"]
    assert record_starts == [2, 31]  # where json.dumps(indent=2) put each record's '{'
    assert (samples[0].file, samples[0].line, samples[1].line) == (str(path), 2, 31)


def test_messages_jsonl_gives_the_same_sample(folder: Path):
    path = _jsonl(folder / "data.jsonl", [GOOD_MESSAGES])
    samples, problems = load_dataset(path)
    assert problems == [] and samples == [_expected_good(folder)]


def test_single_image_key_and_image_root(folder: Path):
    data = folder / "elsewhere"
    data.mkdir()
    record = {"id": 7, "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nOCR"},
                                                           {"from": "gpt", "value": "ok"}]}
    path = _jsonl(data / "d.jsonl", [record])
    samples, _ = load_dataset(path, image_root=folder / "img")
    assert samples[0].id == "7" and samples[0].images == [folder / "img" / "a.png"]
    with pytest.raises(DatasetError, match=r"d\.jsonl:1: record '7': image 'a\.png': no such file"):
        load_dataset(path)  # resolved against the file's own folder, where there is no a.png


def _turns(*pairs: tuple[str, str]) -> list[dict]:
    return [{"from": f, "value": v} for f, v in pairs]


OK_TURNS = _turns(("human", "<image>\nRead it."), ("gpt", "ABC"))

# (record or raw line, expected cause substrings); record i is on line i + 1 of the JSONL file.
BAD_LINES = [
    ('{"id": "x", "image": "img/a.png", "conversations": [', ["bad JSON at column"]),
    ({"id": "ok-1", "image": "img/a.png", "conversations": OK_TURNS}, []),
    ({"id": "key", "image": "img/a.png", "conversations": OK_TURNS, "source": "web"}, ["unknown key 'source'"]),
    ({"id": "role", "image": "img/a.png", "conversations": _turns(("human", "<image>\nhi"), ("bot", "x"))},
     ["turn 1: 'from' is 'bot'"]),
    ({"id": "turnkey", "image": "img/a.png",
      "conversations": [{"from": "human", "value": "<image>\nhi", "weight": 1}, {"from": "gpt", "value": "x"}]},
     ["turn 0: unknown key 'weight'"]),
    ({"id": "missing", "image": "img/nope.png", "conversations": OK_TURNS}, ["image 'img/nope.png': no such file"]),
    ({"id": "count", "images": ["img/a.png", "img/b.png"], "conversations": OK_TURNS},
     ["1 <image> placeholder(s) but 2 image(s)"]),
    ({"id": "noimg", "conversations": OK_TURNS}, ["1 <image> placeholder(s) but 0 image(s)"]),
    ({"id": "empty", "image": "img/a.png", "conversations": _turns(("human", "<image>\nhi"), ("gpt", "  \n"))},
     ["turn 1 (assistant) is empty"]),
    ({"id": "order", "image": "img/a.png", "conversations": _turns(("human", "<image>\nhi"), ("human", "again"),
                                                                   ("gpt", "x"))},
     ["do not follow the rule: " + TURN_RULE]),
    ({"id": "ends", "image": "img/a.png", "conversations": _turns(("human", "<image>\nhi"), ("gpt", "x"),
                                                                  ("human", "and?"))},
     ["['user', 'assistant', 'user'] do not follow the rule"]),
    ({"id": "both", "image": "img/a.png", "conversations": OK_TURNS, "messages": []},
     ["exactly one of 'conversations'"]),
    ({"id": "msgrole", "image": "img/a.png",
      "messages": [{"role": "human", "content": [{"type": "image"}]}, {"role": "assistant", "content": "x"}]},
     ["message 0: role is 'human'"]),
    ({"id": "part", "image": "img/a.png",
      "messages": [{"role": "user", "content": [{"type": "image", "url": "http://x"}]},
                   {"role": "assistant", "content": "x"}]},
     ["message 0: content part"]),
    ({"id": "gptimg", "images": ["img/a.png", "img/b.png"],
      "conversations": _turns(("human", "<image>\nhi"), ("gpt", "<image>\nthere"))},
     ["turn 1 (assistant) holds an image"]),
    ("[1, 2]", ["a record must be a JSON object, got list"]),
    ({"id": "ok-2", "image": "img/b.png", "conversations": OK_TURNS}, []),
]


def _bad_file(folder: Path) -> Path:
    return _jsonl(folder / "bad.jsonl", [item for item, _ in BAD_LINES])


def _expected_problems() -> list[tuple[int, list[str]]]:
    return [(line, causes) for line, (_, causes) in enumerate(BAD_LINES, start=1) if causes]


def _assert_reported(problems: list[Problem], file: Path) -> None:
    """Every bad record is reported at its line with its cause(s); no good record is."""
    by_line: dict[int, list[str]] = {}
    for p in problems:
        assert p.file == str(file)
        by_line.setdefault(p.line, []).append(p.cause)
    expected = _expected_problems()
    assert sorted(by_line) == [line for line, _ in expected]
    for line, causes in expected:
        for cause in causes:
            assert any(cause in c for c in by_line[line]), (line, cause, by_line[line])


def test_skip_reports_every_bad_record_at_its_line(folder: Path):
    path = _bad_file(folder)
    samples, problems = load_dataset(path, policy="skip")
    assert [s.id for s in samples] == ["ok-1", "ok-2"]  # only the good ones, in order, nothing substituted
    assert [s.line for s in samples] == [2, 17]
    _assert_reported(problems, path)
    by_id = {p.record_id: p for p in problems}
    assert str(by_id["missing"]).startswith(f"{path}:6: record 'missing': image 'img/nope.png': no such file")
    assert sorted(p.line for p in problems if p.record_id is None) == [1, 16]


def test_fail_raises_one_error_listing_every_problem(folder: Path):
    path = _bad_file(folder)
    with pytest.raises(DatasetError) as info:
        load_dataset(path, policy="fail")
    assert isinstance(info.value, ValueError)
    _assert_reported(info.value.problems, path)
    message = str(info.value)
    for line, _ in _expected_problems():
        assert f"{path}:{line}:" in message
    assert "policy='skip'" in message


def test_json_array_reports_the_line_of_each_record(folder: Path):
    path = folder / "bad.json"
    path.write_text(
        "[\n"                                                                       # 1
        '  {"id": "a", "image": "img/a.png",\n'                                     # 2
        '   "conversations": [{"from": "human", "value": "<image>\\nhi"},\n'        # 3
        '                     {"from": "gpt", "value": "x"}]},\n'                   # 4
        '  {"id": "b", "images": [],\n'                                             # 5
        '   "conversations": [{"from": "human", "value": "<image>\\nhi"},\n'        # 6
        '                     {"from": "gpt", "value": "x"}]},\n'                   # 7
        '  {"id": "c", "image": "img/a.png",\n'                                     # 8
        '   "conversations": [{"from": "human", "value": "<image>\\nhi"}\n'         # 9
        '                     {"from": "gpt", "value": "x"}]},\n'                   # 10: missing comma
        '  {"id": "d", "image": "img/b.png", "conversations": []}\n'                # 11: unreadable now
        "]\n", encoding="utf-8")
    samples, problems = load_dataset(path, policy="skip")
    assert [s.id for s in samples] == ["a"]
    assert [(p.line, p.record_id) for p in problems] == [(5, "b"), (8, None)]
    assert "0 image(s)" in problems[0].cause
    assert problems[1].cause.startswith("bad JSON at line 10 column 22: Expecting ',' delimiter")


def test_json_array_trailing_garbage_and_missing_bracket(folder: Path):
    record = json.dumps({"id": "a", "image": "img/a.png", "conversations": OK_TURNS})
    extra = folder / "extra.json"
    extra.write_text(f"[{record}]\n\n]", encoding="utf-8")
    samples, problems = load_dataset(extra, policy="skip")
    assert len(samples) == 1 and [(p.line, p.cause) for p in problems] == [
        (3, "bad JSON: extra data after the closing ']' of the array")]
    cut = folder / "cut.json"
    cut.write_text(f"[\n{record}\n", encoding="utf-8")
    samples, problems = load_dataset(cut, policy="skip")
    assert len(samples) == 1 and problems[0].line == 3 and "expected ',' or ']'" in problems[0].cause


def test_unreadable_image_only_with_check_images(folder: Path):
    path = _jsonl(folder / "d.jsonl", [{"id": "p", "image": "img/broken.png", "conversations": OK_TURNS}])
    samples, problems = load_dataset(path)
    assert len(samples) == 1 and problems == []  # it exists: the default check stops there
    with pytest.raises(DatasetError, match=r"d\.jsonl:1: record 'p': image 'img/broken\.png': unreadable .*"
                                           r"not an image in a format Pillow can read"):
        load_dataset(path, check_images=True)


def test_too_long_by_chars_and_by_tokens(folder: Path):
    turns = _turns(("human", "<image>\n读这个"), ("gpt", "你好世界"))  # 3 + 4 = 7 characters of text
    path = _jsonl(folder / "d.jsonl", [{"id": "long", "image": "img/a.png", "conversations": turns}])
    assert len(load_dataset(path, max_chars=7)[0]) == 1
    _, problems = load_dataset(path, max_chars=6, policy="skip")
    assert [(p.line, p.cause) for p in problems] == [(1, "too long: 7 characters of text, over max_chars=6")]
    tok = CharTokenizer("读这个你好世界")
    assert len(load_dataset(path, tokenizer=tok, max_tokens=7)[0]) == 1
    _, problems = load_dataset(path, tokenizer=tok, max_tokens=5, policy="skip")
    assert [p.cause for p in problems] == ["too long: 7 tokens of text, over max_tokens=5"]


def test_bad_utf8_line_and_empty_file(folder: Path):
    good = json.dumps({"id": "g", "image": "img/a.png", "conversations": OK_TURNS}).encode()
    path = folder / "d.jsonl"
    path.write_bytes(good + b"\n" + b'{"id": "\xff"}\n')
    samples, problems = load_dataset(path, policy="skip")
    assert [s.id for s in samples] == ["g"] and problems[0].line == 2 and "not UTF-8" in problems[0].cause
    empty = folder / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="holds no records"):
        load_dataset(empty)


def test_argument_errors(folder: Path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_dataset(folder / "nope.json")
    path = _jsonl(folder / "d.jsonl", [GOOD_MESSAGES])
    with pytest.raises(ValueError, match="policy must be one of"):
        load_dataset(path, policy="ignore")
    with pytest.raises(ValueError, match="together"):
        load_dataset(path, max_tokens=10)


@pytest.mark.parametrize("name", ["out/copy.json", "out/copy.jsonl"])
def test_round_trip(folder: Path, name: str):
    source = _jsonl(folder / "data.jsonl", [GOOD_MESSAGES, {
        "id": "text-only", "messages": [{"role": "user", "content": "Say hi.\n"},
                                        {"role": "assistant", "content": "hi <image-free>"}]}, {
        "id": "tail", "images": ["img/b.png", "img/a.png"],
        "conversations": _turns(("human", "Describe.\n<image><image>\n\n两张"), ("gpt", "OK"))}])
    samples, _ = load_dataset(source)
    assert samples[2].messages[0]["content"] == [_text("Describe.\n"), IMG, IMG, _text("\n两张")]
    out = folder / name
    write_llava_json(samples, out)
    again, problems = load_dataset(out)
    assert problems == [] and again == samples
    record = json.loads(out.read_text(encoding="utf-8").splitlines()[0]) if out.suffix == ".jsonl" else \
        json.loads(out.read_text(encoding="utf-8"))[0]
    assert record["images"] == ["../img/a.png", "../img/b.png"]  # relative to the file's folder
    assert record["conversations"][1] == {"from": "human", "value": "<image>\n这张图片里写了什么？"}


def test_round_trip_with_image_root(folder: Path):
    samples, _ = load_dataset(_jsonl(folder / "data.jsonl", [GOOD_CONVERSATIONS]))
    out = folder / "out" / "copy.json"
    write_llava_json(samples, out, image_root=folder / "img")
    assert json.loads(out.read_text(encoding="utf-8"))[0]["images"] == ["a.png", "b.png"]
    assert load_dataset(out, image_root=folder / "img")[0] == samples


# ---- hostile records: each is one record's problem at its line, never the whole file's

DEEP = "[" * 100_000 + "]" * 100_000  # deeper than Python's JSON reader recurses
HOSTILE = [  # (line, expected cause); lines 1 and 7 are good records
    (2, "nested too deeply for Python's JSON reader"),
    (3, "the system refuses the path (File name too long)"),
    (4, "a number in the record cannot be read (Exceeds the limit (4300 digits) for integer string conversion"),
    (5, "turn 1 (assistant) holds a lone surrogate '\\ud800' at character 3"),
    (6, "'id' holds a lone surrogate"),
]


def _hostile_lines() -> list[str]:
    ok = {"image": "img/a.png", "conversations": OK_TURNS}
    return [
        json.dumps({"id": "first", **ok}),
        '{"id": "deep", "image": "img/a.png", "conversations": ' + DEEP + "}",
        json.dumps({"id": "long-name", "image": "x" * 5000 + ".png", "conversations": OK_TURNS}),
        '{"id": ' + "7" * 5000 + ', "image": "img/a.png", "conversations": []}',
        ('{"id": "surrogate", "image": "img/a.png", "conversations": [{"from": "human", "value": "<image>\\nhi"}, '
         '{"from": "gpt", "value": "ABC\\ud800"}]}'),  # the JSON escape, as a file holds it
        '{"id": "bad-\\udfff", "image": "img/a.png", "conversations": ' + json.dumps(OK_TURNS) + "}",
        json.dumps({"id": "last", **ok}),
    ]


@pytest.mark.parametrize("form", ["jsonl", "json"])
def test_hostile_records_are_problems_of_their_own_line(folder: Path, form: str):
    """A record nested 100,000 deep, a 5,000-character image name, a 5,000-digit id and lone surrogates in
    the text and the id: each a problem at its line, the records around them kept (in a JSON array too: the
    array goes on after the record Python cannot read)."""
    lines = _hostile_lines()
    if form == "jsonl":
        path = folder / "hostile.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        offset = 0
    else:
        path = folder / "hostile.json"
        path.write_text("[\n" + ",\n".join(lines) + "\n]\n", encoding="utf-8")
        offset = 1  # the '[' is line 1
    samples, problems = load_dataset(path, policy="skip")
    assert [(s.id, s.line) for s in samples] == [("first", 1 + offset), ("last", 7 + offset)]
    assert [p.line for p in problems] == [line + offset for line, _ in HOSTILE]
    for problem, (_, cause) in zip(problems, HOSTILE):
        assert cause in problem.cause, (problem, cause)
        assert len(str(problem)) < 400  # the 5,000-character name and the 5,000 digits are not repeated
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    assert len(info.value.problems) == len(HOSTILE)
    assert "--data-policy skip" in str(info.value)


def test_a_missing_image_names_the_cli_flag(folder: Path):
    path = _jsonl(folder / "d.jsonl", [{"id": "m", "image": "nope.png", "conversations": OK_TURNS}])
    with pytest.raises(DatasetError, match=r"pass --image-root DIR \(from Python: image_root=\)"):
        load_dataset(path)
