"""RoPE scaling variants: vlmkit's inv_freq, attention scaling and cos/sin against transformers' rotary embeddings.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_rope.py
"""

from __future__ import annotations

import math

import pytest
import torch

from vlmkit.config import LMConfig
from vlmkit.models.rope import RotaryEmbedding, rope_inv_freq

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, Phi3Config  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding  # noqa: E402

HIDDEN, HEADS, MAX_POS, THETA = 128, 4, 64, 10000.0  # head_dim 32: 16 frequencies

# Each case: (id, rope_scaling as LMConfig holds it, partial_rotary_factor).
LLAMA_CASES = [
    ("linear", {"rope_type": "linear", "factor": 4.0}, 1.0),
    ("llama3", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}, 1.0),
    ("yarn", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}, 1.0),
    ("yarn_no_truncate", {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 20,
                          "truncate": False, "beta_fast": 16, "beta_slow": 2}, 1.0),
    ("yarn_mscale", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                     "mscale": 0.707, "mscale_all_dim": 1.0}, 1.0),
    ("yarn_attention_factor", {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32,
                               "attention_factor": 0.9}, 1.0),
    ("yarn_partial", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}, 0.5),
    ("linear_partial", {"rope_type": "linear", "factor": 2.0}, 0.5),
]


def _lm_config(scaling: dict | None, partial: float = 1.0, max_pos: int = MAX_POS) -> LMConfig:
    return LMConfig(vocab_size=10, hidden_size=HIDDEN, intermediate_size=8, num_layers=1, num_heads=HEADS,
                    rope_theta=THETA, rope_scaling=scaling, partial_rotary_factor=partial,
                    max_position_embeddings=max_pos)


def _hf_llama_rope(scaling: dict | None, partial: float = 1.0) -> LlamaRotaryEmbedding:
    params = {"rope_theta": THETA, "rope_type": "default", **(scaling or {})}
    if partial != 1.0:
        params["partial_rotary_factor"] = partial
    cfg = LlamaConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, max_position_embeddings=MAX_POS,
                      rope_parameters=params)
    return LlamaRotaryEmbedding(cfg)


def _assert_tables_equal(ours: RotaryEmbedding, ref: torch.nn.Module, position_ids: torch.Tensor) -> None:
    x = torch.zeros(1, dtype=torch.float32)
    cos_ref, sin_ref = ref(x, position_ids)
    cos, sin = ours(position_ids, torch.float32)
    assert cos.shape == cos_ref.shape
    torch.testing.assert_close(cos, cos_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, sin_ref, atol=1e-6, rtol=0)


def test_default_matches_transformers():
    cfg = _lm_config(None)
    ref = _hf_llama_rope(None)
    inv_freq, scale = rope_inv_freq(cfg)
    torch.testing.assert_close(inv_freq, ref.inv_freq, atol=0, rtol=1e-7)
    assert scale == 1.0
    _assert_tables_equal(RotaryEmbedding(cfg), ref, torch.arange(100)[None])


def test_default_by_hand():
    """inv_freq[i] = theta ** (-2i / d): with d = 4, theta = 100 that is [1, 0.1]."""
    cfg = LMConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2, rope_theta=100.0)
    inv_freq, _ = rope_inv_freq(cfg)
    torch.testing.assert_close(inv_freq, torch.tensor([1.0, 0.1]))


@pytest.mark.parametrize("case", LLAMA_CASES, ids=[c[0] for c in LLAMA_CASES])
def test_variant_matches_transformers(case):
    _, scaling, partial = case
    cfg = _lm_config(scaling, partial)
    ref = _hf_llama_rope(scaling, partial)
    inv_freq, scale = rope_inv_freq(cfg)
    torch.testing.assert_close(inv_freq, ref.inv_freq, atol=0, rtol=1e-6)
    assert scale == pytest.approx(ref.attention_scaling, rel=1e-12)
    positions = torch.stack([torch.arange(90), torch.arange(10, 100)])  # (2, 90), past max_position_embeddings
    _assert_tables_equal(RotaryEmbedding(cfg), ref, positions)


def test_linear_by_hand():
    """Linear scaling divides every frequency by factor."""
    plain, _ = rope_inv_freq(_lm_config(None))
    scaled, _ = rope_inv_freq(_lm_config({"rope_type": "linear", "factor": 4.0}))
    torch.testing.assert_close(scaled, plain / 4)


def test_llama3_keeps_high_and_divides_low_frequencies():
    """Wavelengths below original/high_freq_factor are untouched, above original/low_freq_factor divided."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    plain, _ = rope_inv_freq(_lm_config(None))
    scaled, _ = rope_inv_freq(_lm_config(scaling))
    wavelen = 2 * math.pi / plain
    torch.testing.assert_close(scaled[wavelen < 4], plain[wavelen < 4])
    torch.testing.assert_close(scaled[wavelen > 16], plain[wavelen > 16] / 8)


def test_legacy_type_key_is_accepted():
    """Old configs say {"type": "linear"} instead of {"rope_type": "linear"}."""
    new, _ = rope_inv_freq(_lm_config({"rope_type": "linear", "factor": 2.0}))
    old, _ = rope_inv_freq(_lm_config({"type": "linear", "factor": 2.0}))
    torch.testing.assert_close(new, old)


def test_missing_parameter_is_a_clear_error():
    with pytest.raises(ValueError, match="low_freq_factor"):
        rope_inv_freq(_lm_config({"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}))


def test_dynamic_follows_transformers_across_calls():
    """Dynamic NTK depends on the longest sequence seen: it grows, stays stretched for shorter calls
    above max_position_embeddings, and resets once a call is shorter than it (transformers' rule)."""
    scaling = {"rope_type": "dynamic", "factor": 2.0}
    cfg = _lm_config(scaling)
    ours, ref = RotaryEmbedding(cfg), _hf_llama_rope(scaling)
    for length in (10, 64, 80, 120, 100, 200, 30, 150, 150, 20):  # MAX_POS = 64
        positions = torch.arange(length)[None]
        _assert_tables_equal(ours, ref, positions)
        _assert_tables_equal(ours, ref, positions[:, -1:])  # one decode step at the last position
        torch.testing.assert_close(ours.inv_freq, ref.inv_freq, atol=0, rtol=1e-6)


def test_dynamic_by_hand():
    """theta' = theta * (factor * L / L_max - (factor - 1)) ** (d / (d - 2)); no change up to L_max."""
    cfg = _lm_config({"rope_type": "dynamic", "factor": 2.0})
    d = cfg.rotary_dim
    at_max, _ = rope_inv_freq(cfg, seq_len=MAX_POS)
    torch.testing.assert_close(at_max, rope_inv_freq(_lm_config(None))[0])
    stretched, _ = rope_inv_freq(cfg, seq_len=2 * MAX_POS)
    theta = THETA * 3.0 ** (d / (d - 2))
    torch.testing.assert_close(stretched, 1.0 / theta ** (torch.arange(0, d, 2).float() / d))


def _phi3_longrope(partial: float, factor_override: dict) -> tuple[LMConfig, Phi3RotaryEmbedding]:
    rotary = int(HIDDEN // HEADS * partial)
    short = [1.0 + 0.05 * i for i in range(rotary // 2)]
    long = [1.0 + 0.5 * i for i in range(rotary // 2)]
    scaling = {"rope_type": "longrope", "short_factor": short, "long_factor": long,
               "original_max_position_embeddings": 16, **factor_override}
    hf_cfg = Phi3Config(vocab_size=10, hidden_size=HIDDEN, num_attention_heads=HEADS,
                        max_position_embeddings=MAX_POS, original_max_position_embeddings=16,
                        rope_parameters={"rope_theta": THETA, "partial_rotary_factor": partial, **scaling},
                        pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return _lm_config(scaling, partial), Phi3RotaryEmbedding(hf_cfg)


@pytest.mark.parametrize("partial", [1.0, 0.75])
@pytest.mark.parametrize("override", [{}, {"attention_factor": 1.2}], ids=["inferred_scale", "given_scale"])
def test_longrope_switches_factors_like_transformers(partial, override):
    cfg, ref = _phi3_longrope(partial, override)
    ours = RotaryEmbedding(cfg)
    assert ours.attention_scaling == pytest.approx(ref.attention_scaling, rel=1e-12)
    if not override:  # sqrt(1 + ln(64 / 16) / ln(16)) = sqrt(1.5)
        assert ours.attention_scaling == pytest.approx(math.sqrt(1.5))
    for length in (8, 16, 17, 40, 12):  # short factors up to original_max_position_embeddings (16), long beyond
        positions = torch.arange(length)[None]
        _assert_tables_equal(ours, ref, positions)
        _assert_tables_equal(ours, ref, positions[:, -1:])


def test_longrope_factor_length_is_checked():
    cfg = _lm_config({"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 3,
                      "original_max_position_embeddings": 16})
    with pytest.raises(ValueError, match="short_factor has 3 entries"):
        RotaryEmbedding(cfg)


def test_tables_stay_fp32_under_bf16():
    """model.to(bfloat16) must not round the frequencies: cos/sin are computed in fp32, then cast."""
    cfg = _lm_config({"rope_type": "linear", "factor": 2.0})
    rope = RotaryEmbedding(cfg).to(torch.bfloat16)
    positions = torch.arange(1000, 1010)[None]
    cos, _ = rope(positions, torch.bfloat16)
    cos_ref, _ = RotaryEmbedding(cfg)(positions, torch.float32)
    assert rope.inv_freq.dtype == torch.float32
    torch.testing.assert_close(cos, cos_ref.to(torch.bfloat16), atol=0, rtol=0)
