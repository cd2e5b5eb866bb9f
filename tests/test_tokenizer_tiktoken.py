"""Qwen-1's tiktoken tokenizer (text/qwen_tiktoken.py) against the reference QWenTokenizer of Qwen-VL-Chat.

The oracle is tests/reference/qwen_tiktoken.py, which ran the reference `tokenization_qwen.py` (transformers
4.32.0, tiktoken 0.14.0) on a small `qwen.tiktoken` it learned from the fixture text, and on Qwen's real
`qwen.tiktoken` as the dashscope package ships it, and saved its ids and decoded strings under
tests/fixtures/qwen_tiktoken/. Where the reference raised, vlmkit must raise ValueError.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from vlmkit.text.qwen_chat import qwen_chat_prompt, qwen_vl_query
from vlmkit.text.qwen_tiktoken import QwenTiktokenTokenizer, read_ranks
from vlmkit.text.tokenizer import load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "qwen_tiktoken"
REFERENCE = json.loads((FIXTURES / "reference.json").read_text())
REAL = json.loads((FIXTURES / "reference_real.json").read_text())


@pytest.fixture(scope="module")
def tok() -> QwenTiktokenTokenizer:
    return load_tokenizer(FIXTURES)


def encode_kwargs(case: dict) -> dict:
    kwargs = {}
    if case["allowed_special"] is not None:
        kwargs["allowed_special"] = case["allowed_special"]
    if case["disallowed_special"] is not None:
        kwargs["disallowed_special"] = case["disallowed_special"]
    return kwargs


def check_encode(tok: QwenTiktokenTokenizer, case: dict) -> None:
    if "error" in case:
        with pytest.raises(ValueError):
            tok.encode(case["text"], **encode_kwargs(case))
    else:
        assert tok.encode(case["text"], **encode_kwargs(case)) == case["ids"]


def check_decode(tok: QwenTiktokenTokenizer, case: dict) -> None:
    if "error" in case:
        with pytest.raises(ValueError):
            tok.decode(case["ids"], skip_special_tokens=case["skip_special_tokens"])
    else:
        assert tok.decode(case["ids"], skip_special_tokens=case["skip_special_tokens"]) == case["text"]


def test_the_fixture_covers_what_it_must():
    assert len(REFERENCE["mixed_text"]) >= 2000
    assert (FIXTURES / "qwen.tiktoken").stat().st_size < 100_000
    names = {case["name"] for case in REFERENCE["encode"]}
    assert {f"special:{s}" for s in REFERENCE["special_ids"]} <= names
    partial = next(case for case in REFERENCE["decode"] if case["name"] == "partial_multibyte")
    assert partial["text"].endswith("\ufffd")


def test_a_qwen_vl_directory_loads_as_the_tiktoken_tokenizer(tok):
    assert isinstance(tok, QwenTiktokenTokenizer)
    assert tok.vocab_size == REFERENCE["vocab_size"]
    assert {s: tok.token_to_id(s) for s in REFERENCE["special_ids"]} == REFERENCE["special_ids"]
    assert [tok.id_to_token(i) for i in REFERENCE["special_ids"].values()] == list(REFERENCE["special_ids"])
    assert tok.eos_token_id == REFERENCE["special_ids"]["<|endoftext|>"]
    assert tok.encode("\n") == REFERENCE["nl_ids"]


@pytest.mark.parametrize("case", REFERENCE["encode"], ids=lambda c: c["name"][:60])
def test_encode_equals_the_reference(tok, case):
    check_encode(tok, case)


@pytest.mark.parametrize("case", REFERENCE["decode"], ids=lambda c: c["name"])
def test_decode_equals_the_reference(tok, case):
    check_decode(tok, case)


def test_a_qwen_vl_prompt_holds_the_paths_bytes_then_padding(tok):
    """The reference's image span, checked by hand: <img>, the path's byte values, <imgpad> x (256 - len), </img>."""
    ids = tok.encode("x<img>猫.jpg</img>")
    path = "猫.jpg".encode()
    start = ids.index(tok.img_start_id)
    assert ids[start + 1:start + 1 + len(path)] == list(path)
    assert ids[start + 1 + len(path):-1] == [tok.img_pad_id] * (256 - len(path))
    assert ids[-1] == tok.img_end_id and len(ids) - start == 258


def test_token_spellings_round_trip(tok):
    for token_id in (0, 1, 255, 256, tok.vocab_size - 1, tok.eod_id):
        assert tok.token_to_id(tok.id_to_token(token_id)) == token_id
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.id_to_token(tok.vocab_size)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.token_to_id("<|extra_205|>")


def test_save_pretrained_writes_the_same_files_back(tok, tmp_path):
    assert sorted(tok.save_pretrained(tmp_path)) == ["qwen.tiktoken", "tokenizer_config.json"]
    assert (tmp_path / "qwen.tiktoken").read_bytes() == (FIXTURES / "qwen.tiktoken").read_bytes()
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == json.loads(
        (FIXTURES / "tokenizer_config.json").read_text())
    again = load_tokenizer(tmp_path)
    for case in REFERENCE["encode"][:3]:
        check_encode(again, case)


def test_a_model_directory_with_qwen_tiktoken_loads_and_saves_it(tmp_path):
    """load_model of a model folder whose tokenizer is qwen.tiktoken gets this tokenizer; saving writes it back."""
    from vlmkit.load import load_model, tiny_random_model

    folder = tiny_random_model(0).save_pretrained(tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink(missing_ok=True)
    for name in ("qwen.tiktoken", "tokenizer_config.json"):
        shutil.copy(FIXTURES / name, folder / name)
    loaded = load_model(str(folder))
    assert isinstance(loaded.tokenizer, QwenTiktokenTokenizer)
    assert loaded.tokenizer.encode(REFERENCE["mixed_text"]) == REFERENCE["encode"][0]["ids"]
    out = loaded.save_pretrained(tmp_path / "out")
    assert (out / "qwen.tiktoken").read_bytes() == (FIXTURES / "qwen.tiktoken").read_bytes()
    assert not (out / "tokenizer.json").exists()


def test_malformed_rank_files_say_which_line(tmp_path):
    cases = {"bad base64": "IQ== 0\n!!! 1\n", "repeated token": "IQ== 0\nIQ== 1\n", "gap": "IQ== 0\nIg== 2\n"}
    for what, text in cases.items():
        (tmp_path / "qwen.tiktoken").write_text(text)
        with pytest.raises(ValueError, match="qwen.tiktoken"):
            read_ranks(tmp_path / "qwen.tiktoken")
    assert read_ranks(FIXTURES / "qwen.tiktoken")[bytes([ord("!")])] == 0  # GPT-2's byte order: '!' first


# --- Qwen's real qwen.tiktoken, as the dashscope package (pinned in the test extra) ships it ------------------


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory) -> Path:
    spec = importlib.util.find_spec("dashscope")
    if spec is None or spec.submodule_search_locations is None:
        raise RuntimeError("the real qwen.tiktoken comes with the dashscope package: pip install -e '.[test]'")
    file = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    assert hashlib.sha256(file.read_bytes()).hexdigest() == REAL["vocab_sha256"], f"{file} is another version"
    folder = tmp_path_factory.mktemp("real")
    shutil.copy(file, folder / "qwen.tiktoken")
    return folder


@pytest.fixture(scope="module")
def real_tok(real_dir) -> QwenTiktokenTokenizer:
    return load_tokenizer(real_dir)


def test_real_vocabulary_ids(real_tok):
    assert real_tok.vocab_size == REAL["vocab_size"] == 151860
    assert {s: real_tok.token_to_id(s) for s in REAL["special_ids"]} == REAL["special_ids"]
    assert real_tok.img_start_id == 151857


@pytest.mark.parametrize("case", REAL["encode"], ids=lambda c: c["name"])
def test_real_vocabulary_encode(real_tok, case):
    check_encode(real_tok, case)


@pytest.mark.parametrize("case", REAL["decode"], ids=lambda c: c["name"])
def test_real_vocabulary_decode(real_tok, case):
    check_decode(real_tok, case)


def test_real_vocabulary_saves_byte_for_byte(real_tok, real_dir, tmp_path):
    real_tok.save_pretrained(tmp_path)
    assert (tmp_path / "qwen.tiktoken").read_bytes() == (real_dir / "qwen.tiktoken").read_bytes()


# --- Qwen-VL-Chat's prompt (text/qwen_chat.py) against from_list_format and make_context ----------------------


@pytest.mark.parametrize("case", REFERENCE["from_list_format"], ids=lambda c: c["text"][:30])
def test_query_text_equals_from_list_format(case):
    assert qwen_vl_query(case["parts"]) == case["text"]


def check_make_context(tok: QwenTiktokenTokenizer, case: dict) -> None:
    history = [tuple(turn) for turn in case["history"]]
    text, ids = qwen_chat_prompt(tok, case["query"], history, case["system"], case["max_window_size"])
    assert text == case["raw_text"]
    assert ids == case["ids"]


@pytest.mark.parametrize("case", REFERENCE["make_context"], ids=lambda c: c["name"])
def test_prompt_ids_equal_make_context(tok, case):
    check_make_context(tok, case)


@pytest.mark.parametrize("case", REAL["make_context"], ids=lambda c: c["name"])
def test_real_vocabulary_prompt_ids_equal_make_context(real_tok, case):
    check_make_context(real_tok, case)


def test_query_parts_that_are_not_understood_are_refused():
    with pytest.raises(ValueError, match="none of"):
        qwen_vl_query([{"ref": "a dog"}])
    with pytest.raises(ValueError, match="x1, y1, x2, y2"):
        qwen_vl_query([{"box": [(1, 2, 3)]}])


def test_tokenizer_config_can_rename_the_image_tags(tmp_path):
    """QWenTokenizer takes its tags (and errors) as keyword arguments from tokenizer_config.json; the ids follow
    the reference's order: 208 ChatML/extra tokens after the ranks, then ref, box, quad, image start/end/pad."""
    shutil.copy(FIXTURES / "qwen.tiktoken", tmp_path / "qwen.tiktoken")
    config = {"tokenizer_class": "QWenTokenizer", "image_start_tag": "<image>", "image_end_tag": "</image>",
              "errors": "strict"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    n = REFERENCE["n_mergeable"]
    assert tok.token_to_id("<image>") == n + 208 + 6 and tok.token_to_id("</image>") == n + 208 + 7
    assert tok.encode("<img>") == tok.encode("<img>", allowed_special=())  # the old tag is text now
    assert tok.decode(tok.encode("<image>a.png</image>")) == "<image>a.png</image>"
    e4 = read_ranks(FIXTURES / "qwen.tiktoken")[b"\xe4"]
    with pytest.raises(UnicodeDecodeError):
        tok.decode([e4])
    tok.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text()) == config
