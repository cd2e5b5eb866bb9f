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


def as_rgb(image: Image.Image) -> Image.Image:
    """image itself when it is already RGB (Pillow's convert would copy it), else image.convert("RGB")."""
    return image if image.mode == "RGB" else image.convert("RGB")


def rgb_array(image: Image.Image) -> np.ndarray:
    """The (H, W, 3) uint8 pixels of image (converted to RGB first when it is in another mode)."""
    return np.asarray(as_rgb(image))  # (H, W, 3)


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


def preprocess_pad(image: Image.Image, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Pad to square with the mean colour, bicubic-resize to size x size, normalise -> (3, size, size)."""
    fill = tuple(int(m * 255) for m in mean)
    square = pad_to_square(as_rgb(image), fill)  # type: ignore[arg-type]
    return normalize(square.resize((size, size), Image.Resampling.BICUBIC), mean, std)


def pad_token_count(size: int, patch_size: int, keep_cls: bool = False, merge: int = 1, queries: int = 0) -> int:
    """Tokens one size x size view costs: its patches (plus CLS if kept), merge x merge blocks fused,
    or a resampler's fixed number of queries when it has one.

        >>> pad_token_count(336, 14, merge=2), pad_token_count(448, 14, queries=256)
        (144, 256)
    """
    if queries:
        return queries
    return ((size // patch_size) ** 2 + int(keep_cls)) // merge**2


def plan_pad(image: Image.Image, size: int, mean: tuple[float, ...], std: tuple[float, ...],
             patch_size: int = 14, keep_cls: bool = False, merge: int = 1, queries: int = 0) -> ImagePlan:
    """The pad scheme's plan: pixel_values (1, 3, size, size) and parts {"image": tokens}.

        >>> plan_pad(Image.new("RGB", (40, 20)), 336, (0.5,) * 3, (0.5,) * 3).num_tokens
        576
    """
    pixels = preprocess_pad(image, size, mean, std)[None]  # (1, 3, size, size)
    return ImagePlan(scheme="pad", pixel_values=pixels, original_size=image.size, resized_size=(size, size),
                     grid=(1, 1), parts={"image": pad_token_count(size, patch_size, keep_cls, merge, queries)})
