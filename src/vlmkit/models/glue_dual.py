"""The VLM glue of Vary-base's `dual` scheme: two towers on the same image, concatenated along channels.

    pixel_values      (N, 3, 224, 224)   --CLIP-L (penultimate layer, CLS dropped)--> (N, 256, 1024)
                                         --projector--> (N, 256, C1)
    pixel_values_high (N, 3, 1024, 1024) --SAM ViTDet-B, neck, two stride-2 convs--> (N, 256, 1024)
                                         --projector_high--> (N, 256, C2)
    rows = cat([clip, sam], dim=-1)      (N, 256, C1 + C2 = LM width): one row per <imgpad> position

This follows seed 001's printout of Vary's forward: `image_features_1 = mm_projector(CLIP)`,
`image_features_2 = mm_projector_vary(SAM)`, `torch.cat((f1, f2), dim=-1)` -> (1, 256, 2048) for Qwen-7B.
The token count comes from the scheme's plan (image/schemes/dual.py, `dual_num_tokens`);
`dual_rows` checks that the concatenated rows hold exactly that many.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from PIL import Image

from vlmkit.config import VLMConfig
from vlmkit.image.plan import ImagePlan
from vlmkit.image.schemes.dual import dual_num_tokens, plan_dual

if TYPE_CHECKING:
    from vlmkit.models.vlm import VLM


def dual_plan(cfg: VLMConfig, image: Image.Image, num_images: int) -> ImagePlan:
    """The image's dual plan at the sizes of the model's two towers (224 / 14 and 1024 / 16 for Vary)."""
    high = cfg.vision_high
    if high is None:
        raise ValueError("the dual scheme needs cfg.vision_high (the SAM tower); set image_scheme='dual' with it")
    return plan_dual(image, clip_size=cfg.vision.image_size, sam_size=high.image_size,
                     clip_patch=cfg.vision.patch_size, sam_patch=high.patch_size)


def dual_inputs(plans: Sequence[ImagePlan]) -> dict[str, torch.Tensor]:
    """pixel_values (N, 3, S, S), the CLIP views, and pixel_values_high (N, 3, S_high, S_high), the SAM views."""
    return {"pixel_values": torch.cat([p.pixel_values for p in plans]),  # (N, 3, S, S)
            "pixel_values_high": torch.cat([p.extra["pixel_values_high"] for p in plans])}  # (N, 3, Sh, Sh)


def dual_rows(clip: torch.Tensor, sam: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """One image's rows: its projected CLIP tokens (T, C1) and SAM tokens (T, C2) side by side -> (T, C1 + C2).

    Raises ValueError unless both branches give exactly num_tokens rows (the plan's count).

        >>> dual_rows(torch.zeros(4, 2), torch.ones(4, 3), 4)[0].tolist()
        [0.0, 0.0, 1.0, 1.0, 1.0]
    """
    if clip.shape[0] != num_tokens or sam.shape[0] != num_tokens:
        raise ValueError(f"the dual plan counts {num_tokens} tokens per image but the CLIP branch gives "
                         f"{clip.shape[0]} and the SAM branch {sam.shape[0]}; check the towers' image and "
                         "patch sizes against vision / vision_high")
    return torch.cat([clip, sam], dim=-1)  # (T, C1 + C2)


def encode_dual(model: VLM, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None,
                pixel_values_high: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Each image's (T, C) rows from the CLIP views (N, 3, S, S) and SAM views (N, 3, Sh, Sh); image_sizes unused."""
    if pixel_values_high is None:
        raise ValueError("a dual (Vary) model needs pixel_values_high, the SAM views (num_images, 3, S, S), next "
                         "to pixel_values; image_inputs(plans) makes both")
    if pixel_values.ndim != 4 or pixel_values_high.ndim != 4 or pixel_values.shape[0] != pixel_values_high.shape[0]:
        raise ValueError(f"pixel_values {tuple(pixel_values.shape)} and pixel_values_high "
                         f"{tuple(pixel_values_high.shape)} must both be (num_images, 3, S, S) for the same images")
    high = model.cfg.vision_high
    tokens = dual_num_tokens(high.image_size, sam_patch=high.patch_size)
    dtype = next(model.projector_high.parameters()).dtype
    clip = model._project(pixel_values)  # (N, T, C1)
    sam = model.projector_high(model.vision_high.features(pixel_values_high.to(dtype)))  # (N, T, C2)
    return [dual_rows(c, s, tokens) for c, s in zip(clip, sam)]  # N x (T, C1 + C2)
