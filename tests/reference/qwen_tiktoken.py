"""Fixtures of Qwen-1's tiktoken tokenizer (Qwen-VL-Chat's `QWenTokenizer`) for tests/test_tokenizer_tiktoken.py.

Runs the reference tokenizer outside vlmkit, in its own virtualenv, and saves what it returns. Nothing of the
reference is copied here: this script imports it from the directory given.

Reference: `tokenization_qwen.py` and `qwen_generation_utils.py` of Qwen-VL-Chat (GitHub mirror
x1ngzai/Qwen-VL-Chat-Int4, commit 1cd721a27dd000fc4cf688c6ad58e614da1d600d, whose requirements.txt asks for
transformers==4.32.0). Checked against a second mirror of the same file: the same code, one fork changes only
IMG_TOKEN_SPAN (256 -> 1280).
Versions: Python 3.11.7, transformers==4.32.0 (tokenizers 0.13.3 in that venv), tiktoken==0.14.0, torch 2.13.0+cpu,
dashscope==2.0.2 (ships Qwen's real `qwen.tiktoken` as dashscope/resources/qwen.tiktoken).

Exact commands (REF is a scratch directory holding the two reference files of that commit, DS the unpacked
dashscope 2.0.2 wheel; transformers 4.32.0 requires tokenizers < 0.14, so that venv keeps its tokenizers 0.13.3 to itself):
    python -m venv --system-site-packages /work/venvs/tiktoken/ref
    /work/venvs/tiktoken/ref/bin/pip install transformers==4.32.0 tiktoken==0.14.0
    pip download --no-deps dashscope==2.0.2 -d DS && unzip DS/dashscope-2.0.2-py3-none-any.whl -d DS
    /work/venvs/tiktoken/ref/bin/python tests/reference/qwen_tiktoken.py --reference-dir REF \
        --real-vocab DS/dashscope/resources/qwen.tiktoken
Two runs write the same files (the vocabulary learned here is deterministic).

What it writes under tests/fixtures/qwen_tiktoken/:
    qwen.tiktoken          a small rank file in Qwen's format (base64 token, space, rank): the 256 single bytes in
                           the real file's order (GPT-2's printable-first order, so a byte's rank is not its value),
                           then byte-level BPE merges learned here on MIXED_TEXT with Qwen's split regex
    tokenizer_config.json  Qwen-VL-Chat's tokenizer config (the directory is a Qwen-VL-Chat tokenizer layout)
    reference.json         the reference tokenizer's ids and decoded strings on that small file, and the ids of
                           Qwen-VL-Chat conversations as qwen_generation_utils.make_context builds them (queries
                           written by the tokenizer's from_list_format)
    reference_real.json    the same for a few cases on the real qwen.tiktoken (with its sha256), when --real-vocab
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib
import json
import sys
from collections import Counter
from pathlib import Path

import regex

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "qwen_tiktoken"

# At least 2,000 characters of English, Chinese, code, emoji, digits, odd whitespace and a decomposed accent
# (the reference normalizes to NFC before encoding). Training the small vocabulary on it leaves characters
# seen once as bytes, so some Chinese characters and emoji encode as partial multi-byte tokens.
MIXED_TEXT = (
    "Qwen-VL is a large vision-language model. It's trained on image-text pairs, and it'LL answer questions "
    "about pictures; WE'RE testing how its tokenizer splits text that mixes scripts, digits and symbols.\n"
    "The quick brown fox jumps over the lazy dog 3 times in 2024, at 12:45:07 -- costing $1,234.56 (or "
    "€999.99).   Three spaces, a tab\there, and trailing spaces   \n\n\n"
    "Cafe\u0301 and cafe\u0301 ne\u0301e: decomposed accents become one code point each (NFC).\r\n"
    "通义千问是阿里云研发的大语言模型。它可以回答问题、创作文字，还能表达观点、撰写代码。\n"
    "视觉语言模型把图片和文字放在一起理解：先用视觉编码器把图片变成特征，再交给语言模型。\n"
    "今天天气很好，我们去公园散步吧！你觉得怎么样？好的，下午三点见。\n"
    "日本語も少し：これはテストです。한국어도 조금: 이것은 테스트입니다.\n"
    "```python\n"
    "def tokenize(text: str, vocab: dict[bytes, int]) -> list[int]:\n"
    "    \"\"\"Split text into ids; unknown bytes fall back to single-byte tokens.\"\"\"\n"
    "    ids = []\n"
    "    for word in re.findall(r\"\\w+|\\s+|[^\\w\\s]+\", text):\n"
    "        if word.encode('utf-8') in vocab:\n"
    "            ids.append(vocab[word.encode('utf-8')])\n"
    "        else:\n"
    "            ids.extend(vocab[bytes([b])] for b in word.encode('utf-8'))  # 0x00..0xff\n"
    "    return ids\n"
    "\n"
    "if __name__ == \"__main__\":\n"
    "\tprint(tokenize(\"hello, world\", {b\"h\": 104}))\n"
    "```\n"
    "JSON: {\"id\": 42, \"tags\": [\"a\", \"b\"], \"ok\": true, \"ratio\": 0.125, \"nested\": {\"x\": null}}\n"
    "Emoji: 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇨🇳🇺🇸 ❤️ 🎉🎉🎉 — and a lone 🦙 among words. Math: ∑ x² ≤ ∞, α+β=γ.\n"
    "URLs and paths: https://example.com/a/b?c=1&d=2#frag, C:\\Users\\qwen\\图片\\猫.jpg, /tmp/dog_01.png\n"
    "Numbers split digit by digit: 1234567890, 3.14159, -273.15, 1e-6, 0xDEADBEEF.\n"
    "我们再写一段中文：模型的分词器会把汉字切成若干字节，常见的字会合并成一个词元，罕见的字则保留为多个字节。"
    "例如“龘”和“靐”这样的字很少见。\n"
    "Mixed: 在2024年，Qwen-VL用448×448的图片，把256个查询向量送进语言模型。I think that's neat, isn't it?\n"
    "A longer English paragraph so that common words repeat and merge: the model reads the image, the model "
    "reads the question, and then the model writes the answer one token at a time. Tokens that appear often "
    "become single ids; rare words stay split into smaller pieces, and rare characters stay split into bytes.\n"
    "再来一段：图片被切成小块，每一块经过视觉编码器，得到的特征再经过重采样器压缩成二百五十六个向量。"
    "语言模型看到这些向量，就像看到一段特别的文字。它回答问题时，可以用坐标框出图中的物体。\n"
    "class Resampler(nn.Module):\n"
    "    def __init__(self, dim: int = 4096, queries: int = 256) -> None:\n"
    "        super().__init__()\n"
    "        self.query = nn.Parameter(torch.zeros(queries, dim))  # (Q, D)\n"
    "\n"
    "    def forward(self, x: torch.Tensor) -> torch.Tensor:\n"
    "        return self.attn(self.query.expand(x.shape[0], -1, -1), x, x)[0]  # (B, Q, D)\n"
    "The end... or is it?!  Yes:   it is. 🙂\n"
)

# Qwen-VL prompts: images as `<img>path</img>` (the reference turns the path into its bytes, padded with <imgpad>
# to 256 ids), grounding tags, ChatML markers.
VL_PROMPT = (
    "Picture 1: <img>https://qianwen-res.oss-cn-beijing.aliyuncs.com/Qwen-VL/assets/demo.jpeg</img>\n"
    "Picture 2: <img>/data/照片/cat 1.png</img>\n"
    "这是什么？Describe both pictures.<ref>the dog</ref><box>(120,340),(560,880)</box>"
    "<quad>(1,2),(3,4),(5,6),(7,8)</quad>"
)
CHATML = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
          "Picture 1: <img>a.jpg</img>\n框出图中的狗<|im_end|>\n<|im_start|>assistant\n"
          "<ref>狗</ref><box>(1,2),(300,400)</box><|im_end|><|endoftext|>")
# More text cases: special tokens inside ordinary text, look-alikes that are not special tokens, image edge cases.
TEXT_CASES = {
    "specials_in_text": "a<|im_start|>b<|im_end|>\nc<|endoftext|>d<|extra_0|>e<|extra_204|>f",
    "lookalikes": "<|extra_205|> <|im_start|| <img <imgpad <|IM_END|> <ref >",
    "two_images_adjacent": "<img>x</img><img>y.png</img>",
    "empty_image": "<img></img>",
    "image_with_specials_after": "<img>猫.jpg</img><ref>猫</ref>",
    "end_tag_alone": "text </img> more",
    "pad_alone": "<imgpad><imgpad>",
    "unclosed_image": "Picture 1: <img>a.jpg",
    "special_inside_image": "<img>a<|im_end|>b</img>",
    "image_path_too_long": "<img>" + "p" * 257 + "</img>",
    "image_path_at_limit": "<img>" + "q" * 256 + "</img>",
    "empty": "",
    "whitespace": "   \n\t \r\n  ",
    "nfc": "e\u0301 A\u030a \u1100\u1161",
}
# (allowed_special, disallowed_special) as the reference's tokenize takes them; None means its default.
SPECIAL_MODES = [
    (None, None),
    ([], None),                                   # nothing special: markers are plain text
    (["<img>", "</img>", "<imgpad>", "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>"], None),
    ([], "all"),                                  # special-looking text is an error
    (["<|im_start|>"], ["<|im_end|>"]),
]


def byte_order() -> list[int]:
    """GPT-2's byte order, the order of the 256 single bytes at the top of the real qwen.tiktoken: the
    printable bytes first ('!'..'~', '¡'..'¬', '®'..'ÿ'), then the others by value."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    return printable + [b for b in range(256) if b not in printable]


def learn_ranks(text: str, pattern: str, max_merges: int) -> dict[bytes, int]:
    """Byte-level BPE on text split by pattern: the single bytes, then the most frequent adjacent pair merged
    repeatedly (ties broken by the larger pair bytes, for determinism) while a pair occurs at least twice."""
    ranks = {bytes([b]): rank for rank, b in enumerate(byte_order())}
    words = Counter(tuple(bytes([b]) for b in piece.encode("utf-8")) for piece in regex.findall(pattern, text))
    for _ in range(max_merges):
        pairs: Counter = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best, count = max(pairs.items(), key=lambda item: (item[1], item[0]))
        if count < 2:
            break
        merged = best[0] + best[1]
        ranks.setdefault(merged, len(ranks))
        new_words: Counter = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] += n
        words = new_words
    return ranks


def write_ranks(ranks: dict[bytes, int], file: Path) -> None:
    lines = [f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in sorted(ranks.items(), key=lambda x: x[1])]
    file.write_text("".join(lines))


def run(call) -> dict:
    """{"ids"/"text": result} or {"error": "ExceptionType: message"} when the reference raises."""
    try:
        return {"result": call()}
    except Exception as e:  # noqa: BLE001 - the reference's exception is the expected outcome being recorded
        return {"error": f"{type(e).__name__}: {e}"}


def encode_case(tok, name: str, text: str, allowed=None, disallowed=None) -> dict:
    kwargs = {}
    if allowed is not None:
        kwargs["allowed_special"] = allowed if allowed == "all" else set(allowed)
    if disallowed is not None:
        kwargs["disallowed_special"] = disallowed if disallowed == "all" else set(disallowed)
    out = run(lambda: tok.encode(text, **kwargs))
    case = {"name": name, "text": text, "allowed_special": allowed, "disallowed_special": disallowed}
    if "error" in out:
        return {**case, "error": out["error"]}
    return {**case, "ids": out["result"]}


def decode_case(tok, name: str, ids: list[int], skip: bool = False) -> dict:
    out = run(lambda: tok.decode(ids, skip_special_tokens=skip))
    case = {"name": name, "ids": ids, "skip_special_tokens": skip}
    return {**case, "error": out["error"]} if "error" in out else {**case, "text": out["result"]}


def partial_multibyte_ids(tok, ids: list[int]) -> list[int]:
    """The ids of the text up to and including the first token whose bytes are not valid UTF-8 on their own
    (a piece of a multi-byte character), so decoding them ends in a cut character."""
    for i, token_id in enumerate(ids):
        piece = tok.decoder[token_id]
        if isinstance(piece, bytes):
            try:
                piece.decode("utf-8")
            except UnicodeDecodeError:
                return ids[: i + 1]
    raise RuntimeError("MIXED_TEXT encodes without a partial multi-byte token; the fixture needs one")


def small_vocab_cases(tok, ref) -> dict:
    text_ids = tok.encode(MIXED_TEXT)
    vl_ids = tok.encode(VL_PROMPT)
    chatml_ids = tok.encode(CHATML)
    specials = list(ref.SPECIAL_TOKENS + tok.IMAGE_ST)
    encode = [encode_case(tok, "mixed_text", MIXED_TEXT), encode_case(tok, "vl_prompt", VL_PROMPT),
              encode_case(tok, "chatml", CHATML)]
    encode += [encode_case(tok, f"special:{s}", s) for s in specials]
    encode += [encode_case(tok, "all_specials_joined", " ".join(specials))]
    encode += [encode_case(tok, name, text) for name, text in TEXT_CASES.items()]
    for allowed, disallowed in SPECIAL_MODES:
        for name, text in (("specials_in_text", TEXT_CASES["specials_in_text"]), ("vl_prompt", VL_PROMPT)):
            encode.append(encode_case(tok, f"{name}:allowed={allowed}:disallowed={disallowed}", text,
                                      allowed, disallowed))
    partial = partial_multibyte_ids(tok, text_ids)
    e4 = tok.mergeable_ranks[b"\xe4"]
    decode = [
        decode_case(tok, "mixed_text", text_ids),
        decode_case(tok, "vl_prompt", vl_ids),
        decode_case(tok, "vl_prompt_skip_special", vl_ids, skip=True),
        decode_case(tok, "chatml", chatml_ids),
        decode_case(tok, "chatml_skip_special", chatml_ids, skip=True),
        decode_case(tok, "partial_multibyte", partial),
        decode_case(tok, "lone_lead_byte", [e4]),
        decode_case(tok, "lead_byte_between_text", tok.encode("ab") + [e4, e4] + tok.encode("cd")),
        decode_case(tok, "byte_values_as_ids", list(range(40, 60))),
        decode_case(tok, "every_special", [tok.special_tokens[s] for s in specials if s != tok.image_start_tag]),
        decode_case(tok, "image_without_pad", [tok.img_start_id] + tok.encode("abc") + [tok.img_end_id]),
        decode_case(tok, "unclosed_image_ids", [tok.img_start_id, 97, tok.img_pad_id]),
        decode_case(tok, "empty", []),
    ]
    return {"vocab_size": len(tok), "n_mergeable": len(tok.mergeable_ranks),
            "special_ids": {s: tok.special_tokens[s] for s in specials},
            "nl_ids": tok.encode("\n"), "encode": encode, "decode": decode}


def real_vocab_cases(tok, ref) -> dict:
    specials = list(ref.SPECIAL_TOKENS + tok.IMAGE_ST)
    text_ids = tok.encode(MIXED_TEXT)
    vl_ids = tok.encode(VL_PROMPT)
    return {"vocab_size": len(tok), "special_ids": {s: tok.special_tokens[s] for s in specials},
            "encode": [encode_case(tok, "mixed_text", MIXED_TEXT), encode_case(tok, "vl_prompt", VL_PROMPT),
                       encode_case(tok, "chatml", CHATML),
                       encode_case(tok, "specials_in_text", TEXT_CASES["specials_in_text"])],
            "decode": [decode_case(tok, "mixed_text", text_ids), decode_case(tok, "vl_prompt", vl_ids),
                       decode_case(tok, "partial_multibyte", partial_multibyte_ids(tok, text_ids))]}


# Qwen-VL-Chat conversations for make_context: (query parts for from_list_format, history, system, max_window_size).
# history is a list of (query, response) pairs whose queries are from_list_format parts too; a None response
# is an unanswered turn. The window sizes cut the history at different turns.
LIST_FORMAT_QUERIES = [
    [{"image": "https://qianwen-res.oss-cn-beijing.aliyuncs.com/Qwen-VL/assets/demo.jpeg"},
     {"image": "/data/照片/cat 1.png"}, {"text": "这两张图片有什么不同？"}],
    [{"text": "Box the dog: "}, {"ref": "the dog", "box": [(120, 340, 560, 880), (1, 2, 3, 4)]}],
    [{"box": [(0, 0, 1000, 1000)]}, {"text": " whole picture"}],
    [{"text": "No image at all, and text that looks special: <|im_end|><|endoftext|> and leading\n newline"}],
]
CONVERSATIONS = [
    ("two_images", 0, [], "You are a helpful assistant.", 6144),
    ("empty_system", 0, [], "", 6144),
    ("with_history", 1, [(0, "第一张是狗，第二张是猫。"), (2, "<ref>狗</ref><box>(10,20),(300,400)</box>")],
     "You are a helpful assistant.", 6144),
    ("unanswered_turn", 3, [(1, None), (3, "Sure.")], "You are a helpful assistant.", 6144),
    ("window_drops_old_turns", 3, [(0, "old answer"), (1, "newer"), (2, "newest")], "sys", 700),
    ("window_drops_all_history", 3, [(1, "x"), (0, "y")], "You are a helpful assistant.", 300),
    ("special_text_in_query", 3, [(3, "<|im_start|>not special<|im_end|>")], "<|endoftext|>system", 6144),
]


def make_context_cases(tok, utils) -> dict:
    queries = [tok.from_list_format(parts) for parts in LIST_FORMAT_QUERIES]
    cases = []
    for name, query, history, system, window in CONVERSATIONS:
        hist = [(queries[q], r) for q, r in history]
        raw_text, ids = utils.make_context(tok, queries[query], history=hist, system=system,
                                           max_window_size=window, chat_format="chatml")
        cases.append({"name": name, "query": queries[query], "history": hist, "system": system,
                      "max_window_size": window, "raw_text": raw_text, "ids": ids})
    return {"from_list_format": [{"parts": parts, "text": text}
                                 for parts, text in zip(LIST_FORMAT_QUERIES, queries, strict=True)],
            "make_context": cases}


def dump(data: dict, file: Path) -> None:
    file.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {file} ({file.stat().st_size} bytes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-dir", required=True, type=Path,
                        help="directory holding Qwen-VL-Chat's tokenization_qwen.py and qwen_generation_utils.py")
    parser.add_argument("--real-vocab", type=Path, help="Qwen's real qwen.tiktoken (e.g. dashscope's copy)")
    parser.add_argument("--max-merges", type=int, default=4000, help="upper bound on learned merges")
    args = parser.parse_args()
    sys.path.insert(0, str(args.reference_dir))
    ref = importlib.import_module("tokenization_qwen")

    FIXTURES.mkdir(parents=True, exist_ok=True)
    vocab = FIXTURES / "qwen.tiktoken"
    write_ranks(learn_ranks(MIXED_TEXT, ref.PAT_STR, args.max_merges), vocab)
    config = {"model_max_length": 8192, "tokenizer_class": "QWenTokenizer",
              "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}
    (FIXTURES / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    utils = importlib.import_module("qwen_generation_utils")
    tok = ref.QWenTokenizer(str(vocab))
    data = {"source": "x1ngzai/Qwen-VL-Chat-Int4@1cd721a27dd000fc4cf688c6ad58e614da1d600d tokenization_qwen.py, "
                      "qwen_generation_utils.py",
            "mixed_text": MIXED_TEXT, "vl_prompt": VL_PROMPT, **small_vocab_cases(tok, ref),
            **make_context_cases(tok, utils)}
    dump(data, FIXTURES / "reference.json")
    print(f"vocabulary: {data['n_mergeable']} ranks; text {len(MIXED_TEXT)} chars -> {len(data['encode'][0]['ids'])} ids")

    if args.real_vocab is not None:
        real = ref.QWenTokenizer(str(args.real_vocab))
        sha = hashlib.sha256(args.real_vocab.read_bytes()).hexdigest()
        dump({"vocab_sha256": sha, "mixed_text": MIXED_TEXT, **real_vocab_cases(real, ref),
              **make_context_cases(real, utils)},
             FIXTURES / "reference_real.json")


if __name__ == "__main__":
    main()
