"""Tokenizers: one interface over a checkpoint's tokenizer.json, a GGUF vocabulary and a character set.

    tok = load_tokenizer("path/to/model_dir")          # tokenizer.json (+ tokenizer_config.json ...)
    tok = load_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")   # vocabulary + merges stored in the GGUF
    tok = load_tokenizer("chars.json")                 # a CharTokenizer saved with .save()
    tok = load_tokenizer("Qwen-VL-Chat/")              # qwen.tiktoken (text/qwen_tiktoken.py)
    tok.save_pretrained("out/")                        # out/tokenizer.json (+ tokenizer_config.json); load_tokenizer reads it
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")   # special tokens in the text are single ids

`HFTokenizer` wraps a `tokenizers.Tokenizer` (the Rust library transformers'
fast tokenizers use), so a checkpoint's own tokenizer.json gives the same ids
as transformers. A GGUF file has no tokenizer.json: `HFTokenizer.from_gguf`
rebuilds one from the `tokenizer.ggml.*` metadata the way llama.cpp reads it
(the builder lives in text/gguf_vocab.py).
`CharTokenizer` is a character-level vocabulary for models trained from scratch.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as RustTokenizer

from vlmkit.files import write_text_atomically
from vlmkit.text.gguf_vocab import gguf_tokenizer_spec

TOKENIZER_FILE, TOKENIZER_CONFIG_FILE = "tokenizer.json", "tokenizer_config.json"


class Tokenizer(ABC):
    """What the rest of vlmkit needs from a tokenizer: text <-> ids, special ids, the chat template."""

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of text. Special tokens written in the text (e.g. `<|im_start|>`) become single ids.
        add_special_tokens adds what the tokenizer adds around a sequence (e.g. a BOS)."""

    @abstractmethod
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ids; special tokens are dropped when skip_special_tokens is set."""

    @abstractmethod
    def token_to_id(self, token: str) -> int:
        """Id of one vocabulary entry; ValueError naming the token if it is not in the vocabulary."""

    @abstractmethod
    def id_to_token(self, token_id: int) -> str:
        """Vocabulary entry of one id; ValueError if the id is out of range."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, added and special tokens included."""

    @property
    @abstractmethod
    def bos_token_id(self) -> int | None: ...

    @property
    @abstractmethod
    def eos_token_id(self) -> int | None: ...

    @property
    @abstractmethod
    def pad_token_id(self) -> int | None: ...

    @property
    @abstractmethod
    def chat_template(self) -> str | None:
        """Jinja source of the checkpoint's chat template or the name of a built-in one; None if unknown."""

    @abstractmethod
    def save_pretrained(self, folder: str | Path) -> list[str]:
        """Write the tokenizer's files into folder (created if missing), its chat template included, so that
        load_tokenizer(folder) gives the same tokenizer back; returns the names of the files written. Each
        file is replaced atomically. The one way vlmkit writes a tokenizer (weights.save_pretrained and so
        LoadedModel.save_pretrained and `vlmkit train` use it)."""

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_token_id is None else self.id_to_token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_token_id is None else self.id_to_token(self.eos_token_id)

    @property
    def end_token_ids(self) -> tuple[int, ...]:
        """The ids that end generation. A loaded model sets them (load.LoadedModel: the chat template's turn
        end, the config's and generation_config.json's eos_token_id); until then, the eos alone."""
        ids = getattr(self, "_end_token_ids", None)
        if ids is not None:
            return ids
        return () if self.eos_token_id is None else (self.eos_token_id,)

    @end_token_ids.setter
    def end_token_ids(self, ids: Iterable[int]) -> None:
        ids = tuple(dict.fromkeys(ids))
        bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool) or i < 0]
        if bad:
            raise ValueError(f"end token ids must be non-negative ints, got {bad}")
        self._end_token_ids = ids

    def __len__(self) -> int:
        return self.vocab_size


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` plus the special tokens and chat template transformers keeps beside it."""

    def __init__(self, backend: RustTokenizer, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, unk_token: str | None = None, chat_template: str | None = None,
                 add_bos_token: bool | None = None, add_eos_token: bool | None = None,
                 extra_special_tokens: Sequence[str] = ()) -> None:
        """The named and extra special tokens become special added tokens of backend (matched whole in
        text, dropped by skip_special_tokens), new ids if the vocabulary lacks them, as transformers does.
        add_bos_token / add_eos_token: None keeps backend's own post-processor; a bool replaces it
        with one that adds BOS / EOS when encode(add_special_tokens=True) (GGUF files state these)."""
        self.backend = backend
        self._tokens = {"bos": bos_token, "eos": eos_token, "pad": pad_token, "unk": unk_token}
        added = {t.content for t in backend.get_added_tokens_decoder().values()}
        missing = [t for t in dict.fromkeys([*self._tokens.values(), *extra_special_tokens])
                   if t is not None and t not in added]
        if missing:
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        self._chat_template = chat_template
        if add_bos_token is not None or add_eos_token is not None or backend.post_processor is None:
            self._set_post_processor(bool(add_bos_token), bool(add_eos_token))

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        bos, eos = self._tokens["bos"], self._tokens["eos"]
        add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
        single = " ".join([f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos)
        pair = single + " " + " ".join([f"{bos}:1"] * add_bos + ["$B:1"] + [f"{eos}:1"] * add_eos)
        special = [(t, self.backend.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        self.backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    @classmethod
    def from_dir(cls, path: str | Path) -> HFTokenizer:
        """Load a transformers tokenizer directory: tokenizer.json, and when present tokenizer_config.json,
        special_tokens_map.json and chat_template.jinja (which wins over a template in the config)."""
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: vlmkit reads fast tokenizers only; write one with "
                                    "transformers' AutoTokenizer.from_pretrained(...).save_pretrained(dir)")
        backend = RustTokenizer.from_file(str(file))
        config = _read_json(path / TOKENIZER_CONFIG_FILE)
        special_map = _read_json(path / "special_tokens_map.json")
        tokens = {}
        for role in ("bos", "eos", "pad", "unk"):
            key = f"{role}_token"
            tokens[key] = _token_content(config.get(key, special_map.get(key)))
        extra = []
        for key in ("additional_special_tokens", "extra_special_tokens"):
            value = config.get(key, special_map.get(key)) or []
            extra += [_token_content(t) for t in (value.values() if isinstance(value, dict) else value)]
        template = _template_from_config(config.get("chat_template"))
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        if template is None and (path / "chat_template.json").is_file():
            template = _template_from_config(_read_json(path / "chat_template.json").get("chat_template"))
        # Like transformers 5, add_bos_token / add_eos_token in the config are ignored: tokenizer.json's
        # post-processor says what encode(add_special_tokens=True) adds.
        return cls(backend, **tokens, chat_template=template, extra_special_tokens=extra)

    @classmethod
    def from_gguf(cls, path: str | Path) -> HFTokenizer:
        """Rebuild the tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata."""
        from vlmkit.weights.gguf import read_gguf_metadata  # weights.gguf imports this module

        return cls.from_gguf_metadata(read_gguf_metadata(path), source=str(path))

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], source: str = "GGUF metadata") -> HFTokenizer:
        """Build from parsed GGUF metadata (key -> value). Supports tokenizer.ggml.model "gpt2"
        (byte-level BPE: GPT-2, Llama-3, Qwen2, SmolLM2 ...)."""
        spec = gguf_tokenizer_spec(meta, source)
        return cls(spec.backend, bos_token=spec.bos_token, eos_token=spec.eos_token, pad_token=spec.pad_token,
                   unk_token=spec.unk_token, chat_template=spec.chat_template,
                   add_bos_token=spec.add_bos_token, add_eos_token=spec.add_eos_token)

    def save_pretrained(self, folder: str | Path) -> list[str]:
        """tokenizer.json (the backend: vocabulary, merges, added tokens, post-processor) and
        tokenizer_config.json (the bos/eos/pad/unk tokens and the chat template), the files transformers'
        AutoTokenizer and HFTokenizer.from_dir read."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {f"{role}_token": token for role, token in self._tokens.items() if token is not None}
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        if self._chat_template is not None:
            config["chat_template"] = self._chat_template
        write_text_atomically(folder / "tokenizer.json", self.backend.to_str())
        write_text_atomically(folder / TOKENIZER_CONFIG_FILE, json.dumps(config, ensure_ascii=False, indent=1) + "\n")
        return ["tokenizer.json", TOKENIZER_CONFIG_FILE]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"token {token!r} is not in the vocabulary")
        return token_id

    def id_to_token(self, token_id: int) -> str:
        token = self.backend.id_to_token(int(token_id))
        if token is None:
            raise ValueError(f"id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return token

    def _id(self, role: str) -> int | None:
        token = self._tokens[role]
        return None if token is None else self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._id("bos")

    @property
    def eos_token_id(self) -> int | None:
        return self._id("eos")

    @property
    def pad_token_id(self) -> int | None:
        return self._id("pad")

    @property
    def unk_token_id(self) -> int | None:
        return self._id("unk")

    @property
    def chat_template(self) -> str | None:
        return self._chat_template


# --- tokenizer_config.json and friends -----------------------------------------------------------


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e


def _token_content(value: str | dict | None) -> str | None:
    """tokenizer_config.json writes a token as a string or as an AddedToken dict with "content"."""
    return value.get("content") if isinstance(value, dict) else value


def _template_from_config(value: str | list | None) -> str | None:
    """A template is a string, or a list of {"name", "template"} of which "default" is the chat one."""
    if isinstance(value, list):
        named = {entry["name"]: entry["template"] for entry in value}
        return named.get("default")
    return value


# --- characters ---------------------------------------------------------------------------------

DEFAULT_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>", "<|im_start|>", "<|im_end|>")
CHAR_TOKENIZER_TYPE = "vlmkit.CharTokenizer"


class CharTokenizer(Tokenizer):
    """One id per character, for small models trained from scratch.

    Ids 0.. are the special tokens in the order given (by default `<pad>` `<s>` `</s>` `<unk>`
    `<image>` `<|im_start|>` `<|im_end|>`), then the characters in sorted order. Special tokens
    written in the text are single ids. A character that is not in the vocabulary encodes to
    `<unk>` (so decode(encode(text)) == text only for text made of known characters).
    encode(add_special_tokens=True) puts `<s>` in front, as Llama tokenizers do.
    The default chat template is the built-in "chatml", whose markers are special tokens here.

        >>> tok = CharTokenizer.from_corpus("hello")
        >>> tok.decode(tok.encode("hole?"))
        'hole<unk>'
    """

    def __init__(self, chars: Iterable[str], special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
                 chat_template: str | None = "chatml") -> None:
        special_tokens = list(dict.fromkeys(special_tokens))
        for required in ("<pad>", "<s>", "</s>", "<unk>"):
            if required not in special_tokens:
                raise ValueError(f"special_tokens must include {required!r}; got {special_tokens}")
        short = [t for t in special_tokens if len(t) < 2]
        if short:
            raise ValueError(f"special tokens must be at least 2 characters so they cannot clash with "
                             f"characters; got {short}")
        chars = sorted(set(chars))
        long = [c for c in chars if len(c) != 1]
        if long:
            raise ValueError(f"chars must be single characters; got {long[:5]}")
        self.special_tokens = special_tokens
        self.chars = chars
        self.vocab = special_tokens + chars
        self._ids = {t: i for i, t in enumerate(self.vocab)}
        self._special_ids = set(range(len(special_tokens)))
        # Longest first, so a special token that begins another cannot win the match.
        alternation = "|".join(re.escape(t) for t in sorted(special_tokens, key=len, reverse=True))
        self._special_re = re.compile(f"({alternation})")
        self._chat_template = chat_template

    @classmethod
    def from_corpus(cls, text: str | Iterable[str], **kwargs: Any) -> CharTokenizer:
        """Vocabulary = every character of text (a string or an iterable of strings)."""
        chars: set[str] = set()
        for piece in [text] if isinstance(text, str) else text:
            chars.update(piece)
        return cls(chars, **kwargs)

    def save_pretrained(self, folder: str | Path) -> list[str]:
        """folder/tokenizer.json: the vocabulary and chat template as save() writes them (load_tokenizer tells
        this file from a transformers tokenizer.json by its "type")."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.save(Path(folder) / "tokenizer.json")
        return ["tokenizer.json"]

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as JSON; CharTokenizer.load(path) reads it back. The file is replaced
        atomically: a failed save (e.g. a character UTF-8 cannot hold) leaves the old file or none."""
        data = {"type": CHAR_TOKENIZER_TYPE, "version": 1, "special_tokens": self.special_tokens,
                "chars": self.chars, "chat_template": self._chat_template}
        write_text_atomically(path, json.dumps(data, ensure_ascii=False, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CharTokenizer:
        if not Path(path).is_file():
            raise FileNotFoundError(f"char tokenizer file {path} not found")
        data = _read_json(Path(path))
        if data.get("type") != CHAR_TOKENIZER_TYPE:
            raise ValueError(f"{path} is not a CharTokenizer file (its \"type\" is {data.get('type')!r}, "
                             f"expected {CHAR_TOKENIZER_TYPE!r})")
        return cls(data["chars"], data["special_tokens"], data.get("chat_template"))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        unk = self._ids["<unk>"]
        ids = [self._ids["<s>"]] if add_special_tokens else []
        for i, piece in enumerate(self._special_re.split(text)):
            if i % 2:  # odd pieces are the special tokens the split captured
                ids.append(self._ids[piece])
            else:
                ids.extend(self._ids.get(c, unk) for c in piece)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return "".join(self.id_to_token(i) for i in ids)

    def token_to_id(self, token: str) -> int:
        if token not in self._ids:
            raise ValueError(f"token {token!r} is not in the vocabulary")
        return self._ids[token]

    def id_to_token(self, token_id: int) -> str:
        if not 0 <= token_id < len(self.vocab):
            raise ValueError(f"id {token_id} is outside the vocabulary (size {len(self.vocab)})")
        return self.vocab[token_id]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def bos_token_id(self) -> int:
        return self._ids["<s>"]

    @property
    def eos_token_id(self) -> int:
        return self._ids["</s>"]

    @property
    def pad_token_id(self) -> int:
        return self._ids["<pad>"]

    @property
    def unk_token_id(self) -> int:
        return self._ids["<unk>"]

    @property
    def chat_template(self) -> str | None:
        return self._chat_template


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer at path: a directory with tokenizer.json (or Qwen-1's qwen.tiktoken), a .gguf file, or a
    CharTokenizer JSON."""
    path = Path(path)
    if path.is_dir():
        file = path / "tokenizer.json"
        if file.is_file():
            return CharTokenizer.load(file) if _is_char_file(file) else HFTokenizer.from_dir(path)
        if (path / "qwen.tiktoken").is_file():  # Qwen-1 / Qwen-VL: a tiktoken rank file, no tokenizer.json
            from vlmkit.text.qwen_tiktoken import QwenTiktokenTokenizer  # it imports this module

            return QwenTiktokenTokenizer.from_dir(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return HFTokenizer.from_gguf(ggufs[0])
        raise FileNotFoundError(f"{path} holds no tokenizer.json, no qwen.tiktoken and {len(ggufs)} .gguf files; "
                                "pass a directory with tokenizer.json or qwen.tiktoken, a .gguf file or a "
                                "CharTokenizer .json file")
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer path {path} does not exist")
    if path.suffix == ".gguf":
        return HFTokenizer.from_gguf(path)
    if path.suffix == ".json":
        if _is_char_file(path):
            return CharTokenizer.load(path)
        if path.name == "tokenizer.json":
            return HFTokenizer.from_dir(path.parent)
    raise ValueError(f"cannot tell what tokenizer {path} is: pass a directory with tokenizer.json, "
                     "a .gguf file or a CharTokenizer .json file")


def _is_char_file(file: Path) -> bool:
    return _read_json(file).get("type") == CHAR_TOKENIZER_TYPE
