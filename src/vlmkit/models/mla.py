"""Multi-head latent attention (MLA), the attention of DeepSeek-V2/V3 and of DeepSeek-VL2's language model.

Keys and values come from one low-rank latent per token, and RoPE lives on a few extra
channels whose key is one head shared by all heads (DeepSeek-V2 paper, arXiv:2405.04434, sec. 2.1):

    q = q_b(rms_norm(q_a(x)))  or  q_proj(x)              # (B, T, nh, dn + dr)   q_lora_rank > 0 or 0
    c, k_rot = kv_a(x) split [r, dr]                      # latent (B, T, r), shared RoPE key (B, T, dr)
    c = rms_norm(c)                                       # what the KV cache stores, with rope(k_rot)
    k_nope, v = kv_b(c) split [dn, dv] per head           # (B, nh, S, dn), (B, nh, S, dv)
    k = [k_nope, rope(k_rot) for every head]              # (B, nh, S, dn + dr)
    y = softmax(q k^T * scale) v -> out                   # scale = (dn + dr)^-0.5 (* mscale^2 with YaRN)

r = kv_lora_rank, dn = qk_nope_head_dim, dr = qk_rope_head_dim, dv = v_head_dim. The cache
holds r + dr numbers per token and layer instead of 2 * nh * head_dim: it is KVCache with
keys of shape (B, 1, S, r) and values (B, 1, S, dr) (models/lm.py). Each step re-expands the
cached latents through kv_b, as transformers' DeepseekV2Attention does; the "absorbed" form
(kv_b folded into the query and the output) gives the same numbers with less work at long contexts.

DeepSeek's checkpoints lay the RoPE channels out in interleaved pairs (2i, 2i + 1)
(rope_interleave; DeepSeek-V2 always, V3 by config): they are gathered to halves (evens, odds)
for queries and keys alike, after which the usual rotate-half RoPE applies; q . k is unchanged
by that common permutation. The two norms on the latents use eps 1e-6 whatever rms_norm_eps is,
as the reference's DeepseekV2RMSNorm(q_lora_rank) / (kv_lora_rank) do.

Reference: transformers models/deepseek_v2/modeling_deepseek_v2.py and deepseek_v3/modeling_deepseek_v3.py
(DeepseekV3Attention, yarn_apply_mscale, apply_rotary_pos_emb_interleave).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlmkit.config import LMConfig
from vlmkit.models.lm import KVCache, RMSNorm
from vlmkit.models.rope import apply_rotary, rope_parameters

LATENT_NORM_EPS = 1e-6


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 * mscale * ln(scale) + 1 (1 when scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(cfg: LMConfig) -> float:
    """(dn + dr)^-0.5, times mscale(factor, mscale_all_dim)^2 under scaled RoPE with mscale_all_dim set
    (DeepSeek's YaRN: part of the temperature goes to the logits, the rest to cos/sin in models/rope.py)."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    params = rope_parameters(cfg)
    all_dim = params.get("mscale_all_dim") or 0
    if params["rope_type"] != "default" and all_dim:
        scale *= yarn_mscale(params["factor"], all_dim) ** 2
    return scale


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """(..., d) channels (x0, x1, x2, x3, ...) -> (x0, x2, ..., x1, x3, ...): DeepSeek's RoPE pairs (2i, 2i+1)
    become the (i, i + d/2) pairs apply_rotary rotates."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


class LatentAttention(nn.Module):
    """MLA with the forward signature of models/lm.py's Attention (x, cos, signed sin, mask, cache)."""

    def __init__(self, cfg: LMConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        C, self.nh = cfg.hidden_size, cfg.num_heads
        self.r, self.dn, self.dr, self.dv = cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        q_out = self.nh * (self.dn + self.dr)
        if cfg.q_lora_rank:
            self.q_a = nn.Linear(C, cfg.q_lora_rank, bias=cfg.qkv_bias)
            self.q_norm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b = nn.Linear(cfg.q_lora_rank, q_out, bias=False)
        else:
            self.q_proj = nn.Linear(C, q_out, bias=False)
        self.kv_a = nn.Linear(C, self.r + self.dr, bias=cfg.qkv_bias)
        self.kv_norm = RMSNorm(self.r, LATENT_NORM_EPS)
        self.kv_b = nn.Linear(self.r, self.nh * (self.dn + self.dv), bias=False)
        self.out = nn.Linear(self.nh * self.dv, C, bias=cfg.o_bias)
        self.interleaved = cfg.rope_interleave
        self.scale = softmax_scale(cfg)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T, nh, dn + dr)."""
        q = self.q_b(self.q_norm(self.q_a(x))) if hasattr(self, "q_a") else self.q_proj(x)
        return q.view(*x.shape[:2], self.nh, self.dn + self.dr)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor,
                mask: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q_nope, q_rot = self.queries(x).split([self.dn, self.dr], dim=-1)  # (B, T, nh, dn), (B, T, nh, dr)
        latent, k_rot = self.kv_a(x).split([self.r, self.dr], dim=-1)  # (B, T, r), (B, T, dr)
        latent = self.kv_norm(latent).unsqueeze(1)  # (B, 1, T, r)
        k_rot = k_rot.unsqueeze(2)  # (B, T, 1, dr): one RoPE key head for all heads
        if self.interleaved:
            q_rot, k_rot = deinterleave(q_rot), deinterleave(k_rot)
        q_rot = apply_rotary(q_rot, cos, sin_signed)  # cos, sin: (B, T, 1, dr)
        k_rot = apply_rotary(k_rot, cos, sin_signed).transpose(1, 2)  # (B, 1, T, dr)
        if cache is not None:
            latent, k_rot = cache.update(self.layer, latent, k_rot)  # (B, 1, S, r), (B, 1, S, dr); S = cached + T
        S = latent.shape[2]
        kv = self.kv_b(latent[:, 0]).view(B, S, self.nh, self.dn + self.dv).transpose(1, 2)  # (B, nh, S, dn + dv)
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)  # (B, nh, S, dn), (B, nh, S, dv)
        k = torch.cat((k_nope, k_rot.expand(B, self.nh, S, self.dr)), dim=-1)  # (B, nh, S, dn + dr)
        q = torch.cat((q_nope, q_rot), dim=-1).transpose(1, 2)  # (B, nh, T, dn + dr)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           scale=self.scale)  # (B, nh, T, dv)
        return self.out(y.transpose(1, 2).reshape(B, T, self.nh * self.dv))


if __name__ == "__main__":
    cfg = LMConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                   kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12,
                   rope_interleave=True)
    from vlmkit.models.lm import CausalLM

    print("logits", tuple(CausalLM(cfg)(torch.randint(0, 100, (2, 7))).logits.shape))  # (2, 7, 100)
