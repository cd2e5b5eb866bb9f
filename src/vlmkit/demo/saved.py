"""The demo's trained model as a folder, in vlmkit's own saved-model format under model_type "vlmkit-demo".

    save_demo_model(model, tokenizer, "demo-report")   # run_demo does this at the end of every run
    load_model("demo-report")                          # vlmkit.load, like any model directory

The folder (the report folder of `vlmkit demo`) holds config.json (DemoConfig's fields under
"vlmkit_config", the sha256 of every file), model.safetensors (DemoVLM's weights, the tied LM head once)
and tokenizer.json (the character tokenizer). Writing, the integrity check and the refusal of a folder
whose save was interrupted are weights/native.py's, the same for every model vlmkit saves in its own
format. How a loaded demo model is prompted and how a user's image is prepared is the `demo` scheme
(demo/scheme.py). Importing this module registers the model type (vlmkit/demo/__init__.py does).
"""

from __future__ import annotations

from pathlib import Path

from vlmkit.demo.model import DemoConfig, DemoVLM
from vlmkit.text.tokenizer import CharTokenizer, Tokenizer
from vlmkit.weights.hf import register_converter, save_pretrained
from vlmkit.weights.native import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, native_converter

MODEL_TYPE = "vlmkit-demo"
__all__ = ["CONFIG_FILE", "MODEL_TYPE", "TOKENIZER_FILE", "WEIGHTS_FILE", "save_demo_model"]

register_converter(MODEL_TYPE, native_converter(MODEL_TYPE, DemoConfig.from_dict, DemoVLM, "demo"))


def save_demo_model(model: DemoVLM, tokenizer: Tokenizer, folder: str | Path) -> Path:
    """Write model and its character tokenizer into folder (see the module docstring); returns config.json's path."""
    if not isinstance(tokenizer, CharTokenizer):
        raise ValueError(f"only the character-level demo LM is saved; got a {type(tokenizer).__name__} "
                         "(the --llm smollm2 run does not save its model)")
    save_pretrained(model, folder, MODEL_TYPE, tokenizer=tokenizer)
    return Path(folder) / CONFIG_FILE
