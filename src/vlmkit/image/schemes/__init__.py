"""Image schemes: how an image of any size becomes pixel tensors and a number of tokens.

`SCHEMES` maps each scheme's name to `plan(image, **options) -> ImagePlan` with the defaults of
the reference model named beside it; keyword options override a default (e.g. `max_crops=4` for
hd, `num_images=3` for tiles). The functions are the scheme modules' own, defaults bound:

    name     reference        defaults                                                function
    pad      LLaVA-1.5        336 x 336, patch 14, CLIP mean/std                      plan_pad
    anyres   LLaVA-v1.6       5 grid pinpoints, tiles 336, patch 14, CLIP mean/std    plan_anyres
    hd       Phi-3.5-vision   HD-16 (max_crops=16), CLIP mean/std                     plan_hd
    tiles    DeepSeek-VL2     384 tiles, <= 9 per image, tiling off above 2 images    plan_tiles
    slices   MiniCPM-V 2.6    ~448 x 448 slices, at most 9, 64 queries per view       plan_slices
    dynamic  Qwen2-VL         56*56 <= pixels <= 28*28*1280, CLIP mean/std            plan_dynamic
    dual     Vary             CLIP 224 + SAM 1024                                     plan_dual

    >>> from PIL import Image
    >>> get_scheme("pad")(Image.new("RGB", (336, 336))).num_tokens
    576
    >>> get_scheme("hd")(Image.new("RGB", (672, 672)), max_crops=4).num_tokens
    757
    >>> get_scheme("mosaic")
    Traceback (most recent call last):
    ...
    ValueError: unknown image scheme 'mosaic'; valid schemes: pad, anyres, hd, tiles, slices, dynamic, dual
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from vlmkit.image.plan import ImagePlan
from vlmkit.image.schemes.anyres import LLAVA_V16_PINPOINTS, plan_anyres
from vlmkit.image.schemes.dual import plan_dual
from vlmkit.image.schemes.dynamic import plan_dynamic
from vlmkit.image.schemes.hd import CLIP_MEAN, CLIP_STD, plan_hd
from vlmkit.image.schemes.pad import plan_pad
from vlmkit.image.schemes.slices import plan_slices
from vlmkit.image.schemes.tiles import plan_tiles

SCHEMES: dict[str, Callable[..., ImagePlan]] = {
    "pad": partial(plan_pad, size=336, mean=CLIP_MEAN, std=CLIP_STD, patch_size=14),
    "anyres": partial(plan_anyres, grid_pinpoints=LLAVA_V16_PINPOINTS, tile_size=336, mean=CLIP_MEAN,
                      std=CLIP_STD, patch_size=14),
    "hd": partial(plan_hd, max_crops=16),
    "tiles": plan_tiles,
    "slices": plan_slices,
    "dynamic": plan_dynamic,
    "dual": plan_dual,
}


def get_scheme(name: str) -> Callable[..., ImagePlan]:
    """The plan function of scheme `name`; ValueError naming the valid schemes if there is none."""
    try:
        return SCHEMES[name]
    except KeyError:
        raise ValueError(f"unknown image scheme {name!r}; valid schemes: {', '.join(SCHEMES)}") from None
