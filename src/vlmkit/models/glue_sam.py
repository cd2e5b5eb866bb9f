"""The VLM glue of Vary-tiny's `sam` scheme: the SAM branch alone, no CLIP tower.

    image --bicubic resize to vision_high.image_size (aspect ratio not kept), normalise--> (1, 3, 1024, 1024)
    pixel_values (N, 3, 1024, 1024) --SAM ViTDet-B, neck, two stride-2 convs ("vary")--> (N, 256, 1024)
                                    --projector (Vary-tiny: Linear 1024 -> LM width)--> (N, 256, C)
    one row per <imgpad> position; the prompt wraps them as `<img>` + 256 x `<imgpad>` + `</img>`

Vary-tiny is the first stage of Vary (seed 001): the "new vision vocabulary" (SAM-B with two extra
convs) trained with a small decoder before Vary-base puts it beside CLIP. Its image processor is the
SAM branch's BlipImageEvalProcessor(image_size=1024), so the view is image/schemes/dual.py's `sam_view`
with the tower's own image_mean / image_std. The token count is `vision_high.tokens_per_image`
(SamConfig), the formula SamEncoder.features' output follows; the SAM encoder rejects views of another size.

GOT-OCR2 (transformers' got_ocr2, Vary's successor) runs on this same glue (weights/got_ocr2.py). Seed 001's
Vary code has net_2 Conv(256 -> 512), net_3 Conv(512 -> 1024), then a Linear 1024 -> LM width (1024 -> 1024
in Vary-base's printout, 1024 -> 768 into Vary-tiny's OPT-125M); GOT-OCR2's second conv gives the LM width H
directly and its Linear is H -> H. The config says which: vision_high.downsample_channels = (512, 1024) and
projector 1024 -> C for Vary, (512, H) and H -> H for GOT-OCR2 (the same at GOT's H = 1024).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from PIL import Image

from vlmkit.models.sam import SamConfig
from vlmkit.config import VLMConfig
from vlmkit.image.plan import ImagePlan
from vlmkit.image.schemes.dual import sam_view

if TYPE_CHECKING:
    from vlmkit.models.vlm import VLM


def _sam_tower(cfg: VLMConfig) -> SamConfig:
    if cfg.vision_high is None:
        raise ValueError("the sam scheme needs cfg.vision_high (the SAM tower); set image_scheme='sam' with it")
    return cfg.vision_high


def sam_plan(cfg: VLMConfig, image: Image.Image, num_images: int) -> ImagePlan:
    """The image's Vary-tiny plan: one view resized to the SAM tower's size, vision_high.tokens_per_image
    placeholders (256 at 1024 px with the vary convs) wrapped in <img> ... </img> text tokens."""
    high = _sam_tower(cfg)
    size = high.image_size
    view = sam_view(image, size, high.image_mean, high.image_std)  # (3, S, S)
    return ImagePlan(scheme="sam", pixel_values=view[None], original_size=image.size, resized_size=(size, size),
                     grid=(1, 1), parts={"features": high.tokens_per_image}, text_parts={"<img>": 1, "</img>": 1})


def sam_inputs(plans: Sequence[ImagePlan]) -> dict[str, torch.Tensor]:
    """pixel_values (N, 3, S, S): every image's SAM view."""
    return {"pixel_values": torch.cat([p.pixel_values for p in plans])}  # (N, 3, S, S)


def encode_sam(model: VLM, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None) -> list[torch.Tensor]:
    """Each image's (T, C) rows: SAM tokens (N, T, feature_dim) through the projector; image_sizes unused."""
    if pixel_values.ndim != 4:
        raise ValueError(f"pixel_values must be (num_images, 3, S, S) SAM views, got shape {tuple(pixel_values.shape)}")
    dtype = next(model.projector.parameters()).dtype
    features = model.vision_high.features(pixel_values.to(dtype))  # (N, T, feature_dim), T = tokens_per_image
    return list(model.projector(features).unbind(0))  # N x (T, C)
