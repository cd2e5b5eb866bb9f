"""Projectors: map vision features (B, N, Dv) to the LM width (B, N', C).

Five families, chosen by the config string ProjectorConfig.type:

- ``linear``               one Linear(Dv, C)                        (LLaVA-1.0, Vary)
- ``mlp{N}x_gelu``         Linear(Dv, C), then (GELU, Linear(C, C)) x (N-1)  (LLaVA-1.5 uses N=2)
- ``merge2x2_mlp{N}x_gelu`` every 2x2 block of neighbouring patches is
  concatenated into one vector of 4*Dv (space-to-depth / pixel shuffle, as in
  Phi-3.5-vision and Qwen2-VL), then the MLP: N tokens -> N/4 tokens.
- ``qwen_resampler{Q}q``   Qwen-VL's one cross-attention layer with Q learnable queries and
  2-D sin-cos positions: any N tokens -> Q tokens (models/resampler.py)
- ``perceiver{Q}q`` / ``perceiver{Q}q_{L}x{H}``  a BLIP-2 Q-Former of Q queries (BERT-base, or
  L layers of width H), then a Linear to C: N tokens -> Q tokens (models/resampler.py)

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

from vlmkit.config import ProjectorSpec, parse_projector_type
from vlmkit.models.resampler import build_perceiver, build_qwen_resampler


def mlp_gelu(in_dim: int, out_dim: int, depth: int, bias: bool = True) -> nn.Sequential:
    """Linear(in, out) followed by (GELU, Linear(out, out)) depth-1 times; indices 0, 2, 4 ... are Linear."""
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim, bias=bias)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim, bias=bias)]
    return nn.Sequential(*layers)


def merge_2x2(x: torch.Tensor) -> torch.Tensor:
    """Space-to-depth: (B, H*W, D) on a square H x W grid -> (B, H/2 * W/2, 4*D).

    The 4 patches of each 2x2 block are concatenated in row-major order
    (top-left, top-right, bottom-left, bottom-right), as Phi-3.5-vision's
    `reshape_hd_patches_2x2merge` does; odd sides are an error.
    """
    B, N, D = x.shape
    side = math.isqrt(N)
    if side * side != N or side % 2:
        raise ValueError(f"2x2 merge needs an even square grid of patches, got {N} tokens")
    x = x.view(B, side // 2, 2, side // 2, 2, D)  # (B, h, 2, w, 2, D)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, h, w, 2, 2, D)
    return x.reshape(B, (side // 2) ** 2, 4 * D)


class Projector(nn.Module):
    """An optional 2x2 merge followed by a Linear/MLP stack."""

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
}


def build_projector(projector_type: str, in_dim: int, out_dim: int, bias: bool = True) -> nn.Module:
    """Build the projector named by a ProjectorConfig.type string."""
    spec = parse_projector_type(projector_type)
    return PROJECTORS[spec.family](spec, in_dim, out_dim, bias)
