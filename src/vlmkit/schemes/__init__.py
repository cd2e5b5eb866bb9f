"""Image schemes: how an image of any size becomes views, a number of tokens and the rows a model fills in.

Each scheme is one module here and one line of the registry below (the demo registers its own from
vlmkit.demo; a plugin package registers its schemes the same way, see vlmkit.plugins):

    name     reference model   module    what it does
    pad      LLaVA-1.5         pad       pad to a square, one view
    anyres   LLaVA-NeXT        anyres    base view + best-fit tiles, unpad, newline per row
    hd       Phi-3.5-vision    hd        global + HD-N crops, 2x2 merge, sub_GN / glb_GN
    tiles    DeepSeek-VL2      tiles     global + up to 9 tiles, 2x2 downsample, newline / separator
    slices   MiniCPM-V 2.6     slices    source + slices near 448**2 px, a resampler per view
    dynamic  Qwen2-VL          dynamic   native resolution patch rows, 2x2 merger, native video
    dual     Vary-base         dual      CLIP 224 beside SAM 1024, concatenated on channels
    sam      Vary-tiny         sam       SAM 1024 alone
    hybrid   DeepSeek-VL       hybrid    SigLIP 384 and SAM 1024 views, hybrid aligner
    squash   Qwen-VL           squash    resize to a square (aspect not kept), one view

A model's config names its scheme (VLMConfig.image_scheme; Qwen2VLConfig and DeepseekVLConfig name theirs),
and everything that plans an image goes through it:

    >>> from PIL import Image
    >>> from vlmkit.presets import get_preset
    >>> plan_image(get_preset("llava-1.5"), Image.new("RGB", (640, 480))).num_tokens
    576
    >>> get_scheme("mosaic")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: unknown image scheme 'mosaic'; valid schemes: pad, anyres, hd, tiles, slices, dynamic, dual, sam, ...

Adding a scheme: write a module with a `Scheme` subclass (plan, work, inputs, encode, and what else differs
from the defaults in schemes/base.py) and call `register_scheme` with an instance (docs/architecture.md
walks through one).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from vlmkit.image.plan import ImagePlan, MediaPlans
from vlmkit.image.video import VideoFrames
from vlmkit.plugins import load_plugins
from vlmkit.schemes.anyres import Anyres
from vlmkit.schemes.base import Scheme, Video, check_work
from vlmkit.schemes.dual import Dual
from vlmkit.schemes.dynamic import Dynamic
from vlmkit.schemes.hd import HD
from vlmkit.schemes.hybrid import Hybrid
from vlmkit.schemes.pad import Pad
from vlmkit.schemes.sam import Sam
from vlmkit.schemes.slices import Slices
from vlmkit.schemes.squash import Squash
from vlmkit.schemes.tiles import Tiles

Media = Image.Image | Video  # one image, or a video as its sampled frames

SCHEMES: dict[str, Scheme] = {}


def register_scheme(scheme: Scheme) -> Scheme:
    """Add scheme to the registry under scheme.name (ValueError if another scheme has that name)."""
    if not scheme.name:
        raise ValueError(f"{type(scheme).__name__} has no name; set the class attribute `name`")
    if scheme.name in SCHEMES and type(SCHEMES[scheme.name]) is not type(scheme):
        raise ValueError(f"image scheme {scheme.name!r} is already registered ({type(SCHEMES[scheme.name]).__name__}); "
                         "choose another name")
    SCHEMES[scheme.name] = scheme
    return scheme


def get_scheme(name: str) -> Scheme:
    """The registered scheme called name; ValueError naming the valid schemes if there is none."""
    if name not in SCHEMES:
        load_plugins()  # a scheme of an installed plugin package registers itself on import
    if name not in SCHEMES:
        raise ValueError(f"unknown image scheme {name!r}; valid schemes: {', '.join(SCHEMES)}")
    return SCHEMES[name]


def plan_image(cfg: Any, image: Image.Image, num_images: int = 1) -> ImagePlan:
    """The ImagePlan of one image under the scheme cfg names: its views and its token count. num_images is
    how many images the prompt holds (DeepSeek-VL2's tiles turn tiling off above 2). An image the scheme cannot
    plan within MAX_WORK_BYTES is refused first (ImagePlanError, see schemes.base.check_work)."""
    scheme = get_scheme(cfg.image_scheme)
    check_work(scheme, cfg, image.size, num_images)
    return scheme.plan(cfg, image, num_images)


def plan_media(cfg: Any, media: Sequence[Media]) -> list[MediaPlans]:
    """Plan every image and video of one prompt, in message order, under cfg's scheme: an image gives one
    ImagePlan, a video (its frames, or image.video's VideoFrames) a list of plans (one per frame, or the
    clip's one plan for a scheme with native video). Frames count as images of the prompt. Every image and
    video is checked against MAX_WORK_BYTES (schemes.base.check_work) before any is planned."""
    scheme = get_scheme(cfg.image_scheme)
    frames = [1 if isinstance(m, Image.Image) else len(m.frames if isinstance(m, VideoFrames) else m) for m in media]
    total = sum(frames)
    for m, count in zip(media, frames):
        if isinstance(m, Image.Image):
            check_work(scheme, cfg, m.size, total)
        else:
            for size in {f.size for f in (m.frames if isinstance(m, VideoFrames) else m)}:
                check_work(scheme, cfg, size, total, frames=count)
    return [scheme.plan(cfg, m, total) if isinstance(m, Image.Image) else scheme.plan_video(cfg, m, total)
            for m in media]


def image_inputs(plans: Sequence[ImagePlan]) -> dict[str, torch.Tensor]:
    """The forward keyword tensors of a batch's plans, in prompt order (each scheme's `inputs`); {} without
    plans. All plans must come from one scheme, the model's."""
    if not plans:
        return {}
    names = {p.scheme for p in plans}
    if len(names) > 1:
        raise ValueError(f"the images were planned with different schemes {sorted(names)}; use the model's one")
    return get_scheme(plans[0].scheme).inputs(plans)


for _scheme in (Pad(), Anyres(), HD(), Tiles(), Slices(), Dynamic(), Dual(), Sam(), Hybrid(), Squash()):
    register_scheme(_scheme)
