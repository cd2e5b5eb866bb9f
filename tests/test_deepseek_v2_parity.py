"""DeepSeek-V2/V3 language models (models/mla.py, models/moe.py routing, weights/deepseek_v2.py) against transformers.

Tiny random DeepseekV2ForCausalLM / DeepseekV3ForCausalLM models (every weight perturbed, the V3
correction bias random so that it changes the routing) are saved, loaded through vlmkit's common
loader, and compared: logits (fp32, <= 1e-4) on plain and left-padded batches, a KV-cached decode
fed one token at a time, 20 greedy tokens (vlmkit.generate with its latent KV cache against
transformers' generate), and vlmkit's save read back by transformers. The cases cover latent
attention with and without the query bottleneck, interleaved and rotate-half RoPE, YaRN with
DeepSeek's mscale, and the routing variants transformers has: greedy softmax with a routed scale,
group-limited greedy, and noaux_tc over sigmoid scores with group selection and renormalisation.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_deepseek_v2_parity.py
"""

from __future__ import annotations

import pytest
import torch
from lm_parity import (
    TOL,
    check_greedy_generation,
    check_left_padded_logits,
    check_logits,
    check_reloaded_logits,
    padded_batch,
)

from vlmkit.weights import from_pretrained, save_pretrained
from vlmkit.models.lm import CausalLM
from vlmkit.models.mla import LatentAttention
from vlmkit.models.moe import MoE
from vlmkit.weights.deepseek_v2 import config_from_hf

transformers = pytest.importorskip("transformers")

VOCAB = 96
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=4, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
            n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2, max_position_embeddings=128,
            pad_token_id=0, bos_token_id=1, eos_token_id=None)  # no eos: 20 tokens on both sides
CASES = {
    # q bottleneck, greedy softmax routing with a routed scale, one dense layer first.
    "v2_qlora_greedy": ("DeepseekV2", dict(TINY, q_lora_rank=16, topk_method="greedy", first_k_dense_replace=1,
                                            routed_scaling_factor=1.5)),
    # full q projection, group-limited greedy (4 groups of 2, best 2 groups), YaRN with DeepSeek's mscale.
    "v2_group_yarn": ("DeepseekV2", dict(TINY, q_lora_rank=None, topk_method="group_limited_greedy", n_group=4,
                                          topk_group=2, num_experts_per_tok=3, first_k_dense_replace=0,
                                          rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                           "original_max_position_embeddings": 32, "mscale": 0.8,
                                                           "mscale_all_dim": 0.8, "beta_fast": 16, "beta_slow": 1})),
    # noaux_tc: sigmoid scores + correction bias, 4 groups scored by their best two, top 2 groups, interleaved RoPE.
    "v3_noaux_interleave": ("DeepseekV3", dict(TINY, q_lora_rank=16, n_group=4, topk_group=2, num_experts_per_tok=3,
                                                first_k_dense_replace=1, norm_topk_prob=True,
                                                routed_scaling_factor=2.5, rope_interleave=True, num_mtp_layers=0,
                                                num_key_value_heads=4)),
    # DeepSeek-VL2's routing shape: one group, noaux_tc, rotate-half RoPE, no q bottleneck.
    "v3_one_group_rotate_half": ("DeepseekV3", dict(TINY, q_lora_rank=None, n_group=1, topk_group=1,
                                                     first_k_dense_replace=1, norm_topk_prob=True,
                                                     routed_scaling_factor=2.0, rope_interleave=False,
                                                     num_mtp_layers=0, num_key_value_heads=4)),
}


def _hf_model(kind: str, kwargs: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{kind}Config")(**kwargs)
    model = getattr(transformers, f"{kind}ForCausalLM")(cfg).eval()
    with torch.no_grad():  # the 0.02 init routes almost uniformly; larger weights make routing decisive
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.15)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn_like(buffer) * 0.3)
    return model


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    """(transformers model, vlmkit model loaded from its save_pretrained directory, case id)."""
    hf = _hf_model(*CASES[request.param])
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, from_pretrained(path), request.param


def test_loaded_structure(pair):
    hf, ours, case = pair
    assert isinstance(ours, CausalLM)
    assert all(isinstance(layer.attn, LatentAttention) for layer in ours.layers)
    dense = hf.config.first_k_dense_replace
    assert [isinstance(layer.mlp, MoE) for layer in ours.layers] == [i >= dense for i in range(3)]
    cfg = ours.cfg
    assert cfg.rope_interleave == (case != "v3_one_group_rotate_half")
    assert cfg.shared_expert_intermediate_size == 32 and not cfg.shared_expert_gate
    expected = {"v2_qlora_greedy": "greedy", "v2_group_yarn": "group_limited_greedy"}.get(case, "noaux_tc")
    assert cfg.moe_topk_method == expected
    assert cfg.moe_scoring == ("sigmoid" if case.startswith("v3") else "softmax")


def test_logits_match(pair):
    hf, ours, case = pair
    check_logits(hf, ours, case, VOCAB, (9, 40))  # 40 > the YaRN case's original 32 positions


def test_left_padded_batch_matches(pair):
    check_left_padded_logits(*pair, *padded_batch([24, 13, 19], seed=1, vocab=VOCAB, low=3))


@torch.no_grad()
def test_kv_cached_decode_matches(pair):
    """Prefill 10 tokens into the latent cache, then 8 single-token steps: each step's logits equal
    transformers' full forward over the whole prefix."""
    hf, ours, case = pair
    ids = torch.randint(3, VOCAB, (2, 18), generator=torch.Generator().manual_seed(4))
    full = hf(ids).logits  # (2, 18, V)
    cache = ours.new_cache(2, 18)
    assert tuple(cache.keys[0].shape) == (2, 1, 18, 12) and tuple(cache.values[0].shape) == (2, 1, 18, 4)
    steps = [ours(ids[:, :10], cache=cache).logits]
    steps += [ours(ids[:, t:t + 1], cache=cache).logits for t in range(10, 18)]
    diff = (torch.cat(steps, dim=1) - full).abs().max().item()
    assert diff <= TOL, f"{case}: cached decode max |logits diff| = {diff}"


def test_greedy_generation_matches(pair):
    check_greedy_generation(*pair, *padded_batch([12, 7], seed=2, vocab=VOCAB, low=3))


def test_save_loads_in_transformers(pair, tmp_path):
    hf, ours, case = pair
    save_pretrained(ours, tmp_path)
    check_reloaded_logits(type(hf).from_pretrained(tmp_path).eval(), hf, case, VOCAB, 16)
    assert from_pretrained(tmp_path).cfg == ours.cfg


def test_deepseek_vl2_language_config_keys():
    """DeepSeek's own keys in a DeepSeek-VL2 language_config: scoring_func, topk_method noaux_tc,
    moe_layer_freq, use_mla=false (DeepSeek-VL2-Tiny's plain attention)."""
    base = dict(model_type="deepseek_v2", vocab_size=64, hidden_size=32, intermediate_size=64,
                moe_intermediate_size=16, num_hidden_layers=5, num_attention_heads=4, n_routed_experts=8,
                n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=1)
    cfg = config_from_hf(dict(base, topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
                              routed_scaling_factor=2.0, n_group=1, topk_group=1, moe_layer_freq=2,
                              kv_lora_rank=12, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=4,
                              v_head_dim=6))
    assert cfg.dense_layers == (0, 1, 3)  # layer 0 (first_k_dense_replace), then odd layers (moe_layer_freq 2)
    assert (cfg.moe_topk_method, cfg.moe_scoring, cfg.routed_scaling_factor) == ("noaux_tc", "sigmoid", 2.0)
    assert cfg.kv_lora_rank == 12 and cfg.q_lora_rank == 0 and cfg.rope_interleave
    tiny = config_from_hf(dict(base, use_mla=False, kv_lora_rank=None, q_lora_rank=None, qk_nope_head_dim=0,
                               qk_rope_head_dim=0, v_head_dim=0))
    assert tiny.kv_lora_rank == 0 and tiny.head_dim == 8 and tiny.rotary_dim == 8
    model = CausalLM(tiny)
    assert type(model.layers[0].attn).__name__ == "Attention"
    with pytest.raises(ValueError, match="noaux_tc over sigmoid"):
        config_from_hf(dict(base, model_type="deepseek_v3", topk_method="greedy", scoring_func="softmax"))
