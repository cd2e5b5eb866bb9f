"""MiniCPM-V's `slices` scheme: the source image plus a grid of slices near 448 x 448 each, every view at
its own size through the tower and a resampler of Q queries.

Reference: MiniCPM-V (Yao et al., "MiniCPM-V: A GPT-4V Level MLLM on Your Phone", 2024, sec. 3.1 "adaptive
visual encoding"); MiniCPM-V 2.6's image_processing_minicpmv.py on the Hugging Face Hub
(openbmb/MiniCPM-V-2_6), whose slicing rule transformers' MiniCPMV4_6ImageProcessorPil keeps in
`get_sliced_grid`. Plan steps:

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
<slice> + 64 x <unk> + </slice> (MiniCPM-V 2.0 writes <im_start>/<im_end> for both), and with
`row_breaks` a "\\n" token between slice rows as MiniCPM-V 2.6 joins them:

    total = (2 + q) * (1 + rows*cols) + (rows - 1)

    >>> plan_size_tokens(1344, 896), plan_size_tokens(448, 448), plan_size_tokens(1344, 896, query_num=96)
    (463, 66, 687)

Of these, only the q * views query positions receive image features: they are the plan's
`parts` (num_tokens, 448 for 1344x896); the wrappers and row breaks are text tokens the prompt
builder writes around them, the plan's `text_parts` (context_tokens = 463). The prompt text is
`Slices.image_text` (prompt.py writes it where the template put `<image>`): MiniCPM-V 2.6's
`<image_id>N</image_id><image>` + q image tokens + `</image>` + the slice rows, whose image token is
`<unk>`; the image-id tag (2 + the digits of N tokens) is not in context_tokens. A model whose image
token is `<image>` itself (the presets' fresh vocabularies) gets the bare run of image ids instead.
The slice resolution is VLMConfig.slice_size (MiniCPM-V 2.6: 448 beside a 980-px tower), else
vision.image_size; the projector is `minicpmv_resampler{Q}q` (MiniCPM-V's own: positions sized to each
view's patch grid, which encode passes it) or a `perceiver{Q}q` Q-Former.
pixel_values holds the views zero-padded to the largest one: (views, 3, H_max, W_max), with each
view's (width, height) in extra["view_sizes"] and its patch grid (h/P, w/P) in extra["tgt_sizes"].

Forward inputs (`Slices.inputs`), zero-padded, with each view's size beside them:

    pixel_values (N, V_max, 3, H_max, W_max)   view v of image i in pixel_values[i, v, :, :h, :w],
                                               zeros to the right, below, and for absent views
    image_sizes  (N, V_max, 2)                 each view's (height, width); (0, 0) for absent views,
                                               which may only follow an image's present ones

The encoder, per view (views of one size share one batch):

    pixel_values[i, v, :, :h, :w]   --tower, positions interpolated to (h/P, w/P)-->  (h/P * w/P, Dv)
                                    --resampler projector (perceiver{Q}q)-->          (Q, C)

and `slices_layout` concatenates an image's views in plan order into its rows (views * Q, C), which
must be the plan's num_tokens or raise ValueError.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from PIL import Image

from vlmkit.config import SIGLIP_MEAN, SIGLIP_STD, require
from vlmkit.image.overlay import Geometry, View, whole_box
from vlmkit.image.pixels import as_rgb, normalize, normalize_work, pil_bytes, resize_work
from vlmkit.image.plan import ImagePlan
from vlmkit.schemes.base import Scheme, require_max_crops, require_projector_input, require_vision
from vlmkit.text.chat import ChatTemplate, chat_template_for

if TYPE_CHECKING:
    from vlmkit.models.vlm import VLM, VLMConfig

SCALE_RESOLUTION = 448
PATCH = 14


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
                mean: tuple[float, ...] = SIGLIP_MEAN, std: tuple[float, ...] = SIGLIP_STD,
                patch_size: int = PATCH) -> ImagePlan:
    """MiniCPM-V plan: views [source, slices row-major], zero-padded into one tensor.

    >>> plan = plan_slices(Image.new("RGB", (1344, 896)))
    >>> plan.grid, plan.num_tokens, plan.context_tokens, plan.extra["view_sizes"][:2]
    ((2, 3), 448, 463, [(546, 364), (448, 448)])
    >>> tuple(plan.pixel_values.shape)
    (7, 3, 448, 546)
    """
    if query_num < 1:
        raise ValueError(f"query_num is {query_num}; the resampler gives at least 1 query per view (64 in 2.6)")
    image = as_rgb(image)
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


def slices_view_sizes(width: int, height: int, max_slices: int = 9, scale_resolution: int = SCALE_RESOLUTION,
                      size_multiple: int = PATCH) -> tuple[tuple[int, int], tuple[int, int] | None, tuple[int, int]]:
    """(source view size, grid or None, slice canvas size) plan_slices uses for a width x height image, as
    (width, height) pairs, from the size alone."""
    grid = sliced_grid(width, height, max_slices, scale_resolution)
    source = best_resize(width, height, scale_resolution, size_multiple, allow_upscale=grid is None)
    canvas = refine_size(width, height, grid, scale_resolution, size_multiple) if grid is not None else source
    return source, grid, canvas


def slices_work(width: int, height: int, max_slices: int = 9, scale_resolution: int = SCALE_RESOLUTION,
                size_multiple: int = PATCH) -> int:
    """Bytes plan_slices of a width x height image allocates: the source view and slice canvas resizes,
    the slices, each view normalised and zero-padded to the largest, and their stack. An extreme aspect
    ratio makes a long thin source view (2 x 65535 px: 14 x 81,102) padded once per view."""
    source, grid, canvas = slices_view_sizes(width, height, max_slices, scale_resolution, size_multiple)
    views = [source]
    total = resize_work((width, height), source)
    if grid is not None:
        rows, cols = grid
        piece = (canvas[0] // cols, canvas[1] // rows)
        views += [piece] * (rows * cols)
        total += resize_work((width, height), canvas) + rows * cols * pil_bytes(*piece)
    max_w, max_h = max(w for w, _ in views), max(h for _, h in views)
    padded = 12 * max_w * max_h
    return total + sum(normalize_work(w, h) for w, h in views) + 2 * len(views) * padded


def slice_size(cfg: VLMConfig) -> int:
    """The side slices are sized to (MiniCPM-V's scale_resolution): cfg.slice_size, else vision.image_size."""
    return cfg.slice_size if cfg.slice_size is not None else cfg.vision.image_size  # type: ignore[union-attr]


def query_num(cfg: VLMConfig) -> int:
    """Tokens per view: the resampler projector's query count (MiniCPM-V 2.6: 64)."""
    queries = cfg.projector.spec.queries
    if queries < 1:
        raise ValueError(f"image_scheme='slices' needs a resampler projector ('perceiver{{Q}}q'), "
                         f"not {cfg.projector.type!r}")
    return queries


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


class Slices(Scheme):
    """Source view + slices, each at its own size through the tower and the perceiver resampler."""

    name = "slices"
    reference_preset = "minicpm-v"
    input_names = ("pixel_values", "image_sizes")
    config_fields = ("max_crops", "slice_size")
    grid_unit = "slices"
    image_placeholder = "<image>"

    def chat_template(self, tokenizer: Any, cfg: VLMConfig, fallback: str | None) -> ChatTemplate:
        """The checkpoint's template fed string content, each image part as `<image>` and a newline (MiniCPM-V's
        ChatML template reads message['content'] as text; MiniCPMV.chat joins an image's `(<image>./</image>)`
        and the text with "\n"), else the built-in fallback. Images before the text, as the model card writes
        them, give the reference's text exactly; a text part before an image gets no newline between them here."""
        return chat_template_for(tokenizer, default=self.prompt_format or fallback, flatten_content=True)

    def image_text(self, plan: ImagePlan, index: int, image_token: str) -> str | None:
        """MiniCPM-V 2.6's image text (image_processing_minicpmv.get_slice_image_placeholder, use_image_id):
        `<image_id>{index}</image_id><image>` + Q image tokens + `</image>`, then per slice row its slices'
        `<slice>` + Q image tokens + `</slice>`, rows joined by "\n". Only for an image token other than
        `<image>` itself (MiniCPM-V's `<unk>`); a model whose image token is `<image>` (the presets' fresh
        vocabularies) gets the bare run of image ids."""
        if image_token == "<image>":
            return None
        queries = plan.parts["source_queries"]
        rows, cols = plan.grid
        piece = f"<slice>{image_token * queries}</slice>"
        slices = "\n".join(piece * cols for _ in range(rows))
        return f"<image_id>{index}</image_id><image>{image_token * queries}</image>{slices}"

    def check_config(self, cfg: VLMConfig) -> None:
        """Every view, whatever its size, becomes the resampler's Q query tokens; the plan takes its query_num
        from the projector, max_slices from max_crops and its slice resolution from vision.image_size."""
        require_vision(cfg, self.name)
        require_max_crops(cfg, self.name, 9, "max_slices")
        require(cfg.projector.spec.family in ("perceiver", "minicpmv_resampler"),
                f"image_scheme='slices' gives every view (non-square, any size) the same number of query "
                f"tokens: use a 'minicpmv_resampler{{Q}}q', 'perceiver{{Q}}q' or 'perceiver{{Q}}q_{{L}}x{{H}}' "
                f"resampler projector, not {cfg.projector.type!r} (qwen_resampler{{Q}}q takes square patch grids "
                "only)")
        require(cfg.slice_size is None or (cfg.slice_size > 0 and cfg.slice_size % cfg.vision.patch_size == 0),
                f"slice_size {cfg.slice_size} must be a positive multiple of the patch size {cfg.vision.patch_size}")
        require_projector_input(cfg)

    def work(self, cfg: VLMConfig, size: tuple[int, int], num_images: int = 1) -> int:
        v = cfg.vision
        return slices_work(*size, cfg.max_crops, slice_size(cfg), v.patch_size)  # type: ignore[arg-type]

    def plan(self, cfg: VLMConfig, image: Image.Image, num_images: int = 1) -> ImagePlan:
        """max_slices = cfg.max_crops, query_num = the projector's queries, slice resolution = cfg.slice_size
        (default vision.image_size), sides multiples of vision.patch_size. Every image of a prompt is sliced alike."""
        v = cfg.vision
        return plan_slices(image, max_slices=cfg.max_crops, query_num=query_num(cfg),  # type: ignore[arg-type]
                           scale_resolution=slice_size(cfg), size_multiple=v.patch_size, mean=v.image_mean,
                           std=v.image_std, patch_size=v.patch_size)

    def inputs(self, plans: Sequence[ImagePlan]) -> dict[str, torch.Tensor]:
        return slices_inputs(plans)

    def encode(self, model: VLM, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None
               ) -> list[torch.Tensor]:
        """Each image's (views * Q, C) rows: every view cropped to its size, through the tower at that size and
        the resampler; views of one size run as one batch. Inputs as in the module docstring."""
        sizes = view_sizes(pixel_values, image_sizes, model.cfg.vision.patch_size)
        groups: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (h, w) -> [(image, view)]
        for i, image in enumerate(sizes):
            for v, size in enumerate(image):
                groups.setdefault(size, []).append((i, v))
        tokens: dict[tuple[int, int], torch.Tensor] = {}
        for (h, w), members in groups.items():
            crops = torch.stack([pixel_values[i, v, :, :h, :w] for i, v in members])  # (G, 3, h, w)
            features = model.tower_features(crops, interpolate_pos_encoding=True)  # (G, h/P * w/P, Dv)
            if getattr(model.projector, "takes_grid", False):  # MiniCPM-V's resampler: positions per view grid
                P = model.cfg.vision.patch_size
                projected = model.projector(features, grid=(h // P, w // P))  # (G, Q, C)
            else:
                projected = model.projector(features)  # (G, Q, C)
            tokens.update(zip(members, projected.unbind(0)))
        queries = query_num(model.cfg)
        return [slices_layout([tokens[i, v] for v in range(len(image))], slices_num_tokens(len(image), queries))
                for i, image in enumerate(sizes)]  # N x (views * Q, C)

    def geometry(self, plan: ImagePlan) -> Geometry:
        rows, cols = plan.grid
        view = View(whole_box(plan), tuple(plan.extra["view_sizes"][0]), "source")
        return Geometry(whole_box(plan) if rows else None, rows, cols, "slice", (view,))
