"""Projectors: map vision features (B, N, Dv) to the LM width (B, N', C).

Six families, chosen by the config string ProjectorConfig.type:

- ``linear``               one Linear(Dv, C)                        (LLaVA-1.0, Vary)
- ``mlp{N}x_gelu``         Linear(Dv, C), then (GELU, Linear(C, C)) x (N-1)  (LLaVA-1.5 uses N=2)
- ``merge2x2_mlp{N}x_gelu`` every 2x2 block of neighbouring patches is
  concatenated into one vector of 4*Dv (space-to-depth / pixel shuffle, as in
  Phi-3.5-vision and Qwen2-VL), then the MLP: N tokens -> N/4 tokens.
- ``qwen_resampler{Q}q``   Qwen-VL's one cross-attention layer with Q learnable queries and
  2-D sin-cos positions: any N tokens -> Q tokens (models/resampler.py)
- ``perceiver{Q}q`` / ``perceiver{Q}q_{L}x{H}``  a BLIP-2 Q-Former of Q queries (BERT-base, or
  L layers of width H), then a Linear to C: N tokens -> Q tokens (models/resampler.py)
- ``minicpmv_resampler{Q}q``  MiniCPM-V's one cross-attention layer with Q queries and 2-D sin-cos
  positions sized to each view's patch grid (models/minicpmv_resampler.py; the slices scheme)

    >>> parse_projector_type("mlp2x_gelu")
    ProjectorSpec(family='mlp', depth=2, merge=1, queries=0, width=0)
    >>> parse_projector_type("perceiver64q_2x32").queries
    64
    >>> parse_projector_type("merge2x2_mlp2x_gelu").merge
    2
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlmkit.config import ProjectorSpec, parse_projector_type
from vlmkit.models.minicpmv_resampler import build_minicpmv_resampler
from vlmkit.models.resampler import build_perceiver, build_qwen_resampler


def mlp_gelu(in_dim: int, out_dim: int, depth: int, bias: bool = True) -> nn.Sequential:
    """Linear(in, out) followed by (GELU, Linear(out, out)) depth-1 times; indices 0, 2, 4 ... are Linear."""
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim, bias=bias)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim, bias=bias)]
    return nn.Sequential(*layers)


def merge_2x2(x: torch.Tensor, channels_first: bool = False, pad_odd: bool = False) -> torch.Tensor:
    """Space-to-depth, the one 2x2 merge of vlmkit: (B, side*side, D) on a square grid -> (B, h*h, 4*D),
    h = side / 2 (rounded up with pad_odd).

    By default the 4 patches of each 2x2 block are concatenated in row-major order, [p(0,0) | p(0,1) |
    p(1,0) | p(1,1)] (Phi-3.5-vision's `reshape_hd_patches_2x2merge`, the merge2x2_ projectors); with
    channels_first every channel's four values are next to each other, [c0(0,0), c0(0,1), c0(1,0), c0(1,1),
    c1(0,0), ...] (F.unfold's order: DeepSeek-VL2's "downsample_mlp_gelu"). An odd side is an error unless
    pad_odd, which zero-pads it at the bottom and right first (DeepSeek-VL2: 27 -> 28 patches).
    (Qwen2-VL's merger needs none of this: its patch rows arrive grouped 2x2, schemes/dynamic.patchify.)

        >>> merge_2x2(torch.arange(4.0).view(1, 4, 1)).flatten().tolist()
        [0.0, 1.0, 2.0, 3.0]
        >>> merge_2x2(torch.arange(8.0).view(1, 4, 2), channels_first=True).flatten().tolist()
        [0.0, 2.0, 4.0, 6.0, 1.0, 3.0, 5.0, 7.0]
        >>> merge_2x2(torch.arange(9.0).view(1, 9, 1), pad_odd=True)[0, 3].tolist()  # bottom-right of a 3x3
        [8.0, 0.0, 0.0, 0.0]
    """
    B, N, D = x.shape
    side = math.isqrt(N)
    if side * side != N or (side % 2 and not pad_odd):
        raise ValueError(f"2x2 merge needs an even square grid of patches, got {N} tokens")
    pad = side % 2
    grid = F.pad(x.view(B, side, side, D), (0, 0, 0, pad, 0, pad))  # (B, side + pad, side + pad, D)
    half = (side + pad) // 2
    blocks = grid.view(B, half, 2, half, 2, D)  # (B, h, 2, w, 2, D)
    order = (0, 1, 3, 5, 2, 4) if channels_first else (0, 1, 3, 2, 4, 5)  # (B, h, w, D, 2, 2) or (B, h, w, 2, 2, D)
    return blocks.permute(*order).reshape(B, half * half, 4 * D)


class Projector(nn.Module):
    """An optional 2x2 merge followed by a Linear/MLP stack (`mlp`).

    A `merge2x2_` projector takes 2x2-merged features (in_dim 4 * D). Its forward merges them itself
    (merge_2x2's patch order), which is what the pad scheme runs. The hd and tiles schemes insert learned
    newline and separator rows between the merge and the MLP (Phi-3.5-V at the merged width; DeepSeek-VL2
    merges in channel order per view first), so their layouts call merge_2x2 where their reference does
    and then `mlp`: one merge function, placed by the scheme."""

    def __init__(self, spec: ProjectorSpec, in_dim: int, out_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.spec = spec
        self.mlp = mlp_gelu(in_dim, out_dim, spec.depth, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.merge == 2:
            x = merge_2x2(x)  # (B, N/4, 4*Dv)
        return self.mlp(x)  # (B, N', C)


PROJECTORS: dict[str, Callable[[ProjectorSpec, int, int, bool], nn.Module]] = {
    "linear": Projector,
    "mlp": Projector,
    "merge_mlp": Projector,
    "qwen_resampler": build_qwen_resampler,
    "perceiver": build_perceiver,
    "minicpmv_resampler": build_minicpmv_resampler,
}


def build_projector(projector_type: str, in_dim: int, out_dim: int, bias: bool = True) -> nn.Module:
    """Build the projector named by a ProjectorConfig.type string."""
    spec = parse_projector_type(projector_type)
    return PROJECTORS[spec.family](spec, in_dim, out_dim, bias)
