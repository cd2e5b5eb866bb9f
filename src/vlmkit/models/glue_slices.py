"""The VLM glue of the MiniCPM-V `slices` scheme: every view at its own size, one resampler per view.

The plan (image/schemes/slices.py) cuts an image into views [source, slices row-major], each its
own (width, height) near vision.image_size**2 pixels with sides multiples of vision.patch_size.
The forward inputs (`slices_inputs`) carry them zero-padded, with each view's size beside them:

    pixel_values (N, V_max, 3, H_max, W_max)   view v of image i in pixel_values[i, v, :, :h, :w],
                                               zeros to the right, below, and for absent views
    image_sizes  (N, V_max, 2)                 each view's (height, width); (0, 0) for absent views,
                                               which may only follow an image's present ones

`encode_slices`, per view (views of one size share one batch):

    pixel_values[i, v, :, :h, :w]   --tower, positions interpolated to (h/P, w/P)-->  (h/P * w/P, Dv)
                                    --resampler projector (perceiver{Q}q)-->          (Q, C)

and `slices_layout` concatenates an image's views in plan order into its rows (views * Q, C), which
must be the plan's num_tokens (its `parts`: Q source queries + Q per slice) or raise ValueError.
The wrappers (<im_start> <im_end> <slice> </slice>) and row breaks are text tokens of the prompt
(the plan's `text_parts`), not rows: the model fills only the image placeholders, in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from PIL import Image

from vlmkit.config import VLMConfig
from vlmkit.image.plan import ImagePlan
from vlmkit.image.schemes.slices import plan_slices, slice_parts
from vlmkit.models.projectors import parse_projector_type

if TYPE_CHECKING:
    from vlmkit.models.vlm import VLM


def query_num(cfg: VLMConfig) -> int:
    """Tokens per view: the resampler projector's query count (MiniCPM-V 2.6: 64)."""
    queries = parse_projector_type(cfg.projector.type).queries
    if queries < 1:
        raise ValueError(f"image_scheme='slices' needs a resampler projector ('perceiver{{Q}}q'), "
                         f"not {cfg.projector.type!r}")
    return queries


def slices_plan(cfg: VLMConfig, image: Image.Image, num_images: int = 1) -> ImagePlan:
    """The slices plan of one image for this model: max_slices = cfg.max_crops, query_num = the projector's
    queries, slice resolution = vision.image_size, sides multiples of vision.patch_size. Every image of a
    prompt is sliced alike (num_images is unused)."""
    v = cfg.vision
    return plan_slices(image, max_slices=cfg.max_crops, query_num=query_num(cfg),  # type: ignore[arg-type]
                       scale_resolution=v.image_size, size_multiple=v.patch_size, mean=v.image_mean, std=v.image_std,
                       patch_size=v.patch_size)


def slices_num_tokens(num_views: int, queries: int) -> int:
    """Placeholders of an image of num_views views (source + slices): the plan's parts, which depend
    only on the number of slices.

        >>> slices_num_tokens(7, 64), slices_num_tokens(1, 64)
        (448, 64)
    """
    if num_views < 1:
        raise ValueError(f"an image has at least its source view, got {num_views} views")
    parts, _ = slice_parts(1, num_views - 1, queries, row_breaks=False)
    return sum(parts.values())


def slices_inputs(plans: Sequence[ImagePlan]) -> dict[str, torch.Tensor]:
    """The forward tensors of slices plans: pixel_values (N, V_max, 3, H_max, W_max) zero-padded and
    image_sizes (N, V_max, 2), each view's (height, width), zeros for absent views."""
    sizes = [p.extra["view_sizes"] for p in plans]  # per image, [(width, height)] per view
    views = max(len(s) for s in sizes)
    height = max(h for s in sizes for _, h in s)
    width = max(w for s in sizes for w, _ in s)
    pixel_values = plans[0].pixel_values.new_zeros(len(plans), views, 3, height, width)  # (N, V_max, 3, H, W)
    image_sizes = torch.zeros(len(plans), views, 2, dtype=torch.long)  # (N, V_max, 2)
    for i, (plan, view_sizes) in enumerate(zip(plans, sizes)):
        v, _, h, w = plan.pixel_values.shape
        pixel_values[i, :v, :, :h, :w] = plan.pixel_values
        image_sizes[i, :v] = torch.tensor([(vh, vw) for vw, vh in view_sizes])
    return {"pixel_values": pixel_values, "image_sizes": image_sizes}


def view_sizes(pixel_values: torch.Tensor, image_sizes: torch.Tensor | None, patch: int) -> list[list[tuple[int, int]]]:
    """Each image's present views as (height, width), checked against pixel_values and the patch size."""
    if pixel_values.ndim != 5:
        raise ValueError(f"slices pixel_values must be (images, views, 3, H_max, W_max), got shape "
                         f"{tuple(pixel_values.shape)}; image_inputs(plans) makes it")
    N, V, _, H, W = pixel_values.shape
    if image_sizes is None or tuple(image_sizes.shape) != (N, V, 2):
        got = None if image_sizes is None else tuple(image_sizes.shape)
        raise ValueError(f"a slices model needs image_sizes of shape ({N}, {V}, 2), each view's (height, width) "
                         f"and zeros for absent views, next to pixel_values; got {got}. image_inputs(plans) makes both")
    out = []
    for i, rows in enumerate(image_sizes.tolist()):
        count = next((k for k, (h, w) in enumerate(rows) if h <= 0 or w <= 0), len(rows))
        if count == 0 or any(h or w for h, w in rows[count:]):
            raise ValueError(f"image_sizes[{i}] = {rows}: the present views must come first, from the source "
                             "view on, and absent ones be (0, 0)")
        present = [(int(h), int(w)) for h, w in rows[:count]]
        for v, (h, w) in enumerate(present):
            if h > H or w > W or h % patch or w % patch:
                raise ValueError(f"image_sizes[{i}][{v}] = ({h}, {w}) must fit in pixel_values' {H}x{W} and be "
                                 f"multiples of the patch size {patch}")
        out.append(present)
    return out


def slices_layout(view_tokens: Sequence[torch.Tensor], num_tokens: int) -> torch.Tensor:
    """An image's rows: its views' (Q, C) tokens concatenated in plan order (source, slices row-major),
    exactly num_tokens (the plan's) of them, else ValueError naming both counts."""
    rows = torch.cat(list(view_tokens))  # (views * Q, C)
    if rows.shape[0] != num_tokens:
        raise ValueError(f"the slices layout gives {rows.shape[0]} tokens ({len(view_tokens)} views of "
                         f"{[t.shape[0] for t in view_tokens]}) but the plan has {num_tokens}; the resampler's "
                         "query count must be the plan's query_num")
    return rows


def encode_slices(model: VLM, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None) -> list[torch.Tensor]:
    """Each image's (views * Q, C) rows: every view cropped to its size, through the tower at that size and
    the resampler; views of one size run as one batch. Inputs as in the module docstring."""
    sizes = view_sizes(pixel_values, image_sizes, model.cfg.vision.patch_size)
    dtype = next(model.projector.parameters()).dtype
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (h, w) -> [(image, view)]
    for i, image in enumerate(sizes):
        for v, size in enumerate(image):
            groups.setdefault(size, []).append((i, v))
    tokens: dict[tuple[int, int], torch.Tensor] = {}
    for (h, w), members in groups.items():
        crops = torch.stack([pixel_values[i, v, :, :h, :w] for i, v in members])  # (G, 3, h, w)
        features = model.vision.features(crops.to(dtype), interpolate_pos_encoding=True)  # (G, h/P * w/P, Dv)
        projected = model.projector(features)  # (G, Q, C)
        tokens.update(zip(members, projected.unbind(0)))
    queries = query_num(model.cfg)
    return [slices_layout([tokens[i, v] for v in range(len(image))], slices_num_tokens(len(image), queries))
            for i, image in enumerate(sizes)]  # N x (views * Q, C)
