"""The DeepSeek-VL2 `tiles` scheme: a global 384 thumbnail plus m x n local 384 tiles, m*n <= 9.

Steps (reference: DeepSeek-VL2's processing_deepseek_vl_v2.py, `select_best_resolution` and
`tokenize_with_images`; seed 003):

1. `candidate_resolutions`: every (cols*384, rows*384) with rows*cols <= 9.
2. `select_best_resolution`: the candidate keeping the most of the image's pixels once the image is
   scaled to fit inside it (effective = min(scaled area, original area)); ties go to the candidate
   wasting the fewest pixels, then to the earlier one in the list.
3. `plan_tiles`: the global view is the image fitted into 384 x 384 and padded with the mean colour
   (PIL's ImageOps.pad: bicubic, centred); the local canvas is the image fitted into the chosen
   resolution the same way, cut into rows x cols tiles, row-major.
   With more images in the prompt than `max_tiled_images` (2 in the reference) tiling is off:
   the chosen resolution is 384 x 384, so the image gets the global view and one local tile.

    >>> select_best_resolution((768, 384), candidate_resolutions())   # 2:1 -> 2 wide, 1 high
    (768, 384)
    >>> select_best_resolution((800, 400), candidate_resolutions())   # 768x384 would lose pixels
    (1152, 768)
    >>> select_best_resolution((1000, 1000), candidate_resolutions())
    (1152, 1152)

Tokens: SigLIP-so400m sees 384 / 14 -> 27 x 27 = 729 patches per view; the projector pads 27 to 28
and merges 2x2 -> 14 x 14 (side = ceil(27 / 2)). Each view row ends with a newline token and one
separator sits between the global and the local view (global first, DeepSeek-VL2's "head"):

    global     side * (side + 1)                          = 14 * 15 = 210
    separator  1
    local      (rows * side) * (cols * side + 1)          = 14 rows * (14 cols + 1)
    total      211 + 196 * rows * cols + 14 * rows

    >>> [tiles_num_tokens(r, c) for r, c in ((1, 1), (2, 2), (3, 3), (1, 3), (3, 1))]
    [421, 1023, 2017, 813, 841]
"""

from __future__ import annotations

import math

import torch
from PIL import Image, ImageOps

from vlmkit.image.plan import ImagePlan
from vlmkit.image.schemes.anyres import select_best_resolution as anyres_best_resolution
from vlmkit.image.schemes.pad import normalize

TILE = 384
PATCH = 14
DOWNSAMPLE = 2
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def candidate_resolutions(max_tiles: int = 9, tile: int = TILE) -> list[tuple[int, int]]:
    """(width, height) = (cols*tile, rows*tile) for rows*cols <= max_tiles.

    Ordered as DeepSeek-VL2's config lists them: by tile count, then narrowest first.

    >>> candidate_resolutions(4, 1)
    [(1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (1, 4), (4, 1), (2, 2)]
    """
    if max_tiles < 1:
        raise ValueError(f"max_tiles is {max_tiles}; it must be >= 1 (DeepSeek-VL2 uses 9)")
    pairs = [(c, r) for r in range(1, max_tiles + 1) for c in range(1, max_tiles + 1) if r * c <= max_tiles]
    pairs.sort(key=lambda p: (p[0] * p[1], min(p), p[0] > p[1]))
    return [(c * tile, r * tile) for c, r in pairs]


def select_best_resolution(image_size: tuple[int, int], candidates: list[tuple[int, int]]) -> tuple[int, int]:
    """The candidate (width, height) that keeps the most pixels of image_size (width, height)."""
    width, height = image_size
    if width <= 0 or height <= 0:
        raise ValueError(f"image has zero size {width}x{height}; the tiles scheme needs at least 1x1 pixels")
    if not candidates:
        raise ValueError("no candidate resolutions to choose from; pass candidate_resolutions()")
    # The same rule as LLaVA-NeXT's, which takes and returns (height, width).
    best_h, best_w = anyres_best_resolution((height, width), [(h, w) for w, h in candidates])
    return best_w, best_h


def view_side(tile: int = TILE, patch: int = PATCH, downsample: int = DOWNSAMPLE) -> int:
    """Tokens per side of one view after the downsample: ceil((tile // patch) / downsample).

    >>> view_side()
    14
    """
    return math.ceil((tile // patch) / downsample)


def tiles_num_tokens(rows: int, cols: int, side: int = 14) -> int:
    """Tokens of an image with a rows x cols local grid (formula in the module docstring)."""
    return side * (side + 1) + 1 + rows * side * (cols * side + 1)


def plan_tiles(image: Image.Image, num_images: int = 1, max_tiled_images: int = 2, max_tiles: int = 9,
               mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD) -> ImagePlan:
    """DeepSeek-VL2 plan: pixel_values (1 + rows*cols, 3, 384, 384) = [global, tiles row-major].

    num_images is how many images the prompt holds; above max_tiled_images tiling is off.

    >>> plan = plan_tiles(Image.new("RGB", (768, 384)))
    >>> plan.grid, plan.num_tokens, tuple(plan.pixel_values.shape)
    ((1, 2), 617, (3, 3, 384, 384))
    >>> plan_tiles(Image.new("RGB", (800, 400)), num_images=3).num_tokens
    421
    """
    if num_images < 1:
        raise ValueError(f"num_images is {num_images}; a prompt with this image holds at least 1 image")
    image = image.convert("RGB")
    if num_images > max_tiled_images:
        best_w, best_h = TILE, TILE
    else:
        best_w, best_h = select_best_resolution(image.size, candidate_resolutions(max_tiles))
    fill = tuple(int(m * 255) for m in mean)
    views = [ImageOps.pad(image, (TILE, TILE), color=fill)]
    canvas = ImageOps.pad(image, (best_w, best_h), color=fill)
    views += [canvas.crop((x, y, x + TILE, y + TILE)) for y in range(0, best_h, TILE) for x in range(0, best_w, TILE)]
    pixel_values = torch.stack([normalize(v, mean, std) for v in views])  # (1 + rows*cols, 3, 384, 384)
    rows, cols, side = best_h // TILE, best_w // TILE, view_side()
    parts = {"global": side * side, "global_newlines": side, "separator": 1,
             "local": rows * cols * side * side, "local_newlines": rows * side}
    return ImagePlan(scheme="tiles", pixel_values=pixel_values, original_size=image.size,
                     resized_size=(best_w, best_h), grid=(rows, cols), parts=parts,
                     extra={"images_spatial_crop": [cols, rows], "tiling": num_images <= max_tiled_images})
