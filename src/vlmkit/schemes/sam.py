"""Vary-tiny's `sam` scheme: the SAM branch alone, no CLIP tower.

    image --bicubic resize to vision_high.image_size (aspect ratio not kept), normalise--> (1, 3, 1024, 1024)
    pixel_values (N, 3, 1024, 1024) --SAM ViTDet-B, neck, two stride-2 convs ("vary")--> (N, 256, 1024)
                                    --projector (Vary-tiny: Linear 1024 -> LM width)--> (N, 256, C)
    one row per <imgpad> position; the prompt wraps them as `<img>` + 256 x `<imgpad>` + `</img>`

Reference: Vary (Wei et al., "Vary: Scaling up the Vision Vocabulary for Large Vision-Language Models",
2023, sec. 3.2): Vary-tiny is Vary's first stage, the "new vision vocabulary" (SAM-B with two extra
convs, net_2 and net_3 of GitHub Ucas-HaoranWei/Vary's vary/model/vision_encoder/sam.py) trained with a
small decoder before Vary-base puts it beside CLIP. Its image processor is the SAM branch's
BlipImageEvalProcessor(image_size=1024), so the view is schemes/dual.py's `sam_view` with the tower's own
image_mean / image_std. The token count is `vision_high.tokens_per_image` (SamConfig), the formula the SAM
encoder's output follows; the encoder rejects views of another size.

GOT-OCR2 (transformers' got_ocr2, Vary's successor) runs on this same scheme (weights/got_ocr2.py). Vary's
code has net_2 Conv(256 -> 512), net_3 Conv(512 -> 1024), then a Linear 1024 -> LM width; GOT-OCR2's second
conv gives the LM width H directly and its Linear is H -> H. The config says which:
vision_high.downsample_channels = (512, 1024) and projector 1024 -> C for Vary, (512, H) and H -> H for
GOT-OCR2 (the same at GOT's H = 1024).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from PIL import Image

from vlmkit.config import require
from vlmkit.image.plan import ImagePlan
from vlmkit.schemes.base import Scheme
from vlmkit.schemes.dual import sam_view, sam_work

if TYPE_CHECKING:
    from vlmkit.models.vlm import VLM, VLMConfig


class Sam(Scheme):
    """The SAM tower (vision_high) and the projector; vision is None."""

    name = "sam"
    reference_preset = "vary-tiny"
    config_fields = ("vision_high",)

    def check_config(self, cfg: VLMConfig) -> None:
        """The SAM tower is the only one, and every one of its tokens goes through `projector`."""
        require(cfg.vision is None, "image_scheme='sam' has no CLIP tower: set vision=None (the SAM tower is "
                                    "vision_high)")
        require(cfg.vision_high is not None, "image_scheme='sam' (Vary-tiny) needs vision_high, a SamConfig "
                                             "(downsample='vary' for Vary's 256 tokens of 1024)")
        spec = cfg.projector.spec
        require(spec.merge == 1 and not spec.queries,
                f"image_scheme='sam' keeps every SAM token: projector must be 'linear' or 'mlp{{N}}x_gelu', "
                f"not {cfg.projector.type!r}")
        require(cfg.projector.in_dim == cfg.vision_high.feature_dim,
                f"projector.in_dim {cfg.projector.in_dim} != vision_high.feature_dim {cfg.vision_high.feature_dim}")

    def work(self, cfg: VLMConfig, size: tuple[int, int], num_images: int = 1) -> int:
        return sam_work(*size, cfg.vision_high.image_size)

    def plan(self, cfg: VLMConfig, image: Image.Image, num_images: int = 1) -> ImagePlan:
        """One view resized to the SAM tower's size, vision_high.tokens_per_image placeholders (256 at 1024 px
        with the vary convs) wrapped in <img> ... </img> text tokens."""
        high = cfg.vision_high
        size = high.image_size
        view = sam_view(image, size, high.image_mean, high.image_std, high.resize)  # (3, S, S)
        return ImagePlan(scheme="sam", pixel_values=view[None], original_size=image.size,
                         resized_size=(size, size), grid=(1, 1), parts={"features": high.tokens_per_image},
                         text_parts={"<img>": 1, "</img>": 1})

    def encode(self, model: VLM, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Each image's (T, C) rows: SAM tokens (N, T, feature_dim) through the projector."""
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be (num_images, 3, S, S) SAM views, got shape "
                             f"{tuple(pixel_values.shape)}")
        dtype = next(model.projector.parameters()).dtype
        features = model.vision_high.features(pixel_values.to(dtype))  # (N, T, feature_dim), T = tokens_per_image
        return list(model.projector(features).unbind(0))  # N x (T, C)
