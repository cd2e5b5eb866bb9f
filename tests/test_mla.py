"""Multi-head latent attention (models/mla.py) against the DeepSeek-V2 paper's equations written out here.

The oracle is a naive MLA (arXiv:2405.04434, sec. 2.1.2-2.1.3, eqs. 9-19): queries through the low-rank
bottleneck, keys and values up-projected from the normalised latent, RoPE as complex rotations of the
interleaved channel pairs (x_{2i} + i x_{2i+1}) * e^{i p theta_i} on the decoupled query channels and on the
one shared key head, softmax over (q_nope . k_nope + q_rope . k_rope) / sqrt(dn + dr) with a causal mask.
transformers parity is in tests/test_deepseek_v2_parity.py.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_mla.py
"""

from __future__ import annotations

import math

import pytest
import torch

from vlmkit.config import LMConfig
from vlmkit.models.lm import CausalLM
from vlmkit.models.mla import LatentAttention, softmax_scale
from vlmkit.models.rope import RotaryEmbedding, signed_sin

NH, DN, DR, DV, R, RQ, C = 3, 4, 6, 5, 7, 9, 24


def mla_cfg(**overrides) -> LMConfig:
    base = dict(vocab_size=50, hidden_size=C, intermediate_size=32, num_layers=2, num_heads=NH, kv_lora_rank=R,
                q_lora_rank=RQ, qk_nope_head_dim=DN, qk_rope_head_dim=DR, v_head_dim=DV, rope_interleave=True,
                rope_theta=100.0)
    return LMConfig(**{**base, **overrides})


def _rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def _rope_complex(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x (T, ..., dr) with pairs (x_{2i}, x_{2i+1}) rotated by angle p * theta^(-2i/dr); same layout back."""
    d = x.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (dr/2,)
    angles = positions[:, None].double() * freqs  # (T, dr/2)
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2).contiguous())  # (T, ..., dr/2)
    rot = torch.polar(torch.ones_like(angles), angles).view(angles.shape[0], *([1] * (z.dim() - 2)), d // 2)
    return torch.view_as_real(z * rot).flatten(-2).to(x.dtype)


def naive_mla(attn: LatentAttention, x: torch.Tensor, theta: float) -> torch.Tensor:
    """One sequence x (T, C) through the paper's MLA equations, from the module's weights."""
    T = x.shape[0]
    q = attn.q_b(_rms(attn.q_a(x), attn.q_norm.weight)).view(T, NH, DN + DR)  # eq. 12-13 (c_Q, then q^C and q^R)
    q_nope, q_rope = q[..., :DN], q[..., DN:]
    kv_a = attn.kv_a(x)
    latent, k_rope = _rms(kv_a[:, :R], attn.kv_norm.weight), kv_a[:, R:]  # eq. 9 c_KV, eq. 14 k^R (one head)
    kv = attn.kv_b(latent).view(T, NH, DN + DV)  # eq. 10-11: k^C and v^C from the latent
    k_nope, v = kv[..., :DN], kv[..., DN:]
    pos = torch.arange(T)
    q_rope, k_rope = _rope_complex(q_rope, pos, theta), _rope_complex(k_rope, pos, theta)
    scores = (torch.einsum("thd,shd->hts", q_nope, k_nope) + torch.einsum("thd,sd->hts", q_rope, k_rope))
    scores = scores / math.sqrt(DN + DR)  # eq. 17
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = torch.einsum("hts,shd->thd", scores.softmax(-1), v)  # (T, NH, DV)
    return attn.out(y.reshape(T, NH * DV))  # eq. 19


def _tables(cfg: LMConfig, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = RotaryEmbedding(cfg)(torch.arange(T)[None], torch.float32)  # (1, T, dr)
    return cos.unsqueeze(2), signed_sin(sin).unsqueeze(2)  # (1, T, 1, dr)


@torch.no_grad()
def test_latent_attention_matches_the_paper():
    torch.manual_seed(0)
    cfg = mla_cfg()
    attn = LatentAttention(cfg, layer=0)
    for p in attn.parameters():
        p.add_(torch.randn_like(p) * 0.2)
    x = torch.randn(11, C)
    got = attn(x[None], *_tables(cfg, 11), None, None)[0]
    torch.testing.assert_close(got, naive_mla(attn, x, cfg.rope_theta), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_rotate_half_layout_is_a_different_model():
    """Without rope_interleave the same weights rotate pairs (i, i + dr/2): not DeepSeek-V2's attention."""
    torch.manual_seed(0)
    cfg = mla_cfg(rope_interleave=False)
    attn = LatentAttention(cfg, layer=0)
    for p in attn.parameters():
        p.add_(torch.randn_like(p) * 0.2)
    x = torch.randn(11, C)
    got = attn(x[None], *_tables(cfg, 11), None, None)[0]
    assert (got - naive_mla(attn, x, cfg.rope_theta)).abs().max() > 1e-3


@torch.no_grad()
def test_latent_cache_holds_r_plus_dr_per_token():
    """The cache keeps the latent and the shared RoPE key, (R + DR) numbers per token and layer, and a decode
    fed token by token gives the full forward's logits."""
    torch.manual_seed(0)
    model = CausalLM(mla_cfg(q_lora_rank=0)).eval()
    cache = model.new_cache(1, 9)
    assert sum(k.numel() + v.numel() for k, v in zip(cache.keys, cache.values)) == 2 * 9 * (R + DR)
    ids = torch.randint(0, 50, (1, 9))
    steps = torch.cat([model(ids[:, t:t + 1], cache=cache).logits for t in range(9)], dim=1)
    torch.testing.assert_close(steps, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_yarn_softmax_scale():
    """DeepSeek's YaRN: the logits scale (dn + dr)^-0.5 grows by (0.1 * mscale_all_dim * ln(factor) + 1)^2."""
    plain = mla_cfg()
    assert softmax_scale(plain) == pytest.approx((DN + DR) ** -0.5)
    yarn = mla_cfg(rope_scaling={"rope_type": "yarn", "factor": 40.0, "mscale": 0.707, "mscale_all_dim": 0.707,
                                 "original_max_position_embeddings": 4096})
    assert softmax_scale(yarn) == pytest.approx((DN + DR) ** -0.5 * (0.1 * 0.707 * math.log(40) + 1) ** 2)


def test_mla_config_validated():
    assert mla_cfg().rotary_dim == DR
    with pytest.raises(ValueError, match="only apply to multi-head latent attention"):
        LMConfig(vocab_size=50, hidden_size=C, intermediate_size=32, num_layers=1, num_heads=NH, v_head_dim=4)
    with pytest.raises(ValueError, match="set num_kv_heads = num_heads"):
        mla_cfg(num_kv_heads=1)
    with pytest.raises(ValueError, match="qk_rope_head_dim must be positive and even"):
        mla_cfg(qk_rope_head_dim=5)
    with pytest.raises(ValueError, match="v_head_dim must be positive"):
        mla_cfg(v_head_dim=0)
