"""Chat templates: jinja templates render exactly as transformers' apply_chat_template renders them;
built-in templates give the prompt strings written in the papers and model cards."""

from __future__ import annotations

import jinja2
import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.models import WordLevel

from vlmkit.text.chat import BUILTIN_TEMPLATES, JinjaChatTemplate, chat_template_for, get_chat_template
from vlmkit.text.tokenizer import CharTokenizer, HFTokenizer

# SmolLM2-135M-Instruct's template, as its GGUF's tokenizer.chat_template holds it.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Templates written to exercise what checkpoints' templates use: whitespace control, tojson,
# namespace, loop controls, content parts, {% generation %}, bos/eos tokens, raise_exception.
FEATURES_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(system='') %}
{% for message in messages %}
    {% if message['role'] == 'system' %}
        {% set ns.system = message['content'] %}
        {% continue %}
    {% endif %}
    {% if message['role'] == 'user' %}
        [{{ loop.index0 }}] {{ message['content'] | tojson }}
    {% else %}
        {% generation %}{{ message['content'] | tojson(indent=2) }}{{ eos_token }}{% endgeneration %}
    {% endif %}
{% endfor %}
system={{ ns.system | tojson }}
{% if add_generation_prompt %}>>> {% endif %}"""
PARTS_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{{ ' ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
ALTERNATE_TEMPLATE = (
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{{ message['content'] }}{% endfor %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <b>&'\" 中文 🙂"},
     {"role": "assistant", "content": "Hello!\nHow can I help?"}, {"role": "user", "content": "Bye."}],
]


def _transformers_tokenizer(template: str):
    """A transformers tokenizer carrying template (its vocabulary is irrelevant to rendering)."""
    from transformers import PreTrainedTokenizerFast

    backend = RustTokenizer(WordLevel({"<s>": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("template", [SMOLLM2_TEMPLATE, FEATURES_TEMPLATE], ids=["smollm2", "features"])
def test_jinja_matches_transformers(template):
    reference = _transformers_tokenizer(template)
    ours = get_chat_template(template, bos_token="<s>", eos_token="</s>")
    for messages in CONVERSATIONS:
        for gen in (False, True):
            expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.render(messages, add_generation_prompt=gen) == expected


def test_jinja_content_parts_match_transformers():
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
                {"role": "user", "content": "And now?"}]
    expected = _transformers_tokenizer(PARTS_TEMPLATE).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert get_chat_template(PARTS_TEMPLATE).render(messages, add_generation_prompt=True) == expected
    assert expected == "USER: <image>\nWhat is this? ASSISTANT: A cat. USER: And now? ASSISTANT:"


def test_jinja_raise_exception():
    template = get_chat_template(ALTERNATE_TEMPLATE)
    assert template.render([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]) == "ab"
    with pytest.raises(ValueError, match="must alternate"):
        template.render([{"role": "assistant", "content": "b"}])
    with pytest.raises(jinja2.TemplateError, match="must alternate"):  # transformers refuses it too
        _transformers_tokenizer(ALTERNATE_TEMPLATE).apply_chat_template(
            [{"role": "assistant", "content": "b"}], tokenize=False)


def test_jinja_is_sandboxed():
    template = get_chat_template("{{ messages.__class__.__mro__ }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        template.render(CONVERSATIONS[0])


def test_jinja_flatten_content_for_text_templates():
    template = JinjaChatTemplate(SMOLLM2_TEMPLATE, flatten_content=True)
    messages = [{"role": "system", "content": "S"},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    assert template.render(messages, add_generation_prompt=True) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n<image>\nDescribe.<|im_end|>\n<|im_start|>assistant\n")


def test_bad_jinja_names_the_line():
    with pytest.raises(ValueError, match="line 2"):
        get_chat_template("{{ messages }}\n{% for m in messages %}")


IMAGE_QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
TWO_IMAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                           {"type": "text", "text": "Compare them."}]}]
MULTI_TURN = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]}]
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


@pytest.mark.parametrize("name, messages, expected", [
    # Phi-3.5-vision (reference document 000): single image, several images, several turns.
    ("phi3", IMAGE_QUESTION, "<|user|>\n<|image_1|>\nWhat is shown?<|end|>\n<|assistant|>\n"),
    ("phi3", TWO_IMAGES, "<|user|>\n<|image_1|>\n<|image_2|>\nCompare them.<|end|>\n<|assistant|>\n"),
    ("phi3", [*TWO_IMAGES, {"role": "assistant", "content": "Same."}, *IMAGE_QUESTION],
     "<|user|>\n<|image_1|>\n<|image_2|>\nCompare them.<|end|>\n<|assistant|>\nSame.<|end|>\n"
     "<|user|>\n<|image_3|>\nWhat is shown?<|end|>\n<|assistant|>\n"),
    # llava-1.5 model card: "USER: <image>\n<prompt> ASSISTANT:"
    ("llava", IMAGE_QUESTION, "USER: <image>\nWhat is shown? ASSISTANT:"),
    ("llava", MULTI_TURN, "USER: Hi ASSISTANT: Hello. USER: <image>\nAnd this? ASSISTANT:"),
    # LLaVA's conv_vicuna_v1: system, " ", "USER: ...", " ", "ASSISTANT: ...", "</s>"
    ("vicuna_v1", IMAGE_QUESTION, VICUNA_SYSTEM + " USER: <image>\nWhat is shown? ASSISTANT:"),
    ("vicuna_v1", MULTI_TURN, VICUNA_SYSTEM + " USER: Hi ASSISTANT: Hello.</s>USER: <image>\nAnd this? ASSISTANT:"),
    ("vicuna_v1", [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
     "Be terse. USER: Hi ASSISTANT:"),
    ("chatml", [{"role": "system", "content": "Be terse."}, *IMAGE_QUESTION],
     "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n"
     "<|im_start|>assistant\n"),
])
def test_builtin_templates(name, messages, expected):
    assert get_chat_template(name).render(messages, add_generation_prompt=True) == expected


def test_builtin_without_generation_prompt():
    assert get_chat_template("chatml").render(MULTI_TURN[:2]) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n")
    assert get_chat_template("vicuna_v1").render(MULTI_TURN[:2]) == VICUNA_SYSTEM + " USER: Hi ASSISTANT: Hello.</s>"


def test_unknown_template_lists_builtins():
    with pytest.raises(ValueError, match="chatml") as info:
        get_chat_template("alpaca")
    assert all(name in str(info.value) for name in BUILTIN_TEMPLATES)


@pytest.mark.parametrize("messages, match", [
    ([{"role": "tool", "content": "x"}], "role 'tool'"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "content part"),
    ([{"role": "user"}], "'role' and 'content'"),
    ("hello", "list of"),
])
def test_builtin_rejects_bad_messages(messages, match):
    with pytest.raises(ValueError, match=match):
        get_chat_template("phi3").render(messages)


def test_chat_template_for_tokenizers():
    chars = CharTokenizer.from_corpus("abc")
    assert chat_template_for(chars) is BUILTIN_TEMPLATES["chatml"]
    backend = RustTokenizer(WordLevel({"<s>": 0, "</s>": 1}, unk_token="<s>"))
    plain = HFTokenizer(backend, bos_token="<s>", eos_token="</s>", chat_template="{{ bos_token }}{{ eos_token }}")
    assert chat_template_for(plain).render([]) == "<s></s>"
    with pytest.raises(ValueError, match="no chat template"):
        chat_template_for(HFTokenizer(backend))
    assert chat_template_for(HFTokenizer(backend), default="llava") is BUILTIN_TEMPLATES["llava"]
