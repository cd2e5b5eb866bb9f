"""GGUF vocabulary -> `tokenizers.Tokenizer`: the tokenizer a GGUF file describes, rebuilt as llama.cpp reads it.

    spec = gguf_tokenizer_spec(read_gguf_metadata("SmolLM2-135M-Instruct.Q4_1.gguf"))
    spec.backend.encode("hello").ids, spec.eos_token, spec.add_bos_token

A GGUF file carries no tokenizer.json, only `tokenizer.ggml.*` metadata: the
token strings and types, the BPE merges, the name of the pre-tokenizer, the
special token ids and whether BOS/EOS are added. This module turns them into a
byte-level BPE `tokenizers.Tokenizer` (GPT-2's byte alphabet, llama.cpp's text
splitting for the named pre-tokenizer, control and user-defined tokens matched
whole). `HFTokenizer.from_gguf` / `from_gguf_metadata` are the public entry
points; this module is what they are built from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.models import BPE

# llama.cpp's token types (gguf.TokenType): control tokens are special, user-defined ones are
# added tokens matched whole in the text.
GGUF_NORMAL, GGUF_CONTROL, GGUF_USER_DEFINED = 1, 3, 4

# How llama.cpp splits text before byte-level BPE, by `tokenizer.ggml.pre` (llama.cpp
# src/llama-vocab.cpp, llm_tokenizer_bpe): a split regex, or GPT-2's own regex (the one
# pre_tokenizers.ByteLevel(use_regex=True) applies), optionally after isolating every digit.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2 = "gpt2"  # GPT-2's regex
_DIGITS_GPT2 = "digits+gpt2"  # every digit on its own, then GPT-2's regex (SmolLM2, StarCoder)
GGUF_PRE_TOKENIZERS: dict[str, str] = {
    "default": _GPT2, "gpt2": _GPT2,
    "smollm": _DIGITS_GPT2, "starcoder": _DIGITS_GPT2, "refact": _DIGITS_GPT2, "codeshell": _DIGITS_GPT2,
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}


@dataclass
class GGUFTokenizerSpec:
    """A GGUF file's tokenizer: the Rust backend plus the special tokens and flags HFTokenizer keeps beside it."""

    backend: RustTokenizer
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    chat_template: str | None  # tokenizer.chat_template (Jinja source), if the file has one
    add_bos_token: bool  # encode(add_special_tokens=True) puts BOS in front
    add_eos_token: bool  # ... and EOS at the end


def gguf_tokenizer_spec(meta: dict[str, Any], source: str = "GGUF metadata") -> GGUFTokenizerSpec:
    """Build the tokenizer parsed GGUF metadata (key -> value) describes. Supports tokenizer.ggml.model
    "gpt2" (byte-level BPE: GPT-2, Llama-3, Qwen2, SmolLM2 ...); source names the file in errors."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{source}: tokenizer.ggml.model {kind!r} is not supported; supported: 'gpt2' "
                         "(byte-level BPE). Load the model's tokenizer.json with HFTokenizer.from_dir instead")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type", [GGUF_NORMAL] * len(tokens)))
    pre = meta.get("tokenizer.ggml.pre", "default")
    backend = byte_level_bpe(tokens, meta.get("tokenizer.ggml.merges", []), pre, source)
    add_gguf_special_tokens(backend, tokens, types)

    def token(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}")
        return None if token_id is None else tokens[int(token_id)]

    return GGUFTokenizerSpec(
        backend=backend, bos_token=token("bos_token_id"), eos_token=token("eos_token_id"),
        pad_token=token("padding_token_id"), unk_token=token("unknown_token_id"),
        chat_template=meta.get("tokenizer.chat_template"),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)))


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (bytes_to_unicode): printable bytes map to
    themselves, the other 68 to chr(256 + n) in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_level_bpe(tokens: list[str], merges: Sequence[str], pre: str, source: str) -> RustTokenizer:
    """A byte-level BPE tokenizer from a GGUF vocabulary, merges ("a b" strings) and pre-tokenizer name."""
    if pre not in GGUF_PRE_TOKENIZERS:
        raise ValueError(f"{source}: tokenizer.ggml.pre {pre!r} is not supported; supported: "
                         f"{sorted(GGUF_PRE_TOKENIZERS)}")
    alphabet = byte_level_alphabet()
    spelled = set(alphabet.values())
    # Byte-level vocabularies spell every byte with the printable alphabet; llama.cpp stores a few
    # added tokens raw (with real spaces, say), which are respelled so the BPE model can hold them.
    vocab = {t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ")) for m in merges]
    split = GGUF_PRE_TOKENIZERS[pre]
    # llama.cpp matches whole words against the vocabulary before merging for Llama-3 (ignore_merges).
    model = BPE(vocab=vocab, merges=pairs, continuing_subword_prefix="", end_of_word_suffix="",
                fuse_unk=False, ignore_merges=split == _LLAMA3_SPLIT)
    backend = RustTokenizer(model)
    if split == _GPT2:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == _DIGITS_GPT2:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def add_gguf_special_tokens(backend: RustTokenizer, tokens: list[str], types: list[int]) -> None:
    """Control tokens become special added tokens, user-defined ones plain added tokens: both are
    then matched whole in the text instead of being cut into pieces by BPE."""
    spelled = set(byte_level_alphabet().values())
    # A control token using characters outside the byte alphabet is a mislabelled llama.cpp entry
    # that the BPE vocabulary cannot hold; adding it would grow the vocabulary past the model's.
    control = [AddedToken(t, special=True, normalized=False)
               for t, k in zip(tokens, types, strict=True) if k == GGUF_CONTROL and set(t) <= spelled]
    user = [AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types, strict=True) if k == GGUF_USER_DEFINED and set(t) <= spelled]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)
