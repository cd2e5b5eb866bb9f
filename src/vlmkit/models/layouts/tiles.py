"""Feature layout of the DeepSeek-VL2 `tiles` scheme: 2x2 downsample, row newlines, view separator.

Follows DeepSeek-VL2's modeling_deepseek_vl_v2.py (`MlpProjector` with "downsample_mlp_gelu" and
the global/local formatting in `prepare_inputs_embeds`), for one image:

    views (1 + rows*cols, 27*27, C) from SigLIP, global first
    -> `downsample_2x2`: zero-pad 27 -> 28 at the bottom/right, merge each 2x2 block with F.unfold's
       channel order [c0(0,0), c0(0,1), c0(1,0), c0(1,1), c1(0,0), ...] -> (views, 14*14, 4C)
    -> the projector MLP (4C -> D), outside this file
    -> `tiles_layout`: [global 14 x (14 + 1), separator, local (rows*14) x (cols*14 + 1)],
       tiles stitched row-major, the newline vector ending every row

    >>> import torch
    >>> downsample_2x2(torch.zeros(2, 27 * 27, 3)).shape
    torch.Size([2, 196, 12])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vlmkit.image.plan import ImagePlan


def downsample_2x2(features: torch.Tensor) -> torch.Tensor:
    """(N, side*side, C) -> (N, ceil(side/2)**2, 4C): pad odd sides with zeros, merge 2x2 blocks.

    >>> downsample_2x2(torch.arange(4.0).view(1, 4, 1)).flatten().tolist()
    [0.0, 1.0, 2.0, 3.0]
    >>> downsample_2x2(torch.arange(9.0).view(1, 9, 1))[0, 3].tolist()   # bottom-right block of a padded 3x3
    [8.0, 0.0, 0.0, 0.0]
    """
    n, length, c = features.shape
    side = math.isqrt(length)
    if side * side != length:
        raise ValueError(f"tiles layout needs a square patch grid per view; got {length} patches per view")
    grid = features.reshape(n, side, side, c)
    pad = side % 2
    grid = F.pad(grid, (0, 0, 0, pad, 0, pad))  # (N, side + pad, side + pad, C)
    half = (side + pad) // 2
    blocks = grid.reshape(n, half, 2, half, 2, c).permute(0, 1, 3, 5, 2, 4)  # (N, h, w, C, 2, 2)
    return blocks.reshape(n, half * half, 4 * c)


def tiles_layout(features: torch.Tensor, plan: ImagePlan, newline: torch.Tensor,
                 separator: torch.Tensor) -> torch.Tensor:
    """One image's token sequence (plan.num_tokens, D) from its projected views (1 + rows*cols, side*side, D)."""
    rows, cols = plan.grid
    views, length, d = features.shape
    if views != 1 + rows * cols:
        raise ValueError(f"tiles layout: plan grid {rows}x{cols} needs {1 + rows * cols} views "
                         f"(global + tiles), got features for {views}")
    side = math.isqrt(length)
    if side * side != length:
        raise ValueError(f"tiles layout needs a square token grid per view; got {length} tokens per view")
    if newline.numel() != d or separator.numel() != d:
        raise ValueError(f"tiles layout: features have {d} channels but the newline has {newline.numel()} "
                         f"and the separator {separator.numel()}")
    newline = newline.reshape(1, 1, d)
    global_map = features[0].reshape(side, side, d)
    global_ = torch.cat([global_map, newline.expand(side, 1, d)], dim=1).reshape(-1, d)  # (side*(side+1), D)
    local_map = features[1:].reshape(rows, cols, side, side, d).permute(0, 2, 1, 3, 4)  # (rows, side, cols, side, D)
    local_map = local_map.reshape(rows * side, cols * side, d)
    local = torch.cat([local_map, newline.expand(rows * side, 1, d)], dim=1).reshape(-1, d)
    tokens = torch.cat([global_, separator.reshape(1, d), local])  # (num_tokens, D)
    if tokens.shape[0] != plan.num_tokens:
        raise ValueError(f"tiles layout produced {tokens.shape[0]} feature vectors but the plan counts "
                         f"{plan.num_tokens} tokens; the plan and the features come from different settings")
    return tokens
