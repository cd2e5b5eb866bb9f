"""The demo's image scheme, `demo`: an image of one of the demo's sizes, prepared as the demo trained on it.

    image (256x32 line, 256x96 paragraph, 64x64 shape) --demo.data.task_pixels--> (1, 3, H, W)
    tokens = (H / 32) * (W / 4): the tower's stem cells (8 x 4 px) merged 4 rows at a time
    pixel_values (N, 3, H, W) --DemoVLM.read, image_tokens--> each image's rows (T, C + 1 + 11):
        the image tokens at the LM width, their soft character counts (RoPE positions, demo/model.py),
        the image's colour and shape probabilities (what a grounded question word reads)

The prompt format (`DemoChatTemplate`) is demo.data.encode_row's, `<s><image>question\\n`, rendered from a
conversation with one image. The demo trained on single questions about one image, so the model sees the
conversation's image and the last user question only: earlier turns are not shown to it (each question
is answered on its own); a system message or a second image is refused. Images of any other size than the
three it trained on are refused with that list.

This module registers the scheme when vlmkit.demo is imported (vlmkit/demo/__init__.py); the library
finds it through the `vlmkit.plugins` entry point like any plugin's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from vlmkit.demo import data as D
from vlmkit.image.plan import ImagePlan
from vlmkit.schemes import register_scheme
from vlmkit.schemes.base import Scheme, Video
from vlmkit.text.chat import ChatTemplate, Message

if TYPE_CHECKING:
    from vlmkit.demo.model import DemoConfig, DemoVLM

SHAPE_SIZE = (64, 64)  # (width, height) of easy-VQA's images
IMAGE_SIZES = {D.LINE_SIZE: "line", D.PARAGRAPH_SIZE: "paragraph", SHAPE_SIZE: "shape"}  # what each size is
STEM_STRIDE = (8, 4)  # (rows, columns) of pixels per stem cell
ROW_MERGE = 4  # stem rows merged into one token: a token covers 32 x 4 pixels
# Why 4-pixel columns: CTC needs a step per character (two for a doubled one); the lines' smallest fonts
# draw characters 6 pixels wide, so 8-pixel columns leave 27% of 8-24 character lines unreadable.


def token_grid(cfg: DemoConfig, height: int, width: int) -> tuple[int, int]:
    """(rows, cols) of image tokens of a height x width image; ValueError for sizes the tower cannot take.

        >>> from vlmkit.demo.model import DemoConfig
        >>> token_grid(DemoConfig(lm_vocab_size=10, ctc_to_lm=(1,), image_token_id=9, prompt_end_id=8), 32, 256)
        (1, 64)
    """
    unit, step = STEM_STRIDE[0] * ROW_MERGE, STEM_STRIDE[1]
    if height % unit or width % step or height // unit > cfg.max_rows or width // step > cfg.max_cols:
        raise ValueError(f"images of {width}x{height} do not fit the demo tower: the height must be a multiple of "
                         f"{unit} up to {unit * cfg.max_rows}, the width a multiple of {step} up to "
                         f"{step * cfg.max_cols}")
    return height // unit, width // step


def demo_tokens(cfg: DemoConfig, height: int, width: int) -> int:
    """Image tokens (placeholders) of a height x width image: (height / 32) * (width / 4)."""
    rows, cols = token_grid(cfg, height, width)
    return rows * cols


def _parts(message: Message) -> list[Mapping[str, Any]]:
    content = message["content"]
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


@dataclasses.dataclass(frozen=True)
class DemoChatTemplate(ChatTemplate):
    """demo.data.encode_row's prompt as a chat template: bos_token, the image's placeholder, the last user
    question, a newline (see the module docstring for which conversations it takes)."""

    bos_token: str
    image_token: str

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        if isinstance(messages, (str, Mapping)) or not all(isinstance(m, Mapping) and {"role", "content"} <= set(m)
                                                         for m in messages):
            raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
        roles = [m["role"] for m in messages]
        if "system" in roles:
            raise ValueError("the demo model was trained without a system message; leave it out")
        if not messages or roles[-1] != "user":
            raise ValueError("the demo model answers a user question: the last message must be the user's")
        kinds = [part.get("type") for m in messages for part in _parts(m)]
        if kinds.count("image") != 1 or "video" in kinds:
            raise ValueError(f"the demo model answers questions about one image; this conversation has "
                             f"{kinds.count('image')} images{' and a video' if 'video' in kinds else ''} "
                             "(start a new conversation for another image)")
        question = "".join(p["text"] for p in _parts(messages[-1]) if p.get("type") == "text")
        if not question.strip() or "\n" in question:
            raise ValueError(f"the demo model takes a one-line question (it finds the question's end by its "
                             f"newline); got {question!r}")
        return self.bos_token + self.image_token + question + "\n"

    def turn_end_text(self) -> str:
        """Nothing: the template renders questions only, and the demo's answers end at the eos (demo.data)."""
        return ""


class DemoScheme(Scheme):
    """The demo's images at the sizes it trained on, through DemoVLM's CNN tower, CTC and class heads."""

    name = "demo"
    model_class = "DemoVLM"

    def check_config(self, cfg: DemoConfig) -> None:
        """DemoConfig sets the tower's sizes; token_grid checks each image against them."""

    def work(self, cfg: DemoConfig, size: tuple[int, int], num_images: int = 1) -> int:
        """Only the few small sizes of IMAGE_SIZES are planned (plan refuses others before touching pixels):
        the base estimate at that size, 0 for any other size."""
        return super().work(cfg, size, num_images) if size in IMAGE_SIZES else 0

    def plan(self, cfg: DemoConfig, image: Image.Image, num_images: int = 1) -> ImagePlan:
        """The image prepared as the demo prepared its evaluation images of that size: pixel_values (1, 3, H, W)
        and the token count of H x W."""
        kind = IMAGE_SIZES.get(image.size)
        if kind is None:
            sizes = ", ".join(f"{w}x{h} ({k})" for (w, h), k in IMAGE_SIZES.items())
            raise ValueError(f"the demo model takes images of the sizes it trained on: {sizes}; this image is "
                             f"{image.size[0]}x{image.size[1]}: crop or resize it to one of them")
        pixels = D.task_pixels(kind, image.convert("RGB"))  # (3, H, W)
        H, W = pixels.shape[1:]
        return ImagePlan(self.name, pixels[None], image.size, (W, H), token_grid(cfg, H, W),
                         {"tokens": demo_tokens(cfg, H, W)},
                         extra={"kind": kind})

    def plan_video(self, cfg: DemoConfig, video: Video, num_images: int) -> list[ImagePlan]:
        raise ValueError("the demo model takes still images, not a video's frames")

    def inputs(self, plans: Sequence[ImagePlan]) -> dict[str, torch.Tensor]:
        """pixel_values (N, 3, H, W); DemoVLM takes one image per prompt row, all of one size."""
        shapes = {tuple(p.pixel_values.shape) for p in plans}
        if len(shapes) != 1:
            raise ValueError(f"demo images must share one size within a batch; got shapes {sorted(shapes)}")
        return super().inputs(plans)

    def encode(self, model: DemoVLM, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """(N, 3, H, W) pixels -> N x (T, C + 1 + 11) rows (module docstring), in fp32 so that the positions
        they carry stay exact."""
        features, logits = model.read(pixel_values)
        tokens, counts, classes = model.image_tokens(features, logits)  # (N, T, C), (N, T), (N, 11)
        classes = classes.float()[:, None].expand(-1, tokens.shape[1], -1)  # (N, T, 11)
        return list(torch.cat([tokens.float(), counts.float()[..., None], classes], dim=-1).unbind(0))

    def chat_template(self, tokenizer: Any, cfg: DemoConfig, fallback: str | None) -> ChatTemplate:
        """Always the demo's own prompt (DemoChatTemplate), whatever the tokenizer carries."""
        bos, image = (tokenizer.id_to_token(i) for i in (tokenizer.bos_token_id, cfg.image_token_id))
        return DemoChatTemplate(bos, image)


DEMO = register_scheme(DemoScheme())
