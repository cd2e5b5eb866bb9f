"""Vary-base's `dual` scheme: the same image for two vision towers, CLIP at 224 and the SAM branch at 1024,
their projected tokens concatenated along channels.

Reference: Vary (Wei et al., "Vary: Scaling up the Vision Vocabulary for Large Vision-Language Models",
2023, sec. 3.2-3.3), GitHub Ucas-HaoranWei/Vary: vary/model/vary_qwen_vary.py (the forward:
`image_features_1 = mm_projector(CLIP)`, `image_features_2 = mm_projector_vary(SAM)`,
`torch.cat((f1, f2), dim=-1)`), vary/model/vision_encoder/sam.py (net_2, net_3) and its two image
processors:
- CLIP-L branch: CLIPImageProcessor -- bicubic resize of the short side to 224 (long side
  int(224 * long / short)), centre crop 224 x 224, CLIP mean/std. CLIP-L/14 at 224 gives 16 x 16 = 256
  patch features (penultimate layer, CLS dropped).
- SAM branch ("new vision vocabulary"): Vary-toy's BlipImageEvalProcessor(image_size=1024) -- bicubic
  resize to 1024 x 1024 ignoring the aspect ratio, then the same CLIP mean/std (its defaults); or Vary-base's
  demo processor, plug/transforms.py test_transform -- OpenCV bilinear resize to 1024 x 1024, ImageNet mean/std.
  The SAM tower's config says which (SamConfig.resize, image_mean, image_std; weights/vary.py).
  SAM ViTDet-B gives 64 x 64 x 256; two 3x3 stride-2 convs give 32 x 32 x 512 and 16 x 16 x 1024 = 256.
- Each branch has its own linear; the two 256-token maps are concatenated along channels, so the
  image costs 256 positions: `<img>` + 256 x `<imgpad>` + `</img>`, the features replacing <imgpad>.

    >>> plan = plan_dual(Image.new("RGB", (300, 200)))
    >>> plan.num_tokens, tuple(plan.pixel_values.shape), tuple(plan.extra["pixel_values_high"].shape)
    (256, (1, 3, 224, 224), (1, 3, 1024, 1024))
    >>> dual_num_tokens(1024), dual_num_tokens(1024, sam_convs=False)   # 1024/16 = 64 -> two convs -> 16
    (256, 4096)

plan.parts = {"features": 256}: the <img>/</img> wrappers are ordinary text tokens of the prompt,
the plan's text_parts (context_tokens = 258). pixel_values is the CLIP view (1, 3, 224, 224); the SAM view is
extra["pixel_values_high"] (1, 3, 1024, 1024). The model side:

    pixel_values      (N, 3, 224, 224)   --CLIP-L (penultimate layer, CLS dropped)--> (N, 256, 1024)
                                         --projector--> (N, 256, C1)
    pixel_values_high (N, 3, 1024, 1024) --SAM ViTDet-B, neck, two stride-2 convs--> (N, 256, 1024)
                                         --projector_high--> (N, 256, C2)
    rows = cat([clip, sam], dim=-1)      (N, 256, C1 + C2 = LM width): one row per <imgpad> position
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from vlmkit.config import CLIP_MEAN, CLIP_STD, require
from vlmkit.image.overlay import Geometry, View, whole_box
from vlmkit.image.pixels import (
    as_rgb,
    normalize,
    normalize_uint8,
    normalize_work,
    pil_bytes,
    resize_work,
    rgb_array,
)
from vlmkit.image.plan import ImagePlan
from vlmkit.schemes.base import Scheme, require_projector_input, require_vision
from vlmkit.text.chat import ChatTemplate, get_chat_template
from vlmkit.text.qwen_tiktoken import QwenTiktokenTokenizer

if TYPE_CHECKING:
    from vlmkit.models.vlm import VLM, VLMConfig

CLIP_SIZE = 224
SAM_SIZE = 1024


def _check(image: Image.Image) -> None:
    if image.width <= 0 or image.height <= 0:
        raise ValueError(f"image has zero size {image.width}x{image.height}; the dual scheme needs at least 1x1 pixels")


def clip_resized_size(width: int, height: int, size: int = CLIP_SIZE) -> tuple[int, int]:
    """(width, height) clip_view resizes to: the short side `size`, the long side int(size * long / short).

    >>> clip_resized_size(300, 200), clip_resized_size(20000, 1)   # the second: a 4,480,000 x 224 image
    ((336, 224), (4480000, 224))
    """
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def clip_work(width: int, height: int, size: int = CLIP_SIZE) -> int:
    """Bytes clip_view of a width x height image allocates: its resize (by the aspect ratio: the long side
    becomes size * long / short), the crop and the normalised view."""
    return resize_work((width, height), clip_resized_size(width, height, size)) + pil_bytes(size, size) + \
        normalize_work(size, size)


def sam_work(width: int, height: int, size: int = SAM_SIZE) -> int:
    """Bytes sam_view of a width x height image allocates: the resize to size x size and the normalised view."""
    return resize_work((width, height), (size, size)) + normalize_work(size, size)


def clip_view(image: Image.Image, size: int = CLIP_SIZE, mean: tuple[float, ...] = CLIP_MEAN,
              std: tuple[float, ...] = CLIP_STD) -> torch.Tensor:
    """Short side to `size` (bicubic), centre crop size x size, normalise -> (3, size, size).

    >>> clip_view(Image.new("RGB", (448, 224))).shape
    torch.Size([3, 224, 224])
    """
    _check(image)
    new_w, new_h = clip_resized_size(*image.size, size)
    resized = as_rgb(image).resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return normalize(resized.crop((left, top, left + size, top + size)), mean, std)  # (3, size, size)


def sam_view(image: Image.Image, size: int = SAM_SIZE, mean: tuple[float, ...] = CLIP_MEAN,
             std: tuple[float, ...] = CLIP_STD, resize: str = "bicubic") -> torch.Tensor:
    """Resize to size x size (aspect ratio not kept), normalise -> (3, size, size). resize "bicubic": Pillow's
    (Vary-toy's BlipImageEvalProcessor, a torchvision Resize of the PIL image); "cv2_linear": OpenCV's
    INTER_LINEAR on the uint8 pixels (Vary-base's albumentations test_transform; needs opencv-python-headless)."""
    _check(image)
    if resize == "bicubic":
        return normalize(as_rgb(image).resize((size, size), Image.Resampling.BICUBIC), mean, std)
    if resize != "cv2_linear":
        raise ValueError(f"sam_view resize {resize!r} unknown; use 'bicubic' or 'cv2_linear'")
    try:
        import cv2
    except ImportError as e:
        raise ImportError("this model's SAM view is resized as Vary-base's albumentations test_transform does, with "
                          "OpenCV: pip install opencv-python-headless") from e
    pixels = cv2.resize(rgb_array(image), (size, size), interpolation=cv2.INTER_LINEAR)  # (size, size, 3) uint8
    return normalize_uint8(torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))), mean, std)


def dual_num_tokens(sam_size: int = SAM_SIZE, sam_convs: bool = True, sam_patch: int = 16) -> int:
    """Positions per image: the SAM grid sam_size / sam_patch, each 3x3 stride-2 pad-1 conv (two of them)
    taking a side n to ceil(n / 2); squared.

    >>> dual_num_tokens(256)   # a tiny SAM: 16 x 16 patches -> 8 -> 4
    16
    """
    side = sam_size // sam_patch
    if sam_convs:
        for _ in range(2):
            side = (side + 1) // 2
    return side * side


def plan_dual(image: Image.Image, clip_size: int = CLIP_SIZE, sam_size: int = SAM_SIZE,
              clip_patch: int = 14, sam_patch: int = 16, sam_mean: tuple[float, ...] = CLIP_MEAN,
              sam_std: tuple[float, ...] = CLIP_STD, sam_resize: str = "bicubic") -> ImagePlan:
    """Vary plan: CLIP view in pixel_values (1, 3, 224, 224), SAM view in extra["pixel_values_high"].
    The sizes and patch sizes are the two towers' (tiny test models use e.g. 32 / 8 and 256 / 16); the SAM
    view's normalisation and resize are the SAM tower's (sam_view).

    >>> plan_dual(Image.new("RGB", (40, 30)), clip_size=32, sam_size=256, clip_patch=8).num_tokens
    16
    """
    _check(image)
    tokens = dual_num_tokens(sam_size, sam_patch=sam_patch)
    clip_tokens = (clip_size // clip_patch) ** 2
    if clip_tokens != tokens:
        raise ValueError(f"CLIP at {clip_size} gives {clip_tokens} tokens but SAM at {sam_size} gives {tokens}; "
                         "Vary concatenates them along channels, so both must match (224 and 1024)")
    return ImagePlan(scheme="dual", pixel_values=clip_view(image, clip_size)[None], original_size=image.size,
                     resized_size=(clip_size, clip_size), grid=(1, 1), parts={"features": tokens},
                     text_parts={"<img>": 1, "</img>": 1},
                     extra={"pixel_values_high": sam_view(image, sam_size, sam_mean, sam_std, sam_resize)[None],
                            "sam_size": sam_size})


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


class Dual(Scheme):
    """CLIP view through vision + projector beside the SAM view through vision_high + projector_high."""

    name = "dual"
    reference_preset = "vary-base"
    input_names = ("pixel_values", "pixel_values_high")
    config_fields = ("vision_high", "projector_high")

    def check_config(self, cfg: VLMConfig) -> None:
        """Both branches must give the same number of tokens (their rows are concatenated along channels)."""
        require_vision(cfg, self.name)
        high, proj = cfg.vision_high, cfg.projector_high
        require(high is not None and proj is not None,
                "image_scheme='dual' (Vary-base) needs vision_high (a SamConfig with downsample='vary') and "
                "projector_high (in_dim = vision_high.feature_dim, e.g. 1024)")
        require(high.downsample == "vary", f"image_scheme='dual' plans Vary's SAM branch: set "
                                           f"vision_high.downsample='vary', not {high.downsample!r}")
        require(cfg.vision.select_feature == "patch",
                "image_scheme='dual' drops CLIP's CLS token as Vary does: set vision.select_feature='patch'")
        for name, p in (("projector", cfg.projector), ("projector_high", proj)):
            require(p.spec.merge == 1 and not p.spec.queries,
                    f"image_scheme='dual' keeps every token of both branches: {name} must be 'linear' or "
                    f"'mlp{{N}}x_gelu', not {p.type!r}")
        require(proj.in_dim == high.feature_dim,
                f"projector_high.in_dim {proj.in_dim} != vision_high.feature_dim {high.feature_dim}")
        clip, sam = cfg.vision.num_patches, high.tokens_per_image
        require(clip == sam, f"the CLIP branch gives {clip} tokens ({cfg.vision.image_size} px / "
                             f"{cfg.vision.patch_size}) but the SAM branch {sam} ({high.image_size} px / "
                             f"{high.patch_size}, two stride-2 convs); both must match (Vary: 224/14 and 1024/16)")
        require_projector_input(cfg)

    def work(self, cfg: VLMConfig, size: tuple[int, int], num_images: int = 1) -> int:
        return clip_work(*size, cfg.vision.image_size) + sam_work(*size, cfg.vision_high.image_size)

    def plan(self, cfg: VLMConfig, image: Image.Image, num_images: int = 1) -> ImagePlan:
        """The image's dual plan at the sizes of the model's two towers (224 / 14 and 1024 / 16 for Vary)."""
        high = cfg.vision_high
        return plan_dual(image, clip_size=cfg.vision.image_size, sam_size=high.image_size,
                         clip_patch=cfg.vision.patch_size, sam_patch=high.patch_size, sam_mean=high.image_mean,
                         sam_std=high.image_std, sam_resize=high.resize)

    def inputs(self, plans: Sequence[ImagePlan]) -> dict[str, torch.Tensor]:
        """pixel_values (N, 3, S, S), the CLIP views, and pixel_values_high (N, 3, S_high, S_high), the SAM views."""
        return {"pixel_values": torch.cat([p.pixel_values for p in plans]),  # (N, 3, S, S)
                "pixel_values_high": torch.cat([p.extra["pixel_values_high"] for p in plans])}  # (N, 3, Sh, Sh)

    def encode(self, model: VLM, pixel_values: torch.Tensor, pixel_values_high: torch.Tensor | None = None
               ) -> list[torch.Tensor]:
        """Each image's (T, C) rows from the CLIP views (N, 3, S, S) and SAM views (N, 3, Sh, Sh)."""
        if pixel_values_high is None:
            raise ValueError("a dual (Vary) model needs pixel_values_high, the SAM views (num_images, 3, S, S), next "
                             "to pixel_values; image_inputs(plans) makes both")
        if pixel_values.ndim != 4 or pixel_values_high.ndim != 4 or pixel_values.shape[0] != pixel_values_high.shape[0]:
            raise ValueError(f"pixel_values {tuple(pixel_values.shape)} and pixel_values_high "
                             f"{tuple(pixel_values_high.shape)} must both be (num_images, 3, S, S) for the same images")
        high = model.cfg.vision_high
        tokens = dual_num_tokens(high.image_size, sam_patch=high.patch_size)
        dtype = next(model.projector_high.parameters()).dtype
        clip = model.project(pixel_values)  # (N, T, C1)
        sam = model.projector_high(model.vision_high.features(pixel_values_high.to(dtype)))  # (N, T, C2)
        return [dual_rows(c, s, tokens) for c, s in zip(clip, sam)]  # N x (T, C1 + C2)

    def chat_template(self, tokenizer: Any, cfg: VLMConfig, fallback: str | None) -> ChatTemplate:
        """Vary's built-in template (conv "mpt" of its code) for a Qwen-1 tokenizer (qwen.tiktoken) that names no
        template of its own, as a Vary checkpoint ships none: "vary_base" (Vary-base's demo) for a model with
        Vary-base's SAM processor (cv2 resize), else "vary" (Vary-toy's demo, a newline after each image).
        Otherwise the tokenizer's own template, else fallback."""
        if isinstance(tokenizer, QwenTiktokenTokenizer) and tokenizer.own_chat_template is None:
            return get_chat_template("vary_base" if cfg.vision_high.resize == "cv2_linear" else "vary")
        return super().chat_template(tokenizer, cfg, fallback)

    def geometry(self, plan: ImagePlan) -> Geometry:
        width, height = plan.original_size
        side = min(width, height)
        crop = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
        sam = plan.extra["sam_size"]
        return Geometry(None, 0, 0, self.grid_unit, (View(crop, plan.resized_size, "CLIP (centre crop)"),
                                                     View(whole_box(plan), (sam, sam), "SAM (squashed)")))
