"""The Phi-3.5-vision `hd` scheme (HD-N): a global 336 view plus up to N local 336 crops.

Steps, each one pure function (reference: Phi-3.5-vision's image_processing_phi3_v.py,
`HD_transform`/`padding_336`/`calc_hd_transform_size`; seed 000 for the feature side):

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

Token count (the Phi-3-V formula, `num_img_tokens` of the reference processor), for a canvas
of rows x cols crops, each crop 24 x 24 ViT patches -> 12 x 12 after the 2x2 merge:

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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from vlmkit.image.plan import ImagePlan
from vlmkit.image.schemes.pad import normalize

CROP = 336
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
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


def hd_num_tokens(rows: int, cols: int) -> int:
    """Tokens of an image whose canvas is rows x cols crops (formula in the module docstring)."""
    return (rows * cols + 1) * 144 + 1 + (rows + 1) * 12


def plan_size_tokens(width: int, height: int, max_crops: int) -> int:
    """Token count of a width x height image under HD-max_crops, without touching pixels."""
    pad_w, pad_h = hd_padded_size(width, height, max_crops)
    return hd_num_tokens(pad_h // CROP, pad_w // CROP)


def hd_transform(image: Image.Image, max_crops: int) -> Image.Image:
    """Resize (bilinear) and pad (white, centred) as the reference's HD_transform.

    The reference works on the transposed image when it is taller than wide, and so does this
    function, so that PIL's resampling passes run in the same order.

    >>> hd_transform(Image.new("RGB", (500, 1000)), 16).size
    (1008, 1680)
    """
    width, height = image.size
    _check(width, height, max_crops)
    transposed = width < height
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    new_w, new_h = hd_resized_size(*image.size, max_crops)
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
    canvas = hd_transform(image.convert("RGB"), max_crops)
    pixels = normalize(canvas, mean, std)  # (3, rows*336, cols*336)
    global_view = F.interpolate(pixels[None], size=(CROP, CROP), mode="bicubic")  # (1, 3, 336, 336)
    crops = split_crops(pixels)  # (rows*cols, 3, 336, 336)
    rows, cols = pixels.shape[1] // CROP, pixels.shape[2] // CROP
    parts = {"local": 144 * rows * cols, "local_newlines": 12 * rows, "separator": 1,
             "global": 144, "global_newlines": 12}
    return ImagePlan(scheme="hd", pixel_values=torch.cat([global_view, crops]), original_size=image.size,
                     resized_size=hd_resized_size(*image.size, max_crops), grid=(rows, cols), parts=parts,
                     extra={"max_crops": max_crops, "image_size_hw": [canvas.height, canvas.width]})

