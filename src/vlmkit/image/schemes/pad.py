"""The LLaVA-1.5 `pad` scheme: pad to a square with the mean colour, resize to the tower's size.

    >>> from PIL import Image
    >>> pad_to_square(Image.new("RGB", (40, 20)), (1, 2, 3)).size
    (40, 40)

The image sits in the middle of the square (left/top offset = (side - size) // 2),
the fill is the normalisation mean as 0-255 integers, as transformers'
LlavaImageProcessor does with do_pad=True (seed 004).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre image on a square canvas of side max(width, height) filled with `fill`."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def normalize(image: Image.Image, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 tensor, (x / 255 - mean) / std per channel."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())  # (3, H, W)


def preprocess_pad(image: Image.Image, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Pad to square with the mean colour, bicubic-resize to size x size, normalise -> (3, size, size)."""
    fill = tuple(int(m * 255) for m in mean)
    square = pad_to_square(image.convert("RGB"), fill)  # type: ignore[arg-type]
    return normalize(square.resize((size, size), Image.Resampling.BICUBIC), mean, std)
