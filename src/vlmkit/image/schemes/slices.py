"""The MiniCPM-V `slices` scheme: the source image plus a grid of slices near 448 x 448 each.

Steps (seed 002's description; the rule of MiniCPM-V 2.6's image_processing_minicpmv.py, which
transformers' MiniCPMV4_6ImageProcessorPil keeps in `get_sliced_grid`):

1. `sliced_grid`: multiple = min(ceil(w*h / 448**2), max_slices); no slicing when multiple <= 1.
   Otherwise among all rows x cols factorisations of multiple-1, multiple, multiple+1 (skipping 1 and
   anything above max_slices) pick the one with |log(w/h) - log(cols/rows)| smallest; on a tie the
   grid with more rows wins.
2. `best_resize`: the source view. An image above 448**2 pixels (or any image when it is not sliced)
   is rescaled to about 448**2 pixels at its aspect ratio; both sides are then rounded to a multiple
   of `size_multiple` (the ViT patch, 14; at least one multiple).
3. `refine_size`: the canvas for the slices: the image size rounded to a multiple of the grid, one
   slice's size passed through `best_resize` (upscaling allowed), times the grid.
4. `plan_slices`: bicubic resizes, normalised, views [source, slices row-major].

    >>> sliced_grid(448, 448) is None, sliced_grid(1344, 896), sliced_grid(3000, 500)
    (True, (2, 3), (1, 7))
    >>> best_resize(1344, 896, allow_upscale=False), refine_size(1344, 896, (2, 3))
    ((546, 364), (1344, 896))

Tokens (MiniCPM-V 2.x with the resampler: `query_num` = 64 queries per view, whatever its size).
Every view is wrapped: the source as <im_start> + 64 x <unk> + <im_end>, each slice as
<slice> + 64 x <unk> + </slice> (seed 002 writes <im_start>/<im_end> for both), and with
`row_breaks` a "\\n" token between slice rows as MiniCPM-V 2.6 joins them:

    total = (2 + q) * (1 + rows*cols) + (rows - 1)

    >>> plan_size_tokens(1344, 896), plan_size_tokens(448, 448), plan_size_tokens(1344, 896, query_num=96)
    (463, 66, 687)

Of these, only the q * views query positions receive image features: they are the plan's
`parts` (num_tokens, 448 for 1344x896); the wrappers and row breaks are text tokens the prompt
builder writes around them, the plan's `text_parts` (context_tokens = 463).
pixel_values holds the views zero-padded to the largest one: (views, 3, H_max, W_max), with each
view's (width, height) in extra["view_sizes"] and its patch grid (h/P, w/P) in extra["tgt_sizes"].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from PIL import Image

from vlmkit.image.plan import ImagePlan
from vlmkit.image.schemes.pad import normalize

SCALE_RESOLUTION = 448
PATCH = 14
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def _check_size(width: float, height: float) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"image has zero size {width}x{height}; the slices scheme needs at least 1x1 pixels")


def sliced_grid(width: int, height: int, max_slices: int = 9,
                scale_resolution: int = SCALE_RESOLUTION) -> tuple[int, int] | None:
    """(rows, cols) of the slice grid, or None when the image is not sliced."""
    _check_size(width, height)
    if max_slices < 1:
        raise ValueError(f"max_slices is {max_slices}; it must be >= 1 (MiniCPM-V uses 9)")
    multiple = min(math.ceil(width * height / scale_resolution**2), max_slices)
    if multiple <= 1:
        return None
    log_ratio = math.log(width / height)
    best, best_error = None, math.inf
    for count in (multiple - 1, multiple, multiple + 1):
        if count == 1 or count > max_slices:
            continue
        for rows in range(1, count + 1):
            if count % rows:
                continue
            error = abs(log_ratio - math.log((count // rows) / rows))
            if error < best_error or (error == best_error and best is not None and rows > best[0]):
                best, best_error = (rows, count // rows), error
    return best


def ensure_divide(length: float, divisor: int) -> int:
    """length rounded to the nearest multiple of divisor, at least divisor.

    >>> ensure_divide(20, 14), ensure_divide(1, 14), ensure_divide(670.5, 2)
    (14, 14, 670)
    """
    return max(round(length / divisor) * divisor, divisor)


def best_resize(width: float, height: float, scale_resolution: int = SCALE_RESOLUTION, size_multiple: int = PATCH,
                allow_upscale: bool = False) -> tuple[int, int]:
    """(width, height) of a view: about scale_resolution**2 pixels if large (or upscaling), multiples of size_multiple."""
    _check_size(width, height)
    if width * height > scale_resolution**2 or allow_upscale:
        ratio = width / height
        height = int(scale_resolution / math.sqrt(ratio))
        width = int(height * ratio)
    return ensure_divide(width, size_multiple), ensure_divide(height, size_multiple)


def refine_size(width: int, height: int, grid: tuple[int, int], scale_resolution: int = SCALE_RESOLUTION,
                size_multiple: int = PATCH) -> tuple[int, int]:
    """(width, height) of the canvas cut into the grid's slices: cols * slice_w, rows * slice_h."""
    rows, cols = grid
    slice_w = ensure_divide(width, cols) / cols
    slice_h = ensure_divide(height, rows) / rows
    best_w, best_h = best_resize(slice_w, slice_h, scale_resolution, size_multiple, allow_upscale=True)
    return best_w * cols, best_h * rows


def slice_parts(rows: int, cols: int, query_num: int = 64,
                row_breaks: bool = True) -> tuple[dict[str, int], dict[str, int]]:
    """(query positions the model fills, text tokens around them) for a rows x cols grid
    ((0, 0) when not sliced): the ImagePlan's parts and text_parts."""
    slices = rows * cols
    parts = {"source_queries": query_num}
    text = {"source_wrappers": 2}
    if slices:
        parts["slice_queries"] = query_num * slices
        text["slice_wrappers"] = 2 * slices
        if row_breaks:
            text["row_breaks"] = rows - 1
    return parts, text


def plan_size_tokens(width: int, height: int, max_slices: int = 9, query_num: int = 64,
                     row_breaks: bool = True) -> int:
    """Token count of a width x height image, without touching pixels."""
    rows, cols = sliced_grid(width, height, max_slices) or (0, 0)
    parts, text = slice_parts(rows, cols, query_num, row_breaks)
    return sum(parts.values()) + sum(text.values())


def plan_slices(image: Image.Image, max_slices: int = 9, query_num: int = 64, row_breaks: bool = True,
                scale_resolution: int = SCALE_RESOLUTION, size_multiple: int = PATCH,
                mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD, patch_size: int = PATCH) -> ImagePlan:
    """MiniCPM-V plan: views [source, slices row-major], zero-padded into one tensor.

    >>> plan = plan_slices(Image.new("RGB", (1344, 896)))
    >>> plan.grid, plan.num_tokens, plan.context_tokens, plan.extra["view_sizes"][:2]
    ((2, 3), 448, 463, [(546, 364), (448, 448)])
    >>> tuple(plan.pixel_values.shape)
    (7, 3, 448, 546)
    """
    if query_num < 1:
        raise ValueError(f"query_num is {query_num}; the resampler gives at least 1 query per view (64 in 2.6)")
    image = image.convert("RGB")
    width, height = image.size
    grid = sliced_grid(width, height, max_slices, scale_resolution)
    source_size = best_resize(width, height, scale_resolution, size_multiple, allow_upscale=grid is None)
    views = [image.resize(source_size, Image.Resampling.BICUBIC)]
    rows, cols = grid or (0, 0)
    resized = source_size
    if grid is not None:
        resized = refine_size(width, height, grid, scale_resolution, size_multiple)
        canvas = image.resize(resized, Image.Resampling.BICUBIC)
        slice_w, slice_h = resized[0] // cols, resized[1] // rows
        views += [canvas.crop((x, y, x + slice_w, y + slice_h))
                  for y in range(0, resized[1], slice_h) for x in range(0, resized[0], slice_w)]
    max_w, max_h = max(v.width for v in views), max(v.height for v in views)
    pixel_values = torch.stack([F.pad(normalize(v, mean, std), (0, max_w - v.width, 0, max_h - v.height))
                                for v in views])  # (views, 3, max_h, max_w)
    parts, text = slice_parts(rows, cols, query_num, row_breaks)
    return ImagePlan(scheme="slices", pixel_values=pixel_values, original_size=image.size, resized_size=resized,
                     grid=(rows, cols), parts=parts, text_parts=text,
                     extra={"view_sizes": [v.size for v in views],
                            "tgt_sizes": [(v.height // patch_size, v.width // patch_size) for v in views]})
