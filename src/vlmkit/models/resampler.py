"""Resampler projectors: a fixed number of learnable queries read the vision features by cross-attention.

Unlike the Linear/MLP projectors, these give the same number of LM tokens for any
number of vision features. Two families:

- ``QwenResampler`` (Qwen-VL's "position-aware vision-language adapter", Bai et al. 2023, sec. 2.1;
  Qwen/Qwen-VL's `visual.py` on the Hugging Face Hub, `Resampler` plus the `ln_post` / `proj` that follow
  it in `VisionTransformer`; docs/references.md, Qwen-VL):
  one cross-attention layer, 256 queries, fixed 2-D sin-cos positions added to the
  queries (on the 16x16 query grid) and to the keys (the same table, bicubically
  resized to the image patch grid, as Qwen-VL's `get_abs_pos`)::

      pos_k = resize_pos_embed(pos_embed, N)            # (N, C)
      kv = ln_kv(kv_proj(x))                            # (B, N, C)
      q = ln_q(query) + pos_embed                       # (Q, C)
      out = attn(q, kv + pos_k, kv)                     # (B, Q, C)  values carry no positions
      out = ln_post(out) @ proj                         # (B, Q, C)

- ``PerceiverResampler``: the BLIP-2 Q-Former (InternLM-XComposer's "perceive sampler",
  MiniCPM-style query resampling): learnable queries, then post-norm BERT layers with
  self-attention among the queries, cross-attention to the image features on every
  `cross_attention_frequency`-th layer, and an MLP; then a Linear to the LM width
  (BLIP-2's `language_projection`). Numerically equal to transformers'
  `Blip2QFormerModel` (modeling_blip_2.py) given its weights via `load_qformer_state`.

The registry builders `build_qwen_resampler` / `build_perceiver` take the
(spec, in_dim, out_dim, bias) arguments of models.projectors.PROJECTORS.

Run `python -m vlmkit.models.resampler` for a shape check of both.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from vlmkit.config import ProjectorSpec


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positions for a grid_size x grid_size grid, as MAE's `get_2d_sincos_pos_embed`.

    Row k = i * grid_size + j (row i, column j) is
    [sin(j*w), cos(j*w), sin(i*w), cos(i*w)] with the embed_dim/4 frequencies
    w_d = 10000^(-d / (embed_dim/4)): the first half encodes the column, the second
    the row (MAE's `np.meshgrid(grid_w, grid_h)` puts w first).

        >>> get_2d_sincos_pos_embed(8, 16).shape
        torch.Size([256, 8])
    """
    if embed_dim % 4 or embed_dim <= 0:
        raise ValueError(f"2-D sin-cos positions need an embed_dim divisible by 4, got {embed_dim}")
    if grid_size <= 0:
        raise ValueError(f"grid_size must be positive, got {grid_size}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (D/4,)
    pos = torch.arange(grid_size, dtype=torch.float64)  # (G,)
    rows = pos.repeat_interleave(grid_size)  # (G*G,) i of each k
    cols = pos.repeat(grid_size)  # (G*G,) j of each k
    ang_c = cols[:, None] * omega[None, :]  # (G*G, D/4)
    ang_r = rows[:, None] * omega[None, :]  # (G*G, D/4)
    table = torch.cat([ang_c.sin(), ang_c.cos(), ang_r.sin(), ang_r.cos()], dim=1)  # (G*G, D)
    return table.float()


def _square_side(n: int, what: str) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{what}: {n} positions do not form a square grid; give a square number of patches")
    return side


def resize_pos_embed(table: torch.Tensor, num_positions: int) -> torch.Tensor:
    """Bicubically resize a (G*G, C) position table to (S*S, C) with S*S = num_positions (Qwen-VL's `get_abs_pos`).

    Returns the table itself when the sizes match; interpolates in fp32 and casts back.
    """
    src = _square_side(table.shape[0], "stored position table")
    tgt = _square_side(num_positions, "image features")
    if src == tgt:
        return table
    grid = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)  # (1, C, G, G)
    grid = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)  # (1, C, S, S)
    return grid.permute(0, 2, 3, 1).reshape(tgt * tgt, -1).to(table.dtype)  # (S*S, C)


def _check_features(x: torch.Tensor, in_dim: int, who: str) -> None:
    if x.dim() != 3 or x.shape[-1] != in_dim:
        raise ValueError(f"{who} expects vision features of shape (batch, patches, {in_dim}), "
                         f"got {tuple(x.shape)}")


class FusedCrossAttention(nn.Module):
    """Multi-head attention with the parameter layout of torch.nn.MultiheadAttention
    (`in_proj_weight` rows = [Wq; Wk; Wv], `in_proj_bias`, `out_proj`), as Qwen-VL's checkpoint stores it."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, Q, C), k and v (B, N, C) -> (B, Q, C)."""
        wq, wk, wv = self.in_proj_weight.chunk(3)  # each (C, C)
        bq, bk, bv = self.in_proj_bias.chunk(3)  # each (C,)
        B, Q, C = q.shape
        nh = self.num_heads
        q = F.linear(q, wq, bq).view(B, Q, nh, C // nh).transpose(1, 2)  # (B, nh, Q, hd)
        k = F.linear(k, wk, bk).view(B, -1, nh, C // nh).transpose(1, 2)  # (B, nh, N, hd)
        v = F.linear(v, wv, bv).view(B, -1, nh, C // nh).transpose(1, 2)  # (B, nh, N, hd)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, nh, Q, hd)
        return self.out_proj(out.transpose(1, 2).reshape(B, Q, C))  # (B, Q, C)


class QueryResampler(nn.Module):
    """What Qwen-VL's and MiniCPM-V's resamplers share: num_queries learned queries read kv_proj(x) by one
    cross-attention at out_dim with num_heads heads (default out_dim // 128), LayerNorms on the queries, the keys
    and values and the output, then x @ proj. Subclasses give the positions (attend's pos_k, pos_q)."""

    def __init__(self, in_dim: int, out_dim: int, num_queries: int, num_heads: int | None, eps: float) -> None:
        super().__init__()
        if num_queries < 1:
            raise ValueError(f"{type(self).__name__} needs at least one query, got {num_queries}")
        self.in_dim, self.out_dim, self.num_queries = in_dim, out_dim, num_queries
        heads = num_heads if num_heads is not None else max(1, out_dim // 128)
        self.query = nn.Parameter(torch.randn(num_queries, out_dim) * 0.02)  # (Q, C)
        self.kv_proj = nn.Linear(in_dim, out_dim, bias=False) if in_dim != out_dim else nn.Identity()
        self.attn = FusedCrossAttention(out_dim, heads)
        self.ln_q = nn.LayerNorm(out_dim, eps=eps)
        self.ln_kv = nn.LayerNorm(out_dim, eps=eps)
        self.ln_post = nn.LayerNorm(out_dim, eps=eps)
        self.proj = nn.Parameter(torch.randn(out_dim, out_dim) * out_dim**-0.5)  # (C, C), used as x @ proj

    def attend(self, x: torch.Tensor, pos_k: torch.Tensor, pos_q: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, in_dim), pos_k (N, C) added to the keys only, pos_q (Q, C) to the queries -> (B, Q, C)."""
        kv = self.ln_kv(self.kv_proj(x))  # (B, N, C)
        q = self.ln_q(self.query)
        if pos_q is not None:
            q = q + pos_q
        out = self.attn(q.expand(x.shape[0], -1, -1), kv + pos_k, kv)  # (B, Q, C); values carry no positions
        return self.ln_post(out) @ self.proj  # (B, Q, C)


class QwenResampler(QueryResampler):
    """Qwen-VL's adapter: (B, N, in_dim) on a square patch grid -> (B, num_queries, out_dim).

    The attention runs at out_dim with num_heads heads (Qwen-VL: out_dim // 128 = 32 at 4096).
    num_queries must be a square (the queries sit on a grid for their positions).
    """

    def __init__(self, in_dim: int, out_dim: int, num_queries: int = 256, num_heads: int | None = None,
                 eps: float = 1e-6) -> None:
        grid = _square_side(num_queries, "num_queries")
        super().__init__(in_dim, out_dim, num_queries, num_heads, eps)
        self.register_buffer("pos_embed", get_2d_sincos_pos_embed(out_dim, grid))  # (Q, C), fixed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, in_dim), N a square number of patches -> (B, num_queries, out_dim)."""
        _check_features(x, self.in_dim, "QwenResampler")
        pos_k = resize_pos_embed(self.pos_embed, x.shape[1]).to(x.dtype)  # (N, C)
        return self.attend(x, pos_k, self.pos_embed)


class QFormerAttention(nn.Module):
    """BERT post-norm attention block: LayerNorm(x + dense(attn(x, kv))). kv_dim differs from dim for cross-attention."""

    def __init__(self, dim: int, num_heads: int, kv_dim: int, eps: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Q-Former width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kv_dim, dim)
        self.v = nn.Linear(kv_dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """x (B, Q, H), kv (B, N, Dkv) -> (B, Q, H)."""
        B, Q, H = x.shape
        nh = self.num_heads
        q = self.q(x).view(B, Q, nh, H // nh).transpose(1, 2)  # (B, nh, Q, hd)
        k = self.k(kv).view(B, -1, nh, H // nh).transpose(1, 2)  # (B, nh, N, hd)
        v = self.v(kv).view(B, -1, nh, H // nh).transpose(1, 2)  # (B, nh, N, hd)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, Q, H)  # (B, Q, H)
        return self.norm(x + self.o(out))  # (B, Q, H)


class QFormerLayer(nn.Module):
    """Self-attention among the queries, optional cross-attention to the image, post-norm GELU MLP."""

    def __init__(self, dim: int, num_heads: int, intermediate: int, kv_dim: int, cross: bool, eps: float) -> None:
        super().__init__()
        self.self_attn = QFormerAttention(dim, num_heads, dim, eps)
        self.cross_attn = QFormerAttention(dim, num_heads, kv_dim, eps) if cross else None
        self.fc1 = nn.Linear(dim, intermediate)
        self.fc2 = nn.Linear(intermediate, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """x (B, Q, H), image (B, N, Dv) -> (B, Q, H)."""
        x = self.self_attn(x, x)  # (B, Q, H)
        if self.cross_attn is not None:
            x = self.cross_attn(x, image)  # (B, Q, H)
        return self.norm(x + self.fc2(F.gelu(self.fc1(x))))  # (B, Q, H), exact (erf) GELU as BERT


class PerceiverResampler(nn.Module):
    """BLIP-2 Q-Former sampler + Linear to the LM width: (B, N, in_dim) -> (B, num_queries, out_dim).

    Defaults are BLIP-2's / InternLM-XComposer's BERT-base Q-Former: width 768, 12 layers,
    12 heads, MLP 3072, cross-attention on every 2nd layer (layers 0, 2, 4 ...).
    """

    def __init__(self, in_dim: int, out_dim: int, num_queries: int = 64, hidden_size: int = 768,
                 num_layers: int = 12, num_heads: int = 12, intermediate_size: int = 3072,
                 cross_attention_frequency: int = 2, eps: float = 1e-12) -> None:
        super().__init__()
        if num_queries < 1 or num_layers < 1 or cross_attention_frequency < 1:
            raise ValueError(f"PerceiverResampler needs num_queries, num_layers and cross_attention_frequency "
                             f">= 1, got {num_queries}, {num_layers}, {cross_attention_frequency}")
        self.in_dim, self.out_dim, self.num_queries = in_dim, out_dim, num_queries
        self.query = nn.Parameter(torch.randn(num_queries, hidden_size) * 0.02)  # (Q, H)
        self.ln_in = nn.LayerNorm(hidden_size, eps=eps)
        self.layers = nn.ModuleList(
            QFormerLayer(hidden_size, num_heads, intermediate_size, in_dim, i % cross_attention_frequency == 0, eps)
            for i in range(num_layers))
        self.proj = nn.Linear(hidden_size, out_dim)

    def qformer(self, queries: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """The Q-Former alone (transformers' Blip2QFormerModel.forward(query_embeds, encoder_hidden_states)).

        queries (B, Q, H), image (B, N, in_dim) -> last hidden state (B, Q, H).
        """
        x = self.ln_in(queries)  # (B, Q, H)
        for layer in self.layers:
            x = layer(x, image)  # (B, Q, H)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, in_dim) -> (B, num_queries, out_dim)."""
        _check_features(x, self.in_dim, "PerceiverResampler")
        queries = self.query.to(x.dtype).expand(x.shape[0], -1, -1)  # (B, Q, H)
        return self.proj(self.qformer(queries, x))  # (B, Q, C)


def _qformer_key_map(module: PerceiverResampler) -> dict[str, str]:
    """vlmkit parameter name -> transformers Blip2QFormerModel name (modeling_blip_2.py)."""
    names = {"ln_in.weight": "layernorm.weight", "ln_in.bias": "layernorm.bias"}
    for i, layer in enumerate(module.layers):
        hf = f"encoder.layer.{i}"
        blocks = [("self_attn", "attention")] + ([("cross_attn", "crossattention")] if layer.cross_attn else [])
        for ours, theirs in blocks:
            for a, b in [("q", "attention.query"), ("k", "attention.key"), ("v", "attention.value"),
                         ("o", "output.dense"), ("norm", "output.LayerNorm")]:
                for p in ("weight", "bias"):
                    names[f"layers.{i}.{ours}.{a}.{p}"] = f"{hf}.{theirs}.{b}.{p}"
        for a, b in [("fc1", "intermediate_query.dense"), ("fc2", "output_query.dense"),
                     ("norm", "output_query.LayerNorm")]:
            for p in ("weight", "bias"):
                names[f"layers.{i}.{a}.{p}"] = f"{hf}.{b}.{p}"
    return names


def load_qformer_state(module: PerceiverResampler, hf_state_dict: dict[str, torch.Tensor]) -> None:
    """Copy a transformers Q-Former's weights into `module`, checking every shape.

    Takes a `Blip2QFormerModel` state dict, or a `Blip2Model` / `Blip2ForConditionalGeneration`
    one (keys `qformer.*`); in the latter case `query_tokens` and `language_projection` fill
    the queries and the output Linear too. Raises ValueError on a missing key or a shape mismatch.
    """
    prefix = "qformer." if any(k.startswith("qformer.") for k in hf_state_dict) else ""
    names = {ours: prefix + theirs for ours, theirs in _qformer_key_map(module).items()}
    if prefix and "query_tokens" in hf_state_dict:
        names["query"] = "query_tokens"
        names["proj.weight"] = "language_projection.weight"
        names["proj.bias"] = "language_projection.bias"
    missing = [theirs for theirs in names.values() if theirs not in hf_state_dict]
    if missing:
        raise ValueError(f"the state dict is not a Q-Former matching this module: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}; check num_layers and cross_attention_frequency")
    params = dict(module.named_parameters())
    with torch.no_grad():
        for ours, theirs in names.items():
            src = hf_state_dict[theirs]
            if ours == "query":
                src = src.reshape(src.shape[-2:])  # (1, Q, H) -> (Q, H)
            if src.shape != params[ours].shape:
                raise ValueError(f"{theirs}: shape {tuple(src.shape)} does not fit {ours} "
                                 f"{tuple(params[ours].shape)}; build the module with the checkpoint's sizes")
            params[ours].copy_(src)


def build_qwen_resampler(spec: ProjectorSpec, in_dim: int, out_dim: int, bias: bool = True) -> QwenResampler:
    """Registry builder for `qwen_resampler{N}q`: spec.queries queries (bias is unused: Qwen-VL fixes its own)."""
    return QwenResampler(in_dim, out_dim, spec.queries)


def build_perceiver(spec: ProjectorSpec, in_dim: int, out_dim: int, bias: bool = True) -> PerceiverResampler:
    """Registry builder for `perceiver{N}q` (BERT-base Q-Former) and `perceiver{N}q_{L}x{H}`
    (L layers of width H, H // 64 heads, MLP 4H, cross-attention every 2nd layer); bias is unused."""
    if spec.width == 0:
        return PerceiverResampler(in_dim, out_dim, spec.queries)
    return PerceiverResampler(in_dim, out_dim, spec.queries, hidden_size=spec.width, num_layers=spec.depth,
                              num_heads=max(1, spec.width // 64), intermediate_size=4 * spec.width)


if __name__ == "__main__":
    torch.manual_seed(0)
    feats = torch.randn(1, 1024, 40)  # Qwen-VL: 32x32 patches of ViT-bigG (1664 wide, here 40)
    print("qwen", tuple(QwenResampler(40, 64, 256, num_heads=2)(feats).shape))  # (1, 256, 64)
    sampler = PerceiverResampler(40, 64, 64, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    print("perceiver", tuple(sampler(feats).shape))  # (1, 64, 64)
