"""Qwen-VL's `squash` scheme: resize the image to the tower's square size, aspect ratio not kept, one view.

Reference: Qwen-VL's `visual.py` (the Hub's remote code of Qwen/Qwen-VL and Qwen/Qwen-VL-Chat),
`VisionTransformer.image_transform`: `image.convert("RGB")`, torchvision `Resize((448, 448), BICUBIC)` (on a
PIL image: Pillow's bicubic resize), `ToTensor` and `Normalize` with CLIP's mean and std. No padding, no
tiles: every image is one 448 x 448 view, 32 x 32 patches, which the resampler reads into its 256 queries.

    image -> resize S x S (bicubic) -> normalise                 pixel_values (1, 3, S, S)
    pixel_values (N, 3, S, S) --tower--> (N, P, Dv) --projector--> (N, Q, C): one row per placeholder

    >>> plan_squash(Image.new("RGB", (40, 20)), 448, (0.5,) * 3, (0.5,) * 3, queries=256).num_tokens
    256
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from PIL import Image

from vlmkit.image.pixels import as_rgb, normalize, normalize_work, pil_bytes, resize_work
from vlmkit.image.plan import ImagePlan
from vlmkit.schemes.base import Scheme
from vlmkit.schemes.pad import _view_tokens, pad_token_count

if TYPE_CHECKING:
    from vlmkit.models.vlm import VLM, VLMConfig


def preprocess_squash(image: Image.Image, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """RGB, bicubic resize to size x size (aspect ratio not kept), normalise -> (3, size, size)."""
    return normalize(as_rgb(image).resize((size, size), Image.Resampling.BICUBIC), mean, std)


def plan_squash(image: Image.Image, size: int, mean: tuple[float, ...], std: tuple[float, ...],
                patch_size: int = 14, keep_cls: bool = False, merge: int = 1, queries: int = 0) -> ImagePlan:
    """The squash scheme's plan: pixel_values (1, 3, size, size) and parts {"image": tokens} (pad_token_count's:
    the resampler's queries, or the view's patches)."""
    pixels = preprocess_squash(image, size, mean, std)[None]  # (1, 3, size, size)
    return ImagePlan(scheme="squash", pixel_values=pixels, original_size=image.size, resized_size=(size, size),
                     grid=(1, 1), parts={"image": pad_token_count(size, patch_size, keep_cls, merge, queries)})


class Squash(Scheme):
    """One view per image, squashed to the tower's square size, through the tower and the projector."""

    name = "squash"
    reference_preset = "qwen-vl"
    placeholders = {"image_token_id": "<imgpad>"}
    prompt_format = "qwen_vl"

    def work(self, cfg: VLMConfig, size: tuple[int, int], num_images: int = 1) -> int:
        side = cfg.vision.image_size
        return pil_bytes(*size) + resize_work(size, (side, side)) + normalize_work(side, side)

    def plan(self, cfg: VLMConfig, image: Image.Image, num_images: int = 1) -> ImagePlan:
        v = cfg.vision
        tokens = _view_tokens(cfg)
        return plan_squash(image, v.image_size, v.image_mean, v.image_std, **tokens)  # type: ignore[arg-type]

    def encode(self, model: VLM, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """pixel_values (N, 3, S, S) -> N x (Q, C)."""
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be (num_images, 3, H, W), got shape {tuple(pixel_values.shape)}")
        return list(model.project(pixel_values).unbind(0))  # N x (Q, C)
