"""Tokenizers: a transformers tokenizer directory read by HFTokenizer gives transformers' ids;
CharTokenizer's ids are hand-computed; load_tokenizer picks the right class or says why not."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from vlmkit.text.gguf_vocab import byte_level_alphabet
from vlmkit.text.tokenizer import CharTokenizer, HFTokenizer, load_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 12:45 on 2024-05-17!",
    "Hello, world!   Multiple   spaces\tand\ttabs\n\nnew lines.",
    "Numbers: 3.14159, 1000000, 42nd; emoji 🙂🚀 and 中文字符测试。",
    "def f(x):\n    return x ** 2  # code",
]
SAMPLES = [
    "Hello world",
    " leading space and trailing  ",
    "digits 1234567890 and 3.5%",
    "punctuation!?... (brackets) [x] {y} \"quotes\" 'single'",
    "whitespace\t\truns\n\n\n   end",
    "emoji 🙂🚀👍🏽 mixed",
    "中文字符，还有标点。",
    "<s>special</s> inside<pad> text",
    "",
]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
TEMPLATE = "{% for m in messages %}{{ bos_token + m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"


def _tiny_backend() -> RustTokenizer:
    """A small byte-level BPE trained on CORPUS: real merges, byte fallback for anything unseen."""
    tok = RustTokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                         show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A transformers tokenizer directory written by transformers itself (BOS added, chat template)."""
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tok")
    reference = PreTrainedTokenizerFast(tokenizer_object=_tiny_backend(), bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>", add_bos_token=True)
    reference.chat_template = TEMPLATE
    reference.save_pretrained(path)
    return path


def test_hf_dir_matches_transformers(hf_dir):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(hf_dir)
    tok = HFTokenizer.from_dir(hf_dir)
    for text in SAMPLES:
        for add in (False, True):
            assert tok.encode(text, add_special_tokens=add) == reference.encode(text, add_special_tokens=add), text
        ids = reference.encode(text, add_special_tokens=True)
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        reference.bos_token_id, reference.eos_token_id, reference.pad_token_id)
    assert tok.vocab_size == len(reference)
    assert tok.chat_template == reference.chat_template == TEMPLATE


def test_hf_dir_config_flags_match_transformers(tmp_path):
    """The older layout: a tokenizer.json without post-processor, add_bos/eos_token and an AddedToken dict
    in tokenizer_config.json, more tokens in special_tokens_map.json (two not in the vocabulary),
    a named list of chat templates."""
    from transformers import AutoTokenizer

    _tiny_backend().save(str(tmp_path / "tokenizer.json"))
    bos = {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False, "rstrip": False,
           "single_word": False}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "add_bos_token": True,
              "add_eos_token": True, "chat_template": [{"name": "default", "template": TEMPLATE},
                                                       {"name": "tool_use", "template": "{{ 'tools' }}"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    special_map = {"eos_token": "</s>", "pad_token": "<new_pad>", "additional_special_tokens": ["<tool>"]}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special_map))
    reference = AutoTokenizer.from_pretrained(tmp_path)
    tok = HFTokenizer.from_dir(tmp_path)
    for text in SAMPLES:
        for add in (False, True):
            assert tok.encode(text, add_special_tokens=add) == reference.encode(text, add_special_tokens=add), text
    # transformers 5 lets tokenizer.json's post-processor (here: none) win over the config's flags
    assert tok.encode("a", add_special_tokens=True) == [tok.token_to_id("a")]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        reference.bos_token_id, reference.eos_token_id, reference.pad_token_id)
    assert tok.vocab_size == len(reference) == 402  # "<new_pad>" and "<tool>" were added
    text = "x<new_pad>y<tool>"
    assert tok.encode(text) == reference.encode(text, add_special_tokens=False)
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == "xy"
    assert tok.chat_template == TEMPLATE


def test_special_tokens_in_text_are_single_ids(hf_dir):
    tok = HFTokenizer.from_dir(hf_dir)
    ids = tok.encode("a</s>b")
    assert tok.token_to_id("</s>") in ids
    assert tok.decode(ids, skip_special_tokens=True) == "ab"


def test_token_to_id_names_missing_token(hf_dir):
    tok = HFTokenizer.from_dir(hf_dir)
    with pytest.raises(ValueError, match="'<nope>'"):
        tok.token_to_id("<nope>")


def test_from_dir_without_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        HFTokenizer.from_dir(tmp_path)


def test_char_tokenizer_ids_by_hand():
    tok = CharTokenizer.from_corpus(["ba", "c"])
    # specials 0..6 in DEFAULT_SPECIAL_TOKENS order, then sorted characters
    assert tok.vocab_size == 10
    assert tok.encode("abc") == [7, 8, 9]
    assert tok.encode("<s>ab</s>") == [1, 7, 8, 2]
    assert tok.encode("ab", add_special_tokens=True) == [1, 7, 8]
    assert tok.encode("<image>a<|im_start|>") == [4, 7, 5]
    assert tok.encode("az") == [7, 3]  # "z" is unknown -> <unk>
    assert tok.decode([1, 7, 3, 2]) == "<s>a<unk></s>"
    assert tok.decode([1, 7, 3, 2], skip_special_tokens=True) == "a"
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.token_to_id("c") == 9
    with pytest.raises(ValueError, match="'z'"):
        tok.token_to_id("z")
    with pytest.raises(ValueError, match="outside"):
        tok.decode([10])


def test_char_tokenizer_save_load(tmp_path):
    tok = CharTokenizer.from_corpus("héllo wörld 中", special_tokens=["<pad>", "<s>", "</s>", "<unk>", "<x>"])
    file = tmp_path / "chars.json"
    tok.save(file)
    back = CharTokenizer.load(file)
    assert back.vocab == tok.vocab and back.chat_template == "chatml"
    assert back.encode("wörld<x>中") == tok.encode("wörld<x>中")
    assert isinstance(load_tokenizer(file), CharTokenizer)


def test_a_failed_char_tokenizer_save_leaves_the_old_file(tmp_path):
    """A lone surrogate cannot be written as UTF-8: the save raises before the file is touched (no 0-byte
    tokenizer.json), and the file saved before stays as it was, with no temporary beside it."""
    file = tmp_path / "tokenizer.json"
    CharTokenizer.from_corpus("ab").save(file)
    before = file.read_bytes()
    with pytest.raises(UnicodeEncodeError):
        CharTokenizer.from_corpus("ab\ud800").save(file)
    assert file.read_bytes() == before
    with pytest.raises(UnicodeEncodeError):
        CharTokenizer.from_corpus("\ud800").save(tmp_path / "new.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]


def test_char_tokenizer_rejects_bad_specials():
    with pytest.raises(ValueError, match="<unk>"):
        CharTokenizer("abc", special_tokens=["<pad>", "<s>", "</s>"])
    with pytest.raises(ValueError, match="at least 2"):
        CharTokenizer("abc", special_tokens=["<pad>", "<s>", "</s>", "<unk>", "#"])


def test_load_tokenizer_dispatch(hf_dir, tmp_path):
    assert isinstance(load_tokenizer(hf_dir), HFTokenizer)
    assert isinstance(load_tokenizer(hf_dir / "tokenizer.json"), HFTokenizer)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"type": "something"}))
    with pytest.raises(ValueError, match="cannot tell"):
        load_tokenizer(other)


def test_byte_level_alphabet_matches_transformers():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    assert byte_level_alphabet() == bytes_to_unicode()
