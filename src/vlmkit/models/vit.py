"""The vision tower: one ViT for CLIP and SigLIP image encoders.

    x = patch_conv(pixels)                               # (B, N, D), N = (H/P)(W/P)
    x = [cls; x] + positions                             # CLIP prepends a learned CLS token
    x = pre_layernorm(x)                                 # CLIP only
    for each layer:
        x = x + attn(layer_norm(x))                      # bidirectional self-attention
        x = x + fc2(act(fc1(layer_norm(x))))             # quick_gelu (CLIP) / gelu-tanh (SigLIP)
    CLIP:   pooled = post_layernorm(x[:, 0])             # last_hidden_state = x
    SigLIP: x = post_layernorm(x); pooled = head(x)      # attention pooling, when use_head

Everything that differs between the two is data in VisionConfig (use_cls_token,
pre_layernorm, patch_bias, hidden_act, use_head); where post_layernorm applies
follows use_cls_token, as in transformers' CLIPVisionModel / SiglipVisionModel
(modeling_clip.py, modeling_siglip.py), the reference these are tested against.
Query/key/value are one fused Linear (`qkv`), one matmul instead of three.

A VLM takes `features()`: the hidden state at cfg.select_layer, indexed like
transformers' `hidden_states` tuple (0 = embeddings, i = output of layer i),
minus the CLS token when cfg.select_feature == "patch". Layers past that one
are not run.

Run `python -m vlmkit.models.vit` for a shape check on a tiny random tower.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlmkit.config import VisionConfig
from vlmkit.models.activations import ACTIVATIONS


@dataclass
class VisionOutput:
    last_hidden_state: torch.Tensor  # (B, N, D); post-layernormed for SigLIP, not for CLIP
    pooler_output: torch.Tensor | None = None  # (B, D): CLIP's normed CLS, SigLIP's head; None without a head
    hidden_states: tuple[torch.Tensor, ...] | None = None  # num_layers + 1 entries of (B, N, D)


class SelfAttention(nn.Module):
    """Multi-head bidirectional self-attention with fused q, k, v projections."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.nh, self.hd = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.nh, self.hd).permute(2, 0, 3, 1, 4)  # (B, nh, N, hd) each
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, N, hd)
        return self.out(y.transpose(1, 2).reshape(B, N, D))


class MLP(nn.Module):
    """fc2(act(fc1(x))): the feed-forward block of every ViT here (CLIP, SigLIP, SAM, Qwen2-VL)."""

    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = SelfAttention(cfg)
        self.mlp_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class AttentionPoolHead(nn.Module):
    """SigLIP's multihead attention pooling: a learned probe attends over all tokens, then a residual MLP.

    Follows SiglipMultiheadAttentionPoolingHead, whose nn.MultiheadAttention
    in_proj is stored here as `q` (probe side) and fused `kv` (token side).
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        D = cfg.hidden_size
        self.nh, self.hd = cfg.num_heads, D // cfg.num_heads
        self.probe = nn.Parameter(torch.randn(1, 1, D))
        self.q = nn.Linear(D, D)
        self.kv = nn.Linear(D, 2 * D)
        self.out = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q = self.q(self.probe).view(1, 1, self.nh, self.hd).transpose(1, 2).expand(B, -1, -1, -1)  # (B, nh, 1, hd)
        k, v = self.kv(x).view(B, N, 2, self.nh, self.hd).permute(2, 0, 3, 1, 4)  # (B, nh, N, hd) each
        h = F.scaled_dot_product_attention(q, k, v)  # (B, nh, 1, hd)
        h = self.out(h.transpose(1, 2).reshape(B, 1, D))  # (B, 1, D)
        h = h + self.mlp(self.norm(h))
        return h[:, 0]  # (B, D)


def bucket_position_ids(rows: int, cols: int, side: int) -> torch.Tensor:
    """Position-table rows of a rows x cols patch grid on a side x side table, NaViT-style (Idefics2's and
    MiniCPM-V's SiglipVisionEmbeddings): patch (i, j) sits at fractional coordinates (i / rows, j / cols), each
    bucketed into the side equal bins of [0, 1); the id is bin_i * side + bin_j. In float32 with the step a
    float32 tensor, as the reference computes it, so the bins at the edges agree exactly.

        >>> bucket_position_ids(2, 3, 4).tolist()
        [0, 1, 2, 8, 9, 10]
    """
    boundaries = torch.arange(1 / side, 1.0, 1 / side)  # (side - 1,) float32
    steps = 1 / torch.tensor([rows, cols], dtype=torch.int32)  # float32, as 1 / tgt_sizes[i] in the reference
    bins_h = torch.bucketize(torch.arange(0, 1 - 1e-6, steps[0]), boundaries, right=True)  # (rows,)
    bins_w = torch.bucketize(torch.arange(0, 1 - 1e-6, steps[1]), boundaries, right=True)  # (cols,)
    return (bins_h[:, None] * side + bins_w).flatten()  # (rows * cols,)


class VisionTower(nn.Module):
    """CLIP / SigLIP vision transformer built from a VisionConfig."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.patch_embed = nn.Conv2d(cfg.num_channels, D, cfg.patch_size, stride=cfg.patch_size,
                                     bias=cfg.patch_bias)
        self.cls_token = nn.Parameter(torch.randn(D)) if cfg.use_cls_token else None
        self.pos_embed = nn.Parameter(torch.randn(cfg.num_positions, D) * 0.02)  # (num_positions, D)
        self.pre_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps) if cfg.pre_layernorm else None
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))
        self.post_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps) if cfg.post_layernorm else None
        self.head = AttentionPoolHead(cfg) if cfg.use_head else None
        self.gradient_checkpointing = False

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False,
                interpolate_pos_encoding: bool = False) -> VisionOutput:
        """Encode (B, C, H, W) pixels; hidden_states[i] is what LLaVA's select_layer i indexes."""
        hidden: list[torch.Tensor] | None = [] if output_hidden_states else None
        x = self._encode(pixel_values, self.cfg.num_layers, interpolate_pos_encoding, hidden)  # (B, N, D)
        if self.cls_token is not None:  # CLIP: the CLS token is pooled and normed, the tokens are not
            pooled = x[:, 0]  # (B, D)
            if self.post_norm is not None:
                pooled = self.post_norm(pooled)
        else:  # SigLIP: every token is normed, the head (if any) pools them
            if self.post_norm is not None:
                x = self.post_norm(x)
            pooled = self.head(x) if self.head is not None else None  # (B, D)
        return VisionOutput(x, pooled, tuple(hidden) if hidden is not None else None)

    def features(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """The (B, N, D) features a VLM projects: hidden state cfg.select_layer, CLS dropped for "patch", after
        post_layernorm with cfg.feature_post_norm."""
        L = self.cfg.num_layers
        depth = self.cfg.select_layer if self.cfg.select_layer >= 0 else L + 1 + self.cfg.select_layer
        x = self._encode(pixel_values, depth, interpolate_pos_encoding, None)  # (B, N, D)
        if self.cfg.feature_post_norm:  # SigLIP's last_hidden_state (MiniCPM-V)
            x = self.post_norm(x)
        if self.cls_token is not None and self.cfg.select_feature == "patch":
            x = x[:, 1:]  # (B, N - 1, D)
        return x

    def _encode(self, pixel_values: torch.Tensor, depth: int, interpolate_pos_encoding: bool,
                hidden: list[torch.Tensor] | None) -> torch.Tensor:
        """Embeddings then the first `depth` layers; appends every intermediate state to `hidden`."""
        x = self.embed(pixel_values, interpolate_pos_encoding)  # (B, N, D)
        if hidden is not None:
            hidden.append(x)
        for layer in self.layers[:depth]:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
            if hidden is not None:
                hidden.append(x)
        return x

    def embed(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """Patch embeddings + CLS + positions (+ CLIP's pre-layernorm): (B, C, H, W) -> (B, N, D)."""
        grid = self._check_pixels(pixel_values, interpolate_pos_encoding)
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # (B, D, gh, gw)
        x = x.flatten(2).transpose(1, 2)  # (B, gh*gw, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], 1, -1), x], dim=1)  # (B, 1 + gh*gw, D)
        x = x + self.positions(grid)
        return self.pre_norm(x) if self.pre_norm is not None else x

    def positions(self, grid: int | tuple[int, int]) -> torch.Tensor:
        """Position embeddings for a rows x cols patch layout (an int: square): (num_cls + rows*cols, D).

        Other grids than the trained one resize the 2-D table bicubically to (rows, cols)
        (align_corners=False), as transformers' interpolate_pos_encoding does, non-square
        grids included; the CLS position is kept as is.
        """
        rows, cols = (grid, grid) if isinstance(grid, int) else grid
        native = self.cfg.position_side  # a smaller stored table (Qwen-VL's 16 x 16) is resized even at image_size
        if self.cfg.position_buckets:  # NaViT: no CLS (MiniCPM-V's SigLIP), a lookup for every grid
            return self.pos_embed[bucket_position_ids(rows, cols, native).to(self.pos_embed.device)]
        if rows == cols == native:
            return self.pos_embed
        n_cls = int(self.cls_token is not None)
        D = self.pos_embed.shape[-1]
        table = self.pos_embed[n_cls:].reshape(1, native, native, D).permute(0, 3, 1, 2)  # (1, D, g0, g0)
        table = F.interpolate(table, size=(rows, cols), mode="bicubic", align_corners=False)  # (1, D, gh, gw)
        table = table.permute(0, 2, 3, 1).reshape(rows * cols, D)  # (gh*gw, D)
        return torch.cat([self.pos_embed[:n_cls], table], dim=0)

    def _check_pixels(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool) -> tuple[int, int]:
        """Validate a (B, C, H, W) batch and return its patch grid (H/P, W/P).

        Without interpolate_pos_encoding the images must be image_size x image_size; with it any
        H x W of whole patches, square or not.
        """
        shape = tuple(pixel_values.shape)
        C, P, size = self.cfg.num_channels, self.cfg.patch_size, self.cfg.image_size
        if pixel_values.dim() != 4 or shape[1] != C:
            raise ValueError(f"pixel_values has shape {shape}; the vision tower expects (batch, {C}, height, width)")
        H, W = shape[2], shape[3]
        if H != W and not interpolate_pos_encoding:
            raise ValueError(f"pixel_values has shape {shape}: images must be square (height == width); "
                             f"resize or pad them to {size}x{size}, or pass interpolate_pos_encoding=True")
        for side in (H, W):
            if side <= 0 or side % P:
                raise ValueError(f"pixel_values has shape {shape}: the side {side} is not a positive multiple of "
                                 f"patch_size {P}")
        if H != size and not interpolate_pos_encoding:
            raise ValueError(f"pixel_values has shape {shape} but the tower was trained at {size}x{size}; "
                             "resize the images or pass interpolate_pos_encoding=True")
        return H // P, W // P


if __name__ == "__main__":
    cfg = VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4)
    tower = VisionTower(cfg)
    pixels = torch.randn(2, 3, 32, 32)
    out = tower(pixels, output_hidden_states=True)
    print("last", tuple(out.last_hidden_state.shape), "pooled", tuple(out.pooler_output.shape),
          "hidden states", len(out.hidden_states))  # (2, 17, 32) (2, 32) 3
    print("features", tuple(tower.features(pixels).shape))  # (2, 16, 32)
