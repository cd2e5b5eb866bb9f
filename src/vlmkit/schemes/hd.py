"""Phi-3.5-vision's `hd` scheme (HD-N): a global 336 view plus up to N local 336 crops, merged 2x2, with
learned row newlines (sub_GN) and a global/local separator (glb_GN).

Reference: Phi-3.5-vision's remote code on the Hugging Face Hub (microsoft/Phi-3.5-vision-instruct):
image_processing_phi3_v.py (`HD_transform`, `padding_336`, `calc_hd_transform_size`, the token count
`num_img_tokens`) for the plan, and image_embedding_phi3_v.py (`hd_feature_transform`,
`reshape_hd_patches_2x2merge`, `add_image_newline`) for the layout. Technical report: Abdin et al.,
"Phi-3 Technical Report", 2024, sec. 7 (Phi-3.5-Vision). Plan steps, each one pure function:

1. `hd_scale`: with the long side horizontal, the largest `scale` (crops per row) such that
   scale * ceil(scale / ratio) <= N, ratio = long / short.
2. `hd_resized_size`: the long side becomes scale * 336, the short side keeps the aspect ratio.
3. `hd_padded_size`: the short side is padded up to a multiple of 336 (white, centred:
   top = (target - h) // 2, the rest at the bottom), so the canvas is (ph * 336, pw * 336), ph * pw <= N.
4. `plan_hd`: normalise, cut the canvas into ph x pw crops (row-major), and a global view that is the
   normalised canvas resized to 336 x 336 with torch bicubic interpolation, first in pixel_values.

    >>> hd_padded_size(1000, 500, max_crops=16)   # 5 crops per row, 2.5 rows -> padded to 3
    (1680, 1008)
    >>> hd_padded_size(500, 1000, max_crops=16)   # tall: the same, transposed
    (1008, 1680)
    >>> hd_num_tokens(rows=3, cols=5)
    2353

Token count (`num_img_tokens` of the reference processor), for a canvas of rows x cols crops, each
crop 24 x 24 ViT patches -> 12 x 12 after the 2x2 merge:

    local map  rows*12 lines of (cols*12 + 1)  = 144*rows*cols + 12*rows   (sub_GN newline per line)
    separator  1                                                           (glb_GN)
    global     12 lines of (12 + 1)            = 144 + 12
    total      (rows*cols + 1) * 144 + 1 + (rows + 1) * 12

    >>> [hd_num_tokens(k, k) for k in (1, 2, 4)]
    [313, 757, 2509]

Which N those figures assume: the HD transform always scales the image so that it fills
`scale` crops per row -- it upsamples small images too. A square image therefore gets
floor(sqrt(N)) x floor(sqrt(N)) crops whatever its size: 336x336 -> 313 needs N in 1..3,
672x672 -> 757 needs N in 4..8, 1344x1344 -> 2509 needs N in 16..24. The three figures are the
formula at canvases of 1x1, 2x2 and 4x4 crops, i.e. N = 1, 4 and 16 (the reference's default
and Phi-3.5-vision's recommended N for single images is 16, which gives 2509 for any square).

    >>> [plan_size_tokens(s, s, n) for s, n in ((336, 1), (672, 4), (1344, 16), (336, 16))]
    [313, 757, 2509, 2509]

Unlike the reference processor, pixel_values are not zero-padded to N + 1 crops: a plan
holds exactly 1 + rows*cols views.

The layout (`hd_layout`), for one image, at the vision width, before the projector MLP:

    views (1 + rows*cols, 24*24, C), global first (ViT features, CLS dropped)
    -> 2x2 merge: every view (12, 12, 4C), the merged vector is [p(0,0), p(0,1), p(1,0), p(1,1)]
    -> local map: crops stitched row-major into (rows*12, cols*12, 4C), sub_GN appended to every row
    -> [local map, glb_GN, global map with sub_GN per row]  (the reference's 'sub_glb' order)

Forward inputs: pixel_values (N, V_max, 3, 336, 336) [global, crops] and image_sizes (N, 2), the HD canvas
(rows * 336, cols * 336) as (height, width) (base.canvas_inputs).

Prompt format (processing_phi3_v.py): images are numbered placeholders `<|image_1|>`, `<|image_2|>`, ... written
in the message text (an image part renders as `<|image_N|>` and a newline, in the checkpoint's own chat template
as in the built-in `phi3`), and the processor tokenizes the text pieces between placeholders one by one, each
with the tokenizer's special tokens, so every piece starts with a BOS (segment_special_tokens).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from vlmkit.config import CLIP_MEAN, CLIP_STD
from vlmkit.image.overlay import Geometry, View, fit_box
from vlmkit.image.pixels import as_rgb, normalize, normalize_work, pil_bytes, resize_work
from vlmkit.image.plan import ImagePlan
from vlmkit.models.projectors import merge_2x2
from vlmkit.schemes.base import Scheme, canvas_inputs, canvas_plans, per_plan, require_merged_views
from vlmkit.text.chat import ChatTemplate, chat_template_for

if TYPE_CHECKING:
    from vlmkit.models.vlm import VLM, VLMConfig

CROP = 336
PAD_FILL = (255, 255, 255)  # padding_336 pads with white


def _check(width: int, height: int, max_crops: int) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"image has zero size {width}x{height}; the hd scheme needs at least 1x1 pixels")
    if max_crops < 1:
        raise ValueError(f"max_crops (N of HD-N) is {max_crops}; it must be >= 1 (Phi-3.5-vision uses 4 or 16)")


def hd_scale(width: int, height: int, max_crops: int) -> int:
    """Crops along the long side: the largest s with s * ceil(s / ratio) <= max_crops, ratio = long / short.

    >>> hd_scale(336, 336, 16), hd_scale(1000, 500, 16), hd_scale(3000, 100, 9)
    (4, 5, 9)
    """
    _check(width, height, max_crops)
    ratio = max(width, height) / min(width, height)
    scale = 1
    while (scale + 1) * math.ceil((scale + 1) / ratio) <= max_crops:
        scale += 1
    return scale


def hd_resized_size(width: int, height: int, max_crops: int) -> tuple[int, int]:
    """(width, height) the image is resized to before padding: long side = scale * 336.

    The short side is int(long / ratio) as in the reference, but at least 1 pixel (the reference
    would fail on a 0-pixel side for extreme aspect ratios).

    >>> hd_resized_size(1000, 500, 16), hd_resized_size(500, 1000, 16)
    ((1680, 840), (840, 1680))
    """
    scale = hd_scale(width, height, max_crops)
    long_side, short_side = max(width, height), min(width, height)
    new_long = scale * CROP
    new_short = max(1, int(new_long / (long_side / short_side)))
    return (new_long, new_short) if width >= height else (new_short, new_long)


def hd_padded_size(width: int, height: int, max_crops: int) -> tuple[int, int]:
    """(width, height) of the canvas after padding the short side up to a multiple of 336."""
    new_w, new_h = hd_resized_size(width, height, max_crops)
    if width >= height:
        return new_w, math.ceil(new_h / CROP) * CROP
    return math.ceil(new_w / CROP) * CROP, new_h


def hd_work(width: int, height: int, max_crops: int) -> int:
    """Bytes plan_hd of a width x height image allocates: the bilinear resize (a tall image's as two calls,
    see hd_transform, and the result's transposition), the padded canvas (transposed back for a tall
    image), the canvas normalised, the crops and the views."""
    new_w, new_h = hd_resized_size(width, height, max_crops)
    pad_w, pad_h = hd_padded_size(width, height, max_crops)
    if width < height:
        resize = (resize_work((width, height), (width, new_h)) + resize_work((width, new_h), (new_w, new_h))
                  + 2 * pil_bytes(new_w, new_h) + pil_bytes(pad_w, pad_h))
    else:
        resize = resize_work((width, height), (new_w, new_h))
    views = 12 * (pad_w * pad_h + CROP * CROP)
    return resize + pil_bytes(pad_w, pad_h) + normalize_work(pad_w, pad_h) + 2 * views


def hd_parts(rows: int, cols: int) -> dict[str, int]:
    """Tokens per part of an image whose canvas is rows x cols crops, in prompt order (module docstring).

        >>> hd_parts(1, 2)
        {'local': 288, 'local_newlines': 12, 'separator': 1, 'global': 144, 'global_newlines': 12}
    """
    return {"local": 144 * rows * cols, "local_newlines": 12 * rows, "separator": 1,
            "global": 144, "global_newlines": 12}


def hd_num_tokens(rows: int, cols: int) -> int:
    """Tokens of an image whose canvas is rows x cols crops: (rows*cols + 1) * 144 + 1 + (rows + 1) * 12."""
    return sum(hd_parts(rows, cols).values())


def plan_size_tokens(width: int, height: int, max_crops: int) -> int:
    """Token count of a width x height image under HD-max_crops, without touching pixels."""
    pad_w, pad_h = hd_padded_size(width, height, max_crops)
    return hd_num_tokens(pad_h // CROP, pad_w // CROP)


def hd_transform(image: Image.Image, max_crops: int) -> Image.Image:
    """Resize (bilinear) and pad (white, centred) as the reference's HD_transform.

    The reference works on the transposed image when it is taller than wide. Its resize runs PIL's
    horizontal pass, then its vertical pass, over the transposed image: this function runs the same two
    passes over the image itself as two resize calls (vertical only, then horizontal only; the same
    weights and rounding) and transposes only the small result, the same pixels without copying the
    whole image.

    >>> hd_transform(Image.new("RGB", (500, 1000)), 16).size
    (1008, 1680)
    """
    width, height = image.size
    _check(width, height, max_crops)
    transposed = width < height
    if transposed:  # new_w, new_h: the transposed image's
        new_w, new_h = hd_resized_size(height, width, max_crops)
        image = image.resize((width, new_w), Image.Resampling.BILINEAR).resize((new_h, new_w), Image.Resampling.BILINEAR)
        image = image.transpose(Image.Transpose.TRANSPOSE)
    else:
        new_w, new_h = hd_resized_size(width, height, max_crops)
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    target = math.ceil(new_h / CROP) * CROP
    top = (target - new_h) // 2
    image = ImageOps.expand(image, border=(0, top, 0, target - new_h - top), fill=PAD_FILL)
    return image.transpose(Image.Transpose.TRANSPOSE) if transposed else image


def split_crops(canvas: torch.Tensor, size: int = CROP) -> torch.Tensor:
    """(3, rows*size, cols*size) -> (rows*cols, 3, size, size), row-major.

    >>> split_crops(torch.arange(16.0).view(1, 4, 4).expand(3, 4, 4), 2)[1, 0]
    tensor([[2., 3.],
            [6., 7.]])
    """
    c, h, w = canvas.shape
    rows, cols = h // size, w // size
    crops = canvas.reshape(c, rows, size, cols, size).permute(1, 3, 0, 2, 4)  # (rows, cols, 3, size, size)
    return crops.reshape(rows * cols, c, size, size)


def plan_hd(image: Image.Image, max_crops: int = 16, mean: tuple[float, ...] = CLIP_MEAN,
            std: tuple[float, ...] = CLIP_STD) -> ImagePlan:
    """HD-N plan: pixel_values (1 + rows*cols, 3, 336, 336) = [global, crops row-major].

    >>> plan = plan_hd(Image.new("RGB", (672, 672)), max_crops=4)
    >>> plan.grid, plan.num_tokens, tuple(plan.pixel_values.shape)
    ((2, 2), 757, (5, 3, 336, 336))
    """
    canvas = hd_transform(as_rgb(image), max_crops)
    pixels = normalize(canvas, mean, std)  # (3, rows*336, cols*336)
    global_view = F.interpolate(pixels[None], size=(CROP, CROP), mode="bicubic")  # (1, 3, 336, 336)
    crops = split_crops(pixels)  # (rows*cols, 3, 336, 336)
    rows, cols = pixels.shape[1] // CROP, pixels.shape[2] // CROP
    return ImagePlan(scheme="hd", pixel_values=torch.cat([global_view, crops]), original_size=image.size,
                     resized_size=hd_resized_size(*image.size, max_crops), grid=(rows, cols),
                     parts=hd_parts(rows, cols),
                     extra={"max_crops": max_crops, "image_size_hw": [canvas.height, canvas.width]})


def stitch_crops(crops: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(rows*cols, h, w, D) crops in row-major order -> one (rows*h, cols*w, D) map."""
    _, h, w, d = crops.shape
    grid = crops.reshape(rows, cols, h, w, d).permute(0, 2, 1, 3, 4)  # (rows, h, cols, w, D)
    return grid.reshape(rows * h, cols * w, d)


def add_row_newlines(feature_map: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
    """(H, W, D) -> (H * (W + 1), D): the newline vector ends every row."""
    h, _, d = feature_map.shape
    column = newline.reshape(1, 1, d).expand(h, 1, d)  # (H, 1, D)
    return torch.cat([feature_map, column], dim=1).reshape(-1, d)


def hd_layout(features: torch.Tensor, plan: ImagePlan, sub_gn: torch.Tensor, glb_gn: torch.Tensor) -> torch.Tensor:
    """One image's token sequence (plan.num_tokens, 4C) from its views' features (1 + rows*cols, L, C).

    sub_gn and glb_gn are the learned newline and separator, any shape with 4C elements
    (the reference stores them as (1, 1, 1, 4C) and (1, 1, 4C)).
    """
    rows, cols = plan.grid
    if features.shape[0] != 1 + rows * cols:
        raise ValueError(f"hd layout: plan grid {rows}x{cols} needs {1 + rows * cols} views "
                         f"(global + crops), got features for {features.shape[0]}")
    views, length, _ = features.shape
    half = math.isqrt(length) // 2
    merged = merge_2x2(features).view(views, half, half, -1)  # (1 + rows*cols, h, w, 4C)
    d = merged.shape[-1]
    if sub_gn.numel() != d or glb_gn.numel() != d:
        raise ValueError(f"hd layout: merged features have {d} channels but sub_GN has {sub_gn.numel()} "
                         f"and glb_GN {glb_gn.numel()}")
    local = add_row_newlines(stitch_crops(merged[1:], rows, cols), sub_gn)  # (rows*h*(cols*w+1), 4C)
    global_ = add_row_newlines(merged[0], sub_gn)  # (h*(w+1), 4C)
    tokens = torch.cat([local, glb_gn.reshape(1, d), global_])  # (num_tokens, 4C)
    if tokens.shape[0] != plan.num_tokens:
        raise ValueError(f"hd layout produced {tokens.shape[0]} feature vectors but the plan counts "
                         f"{plan.num_tokens} tokens; the plan and the features come from different settings")
    return tokens


class HD(Scheme):
    """Global view + crops through the tower, hd_layout at the vision width, then the projector's MLP."""

    name = "hd"
    reference_preset = "phi-3.5-v"
    input_names = ("pixel_values", "image_sizes")
    config_fields = ("max_crops",)
    grid_unit = "crops"
    prompt_format = "phi3"
    segment_special_tokens = True

    def chat_template(self, tokenizer: Any, cfg: VLMConfig, fallback: str | None) -> ChatTemplate:
        """The checkpoint's template, fed string content with image parts as `<|image_N|>\n` (its templates read
        message['content'] as text, as the model card's prompts write it), else the built-in phi3."""
        return chat_template_for(tokenizer, default=self.prompt_format, flatten_content=True,
                                 image_placeholder="<|image_{n}|>")

    def check_config(self, cfg: VLMConfig) -> None:
        require_merged_views(cfg, self.name, CROP, 14, CROP, 16)  # 24 x 24 patches -> 12 x 12 merged per crop

    def work(self, cfg: VLMConfig, size: tuple[int, int], num_images: int = 1) -> int:
        return hd_work(*size, cfg.max_crops)  # type: ignore[arg-type]

    def plan(self, cfg: VLMConfig, image: Image.Image, num_images: int = 1) -> ImagePlan:
        return plan_hd(image, cfg.max_crops, cfg.vision.image_mean, cfg.vision.image_std)  # type: ignore[arg-type]

    def inputs(self, plans):
        return canvas_inputs(plans)

    def encode(self, model: VLM, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None
               ) -> list[torch.Tensor]:
        """The layout at the vision width (merge, sub_GN, glb_GN), then the projector MLP."""
        plans = canvas_plans(self.name, pixel_values, image_sizes, hd_num_tokens)
        features = model.tower_features(torch.cat([p.pixel_values for p in plans]))  # (sum V, 576, Dv)
        return [model.projector.mlp(hd_layout(f, p, model.sub_gn, model.glb_gn))  # (T_i, 4Dv) -> (T_i, C)
                for f, p in zip(per_plan(plans, features), plans)]

    def vectors(self, cfg: VLMConfig) -> dict[str, int]:
        """sub_GN (row newline) and glb_GN (local/global separator) live at 4 * the vision width."""
        return {"sub_gn": 4 * cfg.vision.hidden_size, "glb_gn": 4 * cfg.vision.hidden_size}

    def geometry(self, plan: ImagePlan) -> Geometry:
        rows, cols = plan.grid
        canvas_h, canvas_w = plan.extra["image_size_hw"]
        canvas = fit_box(*plan.original_size, canvas_w, canvas_h)
        return Geometry(canvas, rows, cols, "crop", (View(canvas, (CROP, CROP), "global (canvas)"),))
