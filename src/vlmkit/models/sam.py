"""SAM's image encoder (a ViTDet backbone) and the stride-2 downsampling Vary and DeepSeek-VL put after it.

    x = patch_conv(pixels) + pos_embed                   # (B, g, g, D), g = image_size / 16 = 64
    for each layer:                                      # windowed, or global at cfg.global_attn_indexes
        x = x + attn(layer_norm(x))                      # decomposed relative positions in every attention
        x = x + fc2(gelu(fc1(layer_norm(x))))
    y = neck(x)                                          # 1x1 conv, LN2d, 3x3 conv, LN2d: (B, 256, g, g)
    "vary":     y = conv2(conv1(y))                      # stride 2 twice: (B, 1024, 16, 16)
    "deepseek": y = conv2(conv1(resize(y, 96)))          # (B, 1024, 24, 24)
    features = y.flatten -> (B, tokens, channels)        # 256 x 1024 (Vary), 576 x 1024 (DeepSeek-VL)

Windowed layers zero-pad the grid to a multiple of the window (64 -> 70 for windows of 14),
attend inside each window (padding included, as the reference does) and crop back.
The relative-position bias is MViTv2's decomposed form: for query (qh, qw) and key (kh, kw)
it adds q . Rh[qh - kh] + q . Rw[qw - kw] to the logits.

The reference is transformers' SamVisionModel (models/sam/modeling_sam.py) for the
encoder and neck, and transformers' DeepseekVLHybridModel.get_high_res_image_features
(models/deepseek_vl_hybrid) for the DeepSeek-VL downsampling with its global branch
(DeepSeek-VL's `sam_hd`); Vary's two convs are net_2/net_3 of GitHub Ucas-HaoranWei/Vary,
vary/model/vision_encoder/sam.py (docs/references.md, Vary), and transformers' GOT-OCR2 (got_ocr2)
holds the same two convs as its projector's conv_upsampler1/2, the second one ending at the LM width
(downsample_channels = (512, H); weights/got_ocr2.py).

Run `python -m vlmkit.models.sam` for a shape check at the real 1024-px geometry with one layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlmkit.config import SamConfig
from vlmkit.models.vit import MLP


@dataclass
class SamOutput:
    last_hidden_state: torch.Tensor  # (B, output_channels, g, g): the neck output, as transformers returns it
    hidden_states: tuple[torch.Tensor, ...] | None = None  # num_layers + 1 entries of (B, g, g, D)


def rel_pos_table(table: torch.Tensor, size: int) -> torch.Tensor:
    """Relative-position embeddings for `size` queries against `size` keys: (L, hd) -> (size, size, hd).

    Entry [i, j] is table[i - j + size - 1]. A table whose length L is not 2 * size - 1
    is first resized linearly along L (align_corners=False), as SAM's get_rel_pos does.
    """
    length = 2 * size - 1
    if table.shape[0] != length:
        table = F.interpolate(table.T[None], size=length, mode="linear")[0].T  # (length, hd)
    index = torch.arange(size, device=table.device)
    offsets = index[:, None] - index[None, :] + size - 1  # (size, size)
    return table[offsets]  # (size, size, hd)


def decomposed_rel_pos(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                       height: int, width: int) -> torch.Tensor:
    """MViTv2's decomposed relative-position bias for self-attention over a height x width grid.

    q is (B, nh, height * width, hd), unscaled; returns the additive logit bias
    (B, nh, height * width, height * width).
    """
    B, nh, N, hd = q.shape
    Rh = rel_pos_table(rel_pos_h, height)  # (h, h, hd)
    Rw = rel_pos_table(rel_pos_w, width)  # (w, w, hd)
    q = q.reshape(B, nh, height, width, hd)  # (B, nh, h, w, hd)
    bias_h = torch.einsum("bnhwc,hkc->bnhwk", q, Rh)  # (B, nh, h, w, h): q . Rh[qh - kh]
    bias_w = torch.einsum("bnhwc,wkc->bnhwk", q, Rw)  # (B, nh, h, w, w): q . Rw[qw - kw]
    bias = bias_h[..., :, None] + bias_w[..., None, :]  # (B, nh, h, w, h, w)
    return bias.reshape(B, nh, N, N)


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad a (B, H, W, D) grid to multiples of `window` and cut it into windows.

    Returns (B * nW, window, window, D) and the padded (H, W).
    """
    B, H, W, D = x.shape
    x = F.pad(x, (0, 0, 0, -W % window, 0, -H % window))  # (B, Hp, Wp, D)
    Hp, Wp = x.shape[1], x.shape[2]
    x = x.reshape(B, Hp // window, window, Wp // window, window, D)  # (B, nh, w, nw, w, D)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, D), (Hp, Wp)  # (B * nW, w, w, D)


def window_unpartition(windows: torch.Tensor, window: int, padded: tuple[int, int],
                       size: tuple[int, int]) -> torch.Tensor:
    """Inverse of window_partition: (B * nW, window, window, D) -> (B, H, W, D), padding cropped."""
    (Hp, Wp), (H, W) = padded, size
    D = windows.shape[-1]
    B = windows.shape[0] // ((Hp // window) * (Wp // window))
    x = windows.reshape(B, Hp // window, Wp // window, window, window, D)  # (B, nh, nw, w, w, D)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, D)  # (B, Hp, Wp, D)
    return x[:, :H, :W]  # (B, H, W, D)


class SamAttention(nn.Module):
    """Self-attention over a (B, h, w, D) grid with a decomposed relative-position bias.

    `size` is the side of the grids this layer sees (the window, or the whole
    patch grid for global layers); it sizes the stored tables at 2 * size - 1.
    """

    def __init__(self, cfg: SamConfig, size: int) -> None:
        super().__init__()
        self.nh, self.hd = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.use_rel_pos = cfg.use_rel_pos
        if cfg.use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * size - 1, self.hd))  # (2 size - 1, hd)
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * size - 1, self.hd))  # (2 size - 1, hd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, h, w, D = x.shape
        q, k, v = self.qkv(x).reshape(B, h * w, 3, self.nh, self.hd).permute(2, 0, 3, 1, 4)  # (B, nh, hw, hd)
        bias = decomposed_rel_pos(q, self.rel_pos_h, self.rel_pos_w, h, w) if self.use_rel_pos else None
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, nh, hw, hd)
        return self.out(y.transpose(1, 2).reshape(B, h, w, D))  # (B, h, w, D)


class SamBlock(nn.Module):
    """Pre-norm transformer block; window > 0 attends inside window x window tiles, 0 globally."""

    def __init__(self, cfg: SamConfig, window: int) -> None:
        super().__init__()
        self.window = window
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = SamAttention(cfg, window if window > 0 else cfg.grid)
        self.mlp_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[1], x.shape[2]
        h = self.attn_norm(x)  # (B, H, W, D)
        if self.window > 0:
            h, padded = window_partition(h, self.window)  # (B * nW, w, w, D)
            h = window_unpartition(self.attn(h), self.window, padded, (H, W))  # (B, H, W, D)
        else:
            h = self.attn(h)  # (B, H, W, D)
        x = x + h
        return x + self.mlp(self.mlp_norm(x))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, C, H, W)


class SamNeck(nn.Module):
    """(B, g, g, D) -> (B, C, g, g): 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d (768 -> 256 in SAM-B)."""

    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        C = cfg.output_channels
        self.conv1 = nn.Conv2d(cfg.hidden_size, C, kernel_size=1, bias=False)
        self.norm1 = LayerNorm2d(C, eps=1e-6)
        self.conv2 = nn.Conv2d(C, C, kernel_size=3, padding=1, bias=False)
        self.norm2 = LayerNorm2d(C, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(self.conv1(x.permute(0, 3, 1, 2)))  # (B, C, g, g)
        return self.norm2(self.conv2(x))  # (B, C, g, g)


class SamNeckDownsample(nn.Module):
    """Two 3x3 stride-2 convs without bias after the neck, each halving the side (rounding up).

    Vary (cfg.downsample "vary", net_2 / net_3): (B, 256, 64, 64) -> (B, 512, 32, 32) -> (B, 1024, 16, 16).
    DeepSeek-VL ("deepseek"): bilinear resize to cfg.resize_to first (align_corners=False, in fp32):
    (B, 256, 64, 64) -> (B, 256, 96, 96) -> (B, 512, 48, 48) -> (B, 1024, 24, 24).
    """

    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        c1, c2 = cfg.downsample_channels
        self.resize_to = cfg.resize_to
        self.conv1 = nn.Conv2d(cfg.output_channels, c1, kernel_size=3, stride=2, padding=1, bias=False)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, stride=2, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize_to is not None:
            size = (self.resize_to, self.resize_to)
            x = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False).to(x.dtype)  # (B, C, r, r)
        x = self.conv1(x)  # (B, c1, s / 2, s / 2)
        return self.conv2(x)  # (B, c2, s / 4, s / 4)


class SamEncoder(nn.Module):
    """SAM ViTDet image encoder + neck, with the optional Vary / DeepSeek-VL downsampling (cfg.downsample)."""

    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D, g = cfg.hidden_size, cfg.grid
        self.patch_embed = nn.Conv2d(cfg.num_channels, D, cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(g, g, D)) if cfg.use_abs_pos else None  # (g, g, D)
        self.layers = nn.ModuleList(
            SamBlock(cfg, 0 if i in cfg.global_attn_indexes else cfg.window_size) for i in range(cfg.num_layers))
        self.neck = SamNeck(cfg)
        self.downsample = SamNeckDownsample(cfg) if cfg.downsample != "none" else None
        self.global_neck = SamNeck(cfg) if cfg.global_branch else None
        self.global_alpha = nn.Parameter(torch.zeros(1)) if cfg.global_branch else None
        self.gradient_checkpointing = False

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> SamOutput:
        """Encode (B, C, S, S) pixels to the neck map; hidden_states[i] is the output of layer i (0 = embeddings)."""
        hidden = self._encode(pixel_values)  # num_layers + 1 of (B, g, g, D)
        return SamOutput(self.neck(hidden[-1]), tuple(hidden) if output_hidden_states else None)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The (B, cfg.tokens_per_image, cfg.feature_dim) tokens a VLM projects, row-major over the map."""
        hidden = self._encode(pixel_values)  # num_layers + 1 of (B, g, g, D)
        y = self.neck(hidden[-1])  # (B, C, g, g)
        if self.downsample is not None:
            y = self.downsample(y)  # (B, c2, s, s)
        if self.global_neck is not None:  # DeepSeek-VL sam_hd: the first global layer, through its own neck
            first_global = hidden[self.cfg.global_attn_indexes[0] + 1]  # (B, g, g, D)
            y = y + self.downsample(self.global_neck(first_global)) * self.global_alpha  # (B, c2, s, s)
        return y.flatten(2).transpose(1, 2)  # (B, s * s, c2)

    def _encode(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Patch embeddings, positions and every layer; returns all num_layers + 1 grids."""
        self._check_pixels(pixel_values)
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)).permute(0, 2, 3, 1)  # (B, g, g, D)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        hidden = [x]
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)  # (B, g, g, D)
            hidden.append(x)
        return hidden

    def _check_pixels(self, pixel_values: torch.Tensor) -> None:
        shape, C, S = tuple(pixel_values.shape), self.cfg.num_channels, self.cfg.image_size
        if pixel_values.dim() != 4 or shape[1:] != (C, S, S):
            raise ValueError(f"pixel_values has shape {shape}; the SAM encoder expects (batch, {C}, {S}, {S}): "
                             f"resize (or pad, as SAM does) the images to {S}x{S}")


if __name__ == "__main__":
    for kind in ("vary", "deepseek"):
        cfg = SamConfig(num_layers=1, global_attn_indexes=(), downsample=kind)  # one windowed layer
        with torch.no_grad():
            tokens = SamEncoder(cfg).features(torch.randn(1, 3, 1024, 1024))
        print(kind, tuple(tokens.shape))  # vary (1, 256, 1024), deepseek (1, 576, 1024)
