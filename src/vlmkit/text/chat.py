r"""Chat templates: a list of messages -> the prompt string a model was trained on.

    template = get_chat_template("phi3")
    template.render([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}],
                    add_generation_prompt=True)
    # '<|user|>\n<|image_1|>\nDescribe it.<|end|>\n<|assistant|>\n'

A message is {"role": "system" | "user" | "assistant", "content": str | list of parts},
a part {"type": "text", "text": str}, {"type": "image"} or {"type": "video"}. Two kinds of template:

- A checkpoint's own jinja template (tokenizer_config.json, chat_template.jinja, GGUF
  `tokenizer.chat_template`), rendered in a sandbox the way transformers'
  `apply_chat_template` renders it (trim_blocks, lstrip_blocks, `raise_exception`,
  a `tojson` that does not escape HTML, `bos_token` / `eos_token` in scope), so the
  same messages give the same string.
- Built-ins by name (`BUILTIN_TEMPLATES`): vicuna_v1, llava, chatml, phi3, vary, vary_base, qwen2_vl, qwen_vl. In these
  an image part renders as the template's placeholder and a newline; phi3 numbers its
  placeholders <|image_1|>, <|image_2|>, ... across the conversation. qwen2_vl is the
  Qwen2-VL-Instruct checkpoints' chat template written as data: chatml with a default system
  turn, `<|vision_start|><|image_pad|><|vision_end|>` for an image and `...<|video_pad|>...`
  for a video, no newline after either. Only a template with a video placeholder (qwen2_vl)
  renders video parts; prompt.py turns videos into image parts for the others. Text parts
  are written as given, in order.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

Message = Mapping[str, Any]
ROLES = ("system", "user", "assistant")


class ChatTemplate(ABC):
    """Renders messages to a prompt string."""

    @abstractmethod
    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The prompt for messages; add_generation_prompt appends the opening of an assistant turn."""

    def turn_end_text(self) -> str:
        """The text the template writes after an assistant turn's content (e.g. chatml's "<|im_end|>\\n", phi3's
        "<|end|>\\n", llava's " "), read from the rendering of a user question and its answer. Both content forms
        are tried (a list of parts, then a string), as checkpoints' templates read one or the other; ValueError
        when the template renders neither. A template that never renders answers overrides this."""
        errors = []
        for content in ([{"type": "text", "text": _ANSWER}], _ANSWER):
            question = [{"type": "text", "text": "Hi"}] if isinstance(content, list) else "Hi"
            try:
                text = self.render([{"role": "user", "content": question}, {"role": "assistant", "content": content}])
            except (ValueError, TypeError, jinja2.TemplateError) as e:
                errors.append(f"{type(e).__name__}: {e}")
                continue
            if _ANSWER in text:
                return text[text.rindex(_ANSWER) + len(_ANSWER):]
            errors.append("the answer's text is not in the rendering")
        raise ValueError(f"the chat template does not render a user question and an assistant answer "
                         f"({'; '.join(errors)})")


_ANSWER = "vlmkit-answer-9f3c"  # a reply no template writes by itself, to find what follows it


def _check_messages(messages: Sequence[Message]) -> None:
    if isinstance(messages, (str, Mapping)):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")


def content_text(content: str | Sequence[Mapping[str, Any]], image_placeholder: str = "<image>",
                 index: int = 0, images: int = 0, video_placeholder: str | None = None,
                 media_suffix: str = "\n") -> tuple[str, int]:
    """(text of message `index`'s content, images counted so far): text parts as given, each image part
    as image_placeholder (its "{n}" = the image's 1-based number, counting from images) and media_suffix,
    each video part as video_placeholder and media_suffix (a ValueError when there is none)."""
    if isinstance(content, str):
        return content, images
    pieces = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        elif kind == "image":
            images += 1
            pieces.append(image_placeholder.replace("{n}", str(images)) + media_suffix)
        elif kind == "video" and video_placeholder is not None:
            pieces.append(video_placeholder + media_suffix)
        elif kind == "video":
            raise ValueError(f"message {index} has a video part but this template has no video placeholder; "
                             "give the video as its frames' image parts (prompt.videos_as_images)")
        else:
            raise ValueError(f"message {index} has content part {part!r}; parts are "
                             "{'type': 'text', 'text': str}, {'type': 'image'} or {'type': 'video'}")
    return "".join(pieces), images


_MARKER = re.compile(r"<\|[^|<>]+\|>|<｜[^｜<>]+｜>")


@dataclass(frozen=True)
class BuiltinChatTemplate(ChatTemplate):
    """A template given as data: the text written before and after each role's content."""

    name: str
    turns: dict[str, tuple[str, str]]  # role -> (before content, after content)
    generation_prompt: str
    image_placeholder: str = "<image>"  # "{n}" is replaced by the image's 1-based number in the conversation
    default_system: str | None = None  # written as a system turn when the first message is not one
    video_placeholder: str | None = None  # a video part's text; None: the template takes no video parts
    media_suffix: str = "\n"  # written after each image / video placeholder
    prefix: str = ""  # written once before the conversation, e.g. the BOS token's text
    number_per_message: bool = False  # "{n}" restarts at 1 in every message (Qwen-VL-Chat's "Picture N:")

    def marker_tokens(self) -> tuple[str, ...]:
        """The `<|...|>` / `<｜...｜>` markers the template writes around turns (phi3's `<|user|>`, `<|end|>`, ...),
        in order of first use: the tokens a fresh vocabulary must hold as special tokens to prompt with it."""
        texts = [self.prefix, *(t for pair in self.turns.values() for t in pair), self.generation_prompt]
        return tuple(dict.fromkeys(m for text in texts for m in _MARKER.findall(text)))

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        _check_messages(messages)
        out = [self.prefix]
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            before, after = self.turns["system"]
            out.append(before + self.default_system + after)
        images = 0
        for i, message in enumerate(messages):
            role = message["role"]
            images = 0 if self.number_per_message else images
            if role not in self.turns:
                raise ValueError(f"message {i} has role {role!r}; the {self.name} template knows {list(self.turns)}")
            text, images = content_text(message["content"], self.image_placeholder, i, images,
                                        self.video_placeholder, self.media_suffix)
            before, after = self.turns[role]
            out.append(before + text + after)
        if add_generation_prompt:
            out.append(self.generation_prompt)
        return "".join(out)


VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")

BUILTIN_TEMPLATES: dict[str, BuiltinChatTemplate] = {
    # LLaVA's conv_vicuna_v1 (llava/conversation.py, SeparatorStyle.TWO: sep " ", sep2 "</s>").
    "vicuna_v1": BuiltinChatTemplate(
        name="vicuna_v1",
        turns={"system": ("", " "), "user": ("USER: ", " "), "assistant": ("ASSISTANT: ", "</s>")},
        generation_prompt="ASSISTANT:",
        default_system=VICUNA_V1_SYSTEM,
    ),
    # llava-hf/llava-1.5 model card: "USER: <image>\n<prompt> ASSISTANT:".
    "llava": BuiltinChatTemplate(
        name="llava",
        turns={"system": ("", " "), "user": ("USER: ", " "), "assistant": ("ASSISTANT: ", " ")},
        generation_prompt="ASSISTANT:",
    ),
    "chatml": BuiltinChatTemplate(
        name="chatml",
        turns={r: (f"<|im_start|>{r}\n", "<|im_end|>\n") for r in ROLES},
        generation_prompt="<|im_start|>assistant\n",
    ),
    # Phi-3(.5)-vision: "<|user|>\n<|image_1|>\n{prompt}<|end|>\n<|assistant|>\n".
    "phi3": BuiltinChatTemplate(
        name="phi3",
        turns={r: (f"<|{r}|>\n", "<|end|>\n") for r in ROLES},
        generation_prompt="<|assistant|>\n",
        image_placeholder="<|image_{n}|>",
    ),
    # DeepSeek-VL2 (conversation.py "deepseek", tokenized as processing_deepseek_vl_v2.py's format_messages_v2
    # does): BOS, then per user turn "<|User|>: {content}\n\n<|Assistant|>:" and per answer "{content}" + EOS.
    # The template writes "<|Assistant|>:" as the generation prompt or before an answer; the one-prompt text
    # is the processor's sft_format ("<|User|>: <image>\n{prompt}\n\n<|Assistant|>:"). A system message is
    # written bare before the first user turn, as format_messages_v2 tokenizes it.
    "deepseek_vl2": BuiltinChatTemplate(
        name="deepseek_vl2",
        turns={"system": ("", ""), "user": ("<|User|>: ", "\n\n"),
               "assistant": ("<|Assistant|>:", "<｜end▁of▁sentence｜>")},
        generation_prompt="<|Assistant|>:",
        prefix="<｜begin▁of▁sentence｜>",
    ),
    # Vary's conv_templates["mpt"] (vary/utils/conversation.py, SeparatorStyle.MPT: each turn role + text +
    # "<|im_end|>", no newline between turns) as Vary-toy's demo fills it: an image is `<img>` + 256 x `<imgpad>`
    # + `</img>` + "\n" before the text (the `<imgpad>` here becomes the image's run).
    "vary": BuiltinChatTemplate(
        name="vary",
        turns={r: (f"<|im_start|>{r}\n", "<|im_end|>") for r in ROLES},
        generation_prompt="<|im_start|>assistant\n",
        image_placeholder="<img><imgpad></img>",
        default_system="You should follow the instructions carefully and explain your answers in detail.",
    ),
    # The same as Vary-base's demo (Ucas-HaoranWei/Vary's vary/demo/run_qwen_vary.py) fills it: no newline after
    # an image's `</img>`.
    "vary_base": BuiltinChatTemplate(
        name="vary_base",
        turns={r: (f"<|im_start|>{r}\n", "<|im_end|>") for r in ROLES},
        generation_prompt="<|im_start|>assistant\n",
        image_placeholder="<img><imgpad></img>",
        default_system="You should follow the instructions carefully and explain your answers in detail.",
        media_suffix="",
    ),
    # Qwen2-VL-Instruct's chat_template.json (add_vision_id off), as data.
    "qwen2_vl": BuiltinChatTemplate(
        name="qwen2_vl",
        turns={r: (f"<|im_start|>{r}\n", "<|im_end|>\n") for r in ROLES},
        generation_prompt="<|im_start|>assistant\n",
        image_placeholder="<|vision_start|><|image_pad|><|vision_end|>",
        video_placeholder="<|vision_start|><|video_pad|><|vision_end|>",
        media_suffix="",
        default_system="You are a helpful assistant.",
    ),
    # Qwen-VL-Chat's make_context (qwen_generation_utils.py, chatml, model.chat's system text) with each query
    # written by QWenTokenizer.from_list_format: an image is "Picture N:<img>path</img>\n", N counting the
    # query's images. The path is left out (the image is given apart from the text): <img><imgpad></img>
    # becomes <img>, the plan's 256 <imgpad>, </img>, the reference tokenizer's ids for an empty path.
    "qwen_vl": BuiltinChatTemplate(
        name="qwen_vl",
        turns={r: (f"<|im_start|>{r}\n", "<|im_end|>\n") for r in ROLES},
        generation_prompt="<|im_start|>assistant\n",
        image_placeholder="Picture {n}:<img><imgpad></img>",
        default_system="You are a helpful assistant.",
        number_per_message=True,
    ),
}


class _GenerationTag(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker) and
    renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise ValueError(f"the chat template refused these messages: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """transformers' tojson: plain json.dumps, no HTML escaping (jinja's own escapes <, >, &, ')."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@dataclass
class JinjaChatTemplate(ChatTemplate):
    """A checkpoint's jinja chat template, rendered as transformers' apply_chat_template renders it.

    Messages reach the template as given (templates of VLM checkpoints read the content parts
    themselves). flatten_content=True instead turns list contents into strings first, an image
    part becoming image_placeholder + "\\n", for text-only templates that expect string content.
    special_tokens (bos_token, eos_token, ...) are in scope in the template, as transformers does.
    """

    source: str
    special_tokens: dict[str, str | None] = field(default_factory=dict)
    flatten_content: bool = False
    image_placeholder: str = "<image>"

    def __post_init__(self) -> None:
        try:
            self._template = _environment().from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"chat template is not valid jinja (line {e.lineno}): {e.message}") from e

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        _check_messages(messages)
        messages = [dict(m) for m in messages]  # fresh copies: the template never touches the caller's
        if self.flatten_content:
            images = 0
            for i, m in enumerate(messages):
                m["content"], images = content_text(m["content"], self.image_placeholder, i, images)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **self.special_tokens)


def get_chat_template(name_or_jinja: str, bos_token: str | None = None, eos_token: str | None = None,
                      flatten_content: bool = False, image_placeholder: str = "<image>") -> ChatTemplate:
    """A built-in template by name, or a JinjaChatTemplate from jinja source (with the tokenizer's
    bos/eos tokens in scope; flatten_content and image_placeholder as JinjaChatTemplate's). Raises
    ValueError for an unknown name, listing the built-ins."""
    if name_or_jinja in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name_or_jinja]
    if "{{" in name_or_jinja or "{%" in name_or_jinja:
        return JinjaChatTemplate(name_or_jinja, {"bos_token": bos_token, "eos_token": eos_token},
                                 flatten_content=flatten_content, image_placeholder=image_placeholder)
    raise ValueError(f"unknown chat template {name_or_jinja!r}; built-in templates: {sorted(BUILTIN_TEMPLATES)} "
                     "(or pass jinja source)")


def chat_template_for(tokenizer: Any, default: str | None = None, flatten_content: bool = False,
                      image_placeholder: str = "<image>") -> ChatTemplate:
    """The chat template of a vlmkit Tokenizer (its own jinja or built-in name), else the built-in
    `default`; ValueError when it has none and no default is given."""
    source = tokenizer.chat_template or default
    if source is None:
        raise ValueError(f"this tokenizer has no chat template; pass default= one of {sorted(BUILTIN_TEMPLATES)}")
    return get_chat_template(source, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
                             flatten_content=flatten_content, image_placeholder=image_placeholder)


def turn_end_ids(template: ChatTemplate, tokenizer: Any) -> tuple[int, ...]:
    """The special tokens the template writes after an assistant turn (template.turn_end_text()), in order: chatml's
    `<|im_end|>`, phi3's `<|end|>`, vicuna's `</s>`, DeepSeek's `<｜end▁of▁sentence｜>`; () when it writes
    only text (llava's " "), whose answers end at the tokenizer's eos. A token is special when decoding
    with skip_special_tokens drops it."""
    ids = tokenizer.encode(template.turn_end_text())
    return tuple(dict.fromkeys(i for i in ids if tokenizer.decode([i], skip_special_tokens=True) == ""
                               and tokenizer.decode([i]) != ""))
