"""Pixel helpers every image scheme uses: RGB conversion, square padding, normalisation to tensors.

    >>> pad_to_square(Image.new("RGB", (40, 20)), (1, 2, 3)).size
    (40, 40)
    >>> normalize(Image.new("RGB", (2, 1), (255, 255, 255)), (0.5,) * 3, (0.5,) * 3).shape
    torch.Size([3, 1, 2])

The normalisation constants themselves (CLIP's, SigLIP's, SAM's) are defined once, in vlmkit.config.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image


def as_rgb(image: Image.Image) -> Image.Image:
    """image itself when it is already RGB (Pillow's convert would copy it), else image.convert("RGB")."""
    return image if image.mode == "RGB" else image.convert("RGB")


def rgb_array(image: Image.Image) -> np.ndarray:
    """The (H, W, 3) uint8 pixels of image (converted to RGB first when it is in another mode)."""
    return np.asarray(as_rgb(image))  # (H, W, 3)


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre image on a square canvas of side max(width, height) filled with `fill` (offsets rounded down)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def mean_colour(mean: tuple[float, ...]) -> tuple[int, ...]:
    """The normalisation mean as 0-255 integers: the fill colour of LLaVA's and DeepSeek's padding.

        >>> mean_colour((0.5, 0.5, 0.5))
        (127, 127, 127)
    """
    return tuple(int(m * 255) for m in mean)


def normalize_uint8(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (..., C, H, W) -> contiguous float32 (x / 255 - mean) / std per channel (dim -3).

    One cast and one fused scale-and-shift, x * (1 / (255 std)) - mean / std, with the
    factors rounded to float32 once; this agrees with the two-step float arithmetic of
    transformers' rescale + normalize to within a few float32 ulps (< 1e-6 for CLIP's
    mean/std).

        >>> normalize_uint8(torch.tensor([[[0, 255]]], dtype=torch.uint8), (0.5,), (0.5,)).tolist()
        [[[-1.0, 1.0]]]
    """
    if pixels.dim() < 3 or pixels.shape[-3] != len(mean) or len(mean) != len(std):
        raise ValueError(f"pixels of shape {tuple(pixels.shape)} need their channel count at dim -3 to equal "
                         f"len(mean)={len(mean)} and len(std)={len(std)}")
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32).view(-1, 1, 1)  # (C, 1, 1)
    offset = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32).view(-1, 1, 1)  # (C, 1, 1)
    out = pixels.to(torch.float32, memory_format=torch.contiguous_format)  # (..., C, H, W)
    return out.mul_(scale).add_(offset)


def normalize(image: Image.Image, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 tensor, (x / 255 - mean) / std per channel."""
    channels_first = np.ascontiguousarray(rgb_array(image).transpose(2, 0, 1))  # (3, H, W) uint8
    return normalize_uint8(torch.from_numpy(channels_first), mean, std)  # (3, H, W)


def square_resized(image: Image.Image, fill: tuple[int, int, int], size: int) -> Image.Image:
    """pad_to_square(image, fill).resize((size, size), BICUBIC): the same pixels, without the square canvas.

    Pillow resamples in two passes, each rounded to 8 bits: every row horizontally (each row on its own),
    then every column vertically; two resize calls, a horizontal-only one and a vertical-only one, run the
    same passes with the same weights. So the canvas's rows are resampled to `size` wide (a wide image's
    rows are its own rows or rows of fill; a tall image's rows are resampled a band at a time) and only
    that side x size result is resampled vertically: memory grows with the long side, not its square.

        >>> image = Image.new("RGB", (40, 20), (9, 99, 199))
        >>> square_resized(image, (1, 2, 3), 16).tobytes() == pad_to_square(image, (1, 2, 3)).resize(
        ...     (16, 16), Image.Resampling.BICUBIC).tobytes()
        True
    """
    image = as_rgb(image)
    w, h = image.size
    if w == h:
        return image.resize((size, size), Image.Resampling.BICUBIC)
    side = max(w, h)
    rows = np.empty((side, size, 3), dtype=np.uint8)  # the canvas after the horizontal pass
    if w > h:
        top = (side - h) // 2
        rows[:] = rgb_array(Image.new("RGB", (side, 1), fill).resize((size, 1), Image.Resampling.BICUBIC))
        rows[top:top + h] = rgb_array(image.resize((size, h), Image.Resampling.BICUBIC))
    else:
        left, band = (side - w) // 2, square_band(side)
        for y in range(0, h, band):
            n = min(band, h - y)
            canvas = Image.new("RGB", (side, n), fill)
            canvas.paste(image.crop((0, y, w, y + n)), (left, 0))
            rows[y:y + n] = rgb_array(canvas.resize((size, n), Image.Resampling.BICUBIC))
    return Image.fromarray(rows).resize((size, size), Image.Resampling.BICUBIC)


# ---- what preprocessing allocates, from sizes alone (each scheme's Scheme.work adds these up) ----------------

PIL_PIXEL_BYTES = 4  # Pillow keeps an RGB pixel in 4 bytes
BAND_BYTES = 16 << 20  # square_resized resamples a tall image's canvas in bands of about this many bytes


def square_band(side: int) -> int:
    """Rows per band of square_resized's canvas for a tall image of long side `side`."""
    return max(1, BAND_BYTES // (PIL_PIXEL_BYTES * side))


def pil_bytes(width: int, height: int) -> int:
    """Bytes of a width x height RGB PIL image."""
    return PIL_PIXEL_BYTES * width * height


def resize_work(src: tuple[int, int], dst: tuple[int, int], support: float = 2.0) -> int:
    """Bytes Pillow's resize of a src (width, height) RGB image to dst allocates: each pass's weight table
    (out * (2 ceil(support * max(1, in / out)) + 1) doubles and 2 ints per output), the horizontal pass's
    image (dst width x src height) and the output. support: 2 for bicubic (bounds bilinear's 1 too).

        >>> resize_work((20000, 1), (336, 336)) < 2_000_000   # the horizontal pass shrinks first
        True
    """
    def table(n_in: int, n_out: int) -> int:
        return n_out * (8 * (2 * math.ceil(support * max(1.0, n_in / n_out)) + 1) + 8)

    (sw, sh), (dw, dh) = src, dst
    return table(sw, dw) + table(sh, dh) + pil_bytes(dw, sh) + pil_bytes(dw, dh)


def normalize_work(width: int, height: int) -> int:
    """Bytes normalize() of a width x height image allocates: the uint8 array, its channels-first copy and
    the float32 result."""
    return (3 + 3 + 12) * width * height


def square_resized_work(width: int, height: int, size: int) -> int:
    """Bytes square_resized of a width x height image to size allocates (an upper bound: every step summed)."""
    side = max(width, height)
    if width == height:
        return resize_work((width, height), (size, size))
    if width > height:
        horizontal = resize_work((side, 1), (size, 1)) + resize_work((width, height), (size, height))
    else:
        band = min(square_band(side), height)
        horizontal = pil_bytes(side, band) + pil_bytes(width, band) + resize_work((side, band), (size, band))
    rows = 3 * side * size
    return horizontal + rows + pil_bytes(size, side) + resize_work((size, side), (size, size))
