"""Generation stops at the chat template's end of turn (issue 14, section 1).

A model trained as the README's "Train" section shows learns to end its answer with `<|im_end|>`; before this
was fixed its answers ran on to the token cap (`blueleluele...`), exact match was 0 and `--stop "<|im_end|>"`
did nothing. Here such a run is trained (fewer steps than the README's 300, still enough to learn the end
token), and `vlmkit generate`, the OpenAI server and `vlmkit eval` must all end its answers at `<|im_end|>`
with finish_reason "stop". Unit tests pin the turn end of every built-in and preset template, of hand-written
jinja templates (hand-written expected tokens), the config's and generation_config.json's eos lists, and a
stop string that is a special token.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_stops.py
"""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil
import string
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest
import torch
import torch.nn.functional as F
from test_serve import Server
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import pre_tokenizers
from tokenizers.models import WordLevel
from torch import nn

from vlmkit.cli import main
from vlmkit.data.formats import load_dataset
from vlmkit.data.synth import DATASET_FILE, synthesize
from vlmkit.eval.runner import evaluate
from vlmkit.generate import GenerationConfig, generate, special_token_id, stream
from vlmkit.image.load import load_image
from vlmkit.load import LoadedModel, load_model, read_eos_ids
from vlmkit.models.lm import KVCache
from vlmkit.models.vlm import VLM
from vlmkit.presets import PRESETS, get_preset, tiny_random
from vlmkit.serve import create_app
from vlmkit.text.chat import (
    BUILTIN_TEMPLATES,
    chat_template_for,
    get_chat_template,
    turn_end_ids,
)
from vlmkit.text.tokenizer import CharTokenizer, HFTokenizer
from vlmkit.train.run import fresh_special_tokens

# CharTokenizer's default special tokens are ids 0.. in this order (text/tokenizer.py DEFAULT_SPECIAL_TOKENS).
PAD, BOS, EOS, UNK, IMAGE, IM_START, IM_END = range(7)
QUESTION = "What color is the shape?"


# ----------------------------------------------------------------------------- a run trained as the README shows


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The README's `vlmkit data synth --shapes 256 --image-size 32x32`."""
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, {"shapes": 256}, seed=0, image_size=(32, 32), progress=False)
    return out / DATASET_FILE


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    """The README's `vlmkit train` with 120 steps instead of 300 (the model emits <|im_end|> after its answer
    from about step 100 on)."""
    out = tmp_path_factory.mktemp("run") / "run"
    torch.set_num_threads(1)
    assert main(["train", "--model", "tiny-random", "--data", str(data), "--stage", "full", "--steps", "120",
                 "--batch-size", "16", "--lr", "3e-3", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def loaded(run) -> LoadedModel:
    return load_model(str(run))


def image_of(data: Path, index: int = 0) -> Path:
    return data.parent / "images" / f"shapes-{index:06d}.png"


def test_train_writes_generation_config(run):
    config = json.loads((run / "generation_config.json").read_text())
    assert config["eos_token_id"] == [EOS, IM_END]  # `</s>`, then chatml's turn end
    assert read_eos_ids(run) == [EOS, IM_END]


def test_generate_cli_stops_at_turn_end(run, data, loaded, capsys):
    image = image_of(data)
    assert main(["generate", "--model", str(run), "--image", str(image), "--prompt", QUESTION, "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["finish_reason"] == "stop"
    assert 0 < answer["completion_tokens"] < 16, answer
    assert answer["text"] == "".join(answer["text"].split()) and answer["text"].isalpha(), answer
    # The oracle: the model's own greedy continuation with no stop ids at all has <|im_end|> right after the
    # answer's tokens, i.e. the answer ended at the end-of-turn token and not elsewhere.
    built = loaded.prompt([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
                          loaded.plan_images([load_image(image)]))
    n = answer["completion_tokens"]
    raw = generate(loaded.model, [built.ids], GenerationConfig(max_new_tokens=n + 1),
                   prefill_inputs=loaded.image_inputs(built.plans))
    assert raw.token_ids[0][n] == IM_END
    assert loaded.tokenizer.decode(raw.token_ids[0][:n]) == answer["text"]


def test_generate_cli_streams_the_same_answer(run, data, capsys):
    assert main(["generate", "--model", str(run), "--image", str(image_of(data)), "--prompt", QUESTION]) == 0
    streamed = capsys.readouterr()
    assert main(["generate", "--model", str(run), "--image", str(image_of(data)), "--prompt", QUESTION,
                 "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert streamed.out == answer["text"] + "\n"
    assert streamed.err.rstrip().endswith(", stop]")


def test_serve_stops_at_turn_end(run, data, loaded, capsys):
    assert main(["generate", "--model", str(run), "--image", str(image_of(data)), "--prompt", QUESTION,
                 "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)
    server = Server(create_app(loaded))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        url = "data:image/png;base64," + base64.b64encode(image_of(data).read_bytes()).decode()
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": QUESTION}]}]
        reply = client.chat.completions.create(model=loaded.name, messages=messages, max_tokens=64, temperature=0)
        assert reply.choices[0].finish_reason == "stop"
        assert reply.choices[0].message.content == expected["text"]
        assert reply.usage.completion_tokens == expected["completion_tokens"]
        chunks = list(client.chat.completions.create(model=loaded.name, messages=messages, max_tokens=64,
                                                     temperature=0, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected["text"]
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    finally:
        server.stop()


def test_eval_scores_exact_answers(loaded, data):
    samples = load_dataset(data)[0][:64]
    result = evaluate(loaded, samples, metrics=["exact_match"], batch_size=16, max_new_tokens=32, quiet=True)
    # Before the fix every answer ran on to max_new_tokens and exact match was 0.0.
    assert result.summary["exact_match"] > 0.3, result.summary
    words = {w for s in samples for m in s.messages if m["role"] == "assistant" for p in m["content"]
             for w in p.get("text", "").split()}
    assert all(row["prediction"] in words for row in result.per_sample), \
        [row["prediction"] for row in result.per_sample if row["prediction"] not in words][:5]


def test_generation_config_ids_join_the_end_ids(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("step-*"))
    letter = CharTokenizer(string.printable).token_to_id("x")
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS, letter]}))
    assert load_model(str(copy)).end_token_ids == (EOS, IM_END, letter)  # eos, turn end, generation_config
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": letter}))
    assert read_eos_ids(copy) == [letter]
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(ValueError, match="generation_config.json: eos_token_id must be a token id"):
        load_model(str(copy))
    (copy / "generation_config.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(str(copy))
    (copy / "generation_config.json").unlink()
    assert read_eos_ids(copy) == []


# ----------------------------------------------------------------------------- turn ends of templates

TURN_ENDS = {  # the text each built-in template writes after an assistant turn, from its definition
    "vicuna_v1": "</s>",
    "llava": " ",
    "chatml": "<|im_end|>\n",
    "phi3": "<|end|>\n",
    "deepseek_vl2": "<｜end▁of▁sentence｜>",
    "qwen2_vl": "<|im_end|>\n",
    "vary": "<|im_end|>",
    "vary_base": "<|im_end|>",
    "qwen_vl": "<|im_end|>\n",
}

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<image>", "<|im_start|>", "<|im_end|>", "<|end|>", "<|user|>",
            "<|assistant|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<｜end▁of▁sentence｜>",
            "<start_of_turn>", "<end_of_turn>")
TOKENIZER = CharTokenizer(string.printable, SPECIALS)


def test_builtin_turn_end_text():
    assert set(TURN_ENDS) == set(BUILTIN_TEMPLATES)
    for name, text in TURN_ENDS.items():
        assert get_chat_template(name).turn_end_text() == text, name


@pytest.mark.parametrize(("name", "expected"), [("vicuna_v1", ("</s>",)), ("llava", ()), ("chatml", ("<|im_end|>",)),
                                                ("phi3", ("<|end|>",)), ("qwen2_vl", ("<|im_end|>",)),
                                                ("qwen_vl", ("<|im_end|>",))])
def test_builtin_turn_end_ids(name, expected):
    assert turn_end_ids(get_chat_template(name), TOKENIZER) == tuple(SPECIALS.index(t) for t in expected)


# Templates in the style of checkpoints' own (tokenizer_config.json), written here by hand.
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
DEEPSEEK = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n\n"
            "{% else %}Assistant: {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}Assistant:{% endif %}")
GEMMA = ("{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
         "{% for part in m['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
         "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


@pytest.mark.parametrize(("source", "eos", "flatten", "expected"), [
    (LLAMA3, "<|eot_id|>", True, "<|eot_id|>"),
    (DEEPSEEK, "<｜end▁of▁sentence｜>", True, "<｜end▁of▁sentence｜>"),
    (GEMMA, "<eos>", False, "<end_of_turn>"),  # reads content parts: a string content would render nothing
])
def test_jinja_turn_end_ids(source, eos, flatten, expected):
    template = get_chat_template(source, bos_token="<s>", eos_token=eos, flatten_content=flatten)
    assert turn_end_ids(template, TOKENIZER) == (SPECIALS.index(expected),)


def test_template_that_renders_no_answer_warns_and_keeps_the_eos():
    refusing = get_chat_template("{{ raise_exception('only user turns') }}", flatten_content=True)
    with pytest.raises(ValueError, match="only user turns"):
        refusing.turn_end_text()
    tok = CharTokenizer(string.printable)
    with pytest.warns(UserWarning, match="stops only at the eos ids"):
        built = LoadedModel("refusing", VLM(tiny_random(vocab_size=tok.vocab_size, image_token_id=IMAGE)), tok,
                            refusing)
    assert built.end_token_ids == (EOS,)


QWEN2_VL_PRESETS = {"qwen2-vl", "qwen2-vl-small", "qwen2.5-vl", "qwen2.5-vl-small"}


PRESET_TURN_ENDS = {"qwen2_vl": "<|im_end|>", "phi3": "<|end|>", "deepseek_vl2": "<｜end▁of▁sentence｜>",
                    "chatml": "<|im_end|>", "qwen_vl": "<|im_end|>"}


def preset_format(preset):
    if preset in QWEN2_VL_PRESETS:
        return "qwen2_vl"
    if preset.startswith("phi-3.5-v"):
        return "phi3"
    if preset in ("qwen-vl", "qwen-vl-small"):
        return "qwen_vl"
    return "deepseek_vl2" if preset.startswith("deepseek-vl2") else "chatml"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_turn_end(preset):
    """A preset trained from random weights is prompted with its family's format (Qwen2-VL's qwen2_vl, Phi-3-V's
    phi3, DeepSeek-VL2's deepseek_vl2, Qwen-VL's qwen_vl), else chatml; its fresh vocabulary holds the template's markers as special
    tokens, so an assistant turn ends with one special token."""
    special, template = fresh_special_tokens(get_preset(preset))
    assert template == preset_format(preset)
    tok = CharTokenizer(string.printable, special, chat_template=template)
    assert turn_end_ids(get_chat_template(template), tok) == (special.index(PRESET_TURN_ENDS[template]),)
    rendered = get_chat_template(template).render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert all(len(tok.encode(m, add_special_tokens=False)) == 1 for m in ("<|user|>", "<|User|>")
               if m in rendered)


def test_config_eos_list_joins_the_end_ids():
    tok = CharTokenizer(string.printable)
    letter = tok.token_to_id("q")
    cfg = tiny_random(vocab_size=tok.vocab_size, image_token_id=IMAGE)
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, eos_token_id=[EOS, letter]))
    built = LoadedModel("listed", VLM(cfg), tok, get_chat_template("chatml"))
    assert built.end_token_ids == (EOS, letter, IM_END)
    assert tok.end_token_ids == (EOS, letter, IM_END)  # the tokenizer carries them to generate()


# ----------------------------------------------------------------------------- the stop rules of one row


class Scripted(nn.Module):
    """Predicts script[n] after n tokens whatever they were, so its output is known in advance."""

    def __init__(self, script: list[int], vocab_size: int) -> None:
        super().__init__()
        self.script, self.vocab_size = script, vocab_size
        self.cfg = tiny_random(vocab_size=vocab_size, image_token_id=IMAGE).lm
        self.anchor = nn.Parameter(torch.zeros(1))

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return KVCache(self.cfg, batch_size, max_len)

    def forward(self, input_ids, attention_mask=None, cache=None, logits_to_keep=0):
        B, T = input_ids.shape
        seen = attention_mask.sum(-1) if attention_mask is not None else torch.full((B,), cache.length + T)
        cache.advance(T)
        nxt = torch.tensor([self.script[min(n, len(self.script) - 1)] for n in seen.tolist()])
        return SimpleNamespace(logits=10.0 * F.one_hot(nxt, self.vocab_size).float()[:, None])  # (B, 1, V)


def run_on_tokenizer() -> CharTokenizer:
    """The issue's situation: a tokenizer whose only end id is `</s>`."""
    tok = CharTokenizer(string.printable)
    tok.end_token_ids = (EOS,)
    return tok


def test_stop_string_that_is_a_special_token():
    tok = run_on_tokenizer()
    prompt = [BOS]
    script = [BOS, *tok.encode("blue"), IM_END, *tok.encode("lueluele")]
    model = Scripted(script, tok.vocab_size)
    cfg = GenerationConfig(max_new_tokens=12)
    assert generate(model, [prompt], cfg, tokenizer=tok).texts == ["bluelueluel"]  # the run-on (12 tokens, <|im_end|> unseen)
    cfg = GenerationConfig(max_new_tokens=12, stop_strings=("<|im_end|>",))
    result = generate(model, [prompt], cfg, tokenizer=tok)
    assert (result.texts, result.finish_reasons, result.token_ids) == (["blue"], ["stop"], [tok.encode("blue")])
    pieces = stream(model, prompt, cfg, tokenizer=tok)
    assert "".join(pieces) == "blue" and pieces.result.finish_reasons == ["stop"]


def test_stop_flag_on_the_command_line(capsys, monkeypatch):
    """`vlmkit generate --stop "<|im_end|>"` on a model whose tokenizer ends only at `</s>` (the issue's run)."""
    from vlmkit.commands import talk

    tok = run_on_tokenizer()
    model = Scripted([BOS, *tok.encode("red"), IM_END, *tok.encode("reded")], tok.vocab_size)
    loaded = SimpleNamespace(name="scripted", model=model, tokenizer=tok, plan_images=lambda media: [],
                             prompt=lambda messages, plans: SimpleNamespace(ids=[BOS], plans=[]),
                             image_inputs=lambda plans: None)
    monkeypatch.setattr(talk, "load_model_of", lambda args: loaded)
    command = ["generate", "--model", "scripted", "--prompt", "hi", "--max-new-tokens", "8", "--json"]
    assert main(command) == 0
    assert json.loads(capsys.readouterr().out)["text"] == "redrede"  # runs on without the flag (8 tokens, <|im_end|> unseen)
    assert main([*command, "--stop", "<|im_end|>"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert (answer["text"], answer["finish_reason"], answer["completion_tokens"]) == ("red", "stop", 3)


def test_stop_string_mixing_a_special_token_and_text_is_refused():
    tok = run_on_tokenizer()
    model = Scripted([BOS, IM_END], tok.vocab_size)
    with pytest.raises(ValueError, match="mixes special tokens"):
        generate(model, [[BOS]], GenerationConfig(stop_strings=("blue<|im_end|>",)), tokenizer=tok)


def test_hf_tokenizer_turn_end_and_stop_string():
    """A transformers-style tokenizer (tokenizers' WordLevel here) with Qwen's chat template markers as special
    tokens and `<|endoftext|>` as eos: the template's turn end is `<|im_end|>`, and `--stop "<|im_end|>"` is it."""
    vocab = {"<unk>": 0, "Hi": 1, "blue": 2, "<|endoftext|>": 3, "<|im_start|>": 4, "<|im_end|>": 5, "user": 6,
             "assistant": 7}
    backend = RustTokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = HFTokenizer(backend, eos_token="<|endoftext|>", unk_token="<unk>", chat_template=chatml,
                      extra_special_tokens=["<|im_start|>", "<|im_end|>"])
    template = chat_template_for(tok, flatten_content=True)
    assert template.turn_end_text() == "<|im_end|>\n"
    assert turn_end_ids(template, tok) == (5,)
    assert special_token_id(tok, "<|im_end|>") == 5
    assert special_token_id(tok, "blue") is None
