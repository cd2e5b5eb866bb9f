"""LLaVA-NeXT's `anyres` scheme: best-fit canvas from grid pinpoints, resize-and-pad, tiles + base view,
and the "spatial_unpad" feature layout with a newline per row.

Reference: LLaVA-NeXT (Liu et al., "LLaVA-NeXT: Improved reasoning, OCR, and world knowledge", 2024) as
transformers does it: the image processor (models/llava_next/image_processing_pil_llava_next.py), the
token count of its processor (processing_llava_next.py, `_get_number_of_features`) and the model's
`pack_image_features` (modeling_llava_next.py). One pure function per step:

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

The feature layout (`pack_anyres`), for one image:

    features (1 + r*c, P, C), P = s*s patches per view, projected
    base = features[0]                                         (P, C)
    tiles (r*c, s, s, C) -> one (C, r*s, c*s) map, tile rows then patch rows, tile cols then patch cols
    crop the map to unpad_bounds(original size, map size)       (C, h, w)
    append image_newline as one more column                     (C, h, w + 1)
    tokens = [base; map read row by row]                        (P + h * (w + 1), C)

Forward inputs (`Anyres.inputs`): pixel_values (N, V_max, 3, S, S) zero-padded views and image_sizes (N, 2),
each image's original (height, width), as transformers' processor sends them; the encoder rebuilds each
image's plan from them (`anyres_plan`), so the count it checks is the plan's.

All sizes are (height, width), as transformers' llava_next writes them, except
ImagePlan.original_size / resized_size which are (width, height) like PIL's.
The unpad arithmetic (`unpad_bounds`) is written once: the plan counts tokens with it and the
layout slices features with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from vlmkit.config import require
from vlmkit.image.overlay import Geometry, View, fit_box, whole_box
from vlmkit.image.pixels import as_rgb, normalize_uint8, pil_bytes, resize_work, rgb_array
from vlmkit.image.plan import ImagePlan
from vlmkit.schemes.base import Scheme, per_plan, require_projector_input, require_vision, stacked_views

if TYPE_CHECKING:
    from vlmkit.models.vlm import VLM, VLMConfig

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


def anyres_work(width: int, height: int, grid_pinpoints: Sequence[tuple[int, int]], tile_size: int) -> int:
    """Bytes plan_anyres of a width x height image allocates: the base view, the fit into the best pinpoint's
    canvas and the canvas, their uint8 arrays, the views and
    their normalised copy; bounded by the largest pinpoint."""
    canvas_h, canvas_w = select_best_resolution((height, width), grid_pinpoints)
    views = 1 + (canvas_h // tile_size) * (canvas_w // tile_size)
    base = resize_work((width, height), (tile_size, tile_size)) + 3 * tile_size * tile_size
    fit_h, fit_w = fit_within((height, width), (canvas_h, canvas_w))
    fit = resize_work((width, height), (fit_w, fit_h)) + pil_bytes(canvas_w, canvas_h) + 3 * canvas_w * canvas_h
    return base + fit + (3 + 12) * views * tile_size * tile_size


def pack_anyres(features: torch.Tensor, plan: ImagePlan, image_newline: torch.Tensor) -> torch.Tensor:
    """Lay out one image's projected view features (1 + rows*cols, P, C) as plan.num_tokens vectors (T, C)."""
    rows, cols = plan.grid
    views, P, C = features.shape
    if views != 1 + rows * cols:
        raise ValueError(f"the anyres plan has a {rows}x{cols} tile grid ({1 + rows * cols} views with the base) "
                         f"but the features hold {views} views")
    side = math.isqrt(P)
    if side * side != P:
        raise ValueError(f"anyres needs a square patch grid per view, got {P} features per view "
                         "(a kept CLS token? use select_feature='patch')")
    base = features[0]  # (P, C)
    grid = features[1:].view(rows, cols, side, side, C)  # (r, c, s, s, C)
    grid = grid.permute(4, 0, 2, 1, 3).reshape(C, rows * side, cols * side)  # (C, r*s, c*s)
    width, height = plan.original_size
    top, bottom, left, right = unpad_bounds((height, width), (rows * side, cols * side))
    grid = grid[:, top:bottom, left:right]  # (C, h, w)
    newline = image_newline.to(grid.dtype)[:, None, None].expand(C, grid.shape[1], 1)  # (C, h, 1)
    grid = torch.cat([grid, newline], dim=2)  # (C, h, w + 1)
    tokens = torch.cat([base, grid.flatten(1).transpose(0, 1)], dim=0)  # (P + h * (w + 1), C)
    if tokens.shape[0] != plan.num_tokens:
        raise ValueError(f"the anyres layout produced {tokens.shape[0]} feature tokens but the plan counts "
                         f"{plan.num_tokens} ({plan.parts}); the tower's patch grid ({side}x{side}) does not "
                         f"match the plan's tile_size / patch_size")
    return tokens


class Anyres(Scheme):
    """A base view plus the tiles of the best-fit canvas, each through the tower and projector, laid out by
    pack_anyres with the learned image_newline (LM width)."""

    name = "anyres"
    reference_preset = "llava-next"
    input_names = ("pixel_values", "image_sizes")
    config_fields = ("grid_pinpoints",)
    grid_unit = "tiles"

    def check_config(self, cfg: VLMConfig) -> None:
        require_vision(cfg, self.name)
        tile = cfg.vision.image_size
        require(bool(cfg.grid_pinpoints), "image_scheme='anyres' needs grid_pinpoints, e.g. "
                                           f"(({tile}, {2 * tile}), ({2 * tile}, {tile}), ({2 * tile}, {2 * tile}))")
        for pinpoint in cfg.grid_pinpoints:
            require(len(pinpoint) == 2 and all(isinstance(v, int) and v > 0 and v % tile == 0 for v in pinpoint),
                    f"grid pinpoint {pinpoint} must be (height, width), positive multiples of the tower's "
                    f"image_size {tile}")
        require(cfg.vision.select_feature == "patch",
                "image_scheme='anyres' lays out square patch grids: set vision.select_feature='patch' (drop CLS)")
        require(cfg.projector.spec.merge == 1,
                f"image_scheme='anyres' does not combine with the merging projector {cfg.projector.type!r}")
        require_projector_input(cfg)

    def work(self, cfg: VLMConfig, size: tuple[int, int], num_images: int = 1) -> int:
        return anyres_work(*size, cfg.grid_pinpoints, cfg.vision.image_size)  # type: ignore[arg-type]

    def plan(self, cfg: VLMConfig, image: Image.Image, num_images: int = 1) -> ImagePlan:
        v = cfg.vision
        return plan_anyres(image, cfg.grid_pinpoints, v.image_size, v.image_mean, v.image_std, v.patch_size)

    def inputs(self, plans: Sequence[ImagePlan]) -> dict[str, torch.Tensor]:
        sizes = torch.tensor([[p.original_size[1], p.original_size[0]] for p in plans])  # (N, 2) (height, width)
        return {"pixel_values": stacked_views(plans), "image_sizes": sizes}

    def encode(self, model: VLM, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None
               ) -> list[torch.Tensor]:
        plans = self.plans_of(model.cfg, pixel_values, image_sizes)
        features = model.project(torch.cat([p.pixel_values for p in plans]))  # (sum V, P, C)
        return [pack_anyres(f, p, model.image_newline) for f, p in zip(per_plan(plans, features), plans)]

    def plans_of(self, cfg: VLMConfig, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None
                 ) -> list[ImagePlan]:
        """Each image's plan rebuilt from transformers-style inputs: pixel_values (N, V, 3, S, S) padded, or
        all views concatenated (sum V, 3, S, S); image_sizes (N, 2) as (height, width)."""
        if image_sizes is None:
            raise ValueError("an anyres (LLaVA-NeXT) model needs image_sizes (num_images, 2) as (height, width) "
                             "next to pixel_values; image_inputs(plans) makes both")
        sizes = [(int(h), int(w)) for h, w in image_sizes.tolist()]
        v = cfg.vision
        geometry = (cfg.grid_pinpoints, v.image_size, v.patch_size)
        if pixel_values.ndim == 5:
            if pixel_values.shape[0] != len(sizes):
                raise ValueError(f"pixel_values holds {pixel_values.shape[0]} images but image_sizes "
                                 f"{len(sizes)}; pass one (height, width) per image")
            return [anyres_plan((w, h), pixel_values[i], *geometry) for i, (h, w) in enumerate(sizes)]
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be (images, views, 3, S, S) or (views, 3, S, S), "
                             f"got shape {tuple(pixel_values.shape)}")
        plans, offset = [], 0
        for h, w in sizes:
            plans.append(anyres_plan((w, h), pixel_values[offset:], *geometry))
            offset += plans[-1].pixel_values.shape[0]
        if offset != pixel_values.shape[0]:
            raise ValueError(f"pixel_values holds {pixel_values.shape[0]} views but the image_sizes plan {offset}")
        return plans

    def vectors(self, cfg: VLMConfig) -> dict[str, int]:
        return {"image_newline": cfg.lm.hidden_size}

    def geometry(self, plan: ImagePlan) -> Geometry:
        rows, cols = plan.grid
        tile = plan.extra["tile_size"]
        canvas = fit_box(*plan.original_size, *plan.extra["canvas_size"])
        return Geometry(canvas, rows, cols, "tile", (View(whole_box(plan), (tile, tile), "base (squashed)"),))
