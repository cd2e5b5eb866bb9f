"""Pixel helpers every image scheme uses: RGB conversion, square padding, normalisation to tensors.

    >>> pad_to_square(Image.new("RGB", (40, 20)), (1, 2, 3)).size
    (40, 40)
    >>> normalize(Image.new("RGB", (2, 1), (255, 255, 255)), (0.5,) * 3, (0.5,) * 3).shape
    torch.Size([3, 1, 2])

The normalisation constants themselves (CLIP's, SigLIP's, SAM's) are defined once, in vlmkit.config.
"""

from __future__ import annotations

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
