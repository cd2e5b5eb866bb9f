"""The LLaVA-NeXT `anyres` scheme: best-fit canvas from grid pinpoints, resize-and-pad, tiles + base view.

One pure function per step, following transformers' llava_next image processor
(image_processing_pil_llava_next.py) and processor (processing_llava_next.py):

    >>> PINPOINTS = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]
    >>> select_best_resolution((480, 640), PINPOINTS)     # (height, width) in, (height, width) out
    (672, 672)
    >>> fit_within((480, 640), (672, 672))                # aspect kept, long side fills the canvas
    (504, 672)
    >>> unpad_bounds((480, 640), (48, 48))                # rows 6..42 of the 48 x 48 feature grid hold image
    (6, 42, 0, 48)
    >>> anyres_parts((480, 640), (672, 672), tile_size=336, patch_size=14)
    {'base': 576, 'tiles': 1728, 'newlines': 36}
    >>> sum(anyres_parts((672, 672), (672, 672), 336, 14).values())
    2928

All sizes are (height, width), as transformers' llava_next writes them, except
ImagePlan.original_size / resized_size which are (width, height) like PIL's.
The unpad arithmetic (`unpad_bounds`) is written once: the plan counts tokens
with it and the model layout (models/layouts/anyres.py) slices features with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from vlmkit.image.plan import ImagePlan
from vlmkit.image.schemes.pad import as_rgb, normalize_uint8, rgb_array

LLAVA_V16_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def select_best_resolution(original_size: tuple[int, int],
                           pinpoints: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The pinpoint (height, width) that keeps the most image pixels after an aspect-preserving
    downscale (at most the original area), ties broken by the least wasted canvas area.

    >>> select_best_resolution((100, 1000), [(336, 672), (336, 1008)])  # a wide strip picks the widest
    (336, 1008)
    >>> select_best_resolution((10, 10), [(672, 672), (336, 672)])      # tiny: least waste wins
    (336, 672)
    """
    height, width = original_size
    best, best_effective, best_wasted = None, 0, math.inf
    for canvas_h, canvas_w in pinpoints:
        scale = min(canvas_w / width, canvas_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = canvas_w * canvas_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (canvas_h, canvas_w), effective, wasted
    if best is None:
        raise ValueError(f"no grid pinpoint fits an image of {width}x{height}; pinpoints were {list(pinpoints)}")
    return best


def fit_within(original_size: tuple[int, int], canvas: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the image scaled to touch the canvas on its tighter side, the other side
    rounded up and clipped to the canvas (transformers' get_patch_output_size).

    >>> fit_within((100, 1000), (336, 1008))
    (101, 1008)
    """
    height, width = original_size
    canvas_h, canvas_w = canvas
    scale_w, scale_h = canvas_w / width, canvas_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), canvas_h), canvas_w
    return canvas_h, min(math.ceil(width * scale_h), canvas_w)


def resize_and_pad(image: Image.Image, canvas: tuple[int, int]) -> Image.Image:
    """Bicubic-resize into the (height, width) canvas keeping the aspect ratio, centred on black
    (the left/top margin takes the smaller half of an odd padding).

    >>> resize_and_pad(Image.new("RGB", (100, 50), "white"), (64, 64)).getpixel((32, 15))
    (0, 0, 0)
    """
    new_h, new_w = fit_within((image.height, image.width), canvas)
    canvas_h, canvas_w = canvas
    resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    out = Image.new("RGB", (canvas_w, canvas_h), (0, 0, 0))
    out.paste(resized, ((canvas_w - new_w) // 2, (canvas_h - new_h) // 2))
    return out


def unpad_bounds(original_size: tuple[int, int], current_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the part of a (height, width) feature grid that shows the image,
    once the symmetric letterbox padding of `resize_and_pad` is removed (transformers' unpad_image).

    >>> unpad_bounds((100, 1000), (24, 72))
    (8, 16, 0, 72)
    """
    height, width = original_size
    current_h, current_w = current_size
    if width / height > current_w / current_h:  # wider than the grid: padding above and below
        new_h = int(round(height * (current_w / width), 7))
        pad = (current_h - new_h) // 2
        return pad, current_h - pad, 0, current_w
    new_w = int(round(width * (current_h / height), 7))
    pad = (current_w - new_w) // 2
    return 0, current_h, pad, current_w - pad


def anyres_parts(original_size: tuple[int, int], canvas: tuple[int, int], tile_size: int,
                 patch_size: int) -> dict[str, int]:
    """Tokens per part for an image of (height, width) original_size on a canvas of tiles:
    the base view's patches, the unpadded tile-feature grid, and one newline per kept row
    (transformers' LlavaNextProcessor._get_number_of_features, CLS dropped)."""
    side = tile_size // patch_size
    feature_h, feature_w = canvas[0] // tile_size * side, canvas[1] // tile_size * side
    top, bottom, left, right = unpad_bounds(original_size, (feature_h, feature_w))
    return {"base": side * side, "tiles": (bottom - top) * (right - left), "newlines": bottom - top}


def _check_geometry(pinpoints: Sequence[tuple[int, int]], tile_size: int, patch_size: int) -> None:
    if tile_size % patch_size:
        raise ValueError(f"tile_size {tile_size} is not a multiple of patch_size {patch_size}")
    for h, w in pinpoints:
        if h <= 0 or w <= 0 or h % tile_size or w % tile_size:
            raise ValueError(f"grid pinpoint ({h}, {w}) is not a positive multiple of the tile size {tile_size}")


def anyres_plan(original_size: tuple[int, int], pixel_values: torch.Tensor, grid_pinpoints: Sequence[tuple[int, int]],
                tile_size: int, patch_size: int) -> ImagePlan:
    """The plan of an image of (width, height) original_size whose views are (at least) the first
    rows of pixel_values (views, 3, S, S); extra views (batch padding) are dropped. The model side
    calls this with transformers' (pixel_values, image_sizes); plan_anyres calls it with fresh pixels."""
    width, height = original_size
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height} is empty; every image needs at least one pixel")
    _check_geometry(grid_pinpoints, tile_size, patch_size)
    canvas = select_best_resolution((height, width), grid_pinpoints)
    rows, cols = canvas[0] // tile_size, canvas[1] // tile_size
    views = 1 + rows * cols
    if pixel_values.shape[0] < views:
        raise ValueError(f"an image of {width}x{height} on a {canvas[1]}x{canvas[0]} canvas needs {views} views "
                         f"(base + {rows}x{cols} tiles) but pixel_values holds {pixel_values.shape[0]}")
    new_h, new_w = fit_within((height, width), canvas)
    return ImagePlan(scheme="anyres", pixel_values=pixel_values[:views], original_size=(width, height),
                     resized_size=(new_w, new_h), grid=(rows, cols),
                     parts=anyres_parts((height, width), canvas, tile_size, patch_size),
                     extra={"canvas_size": (canvas[1], canvas[0]), "tile_size": tile_size, "patch_size": patch_size})


def plan_anyres(image: Image.Image, grid_pinpoints: Sequence[tuple[int, int]], tile_size: int,
                mean: tuple[float, ...], std: tuple[float, ...], patch_size: int) -> ImagePlan:
    """LLaVA-NeXT preprocessing of one image: pixel_values (1 + rows*cols, 3, S, S), the base view
    (the whole image squashed to S x S) first, then the tiles of the padded canvas row by row.

    >>> plan = plan_anyres(Image.new("RGB", (640, 480)), LLAVA_V16_PINPOINTS, 336, (0.5,) * 3, (0.5,) * 3, 14)
    >>> plan.grid, tuple(plan.pixel_values.shape), plan.num_tokens
    ((2, 2), (5, 3, 336, 336), 2340)
    """
    image = as_rgb(image)
    _check_geometry(grid_pinpoints, tile_size, patch_size)
    canvas = select_best_resolution((image.height, image.width), grid_pinpoints)
    rows, cols = canvas[0] // tile_size, canvas[1] // tile_size
    # The views are gathered as uint8 and normalised in one pass; the tiles are row-major slices of the
    # padded canvas (the same pixels as PIL crops), so no per-tile image objects or copies are made.
    base = rgb_array(image.resize((tile_size, tile_size), Image.Resampling.BICUBIC))  # (S, S, 3)
    padded = rgb_array(resize_and_pad(image, canvas))  # (rows*S, cols*S, 3)
    views = np.empty((1 + rows * cols, 3, tile_size, tile_size), dtype=np.uint8)  # (1 + rows*cols, 3, S, S)
    views[0] = base.transpose(2, 0, 1)
    tiles = padded.reshape(rows, tile_size, cols, tile_size, 3).transpose(0, 2, 4, 1, 3)  # (rows, cols, 3, S, S)
    views[1:].reshape(rows, cols, 3, tile_size, tile_size)[...] = tiles
    pixel_values = normalize_uint8(torch.from_numpy(views), mean, std)  # (1 + rows*cols, 3, S, S)
    return anyres_plan(image.size, pixel_values, grid_pinpoints, tile_size, patch_size)
