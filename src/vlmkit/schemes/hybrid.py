"""DeepSeek-VL's `hybrid` scheme: every image as two fixed views, SigLIP at 384 px and SAM-B at 1024 px.

    pixel_values (N, 3, 384, 384)            --SigLIP, post-layernorm-->          (N, 576, Dv)
    high_res_pixel_values (N, 3, 1024, 1024) --SAM, neck, resize 96, 2 convs,
                                               + alpha * sam_hd global branch-->  (N, 576, 4 Cs)
    aligner: cat([high_proj(high), low_proj(low)], -1) (N, 576, C), GELU, Linear(C, C)

One image costs (vision.image_size / vision.patch_size)**2 tokens (576 at 384 / 16) whatever its size;
the SAM branch lands on the same grid because it resizes its neck map to 4x that side before the two
stride-2 convs (SamConfig.resize_to).

Reference: DeepSeek-VL (Lu et al., "DeepSeek-VL: Towards Real-World Vision-Language Understanding", 2024,
sec. 3.1 "hybrid vision encoder"), as transformers' DeepseekVLHybrid does it: the image processor
DeepseekVLHybridImageProcessorPil (resize the long side to 1024 and pad to a square with the mean colour,
resize that to 384 and pad again, normalise each with its tower's mean/std) and the model's
get_image_features / DeepseekVLHybridAligner (models/deepseek_vl_hybrid/). The towers and the aligner are
models/deepseek_vl.py's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from PIL import Image

from vlmkit.image.overlay import Geometry, View, fit_box
from vlmkit.image.pixels import (
    as_rgb,
    mean_colour,
    normalize,
    normalize_work,
    pad_to_square,
    pil_bytes,
    resize_work,
)
from vlmkit.image.plan import ImagePlan
from vlmkit.schemes.base import Scheme, Video

if TYPE_CHECKING:
    from vlmkit.models.deepseek_vl import DeepseekVL, DeepseekVLConfig


def _long_side_size(width: int, height: int, side: int, min_size: int) -> tuple[int, int]:
    """(width, height) with the long side `side` (each side at least min_size), rounding half to even."""
    scale = side / max(width, height)
    return max(round(width * scale), min_size), max(round(height * scale), min_size)


def _resize_long_side(image: Image.Image, side: int, min_size: int) -> Image.Image:
    """Bicubic resize so the long side is `side` (each side at least min_size), rounding half to even."""
    return image.resize(_long_side_size(*image.size, side, min_size), Image.BICUBIC)


def hybrid_work(width: int, height: int, high: int, low: int, min_size: int = 14) -> int:
    """Bytes deepseek_vl_pixels of one width x height image allocates: the resize to the high side and its
    square, that square's resize to the low side and its square, both normalised; bounded by the towers'
    sizes (the image is resized before it is padded)."""
    big = _long_side_size(width, height, high, min_size)
    small = _long_side_size(max(big), max(big), low, min_size)
    return (resize_work((width, height), big) + pil_bytes(high, high) + resize_work((high, high), small)
            + pil_bytes(low, low) + normalize_work(high, high) + normalize_work(low, low))


def deepseek_vl_pixels(cfg: DeepseekVLConfig, images: list[Image.Image],
                       min_size: int = 14) -> dict[str, torch.Tensor]:
    """Both views of every image, as transformers' DeepseekVLHybridImageProcessorPil makes them.

    The high-resolution view is the image resized (long side vision_high.image_size) and padded
    square with the colour int(255 * mean); the low-resolution view is that padded square resized
    to vision.image_size. Returns pixel_values (N, 3, 384, 384) and high_res_pixel_values
    (N, 3, 1024, 1024), the forward's keyword tensors (each view normalized with its tower's mean/std).
    """
    if not images:
        raise ValueError("no images given; pass at least one PIL image")
    low_cfg, high_cfg = cfg.vision, cfg.vision_high
    low, high = [], []
    for image in images:
        image = as_rgb(image)
        big = pad_to_square(_resize_long_side(image, high_cfg.image_size, min_size),
                            mean_colour(high_cfg.image_mean))  # type: ignore[arg-type]
        small = pad_to_square(_resize_long_side(big, low_cfg.image_size, min_size),
                              mean_colour(low_cfg.image_mean))  # type: ignore[arg-type]
        high.append(normalize(big, high_cfg.image_mean, high_cfg.image_std))
        low.append(normalize(small, low_cfg.image_mean, low_cfg.image_std))
    return {"pixel_values": torch.stack(low), "high_res_pixel_values": torch.stack(high)}


def hybrid_tokens(cfg: DeepseekVLConfig) -> int:
    """Placeholder tokens one image costs: the SigLIP patch grid, (384 / 16)**2 = 576."""
    return (cfg.vision.image_size // cfg.vision.patch_size) ** 2


class Hybrid(Scheme):
    """The SigLIP and SAM views of each image, joined by DeepSeek-VL's hybrid aligner (models/deepseek_vl.py)."""

    name = "hybrid"
    model_class = "DeepseekVL"
    reference_preset = "deepseek-vl"
    input_names = ("pixel_values", "high_res_pixel_values")

    def check_config(self, cfg: DeepseekVLConfig) -> None:
        """DeepseekVLConfig checks itself (both towers land on one token grid)."""

    def work(self, cfg: DeepseekVLConfig, size: tuple[int, int], num_images: int = 1) -> int:
        return hybrid_work(*size, cfg.vision_high.image_size, cfg.vision.image_size)

    def plan(self, cfg: DeepseekVLConfig, image: Image.Image, num_images: int = 1) -> ImagePlan:
        """Its 384-px SigLIP view as pixel_values (1, 3, 384, 384), its 1024-px SAM view in
        extra["high_res_pixel_values"] (1, 3, 1024, 1024), and hybrid_tokens (576) placeholders."""
        views = deepseek_vl_pixels(cfg, [image])
        side = cfg.vision.image_size // cfg.vision.patch_size
        return ImagePlan(self.name, views["pixel_values"], original_size=image.size,
                         resized_size=(cfg.vision.image_size, cfg.vision.image_size), grid=(side, side),
                         parts={"image": hybrid_tokens(cfg)},
                         extra={"high_res_pixel_values": views["high_res_pixel_values"],
                                "high_res_size": cfg.vision_high.image_size})

    def plan_video(self, cfg: DeepseekVLConfig, video: Video, num_images: int) -> list[ImagePlan]:
        raise ValueError("DeepSeek-VL does not take video: its hybrid encoder reads single images; pass images, "
                         "or use a Qwen2-VL or LLaVA-style model for video")

    def inputs(self, plans: Sequence[ImagePlan]) -> dict[str, torch.Tensor]:
        """pixel_values (N, 3, 384, 384) and high_res_pixel_values (N, 3, 1024, 1024), in prompt order."""
        return {"pixel_values": torch.cat([p.pixel_values for p in plans]),
                "high_res_pixel_values": torch.cat([p.extra["high_res_pixel_values"] for p in plans])}

    def encode(self, model: DeepseekVL, pixel_values: torch.Tensor, high_res_pixel_values: torch.Tensor | None = None
               ) -> list[torch.Tensor]:
        """(N, 3, 384, 384) and (N, 3, 1024, 1024) views of the same images -> N x (576, C) LM-width rows."""
        if high_res_pixel_values is None:
            raise ValueError("DeepSeek-VL needs both pixel_values (384 px) and high_res_pixel_values (1024 px) "
                             "of the same images, or neither; image_inputs(plans) makes both")
        if pixel_values.ndim != 4 or high_res_pixel_values.ndim != 4:
            raise ValueError(f"pixel_values {tuple(pixel_values.shape)} and high_res_pixel_values "
                             f"{tuple(high_res_pixel_values.shape)} must both be (num_images, 3, H, W)")
        if pixel_values.shape[0] != high_res_pixel_values.shape[0]:
            raise ValueError(f"pixel_values holds {pixel_values.shape[0]} images but high_res_pixel_values "
                             f"{high_res_pixel_values.shape[0]}; pass both views of every image")
        dtype = model.projector.proj.weight.dtype
        low = model.vision.features(pixel_values.to(dtype))  # (N, 576, Dv), last layer
        low = model.vision.post_norm(low)  # (N, 576, Dv): SigLIP's last_hidden_state
        high = model.vision_high.features(high_res_pixel_values.to(dtype))  # (N, 576, 4 Cs)
        return list(model.projector(low, high).unbind(0))  # N x (576, C)

    def geometry(self, plan: ImagePlan) -> Geometry:
        width, height = plan.original_size
        side = max(width, height)
        high = plan.extra["high_res_size"]
        box = fit_box(width, height, side, side)
        return Geometry(None, 0, 0, self.grid_unit, (View(box, plan.resized_size, "SigLIP (padded square)"),
                                                     View(box, (high, high), "SAM (padded square)")))
