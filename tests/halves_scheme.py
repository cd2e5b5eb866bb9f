"""A toy image scheme written from outside vlmkit: every image is cut into its left and right halves.

This module is the worked example of docs/architecture.md ("Adding an image scheme"), and
tests/test_add_a_scheme.py registers it and trains a model with it. Nothing in vlmkit knows it:

    image (W x H) -> left half (0 .. W/2), right half (W/2 .. W), each padded square and resized to the
                     tower's S x S as LLaVA-1.5 does (vlmkit.schemes.pad.preprocess_pad)
    work         what planning allocates, from the size: two crops and two pad views (schemes.pad.pad_work)
    plan         pixel_values (2, 3, S, S), parts {"left": P, "right": P}, P = the tower's tokens per view
    inputs       pixel_values (N, 2, 3, S, S)
    encode       the tower and projector over all 2N views -> each image's (2P, C) rows, left half first

    >>> from PIL import Image
    >>> from vlmkit.presets import get_preset
    >>> HALVES.plan(get_preset("llava-1.5"), Image.new("RGB", (640, 480))).parts
    {'left': 576, 'right': 576}
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from vlmkit.image.overlay import Geometry, whole_box
from vlmkit.image.pixels import pil_bytes
from vlmkit.image.plan import ImagePlan
from vlmkit.schemes.base import Scheme, stacked_views
from vlmkit.schemes.pad import pad_token_count, pad_work, preprocess_pad


def halves(image: Image.Image) -> tuple[Image.Image, Image.Image]:
    """The left and right halves of an image (of an odd width the middle column goes to both).

        >>> [h.size for h in halves(Image.new("RGB", (5, 2)))]
        [(3, 2), (3, 2)]
    """
    width, height = image.size
    side = (width + 1) // 2
    return image.crop((0, 0, side, height)), image.crop((width - side, 0, width, height))


class Halves(Scheme):
    """Left half, then right half, each a square view through the tower and the projector."""

    name = "halves"
    reference_preset = "llava-1.5"  # `vlmkit tokens --scheme halves` plans with LLaVA-1.5's tower
    grid_unit = "halves"

    def work(self, cfg, size: tuple[int, int], num_images: int = 1) -> int:
        half = ((size[0] + 1) // 2, size[1])
        return 2 * (pil_bytes(*half) + pad_work(*half, cfg.vision.image_size))

    def plan(self, cfg, image: Image.Image, num_images: int = 1) -> ImagePlan:
        v = cfg.vision
        views = torch.stack([preprocess_pad(h, v.image_size, v.image_mean, v.image_std)
                             for h in halves(image)])  # (2, 3, S, S)
        tokens = pad_token_count(v.image_size, v.patch_size, merge=cfg.projector.spec.merge,
                                 queries=cfg.projector.spec.queries)
        return ImagePlan(self.name, views, image.size, (v.image_size, v.image_size), (1, 2),
                         {"left": tokens, "right": tokens})

    def inputs(self, plans: Sequence[ImagePlan]) -> dict[str, torch.Tensor]:
        return {"pixel_values": stacked_views(plans)}  # (N, 2, 3, S, S)

    def encode(self, model, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        if pixel_values.ndim != 5 or pixel_values.shape[1] != 2:
            raise ValueError(f"halves pixel_values must be (num_images, 2, 3, S, S), got {tuple(pixel_values.shape)}")
        n = pixel_values.shape[0]
        rows = model.project(pixel_values.flatten(0, 1))  # (2N, P, C)
        return list(rows.view(n, -1, rows.shape[-1]).unbind(0))  # N x (2P, C), left half first

    def geometry(self, plan: ImagePlan) -> Geometry:
        return Geometry(whole_box(plan), 1, 2, "half", ())


HALVES = Halves()
