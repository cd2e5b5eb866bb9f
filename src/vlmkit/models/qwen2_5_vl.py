"""Qwen2.5-VL: Qwen2-VL's native-resolution ViT with window attention, RMSNorm and SwiGLU blocks.

    pixel_values (N, C*T*P*P) rows from schemes/dynamic.py, image_grid_thw (I, 3)
      --patch_embed (one matmul)--> (N, E)
      --reorder the merge x merge groups window by window (`window_order`)--> (N, E)
      --blocks: x + attn(RMS(x)) with 2-D rotary, attention within one window, or within one frame
                in the `fullatt_block_indexes` blocks; x + swiglu(RMS(x))--> (N, E)
      --merger: RMSNorm, 4 consecutive rows concatenated, Linear-GELU-Linear--> (N/4, C)
      --undo the window order--> (N/4, C), the rows image placeholders take, as in Qwen2-VL

Everything after the tower (placeholder scatter, M-RoPE positions, the Qwen2 LM, the
cache's rope deltas) is Qwen2-VL's: `Qwen2_5_VL` is `Qwen2VL` with this tower. For images
the positions are the same as Qwen2-VL's; a video's time ids step by
`tokens_per_second * second_per_grid_ts` per temporal patch (Qwen2.5-VL technical report, Bai et al.
2025, sec. 2.1.3: M-RoPE time ids aligned to absolute time), second_per_grid_ts = temporal_patch_size / fps,
1 when not given.

The reference is transformers' models/qwen2_5_vl/modeling_qwen2_5_vl.py
(Qwen2_5_VisionTransformerPretrainedModel) and vision_utils.get_vision_window_index. Run
`python -m vlmkit.models.qwen2_5_vl` for a shape check on a tiny random model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from vlmkit.config import LMConfig, Serializable, require
from vlmkit.models.lm import RMSNorm, SwiGLU
from vlmkit.models.qwen2_vl import (PatchMerger, Qwen2VL, Qwen2VLConfig, VisionAttention, checked_grid, qwen2_7b_lm,
                                    vision_inv_freq, vision_rotary)
from vlmkit.models.activations import ACTIVATIONS

VISION_RMS_NORM_EPS = 1e-6  # transformers' Qwen2_5_VLVisionBlock and PatchMerger hard-code this


@dataclass
class Qwen2_5_VLVisionConfig(Serializable):
    """The Qwen2.5-VL ViT (defaults: Qwen2.5-VL-7B): Qwen2-VL's patches, rotary and merger, with
    windowed attention outside `fullatt_block_indexes`, RMSNorm and a biased SwiGLU MLP."""

    depth: int = 32
    embed_dim: int = 1280  # transformers' vision_config.hidden_size
    num_heads: int = 16
    intermediate_size: int = 3420
    hidden_act: str = "silu"
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 3584  # the merger's output width = the LM's hidden size
    window_size: int = 112  # a window's side in pixels: window_size // (patch_size * merge) merged tokens
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    tokens_per_second: int = 2  # video time ids per second of video (M-RoPE time spacing)
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("depth", "embed_dim", "num_heads", "intermediate_size", "in_channels", "patch_size",
                     "temporal_patch_size", "spatial_merge_size", "out_hidden_size"):
            require(getattr(self, name) > 0,
                    f"Qwen2_5_VLVisionConfig.{name} must be positive, got {getattr(self, name)}")
        require(self.embed_dim % self.num_heads == 0,
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        require(self.head_dim % 4 == 0, f"the vision head size {self.head_dim} must be a multiple of 4: "
                                        "2-D RoPE splits half of it between rows and columns, in pairs")
        require(self.hidden_act in ACTIVATIONS,
                f"vision hidden_act {self.hidden_act!r} unknown; valid: {sorted(ACTIVATIONS)}")
        require(self.window_tokens >= 1,
                f"window_size {self.window_size} is smaller than one merged token "
                f"({self.patch_size * self.spatial_merge_size} px); use a multiple of it")
        self.fullatt_block_indexes = [int(i) for i in self.fullatt_block_indexes]
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        require(not bad, f"fullatt_block_indexes {bad} are not blocks of a depth-{self.depth} tower")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one pixel_values row: C * T * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def window_tokens(self) -> int:
        """A window's side in merged tokens (transformers' vit_merger_window_size)."""
        return self.window_size // self.spatial_merge_size // self.patch_size


@dataclass
class Qwen2_5_VLConfig(Qwen2VLConfig):
    """Qwen2.5-VL: the windowed vision tower + Qwen2-VL's LM with M-RoPE and its special tokens."""

    vision: Qwen2_5_VLVisionConfig = field(default_factory=Qwen2_5_VLVisionConfig)
    lm: LMConfig = field(default_factory=lambda: qwen2_7b_lm(max_position_embeddings=128000))

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = Qwen2_5_VLVisionConfig.from_dict(self.vision)
        super().__post_init__()

    @property
    def timed_video(self) -> bool:
        """A video's time ids step by tokens_per_second * seconds per temporal patch."""
        return True


def window_order(grid: list[tuple[int, int, int]], merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """The order of merged tokens for window attention, and each window's length in patches.

    Each frame's (h/merge, w/merge) token grid is cut into window x window squares in raster
    order; squares at the right and bottom edges are cut short. Tokens keep raster order inside
    a square; frames and images follow each other. Indices count merged tokens over all images.
    The order is made on the host (a python walk over the windows); the tower moves it to its device once.

        >>> order, lengths = window_order([(1, 6, 4)], 2, 2)  # a 3 x 2 token grid
        >>> order.tolist(), lengths
        ([0, 1, 2, 3, 4, 5], [16, 8])
        >>> window_order([(1, 4, 8)], 2, 2)[0].tolist()  # 2 x 4 tokens: two 2 x 2 windows side by side
        [0, 1, 4, 5, 2, 3, 6, 7]
    """
    order, lengths, offset = [], [], 0
    for t, h, w in grid:
        gh, gw = h // merge, w // merge
        tokens = torch.arange(t * gh * gw).view(t, gh, gw) + offset  # (t, gh, gw)
        for frame in tokens:
            for r in range(0, gh, window):
                for c in range(0, gw, window):
                    square = frame[r:r + window, c:c + window].flatten()
                    order.append(square)
                    lengths.append(square.numel() * merge**2)
        offset += t * gh * gw
    return torch.cat(order), lengths


def _by_token(x: torch.Tensor, order: torch.Tensor, merge: int) -> torch.Tensor:
    """Reorder patch rows (N, ...) by merged token: each token's merge^2 consecutive rows move together."""
    return x.unflatten(0, (-1, merge**2))[order].flatten(0, 1)  # (N, ...)


class VisionBlock(nn.Module):
    def __init__(self, cfg: Qwen2_5_VLVisionConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.embed_dim, VISION_RMS_NORM_EPS)
        self.attn = VisionAttention(cfg)
        self.norm2 = RMSNorm(cfg.embed_dim, VISION_RMS_NORM_EPS)
        self.mlp = SwiGLU(cfg.embed_dim, cfg.intermediate_size, cfg.hidden_act, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor,
                lengths: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin_signed, lengths)
        return x + self.mlp(self.norm2(x))


class Qwen2_5VisionTower(nn.Module):
    """pixel_values (N, C*T*P*P) + grid (I, 3) -> merged features (N / merge^2, out_hidden_size)."""

    def __init__(self, cfg: Qwen2_5_VLVisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # transformers' Conv3d with kernel = stride = (T, P, P) over one (C, T, P, P) cube is this matmul.
        self.patch_embed = nn.Linear(cfg.patch_dim, cfg.embed_dim, bias=False)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, norm=RMSNorm(cfg.embed_dim, VISION_RMS_NORM_EPS))
        self.inv_freq = vision_inv_freq(cfg.head_dim, cfg.rope_theta)  # (hd/4,) fp32, a plain attribute

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | list) -> torch.Tensor:
        merge = self.cfg.spatial_merge_size
        grid = checked_grid(pixel_values, grid_thw, self.cfg.patch_dim, merge)
        order, windows = window_order(grid, merge, self.cfg.window_tokens)
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # (N, E)
        order = order.to(x.device)
        x = _by_token(x, order, merge)  # (N, E) window by window
        cos, sin = (_by_token(t, order, merge) for t in vision_rotary(grid, merge, self.inv_freq,
                                                                      x.device))  # (N, 1, 1, hd)
        frames = [h * w for t, h, w in grid for _ in range(t)]  # windows never cross a frame: still contiguous
        full = set(self.cfg.fullatt_block_indexes)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, frames if i in full else windows)
        merged = self.merger(x)  # (N/m^2, C) in window order
        return merged[torch.argsort(order)]  # (N/m^2, C) back in raster order


class Qwen2_5_VL(Qwen2VL):
    """Qwen2.5-VL for generation and training: Qwen2VL's forward(input_ids, pixel_values, image_grid_thw, ...)
    with the windowed vision tower."""

    config_class = Qwen2_5_VLConfig

    def __init__(self, cfg: Qwen2_5_VLConfig) -> None:
        super().__init__(cfg, vision=Qwen2_5VisionTower(cfg.vision))

    def video_intervals(self, video_grid_thw: torch.Tensor | list | None,
                        second_per_grid_ts: torch.Tensor | list | None) -> list[torch.Tensor] | None:
        """Per video, tokens_per_second * second_per_grid_ts (fp32 scalars, as transformers multiplies them)."""
        if video_grid_thw is None:
            return None
        count = len(video_grid_thw)
        seconds = torch.ones(count) if second_per_grid_ts is None else torch.as_tensor(second_per_grid_ts).float()
        if seconds.shape != (count,):
            raise ValueError(f"second_per_grid_ts has shape {tuple(seconds.shape)}; give one value per video "
                             f"({count})")
        return list((self.cfg.vision.tokens_per_second * seconds.cpu()).unbind())


if __name__ == "__main__":
    lm = LMConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                  qkv_bias=True, rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]})
    vision = Qwen2_5_VLVisionConfig(depth=2, embed_dim=32, num_heads=4, intermediate_size=48, out_hidden_size=64,
                                    window_size=56, fullatt_block_indexes=[1])
    model = Qwen2_5_VL(Qwen2_5_VLConfig(vision=vision, lm=lm, image_token_id=99))
    pixels = torch.randn(1 * 6 * 6, vision.patch_dim)  # one image of 6 x 6 patches -> 9 merged tokens, 4 windows
    ids = torch.tensor([[1, 2] + [99] * 9 + [3]])
    print("logits", tuple(model(ids, pixels, [(1, 6, 6)]).logits.shape))  # (1, 12, 100)
    print("window lengths", window_order([(1, 6, 6)], 2, vision.window_tokens)[1])  # [16, 8, 8, 4] patches
