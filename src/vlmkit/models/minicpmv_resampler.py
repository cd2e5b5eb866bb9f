"""MiniCPM-V's resampler (`minicpmv_resampler{Q}q`): Q learnable queries read one view's patches by one
cross-attention at the LM width, with 2-D sin-cos positions sized to the view's own patch grid.

Reference: MiniCPM-V 2.6's resampler.py on the Hugging Face Hub (openbmb/MiniCPM-V-2_6, `Resampler` with
adaptive=True; MiniCPM-V, Yao et al. 2024, sec. 3.1). For a view of h x w patches (its tgt_size)::

    pos = sincos_2d(h, w)                              # (h*w, C), fixed, no parameters
    kv = ln_kv(kv_proj(x))                             # (B, h*w, C)
    q = ln_q(query)                                    # (Q, C)   the queries carry no positions
    out = attn(q, kv + pos, kv)                        # (B, Q, C)  values carry no positions
    out = ln_post(out) @ proj                          # (B, Q, C)

with C // 128 heads (MiniCPM-V 2.6: 28 at 3584), LayerNorm eps 1e-6, attention weights in
torch.nn.MultiheadAttention's layout (models/resampler.FusedCrossAttention). Unlike Qwen-VL's resampler the
positions are not resized from a square table: row i, column j of any grid gets
[sin(j w), cos(j w), sin(i w), cos(i w)], w_d = 10000^(-d / (C/4)), which is the reference's table cut to
[:h, :w]. The slices scheme passes each view's grid (`grid=`), the reason the module says `takes_grid`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vlmkit.models.resampler import QueryResampler

if TYPE_CHECKING:
    from vlmkit.config import ProjectorSpec


def sincos_grid(embed_dim: int, rows: int, cols: int) -> torch.Tensor:
    """(rows * cols, embed_dim) 2-D sin-cos positions, row-major, in float32 as the reference's numpy table.

        >>> sincos_grid(8, 2, 3).shape
        torch.Size([6, 8])
        >>> sincos_grid(4, 2, 3)[4].tolist() == [torch.tensor(1.0).sin().item(), torch.tensor(1.0).cos().item(),
        ...                                      torch.tensor(1.0).sin().item(), torch.tensor(1.0).cos().item()]
        True
    """
    if embed_dim % 4 or embed_dim <= 0:
        raise ValueError(f"2-D sin-cos positions need an embed_dim divisible by 4, got {embed_dim}")
    if rows <= 0 or cols <= 0:
        raise ValueError(f"a view has a positive patch grid, got {rows} x {cols}")
    quarter = embed_dim // 4
    omega = torch.arange(quarter, dtype=torch.float32) / quarter
    omega = 1.0 / 10000**omega  # (C/4,)
    ang_c = torch.arange(cols, dtype=torch.float32)[:, None] * omega  # (w, C/4)
    ang_r = torch.arange(rows, dtype=torch.float32)[:, None] * omega  # (h, C/4)
    col = torch.cat([ang_c.sin(), ang_c.cos()], dim=1)  # (w, C/2)
    row = torch.cat([ang_r.sin(), ang_r.cos()], dim=1)  # (h, C/2)
    return torch.cat([col.expand(rows, -1, -1), row[:, None].expand(-1, cols, -1)], dim=2).reshape(rows * cols, -1)


class MiniCPMVResampler(QueryResampler):
    """(B, h*w, in_dim) features of views of one h x w patch grid -> (B, num_queries, out_dim)."""

    takes_grid = True  # forward needs each view's (rows, cols) patch grid

    def __init__(self, in_dim: int, out_dim: int, num_queries: int = 64, num_heads: int | None = None,
                 eps: float = 1e-6) -> None:
        super().__init__(in_dim, out_dim, num_queries, num_heads, eps)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """x (B, N, in_dim) on a rows x cols grid (N = rows * cols; None: a square grid) -> (B, Q, out_dim)."""
        if x.dim() != 3 or x.shape[-1] != self.in_dim:
            raise ValueError(f"MiniCPMVResampler expects vision features of shape (batch, patches, {self.in_dim}), "
                             f"got {tuple(x.shape)}")
        N = x.shape[1]
        if grid is None:
            side = round(N**0.5)
            if side * side != N:
                raise ValueError(f"{N} patches are not a square grid; pass grid=(rows, cols) of the view")
            grid = (side, side)
        rows, cols = grid
        if rows * cols != N:
            raise ValueError(f"grid {rows} x {cols} does not hold the {N} patches given")
        return self.attend(x, sincos_grid(self.out_dim, rows, cols).to(x.device, x.dtype))  # queries: no positions


def build_minicpmv_resampler(spec: ProjectorSpec, in_dim: int, out_dim: int, bias: bool = True) -> MiniCPMVResampler:
    """Registry builder for `minicpmv_resampler{Q}q`: spec.queries queries, out_dim // 128 heads (bias is unused)."""
    return MiniCPMVResampler(in_dim, out_dim, spec.queries)
