"""The LLaVA-1.5 `pad` scheme: pad to a square with the mean colour, resize to the tower's size.

    >>> from PIL import Image
    >>> pad_to_square(Image.new("RGB", (40, 20)), (1, 2, 3)).size
    (40, 40)
    >>> pad_token_count(336, 14)   # LLaVA-1.5: 24 x 24 patches, CLS dropped
    576

The image sits in the middle of the square (left/top offset = (side - size) // 2),
the fill is the normalisation mean as 0-255 integers, as transformers'
LlavaImageProcessor does with do_pad=True (seed 004).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from vlmkit.image.plan import ImagePlan


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


def pad_token_count(size: int, patch_size: int, keep_cls: bool = False, merge: int = 1) -> int:
    """Tokens one size x size view costs: its patches (plus CLS if kept), merge x merge blocks fused."""
    return ((size // patch_size) ** 2 + int(keep_cls)) // merge**2


def plan_pad(image: Image.Image, size: int, mean: tuple[float, ...], std: tuple[float, ...],
             patch_size: int = 14, keep_cls: bool = False, merge: int = 1) -> ImagePlan:
    """The pad scheme's plan: pixel_values (1, 3, size, size) and parts {"image": tokens}.

        >>> plan_pad(Image.new("RGB", (40, 20)), 336, (0.5,) * 3, (0.5,) * 3).num_tokens
        576
    """
    pixels = preprocess_pad(image, size, mean, std)[None]  # (1, 3, size, size)
    return ImagePlan(scheme="pad", pixel_values=pixels, original_size=image.size, resized_size=(size, size),
                     grid=(1, 1), parts={"image": pad_token_count(size, patch_size, keep_cls, merge)})
