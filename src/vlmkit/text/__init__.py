"""Text side of vlmkit: tokenizers (tokenizer.json, GGUF vocabularies, Qwen-1's qwen.tiktoken, characters) and chat
templates."""

from vlmkit.text.chat import (
    BUILTIN_TEMPLATES,
    BuiltinChatTemplate,
    ChatTemplate,
    JinjaChatTemplate,
    chat_template_for,
    get_chat_template,
)
from vlmkit.text.qwen_tiktoken import QwenTiktokenTokenizer
from vlmkit.text.tokenizer import CharTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "BUILTIN_TEMPLATES",
    "BuiltinChatTemplate",
    "CharTokenizer",
    "ChatTemplate",
    "HFTokenizer",
    "JinjaChatTemplate",
    "QwenTiktokenTokenizer",
    "Tokenizer",
    "chat_template_for",
    "get_chat_template",
    "load_tokenizer",
]
