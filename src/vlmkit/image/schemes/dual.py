"""The Vary `dual` scheme: the same image for two vision towers, CLIP at 224 and the SAM branch at 1024.

Seed 001 (Vary, stage 2 "Vary-base"):
- CLIP-L branch: CLIPImageProcessor -- bicubic resize of the short side to 224 (long side
  int(224 * long / short)), centre crop 224 x 224, CLIP mean/std. CLIP-L/14 at 224 gives 16 x 16 = 256
  patch features (penultimate layer, CLS dropped).
- SAM branch ("new vision vocabulary"): Vary's BlipImageEvalProcessor(image_size=1024) -- bicubic
  resize to 1024 x 1024 ignoring the aspect ratio, then the same CLIP mean/std (its defaults).
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
extra["pixel_values_high"] (1, 3, 1024, 1024).
"""

from __future__ import annotations

import torch
from PIL import Image

from vlmkit.image.plan import ImagePlan
from vlmkit.image.schemes.pad import normalize

CLIP_SIZE = 224
SAM_SIZE = 1024
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _check(image: Image.Image) -> None:
    if image.width <= 0 or image.height <= 0:
        raise ValueError(f"image has zero size {image.width}x{image.height}; the dual scheme needs at least 1x1 pixels")


def clip_view(image: Image.Image, size: int = CLIP_SIZE, mean: tuple[float, ...] = CLIP_MEAN,
              std: tuple[float, ...] = CLIP_STD) -> torch.Tensor:
    """Short side to `size` (bicubic), centre crop size x size, normalise -> (3, size, size).

    >>> clip_view(Image.new("RGB", (448, 224))).shape
    torch.Size([3, 224, 224])
    """
    _check(image)
    width, height = image.size
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    resized = image.convert("RGB").resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return normalize(resized.crop((left, top, left + size, top + size)), mean, std)  # (3, size, size)


def sam_view(image: Image.Image, size: int = SAM_SIZE, mean: tuple[float, ...] = CLIP_MEAN,
             std: tuple[float, ...] = CLIP_STD) -> torch.Tensor:
    """Bicubic resize to size x size (aspect ratio not kept), normalise -> (3, size, size)."""
    _check(image)
    return normalize(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), mean, std)


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
              clip_patch: int = 14, sam_patch: int = 16) -> ImagePlan:
    """Vary plan: CLIP view in pixel_values (1, 3, 224, 224), SAM view in extra["pixel_values_high"].
    The sizes and patch sizes are the two towers' (tiny test models use e.g. 32 / 8 and 256 / 16).

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
                     extra={"pixel_values_high": sam_view(image, sam_size)[None], "sam_size": sam_size})
