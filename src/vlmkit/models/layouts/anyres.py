"""LLaVA-NeXT's feature layout ("spatial_unpad"): base view, then the unpadded tile grid with a newline per row.

Follows transformers' LlavaNextModel.pack_image_features (modeling_llava_next.py):

    features (1 + r*c, P, C), P = s*s patches per view
    base = features[0]                                         (P, C)
    tiles (r*c, s, s, C) -> one (C, r*s, c*s) map, tile rows then patch rows, tile cols then patch cols
    crop the map to unpad_bounds(original size, map size)       (C, h, w)
    append image_newline as one more column                     (C, h, w + 1)
    tokens = [base; map read row by row]                        (P + h * (w + 1), C)

    >>> from vlmkit.image.schemes.anyres import anyres_plan
    >>> plan = anyres_plan((64, 32), torch.zeros(3, 3, 32, 32), [(32, 64)], tile_size=32, patch_size=8)
    >>> pack_anyres(torch.zeros(3, 16, 5), plan, torch.ones(5)).shape
    torch.Size([52, 5])
"""

from __future__ import annotations

import math

import torch

from vlmkit.image.plan import ImagePlan
from vlmkit.image.schemes.anyres import unpad_bounds


def pack_anyres(features: torch.Tensor, plan: ImagePlan, image_newline: torch.Tensor) -> torch.Tensor:
    """Lay out one image's projected view features (1 + rows*cols, P, C) as plan.num_tokens vectors (T, C)."""
    rows, cols = plan.grid
    views, P, C = features.shape
    if views != 1 + rows * cols:
        raise ValueError(f"the anyres plan has a {rows}x{cols} tile grid ({1 + rows * cols} views with the base) "
                         f"but the features hold {views} views")
    side = math.isqrt(P)
    if side * side != P:
        raise ValueError(f"anyres needs a square patch grid per view, got {P} features per view "
                         "(a kept CLS token? use select_feature='patch')")
    base = features[0]  # (P, C)
    grid = features[1:].view(rows, cols, side, side, C)  # (r, c, s, s, C)
    grid = grid.permute(4, 0, 2, 1, 3).reshape(C, rows * side, cols * side)  # (C, r*s, c*s)
    width, height = plan.original_size
    top, bottom, left, right = unpad_bounds((height, width), (rows * side, cols * side))
    grid = grid[:, top:bottom, left:right]  # (C, h, w)
    newline = image_newline.to(grid.dtype)[:, None, None].expand(C, grid.shape[1], 1)  # (C, h, 1)
    grid = torch.cat([grid, newline], dim=2)  # (C, h, w + 1)
    tokens = torch.cat([base, grid.flatten(1).transpose(0, 1)], dim=0)  # (P + h * (w + 1), C)
    if tokens.shape[0] != plan.num_tokens:
        raise ValueError(f"the anyres layout produced {tokens.shape[0]} feature tokens but the plan counts "
                         f"{plan.num_tokens} ({plan.parts}); the tower's patch grid ({side}x{side}) does not "
                         f"match the plan's tile_size / patch_size")
    return tokens
