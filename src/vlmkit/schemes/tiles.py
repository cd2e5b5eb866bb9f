"""DeepSeek-VL2's `tiles` scheme: a global 384 thumbnail plus m x n local 384 tiles (m*n <= 9), each
downsampled 2x2 after SigLIP, laid out with a learned newline per row and a view separator.

Reference: DeepSeek-VL2 (Wu et al., "DeepSeek-VL2: Mixture-of-Experts Vision-Language Models for Advanced
Multimodal Understanding", 2024, sec. 2 "dynamic tiling"), GitHub deepseek-ai/DeepSeek-VL2:
deepseek_vl2/models/processing_deepseek_vl_v2.py (`select_best_resolution`, `tokenize_with_images`) for
the plan, modeling_deepseek_vl_v2.py (`MlpProjector` "downsample_mlp_gelu", the global/local formatting
in `prepare_inputs_embeds`) for the layout. Plan steps:

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

Tokens: SigLIP-so400m sees 384 / 14 -> 27 x 27 = 729 patches per view (its stride-14 conv reads the
first 378 pixels); the projector pads 27 to 28 and merges 2x2 -> 14 x 14 (side = ceil(27 / 2)). Each
view row ends with a newline token and one separator sits between the global and the local view
(global first, DeepSeek-VL2's "head"):

    global     side * (side + 1)                          = 14 * 15 = 210
    separator  1
    local      (rows * side) * (cols * side + 1)          = 14 rows * (14 cols + 1)
    total      211 + 196 * rows * cols + 14 * rows

    >>> [tiles_num_tokens(r, c) for r, c in ((1, 1), (2, 2), (3, 3), (1, 3), (3, 1))]
    [421, 1023, 2017, 813, 841]

The layout, for one image:

    views (1 + rows*cols, 27*27, C) from SigLIP's last layer and its final LayerNorm (siglip_vit.py's
       forward_features ends with `self.norm`), global first
    -> `downsample_2x2`: zero-pad 27 -> 28 at the bottom/right, merge each 2x2 block with F.unfold's
       channel order [c0(0,0), c0(0,1), c0(1,0), c0(1,1), c1(0,0), ...] -> (views, 14*14, 4C)
    -> the projector MLP (4C -> D)
    -> `tiles_layout`: [global 14 x (14 + 1), separator, local (rows*14) x (cols*14 + 1)],
       tiles stitched row-major, the newline vector ending every row

    >>> downsample_2x2(torch.zeros(2, 27 * 27, 3)).shape
    torch.Size([2, 196, 12])

Forward inputs: pixel_values (N, V_max, 3, 384, 384) [global, tiles] and image_sizes (N, 2), the tile canvas
(rows * 384, cols * 384) as (height, width) (base.canvas_inputs).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from PIL import Image, ImageOps

from vlmkit.config import SIGLIP_MEAN, SIGLIP_STD
from vlmkit.image.overlay import Geometry, View, fit_box
from vlmkit.image.pixels import as_rgb, mean_colour, normalize, normalize_work, pil_bytes, resize_work
from vlmkit.image.plan import ImagePlan
from vlmkit.models.projectors import merge_2x2
from vlmkit.schemes.anyres import select_best_resolution as anyres_best_resolution
from vlmkit.schemes.base import Scheme, canvas_inputs, canvas_plans, per_plan, require_merged_views

if TYPE_CHECKING:
    from vlmkit.models.vlm import VLM, VLMConfig

TILE = 384
PATCH = 14
DOWNSAMPLE = 2


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


def tiles_parts(rows: int, cols: int, side: int = 14) -> dict[str, int]:
    """Tokens per part of an image with a rows x cols local grid, in prompt order (module docstring).

        >>> tiles_parts(1, 2)
        {'global': 196, 'global_newlines': 14, 'separator': 1, 'local': 392, 'local_newlines': 14}
    """
    return {"global": side * side, "global_newlines": side, "separator": 1,
            "local": rows * cols * side * side, "local_newlines": rows * side}


def tiles_num_tokens(rows: int, cols: int, side: int = 14) -> int:
    """Tokens of an image with a rows x cols local grid: 211 + 196 * rows * cols + 14 * rows at side 14."""
    return sum(tiles_parts(rows, cols, side).values())


def plan_tiles(image: Image.Image, num_images: int = 1, max_tiled_images: int = 2, max_tiles: int = 9,
               mean: tuple[float, ...] = SIGLIP_MEAN, std: tuple[float, ...] = SIGLIP_STD) -> ImagePlan:
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
    image = as_rgb(image)
    best_w, best_h = tiles_canvas(image.size, num_images, max_tiled_images, max_tiles)
    fill = mean_colour(mean)
    views = [ImageOps.pad(image, (TILE, TILE), color=fill)]
    canvas = ImageOps.pad(image, (best_w, best_h), color=fill)
    views += [canvas.crop((x, y, x + TILE, y + TILE)) for y in range(0, best_h, TILE) for x in range(0, best_w, TILE)]
    pixel_values = torch.stack([normalize(v, mean, std) for v in views])  # (1 + rows*cols, 3, 384, 384)
    rows, cols, side = best_h // TILE, best_w // TILE, view_side()
    return ImagePlan(scheme="tiles", pixel_values=pixel_values, original_size=image.size,
                     resized_size=(best_w, best_h), grid=(rows, cols), parts=tiles_parts(rows, cols, side),
                     extra={"images_spatial_crop": [cols, rows], "tiling": num_images <= max_tiled_images})


def tiles_canvas(image_size: tuple[int, int], num_images: int = 1, max_tiled_images: int = 2,
                 max_tiles: int = 9) -> tuple[int, int]:
    """(width, height) of the local canvas: one tile when the prompt holds more than max_tiled_images images."""
    if num_images > max_tiled_images:
        return TILE, TILE
    return select_best_resolution(image_size, candidate_resolutions(max_tiles))


def tiles_work(width: int, height: int, num_images: int = 1, max_tiled_images: int = 2, max_tiles: int = 9) -> int:
    """Bytes plan_tiles of a width x height image allocates: two fit-and-pad resizes (each bounded by a resize
    to the whole target), the tiles, each view normalised and their stack; bounded by max_tiles."""
    best_w, best_h = tiles_canvas((width, height), num_images, max_tiled_images, max_tiles)
    views = 1 + (best_w // TILE) * (best_h // TILE)
    pads = sum(resize_work((width, height), target) + pil_bytes(*target) for target in ((TILE, TILE), (best_w, best_h)))
    return pads + views * (pil_bytes(TILE, TILE) + normalize_work(TILE, TILE) + 12 * TILE * TILE)


def downsample_2x2(features: torch.Tensor) -> torch.Tensor:
    """(N, side*side, C) -> (N, ceil(side/2)**2, 4C): pad odd sides with zeros, merge 2x2 blocks.

    DeepSeek-VL2's downsample: models.projectors.merge_2x2 in F.unfold's channel order, odd sides zero-padded.

    >>> downsample_2x2(torch.arange(9.0).view(1, 9, 1))[0, 3].tolist()   # bottom-right block of a padded 3x3
    [8.0, 0.0, 0.0, 0.0]
    """
    return merge_2x2(features, channels_first=True, pad_odd=True)


def tiles_layout(features: torch.Tensor, plan: ImagePlan, newline: torch.Tensor,
                 separator: torch.Tensor) -> torch.Tensor:
    """One image's token sequence (plan.num_tokens, D) from its projected views (1 + rows*cols, side*side, D)."""
    rows, cols = plan.grid
    views, length, d = features.shape
    if views != 1 + rows * cols:
        raise ValueError(f"tiles layout: plan grid {rows}x{cols} needs {1 + rows * cols} views "
                         f"(global + tiles), got features for {views}")
    side = math.isqrt(length)
    if side * side != length:
        raise ValueError(f"tiles layout needs a square token grid per view; got {length} tokens per view")
    if newline.numel() != d or separator.numel() != d:
        raise ValueError(f"tiles layout: features have {d} channels but the newline has {newline.numel()} "
                         f"and the separator {separator.numel()}")
    newline = newline.reshape(1, 1, d)
    global_map = features[0].reshape(side, side, d)
    global_ = torch.cat([global_map, newline.expand(side, 1, d)], dim=1).reshape(-1, d)  # (side*(side+1), D)
    local_map = features[1:].reshape(rows, cols, side, side, d).permute(0, 2, 1, 3, 4)  # (rows, side, cols, side, D)
    local_map = local_map.reshape(rows * side, cols * side, d)
    local = torch.cat([local_map, newline.expand(rows * side, 1, d)], dim=1).reshape(-1, d)
    tokens = torch.cat([global_, separator.reshape(1, d), local])  # (num_tokens, D)
    if tokens.shape[0] != plan.num_tokens:
        raise ValueError(f"tiles layout produced {tokens.shape[0]} feature vectors but the plan counts "
                         f"{plan.num_tokens} tokens; the plan and the features come from different settings")
    return tokens


class Tiles(Scheme):
    """Global view + tiles through the tower (first 378 px), 2x2 downsample and the projector MLP per view,
    then tiles_layout at the LM width with the learned image_newline and view_separator."""

    name = "tiles"
    reference_preset = "deepseek-vl2"
    input_names = ("pixel_values", "image_sizes")
    config_fields = ("max_crops",)
    counts_images = True
    grid_unit = "tiles"
    prompt_format = "deepseek_vl2"

    def check_config(self, cfg: VLMConfig) -> None:
        # SigLIP-so400m's stride-14 patch conv reads the first 27 * 14 = 378 pixels of each 384-px tile.
        require_merged_views(cfg, self.name, TILE, PATCH, TILE // PATCH * PATCH, 9)

    def work(self, cfg: VLMConfig, size: tuple[int, int], num_images: int = 1) -> int:
        return tiles_work(*size, num_images=num_images, max_tiles=cfg.max_crops)  # type: ignore[arg-type]

    def plan(self, cfg: VLMConfig, image: Image.Image, num_images: int = 1) -> ImagePlan:
        return plan_tiles(image, num_images=num_images, max_tiles=cfg.max_crops,  # type: ignore[arg-type]
                          mean=cfg.vision.image_mean, std=cfg.vision.image_std)

    def inputs(self, plans):
        return canvas_inputs(plans)

    def encode(self, model: VLM, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None
               ) -> list[torch.Tensor]:
        """Downsample + projector MLP per view, then the layout at the LM width."""
        plans = canvas_plans(self.name, pixel_values, image_sizes,
                             lambda rows, cols: tiles_num_tokens(rows, cols, view_side()))
        seen = model.cfg.vision.image_size  # the stride-14 conv reads the first 27 * 14 = 378 px of a 384 tile
        views = torch.cat([p.pixel_values for p in plans])[..., :seen, :seen]  # (sum V, 3, 378, 378)
        features = model.vision.post_norm(model.tower_features(views))  # (sum V, 729, Dv): after SigLIP's last norm
        projected = model.projector.mlp(downsample_2x2(features))  # (sum V, 196, C)
        return [tiles_layout(f, p, model.image_newline, model.view_separator)
                for f, p in zip(per_plan(plans, projected), plans)]

    def vectors(self, cfg: VLMConfig) -> dict[str, int]:
        """DeepSeek-VL2's image_newline and view_seperator (sic in its checkpoints) live at the LM width."""
        return {"image_newline": cfg.lm.hidden_size, "view_separator": cfg.lm.hidden_size}

    def geometry(self, plan: ImagePlan) -> Geometry:
        rows, cols = plan.grid
        width, height = plan.original_size
        canvas = fit_box(width, height, *plan.resized_size)
        view = View(fit_box(width, height, TILE, TILE), (TILE, TILE), "global (padded)")
        return Geometry(canvas, rows, cols, "tile", (view,))
