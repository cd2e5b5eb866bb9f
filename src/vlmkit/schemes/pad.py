"""LLaVA-1.5's `pad` scheme: pad the image to a square with the mean colour, resize it to the tower's size.

Reference: LLaVA-1.5 (Liu et al., "Improved Baselines with Visual Instruction Tuning", 2023, sec. 3.2 and
its `expand2square`) as transformers' LlavaImageProcessor does it with do_pad=True
(models/llava/image_processing_llava.py). The image sits in the middle of the square (left/top offset
(side - size) // 2), the fill is the normalisation mean as 0-255 integers, then a bicubic resize.

    image -> pad to square -> resize S x S -> normalise          pixel_values (1, 3, S, S)
    pixel_values (N, 3, S, S) --tower--> (N, P, Dv) --projector--> (N, P', C): one row per placeholder

    >>> pad_token_count(336, 14)   # LLaVA-1.5: 24 x 24 patches, CLS dropped
    576
    >>> plan_pad(Image.new("RGB", (40, 20)), 336, (0.5,) * 3, (0.5,) * 3).num_tokens
    576
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from PIL import Image

from vlmkit.image.overlay import Geometry, View, fit_box
from vlmkit.image.pixels import (
    mean_colour,
    normalize,
    normalize_work,
    square_resized,
    square_resized_work,
)
from vlmkit.image.plan import ImagePlan
from vlmkit.schemes.base import Scheme

if TYPE_CHECKING:
    from vlmkit.models.vlm import VLM, VLMConfig


def preprocess_pad(image: Image.Image, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Pad to square with the mean colour, bicubic-resize to size x size, normalise -> (3, size, size).
    (square_resized gives the padded square's resized pixels without allocating the square.)"""
    return normalize(square_resized(image, mean_colour(mean), size), mean, std)  # type: ignore[arg-type]


def pad_work(width: int, height: int, size: int) -> int:
    """Bytes preprocess_pad of a width x height image allocates: by its long side (the rows of the padded
    square resampled to `size`), not by the square's area."""
    return square_resized_work(width, height, size) + normalize_work(size, size)


def pad_token_count(size: int, patch_size: int, keep_cls: bool = False, merge: int = 1, queries: int = 0) -> int:
    """Tokens one size x size view costs: its patches (plus CLS if kept), merge x merge blocks fused,
    or a resampler's fixed number of queries when it has one.

        >>> pad_token_count(336, 14, merge=2), pad_token_count(448, 14, queries=256)
        (144, 256)
    """
    if queries:
        return queries
    return ((size // patch_size) ** 2 + int(keep_cls)) // merge**2


def plan_pad(image: Image.Image, size: int, mean: tuple[float, ...], std: tuple[float, ...],
             patch_size: int = 14, keep_cls: bool = False, merge: int = 1, queries: int = 0) -> ImagePlan:
    """The pad scheme's plan: pixel_values (1, 3, size, size) and parts {"image": tokens}."""
    pixels = preprocess_pad(image, size, mean, std)[None]  # (1, 3, size, size)
    return ImagePlan(scheme="pad", pixel_values=pixels, original_size=image.size, resized_size=(size, size),
                     grid=(1, 1), parts={"image": pad_token_count(size, patch_size, keep_cls, merge, queries)})


def _view_tokens(cfg: VLMConfig) -> dict[str, int | bool]:
    """pad_token_count's settings for cfg: the tower's patches, a kept CLS, the projector's merge or queries."""
    v, spec = cfg.vision, cfg.projector.spec
    return {"patch_size": v.patch_size, "keep_cls": v.use_cls_token and v.select_feature == "cls_patch",
            "merge": spec.merge, "queries": spec.queries}


def image_token_count(cfg: VLMConfig) -> int:
    """Placeholder tokens one image costs under the pad scheme (the same for every image size)."""
    if cfg.image_scheme != "pad":
        raise ValueError(f"under image_scheme={cfg.image_scheme!r} the token count depends on the image size; "
                         "use plan_image(cfg, image).num_tokens")
    return pad_token_count(cfg.vision.image_size, **_view_tokens(cfg))  # type: ignore[arg-type]


class Pad(Scheme):
    """One square view per image through the tower and the projector (any projector: MLP, merge or resampler)."""

    name = "pad"
    reference_preset = "llava-1.5"

    def work(self, cfg: VLMConfig, size: tuple[int, int], num_images: int = 1) -> int:
        return pad_work(*size, cfg.vision.image_size)

    def plan(self, cfg: VLMConfig, image: Image.Image, num_images: int = 1) -> ImagePlan:
        v = cfg.vision
        return plan_pad(image, v.image_size, v.image_mean, v.image_std, **_view_tokens(cfg))  # type: ignore[arg-type]

    def encode(self, model: VLM, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """pixel_values (N, 3, S, S) -> N x (P', C)."""
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be (num_images, 3, H, W), got shape {tuple(pixel_values.shape)}")
        return list(model.project(pixel_values).unbind(0))  # N x (P', C)

    def geometry(self, plan: ImagePlan) -> Geometry:
        width, height = plan.original_size
        side = max(width, height)
        return Geometry(None, 0, 0, self.grid_unit,
                        (View(fit_box(width, height, side, side), plan.resized_size, "view (padded square)"),))
