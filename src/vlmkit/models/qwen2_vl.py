"""Qwen2-VL: a native-resolution ViT with 2-D RoPE and a 2x2 patch merger, feeding a Qwen2 LM with M-RoPE.

    pixel_values (N, C*T*P*P) patch rows from schemes/dynamic.py, image_grid_thw (I, 3)
      --patch_embed (the Conv3d as one matmul)--> (N, E)
      --blocks: x + attn(LN(x)) with 2-D rotary over each patch's (row, col), attention within one
                frame of one image; x + mlp(LN(x))--> (N, E)
      --merger: LN, 4 consecutive rows (one 2x2 group) concatenated, Linear-GELU-Linear--> (N/4, C)
    pixel_values_videos, video_grid_thw: the same for videos (frames paired in time: t = ceil(frames / 2))
    input_ids (B, T) --embed, the image_token_id rows replaced in order by the images' merged rows, the
      video_token_id rows by the videos'--> (B, T, C)
      --CausalLM with (3, B, T) t/h/w positions (M-RoPE)--> logits (B, T, V)

Positions: `mrope_positions` (models/mrope.py, transformers' get_rope_index) gives every token its
(t, h, w) triple from the prompt and the images' grids; the cache (`MRopeCache`) keeps each row's
rope delta so decoding continues from the prefill's largest position.

Encoded images: `encode_images(pixel_values, image_grid_thw)` gives each image's merged rows
(T_i, C); forward takes them back as `image_embeds` (with the same image_grid_thw, which the
positions need) instead of the pixels, so a chat encodes an image once (chat_session.py).

The reference is transformers' models/qwen2_vl/modeling_qwen2_vl.py. Qwen2.5-VL
(models/qwen2_5_vl.py) reuses this file's attention, rotary, merger, positions and top-level
model with its own tower. Run `python -m vlmkit.models.qwen2_vl` for a shape check on a tiny
random model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlmkit.config import LMConfig, Serializable, require
from vlmkit.models.image_model import ImageModel, scatter_rows
from vlmkit.models.lm import CausalLM, CausalLMOutput, KVCache, cache_dtype, default_position_ids
from vlmkit.models.rope import apply_rotary, rope_parameters, signed_sin
from vlmkit.models.activations import ACTIVATIONS
from vlmkit.models.mrope import grid_list, mrope_positions
from vlmkit.models.vit import MLP

VISION_LAYER_NORM_EPS = 1e-6  # transformers' Qwen2VLVisionBlock and PatchMerger hard-code this


@dataclass
class Qwen2VLVisionConfig(Serializable):
    """The Qwen2-VL ViT: patch embedding over (C, T, P, P) cubes, 2-D RoPE, LayerNorm blocks, 2x2 merger."""

    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    mlp_ratio: float = 4.0
    hidden_act: str = "quick_gelu"
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 3584  # the merger's output width = the LM's hidden size (HF vision_config.hidden_size)
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("depth", "embed_dim", "num_heads", "in_channels", "patch_size", "temporal_patch_size",
                     "spatial_merge_size", "out_hidden_size"):
            require(getattr(self, name) > 0, f"Qwen2VLVisionConfig.{name} must be positive, got {getattr(self, name)}")
        require(self.embed_dim % self.num_heads == 0,
                 f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        require(self.head_dim % 4 == 0, f"the vision head size {self.head_dim} must be a multiple of 4: "
                                         "2-D RoPE splits half of it between rows and columns, in pairs")
        require(self.hidden_act in ACTIVATIONS,
                 f"vision hidden_act {self.hidden_act!r} unknown; valid: {sorted(ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        """Length of one pixel_values row: C * T * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


def qwen2_7b_lm(max_position_embeddings: int = 32768) -> LMConfig:
    """The 7B Qwen2 language model of Qwen2-VL / Qwen2.5-VL, its rope_scaling carrying M-RoPE's sections."""
    return LMConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                    num_kv_heads=4, rope_theta=1000000.0,
                    rope_scaling={"rope_type": "default", "mrope_section": [16, 24, 24]},
                    max_position_embeddings=max_position_embeddings, qkv_bias=True, rms_norm_eps=1e-6)


@dataclass
class Qwen2VLConfig(Serializable):
    """Qwen2-VL: vision tower (with its merger) + a Qwen2 LM whose rope_scaling carries `mrope_section`."""

    vision: Qwen2VLVisionConfig = field(default_factory=Qwen2VLVisionConfig)
    lm: LMConfig = field(default_factory=qwen2_7b_lm)
    image_token_id: int = 151655  # <|image_pad|>: the placeholders image features replace
    video_token_id: int = 151656  # <|video_pad|>: the placeholders video features replace
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = Qwen2VLVisionConfig.from_dict(self.vision)
        if isinstance(self.lm, dict):
            self.lm = LMConfig.from_dict(self.lm)
        require(self.vision.out_hidden_size == self.lm.hidden_size,
                 f"vision.out_hidden_size {self.vision.out_hidden_size} != lm.hidden_size {self.lm.hidden_size}")
        section = rope_parameters(self.lm).get("mrope_section")
        require(section is not None, "Qwen2-VL's LM needs M-RoPE: set lm.rope_scaling = "
                                      "{'rope_type': 'default', 'mrope_section': [t, h, w]}")
        require(sum(section) == self.lm.rotary_dim // 2,
                 f"mrope_section {section} must sum to head_dim / 2 = {self.lm.rotary_dim // 2}")
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            require(0 <= getattr(self, name), f"{name} must be non-negative, got {getattr(self, name)}")
        require(self.image_token_id < self.lm.vocab_size,
                 f"image_token_id {self.image_token_id} is outside the LM vocabulary (size {self.lm.vocab_size})")
        require(self.image_token_id != self.video_token_id,
                 f"image_token_id and video_token_id are both {self.image_token_id}; give each its own id")

    @property
    def image_scheme(self) -> str:
        """Qwen2-VL plans images at their native resolution: vlmkit.schemes.dynamic."""
        return "dynamic"

    @property
    def timed_video(self) -> bool:
        """Whether a video's M-RoPE time ids follow its clock (Qwen2.5-VL); Qwen2-VL steps them by 1."""
        return False


# ----------------------------------------------------------------------------- vision tower


def checked_grid(pixel_values: torch.Tensor, grid_thw: torch.Tensor | list, patch_dim: int,
                 merge: int) -> list[tuple[int, int, int]]:
    """image_grid_thw as (t, h, w) ints, after checking it against pixel_values (N, patch_dim)."""
    grid = grid_list(grid_thw)
    expected = sum(t * h * w for t, h, w in grid)
    if pixel_values.dim() != 2 or pixel_values.shape != (expected, patch_dim):
        raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; image_grid_thw {grid} needs "
                         f"({expected}, {patch_dim}): pass the rows plan_dynamic builds, concatenated")
    if any(h % merge or w % merge for _, h, w in grid):
        raise ValueError(f"image_grid_thw {grid}: h and w must be multiples of spatial_merge_size {merge}")
    return grid


def patch_positions(grid_thw: list[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """(N, 2) (row, col) of every patch row, in the order patchify writes them: each `merge x merge`
    group is consecutive, groups in raster order, repeated for every temporal slice. Made on the host from
    the grid (python ints); vision_rotary moves them to the model's device in one copy.

        >>> patch_positions([(1, 2, 4)], 2)[:, 1].tolist()
        [0, 1, 0, 1, 2, 3, 2, 3]
    """
    out = []
    for t, h, w in grid_thw:
        rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)  # (h/m, m, w/m, m)
        cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)  # (h/m, m, w/m, m)
        hw = torch.stack([rows.transpose(1, 2).flatten(), cols.transpose(1, 2).flatten()], dim=-1)  # (h*w, 2)
        out.append(hw.repeat(t, 1))  # (t*h*w, 2)
    return torch.cat(out)


def vision_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """(hd/4,) fp32 inverse frequencies of the ViT's 2-D RoPE, shared by the row and the column axis."""
    quarter = torch.arange(0, head_dim // 2, 2, dtype=torch.int64).float() / (head_dim // 2)
    return 1.0 / theta**quarter


def vision_rotary(grid: list[tuple[int, int, int]], merge: int, inv_freq: torch.Tensor,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin (N, 1, 1, hd) of the 2-D RoPE, rows in patchify order: the first hd/4
    frequencies turn with the patch row, the next hd/4 with the column, and the pair (i, i + hd/2)
    rotates together."""
    pos = patch_positions(grid, merge).to(device)  # (N, 2)
    freqs = (pos[..., None].float() * inv_freq.to(device)).flatten(1)  # (N, hd/2): rows then cols
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, None]  # (N, 1, 1, hd): broadcast over q/k and heads
    return emb.cos(), signed_sin(emb.sin())


class VisionAttention(nn.Module):
    def __init__(self, cfg: Qwen2VLVisionConfig) -> None:
        super().__init__()
        self.nh, self.hd = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor,
                lengths: list[int]) -> torch.Tensor:
        N = x.shape[0]
        qkv = self.qkv(x).view(N, 3, self.nh, self.hd)  # (N, 3, nh, hd)
        # transformers rotates in fp32 (apply_rotary_pos_emb_vision) and casts back.
        qk = apply_rotary(qkv[:, :2].float(), cos, sin_signed).to(x.dtype)  # (N, 2, nh, hd)
        q, k, v = (t.transpose(0, 1) for t in (qk[:, 0], qk[:, 1], qkv[:, 2]))  # (nh, N, hd) each
        # Each frame of each image attends only to itself (transformers' cu_seqlens segments).
        y = torch.cat([F.scaled_dot_product_attention(qs, ks, vs) for qs, ks, vs in
                       zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1))], dim=1)  # (nh, N, hd)
        return self.proj(y.transpose(0, 1).reshape(N, self.nh * self.hd))


class VisionBlock(nn.Module):
    def __init__(self, cfg: Qwen2VLVisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=VISION_LAYER_NORM_EPS)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=VISION_LAYER_NORM_EPS)
        self.mlp = MLP(cfg.embed_dim, cfg.mlp_dim, cfg.hidden_act)

    def forward(self, x, cos, sin_signed, lengths):
        x = x + self.attn(self.norm1(x), cos, sin_signed, lengths)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LayerNorm each patch (or the `norm` given), concatenate the merge x merge consecutive rows of a
    group, then an MLP."""

    def __init__(self, cfg: Qwen2VLVisionConfig, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.group_dim = cfg.embed_dim * cfg.spatial_merge_size**2
        self.norm = norm if norm is not None else nn.LayerNorm(cfg.embed_dim, eps=VISION_LAYER_NORM_EPS)
        self.fc1 = nn.Linear(self.group_dim, self.group_dim)
        self.fc2 = nn.Linear(self.group_dim, cfg.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x).view(-1, self.group_dim)  # (N/m^2, m^2 E)
        return self.fc2(F.gelu(self.fc1(x)))  # (N/m^2, C)


class Qwen2VisionTower(nn.Module):
    """pixel_values (N, C*T*P*P) + grid (I, 3) -> merged features (N / merge^2, out_hidden_size)."""

    def __init__(self, cfg: Qwen2VLVisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # transformers' Conv3d with kernel = stride = (T, P, P) over one (C, T, P, P) cube is this matmul.
        self.patch_embed = nn.Linear(cfg.patch_dim, cfg.embed_dim, bias=False)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)
        self.inv_freq = vision_inv_freq(cfg.head_dim, cfg.rope_theta)  # (hd/4,) fp32, a plain attribute

    def rotary(self, grid: list[tuple[int, int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (N, 1, 1, hd) of the 2-D RoPE (see `vision_rotary`)."""
        return vision_rotary(grid, self.cfg.spatial_merge_size, self.inv_freq, device)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | list) -> torch.Tensor:
        grid = checked_grid(pixel_values, grid_thw, self.cfg.patch_dim, self.cfg.spatial_merge_size)
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # (N, E)
        cos, sin = self.rotary(grid, x.device)  # (N, 1, 1, hd) each
        lengths = [h * w for t, h, w in grid for _ in range(t)]  # one attention segment per frame
        for block in self.blocks:
            x = block(x, cos, sin, lengths)
        return self.merger(x)  # (N/m^2, C)


# ----------------------------------------------------------------------------- the model


class MRopeCache(KVCache):
    """A KVCache that also keeps each row's M-RoPE delta, set by the prefill, used by every decode step."""

    def __init__(self, cfg: LMConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__(cfg, batch_size, max_len, dtype=dtype, device=device)
        self.rope_deltas = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # (B, 1)

    def _take_rows(self, sources: list[tuple[KVCache, torch.Tensor | None]]) -> None:
        """Each row's delta follows its row through KVCache.select / join."""
        self.rope_deltas = torch.cat([c.rope_deltas if rows is None else c.rope_deltas[rows]
                                      for c, rows in sources])  # (B, 1)


class Qwen2VL(ImageModel):
    """Qwen2-VL for generation and training: forward(input_ids, pixel_values, image_grid_thw, ...) -> logits.
    Images are planned, turned into inputs and encoded by the `dynamic` scheme (vlmkit.schemes.dynamic)."""

    config_class = Qwen2VLConfig

    def __init__(self, cfg: Qwen2VLConfig, vision: nn.Module | None = None) -> None:
        """vision: the tower mapping (pixel_values, image_grid_thw) to merged features; None = Qwen2-VL's."""
        super().__init__(cfg)
        self.vision = vision if vision is not None else Qwen2VisionTower(cfg.vision)
        self.lm = CausalLM(cfg.lm)

    @property
    def placeholder_ids(self) -> dict[str, int]:
        """Images and videos each have their placeholder: <|image_pad|> and <|video_pad|>."""
        return {"image": self.cfg.image_token_id, "video": self.cfg.video_token_id}

    def new_cache(self, batch_size: int, max_len: int) -> MRopeCache:
        p = self.lm.embed.weight
        return MRopeCache(self.cfg.lm, batch_size, max_len, dtype=cache_dtype(self.cfg.lm, p), device=p.device)

    def video_rows(self, pixel_values_videos: torch.Tensor | None, video_grid_thw: torch.Tensor | list | None
                   ) -> list[torch.Tensor] | None:
        """Each video's merged rows (T_v, C) in order, from its patch rows; None without videos."""
        if pixel_values_videos is None:
            if video_grid_thw is not None:
                raise ValueError("video_grid_thw was given without the video's pixel values; pass both")
            return None
        if video_grid_thw is None:
            raise ValueError("video pixels need video_grid_thw (one (t, h, w) row per video, from its plan)")
        rows = self.vision(pixel_values_videos, video_grid_thw)  # (F, C)
        return list(rows.split(self.scheme.row_counts(self.cfg, video_grid_thw)))  # V x (T_v, C)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        pixel_values: torch.Tensor | None = None,  # (N, C*T*P*P) rows of every image, concatenated
        image_grid_thw: torch.Tensor | list | None = None,  # (I, 3) (t, h, w) patches per image
        attention_mask: torch.Tensor | None = None,  # (B, S) 1 = real token, 0 = padding; S = cached + T
        position_ids: torch.Tensor | None = None,  # (3, B, T) or (B, T); None = computed (M-RoPE)
        cache: KVCache | None = None,
        labels: torch.Tensor | None = None,  # (B, T), IGNORE_INDEX where no loss is taken
        logits_to_keep: int = 0,
        pixel_values_videos: torch.Tensor | None = None,  # (N', C*T*P*P) rows of every video, concatenated
        video_grid_thw: torch.Tensor | list | None = None,  # (V, 3) (t, h, w) per video, t = temporal patches
        second_per_grid_ts: torch.Tensor | list | None = None,  # (V,) seconds per temporal patch (Qwen2.5-VL)
        loss_only: bool = False,  # with labels: project only the labelled positions, return no logits
        image_embeds: Sequence[torch.Tensor] | None = None,  # I x (T_i, C) from encode_images, for pixel_values
    ) -> CausalLMOutput:
        past = cache.length if cache is not None else 0
        if past and any(v is not None for v in (pixel_values, pixel_values_videos, image_embeds)):
            raise ValueError("images and videos go with the first (prefill) pass over an empty cache; "
                             "start a new cache for a prompt with new images or videos")
        x = self.embed_prompt(input_ids, {"pixel_values": pixel_values, "image_grid_thw": image_grid_thw},
                              image_embeds, cache)  # (B, T, C)
        videos = self.video_rows(pixel_values_videos, video_grid_thw)
        if videos is not None or past == 0:
            x = scatter_rows(input_ids, x, videos or [], self.cfg.video_token_id, "video")
        if position_ids is None:
            position_ids = self._positions(input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts,
                                           attention_mask, cache)
        elif position_ids.dim() == 2:
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)  # (3, B, T): text on every axis
        return self.lm(inputs_embeds=x, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                       labels=labels, logits_to_keep=logits_to_keep, loss_only=loss_only)

    def video_intervals(self, video_grid_thw: torch.Tensor | list | None,
                        second_per_grid_ts: torch.Tensor | list | None) -> list[torch.Tensor] | None:
        """Per video, the step of its M-RoPE time ids per temporal patch: 1 in Qwen2-VL (None)."""
        if second_per_grid_ts is not None:
            raise ValueError("second_per_grid_ts spaces Qwen2.5-VL's video time ids; Qwen2-VL steps them by 1, "
                             "drop it")
        return None

    def _positions(self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | list | None,
                   video_grid_thw: torch.Tensor | list | None, second_per_grid_ts: torch.Tensor | list | None,
                   attention_mask: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        """(3, B, T): from the prompt on an empty cache (storing the deltas), else cached length + delta."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if past == 0:
            positions, deltas = mrope_positions(
                input_ids, image_grid_thw, self.cfg.image_token_id, self.cfg.vision.spatial_merge_size,
                attention_mask, video_grid_thw=video_grid_thw, video_token_id=self.cfg.video_token_id,
                video_intervals=self.video_intervals(video_grid_thw, second_per_grid_ts))
            if isinstance(cache, MRopeCache):
                cache.rope_deltas = deltas
            return positions
        if not isinstance(cache, MRopeCache):
            raise ValueError("decoding Qwen2-VL needs the cache from model.new_cache (it keeps the M-RoPE offsets)")
        text = default_position_ids(attention_mask, past, T, input_ids.device)  # (B or 1, T)
        return (text + cache.rope_deltas).unsqueeze(0).expand(3, -1, -1)  # (3, B, T)


if __name__ == "__main__":
    lm = LMConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                  qkv_bias=True, rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]})
    vision = Qwen2VLVisionConfig(depth=2, embed_dim=32, num_heads=4, out_hidden_size=64)
    model = Qwen2VL(Qwen2VLConfig(vision=vision, lm=lm, image_token_id=99))
    pixels = torch.randn(1 * 4 * 6, vision.patch_dim)  # one image of 4 x 6 patches -> 6 merged tokens
    ids = torch.tensor([[1, 2] + [99] * 6 + [3]])
    print("logits", tuple(model(ids, pixels, [(1, 4, 6)]).logits.shape))  # (1, 9, 100)
