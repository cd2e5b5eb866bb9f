"""Feature layout of the Phi-3.5-vision `hd` scheme: 2x2 merge, stitched crops, newlines, separator.

Follows `hd_feature_transform`, `reshape_hd_patches_2x2merge` and `add_image_newline` of
Phi-3.5-vision's modeling_phi3_v.py (quoted in seed 000), for one image:

    views (1 + rows*cols, 24*24, C), global first (ViT features, CLS dropped)
    -> 2x2 merge: every view (12, 12, 4C), the merged vector is [p(0,0), p(0,1), p(1,0), p(1,1)]
    -> local map: crops stitched row-major into (rows*12, cols*12, 4C), sub_GN appended to every row
    -> [local map, glb_GN, global map with sub_GN per row]  (the reference's 'sub_glb' order)

The result has exactly plan.num_tokens rows and feeds the projector (4C -> LM hidden).

    >>> import torch
    >>> from vlmkit.image.plan import ImagePlan
    >>> plan = ImagePlan("hd", torch.zeros(0), (1, 1), (1, 1), (1, 2), {"n": 2 * (2 * 2 + 1) + 1 + 2 * (2 + 1)})
    >>> hd_layout(torch.zeros(3, 16, 2), plan, torch.ones(8), torch.ones(8)).shape
    torch.Size([17, 8])
"""

from __future__ import annotations

import math

import torch

from vlmkit.image.plan import ImagePlan
from vlmkit.models.projectors import merge_2x2


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
