"""Mixture-of-experts LM (models/moe.py, weights/qwen2_moe.py) against transformers' Qwen2-MoE and hand checks.

The routing and block tests compute the expected result by hand (softmax over
logits chosen to give round probabilities; each chosen expert's SwiGLU written
out). The parity tests build tiny random Qwen2MoeForCausalLM models, save them,
load them through the qwen2_moe converter and compare logits, left-padded
batches, 20-token greedy generation (vlmkit.generate with the KV cache against
transformers' generate) and the way back (vlmkit's save loads in transformers).

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_moe.py
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from lm_parity import (
    check_greedy_generation,
    check_left_padded_logits,
    check_logits,
    check_reloaded_logits,
    padded_batch,
)

from vlmkit.config import LMConfig
from vlmkit.models.lm import CausalLM
from vlmkit.models.moe import MoE, route
from vlmkit.weights.hf import load_state
from vlmkit.weights.qwen2_moe import QWEN2_MOE, config_from_hf
from vlmkit.weights.safetensors_io import read_config, read_state_dict, write_dir

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, Qwen2MoeConfig  # noqa: E402

VOCAB = 128
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=48, max_position_embeddings=64, pad_token_id=0)
CASES = {
    "top2": dict(TINY),
    # norm_topk_prob on; layer 1 keeps the dense MLP (mlp_only_layers), layers 0 and 2 are sparse.
    "top2_norm_dense_layer": dict(TINY, num_hidden_layers=3, norm_topk_prob=True, mlp_only_layers=[1]),
}


def load_qwen2_moe(path) -> CausalLM:
    """What vlmkit.models.from_pretrained does once qwen2_moe is registered in weights/hf.py."""
    cfg = QWEN2_MOE.config_from_hf(read_config(path))
    model = QWEN2_MOE.build(cfg)
    load_state(model, QWEN2_MOE.state_from_hf(read_state_dict(path), cfg), str(path))
    return model.eval()


def tiny_cfg(**overrides) -> LMConfig:
    base = dict(vocab_size=16, hidden_size=2, intermediate_size=4, num_layers=1, num_heads=1, num_experts=3,
                num_experts_per_tok=2, moe_intermediate_size=1)
    return LMConfig(**{**base, **overrides})


# ----------------------------------------------------------------------------- routing by hand


def test_route_hand_checked():
    # Token 0: exp(logits) = [4, 2, 1] -> p = [4/7, 2/7, 1/7]. Token 1: [1/2, 3, 1] -> p = [1/9, 2/3, 2/9].
    logits = torch.tensor([[math.log(4), math.log(2), 0.0], [-math.log(2), math.log(3), 0.0]])
    weights, experts = route(logits, top_k=2, norm_topk_prob=False)
    assert experts.tolist() == [[0, 1], [1, 2]]
    torch.testing.assert_close(weights, torch.tensor([[4 / 7, 2 / 7], [2 / 3, 2 / 9]]))
    weights, experts = route(logits, top_k=2, norm_topk_prob=True)
    assert experts.tolist() == [[0, 1], [1, 2]]
    torch.testing.assert_close(weights, torch.tensor([[2 / 3, 1 / 3], [3 / 4, 1 / 4]]))
    weights, experts = route(logits, top_k=1, norm_topk_prob=True)
    assert experts.tolist() == [[0], [1]] and weights.tolist() == [[1.0], [1.0]]


def _pairs(weights: torch.Tensor, experts: torch.Tensor) -> list[list[tuple[int, float]]]:
    """Each token's (expert, weight) pairs sorted by expert id: the picks, whatever topk's order."""
    return [sorted(zip(e.tolist(), w.tolist())) for w, e in zip(weights, experts)]


def test_group_limited_greedy_hand_checked():
    """DeepSeek-V2 sec. 2.2.2 (device-limited routing): 3 groups of 2 experts, a group scored by its best
    expert. p = [.30, .05 | .25, .20 | .10, .10]: plain top-2 takes experts 0 and 2; limited to the best
    group (topk_group=1) it must take 0 and 1; with 2 groups, 0 and 2 again. Weights are p, times the scale."""
    p = torch.tensor([[0.30, 0.05, 0.25, 0.20, 0.10, 0.10]])
    kw = dict(method="group_limited_greedy", n_group=3, scaling=2.0)
    got = _pairs(*route(p.log(), top_k=2, norm_topk_prob=False, topk_group=1, **kw))
    assert got == [[(0, pytest.approx(0.60)), (1, pytest.approx(0.10))]]
    got = _pairs(*route(p.log(), top_k=2, norm_topk_prob=False, topk_group=2, **kw))
    assert got == [[(0, pytest.approx(0.60)), (2, pytest.approx(0.50))]]


def test_noaux_tc_hand_checked():
    """DeepSeek-V3 sec. 2.1.2: sigmoid scores s; the bias b only chooses (s + b), the weights are s, renormalised,
    times the routed scale. s = [.9, .3 | .6, .5], b = [0, 0, 0, .3], groups scored by their two best:
    without b group 0 wins (1.2 > 1.1), with b group 1 (0.6 + 0.8 = 1.4): experts 2 and 3, weights
    2.5 * [.6, .5] / 1.1."""
    s = torch.tensor([[0.9, 0.3, 0.6, 0.5]])
    logits = torch.log(s / (1 - s))  # sigmoid(logits) = s
    kw = dict(scoring="sigmoid", method="noaux_tc", n_group=2, topk_group=1, scaling=2.5)
    no_bias = route(logits, top_k=2, norm_topk_prob=True, correction_bias=torch.zeros(4), **kw)
    assert _pairs(*no_bias) == [[(0, pytest.approx(2.5 * 0.75)), (1, pytest.approx(2.5 * 0.25))]]
    bias = torch.tensor([0.0, 0.0, 0.0, 0.3])
    got = _pairs(*route(logits, top_k=2, norm_topk_prob=True, correction_bias=bias, **kw))
    assert got == [[(2, pytest.approx(2.5 * 0.6 / 1.1)), (3, pytest.approx(2.5 * 0.5 / 1.1))]]
    greedy = route(logits, top_k=2, norm_topk_prob=False, scoring="sigmoid")  # plain sigmoid top-2: experts 0, 2
    assert _pairs(*greedy) == [[(0, pytest.approx(0.9)), (2, pytest.approx(0.6))]]


def test_deepseek_routing_validated():
    base = dict(num_experts=6, num_experts_per_tok=2)
    assert tiny_cfg(**base, moe_topk_method="noaux_tc", moe_n_group=3, moe_scoring="sigmoid").moe_n_group == 3
    with pytest.raises(ValueError, match="moe_topk_method 'top1' unknown"):
        tiny_cfg(**base, moe_topk_method="top1")
    with pytest.raises(ValueError, match="moe_scoring 'relu' unknown"):
        tiny_cfg(**base, moe_scoring="relu")
    with pytest.raises(ValueError, match="moe_n_group 4 must be >= 1 and divide num_experts 6"):
        tiny_cfg(**base, moe_n_group=4)
    with pytest.raises(ValueError, match="2 reachable"):  # one group of 2 cannot give 3 experts
        tiny_cfg(num_experts=6, num_experts_per_tok=3, moe_topk_method="group_limited_greedy", moe_n_group=3)
    with pytest.raises(ValueError, match="two best experts"):
        tiny_cfg(**base, moe_topk_method="noaux_tc", moe_n_group=6, moe_topk_group=2)
    with pytest.raises(ValueError, match="only apply to a mixture of experts"):
        LMConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 routed_scaling_factor=2.0)


def _swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down * silu(gate . x) * (up . x) for one token x (C,), gate/up (C,), down (C,): width-1 expert."""
    return down * F.silu(gate @ x) * (up @ x)


@pytest.mark.parametrize("norm", [False, True])
@torch.no_grad()
def test_moe_block_hand_checked(norm):
    """Two tokens, three width-1 experts, top-2, a sigmoid-gated shared expert; expected output by hand."""
    cfg = tiny_cfg(norm_topk_prob=norm, shared_expert_intermediate_size=1, shared_expert_gate=True)
    block = MoE(cfg)
    block.router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))  # logits = [x0, x1, 0]
    gates = torch.tensor([[1.0, 0.5], [-0.5, 1.0], [0.3, 0.3]])  # (E, C) one gate row per expert
    ups = torch.tensor([[0.5, 1.0], [1.0, -1.0], [2.0, 0.1]])
    downs = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.2, -0.3]])  # (E, C): the (C, 1) down columns
    block.experts_gate_up.copy_(torch.stack([gates, ups], dim=1))  # (E, 2, C)
    block.experts_down.copy_(downs.unsqueeze(-1))  # (E, C, 1)
    shared_gate_up = torch.tensor([[0.7, -0.2], [0.4, 0.9]])
    block.shared.gate_up.weight.copy_(shared_gate_up)
    block.shared.down.weight.copy_(torch.tensor([[1.5], [-0.5]]))
    block.shared_gate.weight.copy_(torch.tensor([[0.25, -1.0]]))

    x = torch.tensor([[math.log(4), math.log(2)], [-math.log(2), math.log(3)]])  # routed as in test_route
    picks = {0: [(0, 4 / 7), (1, 2 / 7)], 1: [(1, 2 / 3), (2, 2 / 9)]}
    expected = []
    for t, chosen in picks.items():
        total = sum(w for _, w in chosen) if norm else 1.0
        y = sum(w / total * _swiglu(x[t], gates[e], ups[e], downs[e]) for e, w in chosen)
        shared = torch.tensor([1.5, -0.5]) * F.silu(shared_gate_up[0] @ x[t]) * (shared_gate_up[1] @ x[t])
        expected.append(y + torch.sigmoid(torch.tensor([0.25, -1.0]) @ x[t]) * shared)
    got = block(x.view(1, 2, 2))  # (B=1, T=2, C=2)
    torch.testing.assert_close(got[0], torch.stack(expected))


@torch.no_grad()
def test_unpicked_expert_never_runs():
    """An expert no token picks is not computed: NaN weights there leave the output finite."""
    cfg = tiny_cfg(num_experts_per_tok=1)
    block = MoE(cfg)
    block.router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-5.0, -5.0]]))
    block.experts_gate_up[2] = float("nan")
    block.experts_down[2] = float("nan")
    x = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [1.0, 1.5]]])  # (1, 3, 2): experts 0, 1, 1
    assert torch.isfinite(block(x)).all()


# ----------------------------------------------------------------------------- config


def test_dense_config_unchanged_and_moe_validated():
    dense = LMConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4)
    assert dense.num_experts == 0 and not any(dense.is_moe_layer(i) for i in range(2))
    moe = tiny_cfg(num_layers=3, shared_expert_intermediate_size=4, shared_expert_gate=True, dense_layers=[1])
    assert LMConfig.from_dict(json.loads(json.dumps(moe.to_dict()))) == moe
    assert [moe.is_moe_layer(i) for i in range(3)] == [True, False, True]
    with pytest.raises(ValueError, match="only apply to a mixture of experts"):
        LMConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 norm_topk_prob=True)
    with pytest.raises(ValueError, match="num_experts_per_tok must be in 1..num_experts"):
        tiny_cfg(num_experts_per_tok=4)
    with pytest.raises(ValueError, match="moe_intermediate_size must be positive"):
        tiny_cfg(moe_intermediate_size=0)
    with pytest.raises(ValueError, match="shared_expert_gate needs a shared expert"):
        tiny_cfg(shared_expert_gate=True)
    with pytest.raises(ValueError, match=r"dense_layers \[5\] are out of range"):
        tiny_cfg(dense_layers=(5,))


def test_sparse_layers_from_hf_config():
    """Qwen2MoeDecoderLayer: sparse iff not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0."""
    hf_cfg = Qwen2MoeConfig(**dict(TINY, num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3]))
    reference = AutoModelForCausalLM.from_config(hf_cfg)
    sparse = [type(layer.mlp).__name__ == "Qwen2MoeSparseMoeBlock" for layer in reference.model.layers]
    assert sparse == [False, True, False, False, False, True]  # step 2 -> layers 1, 3, 5; 3 is mlp-only
    hf = hf_cfg.to_dict()
    cfg = config_from_hf(hf)
    assert [cfg.is_moe_layer(i) for i in range(6)] == sparse
    assert cfg.dense_layers == (0, 2, 3, 4)
    with pytest.raises(ValueError, match="decoder_sparse_step must be >= 1"):
        config_from_hf({**hf, "decoder_sparse_step": 0})


# ----------------------------------------------------------------------------- parity with transformers


def _randomize(model: torch.nn.Module) -> None:
    """Replace transformers' tiny init so every tensor matters; a wider router makes routing decisive."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
            else:
                p.normal_(0, 0.15)


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    """(transformers model, vlmkit model loaded from its save_pretrained directory, case id)."""
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(Qwen2MoeConfig(**CASES[request.param]))
    _randomize(hf)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf.eval(), load_qwen2_moe(path), request.param


def test_loaded_structure(pair):
    _, ours, case = pair
    sparse = [type(layer.mlp).__name__ for layer in ours.layers]
    assert sparse == (["MoE", "MoE"] if case == "top2" else ["MoE", "MLP", "MoE"])
    assert ours.cfg.norm_topk_prob == (case != "top2")


def test_logits_match(pair):
    hf, ours, case = pair
    check_logits(hf, ours, case, VOCAB, (10, 24))


def test_left_padded_batch_matches(pair):
    check_left_padded_logits(*pair, *padded_batch([24, 13, 19], seed=1, vocab=VOCAB))


def test_greedy_generation_matches(pair):
    check_greedy_generation(*pair, *padded_batch([12, 7], seed=2, vocab=VOCAB))


@torch.no_grad()
def test_save_loads_in_transformers(pair, tmp_path):
    hf, ours, case = pair
    cfg = ours.cfg
    write_dir(tmp_path, QWEN2_MOE.config_to_hf(cfg), QWEN2_MOE.state_to_hf(ours.state_dict(), cfg),
              2 * 1024**3)
    check_reloaded_logits(AutoModelForCausalLM.from_pretrained(tmp_path).eval(), hf, case, VOCAB, 16)
    assert load_qwen2_moe(tmp_path).cfg == cfg


def test_save_refuses_what_qwen2_moe_cannot_express():
    cfg = dataclasses.replace(tiny_cfg(), shared_expert_intermediate_size=0)
    with pytest.raises(ValueError, match="sigmoid-gated shared expert"):
        QWEN2_MOE.config_to_hf(cfg)


def test_moe_directories_go_through_the_common_loader(tmp_path):
    from vlmkit.weights import from_pretrained, save_pretrained

    torch.manual_seed(0)
    cfg = transformers.Qwen2MoeConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64, num_experts=4,
                                      num_experts_per_tok=2, moe_intermediate_size=16,
                                      shared_expert_intermediate_size=24)
    hf = transformers.Qwen2MoeForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = from_pretrained(tmp_path / "hf")
    assert ours.cfg.num_experts == 4
    save_pretrained(ours, tmp_path / "ours")
    back = transformers.Qwen2MoeForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        expected = hf(ids).logits
        assert (ours(ids).logits - expected).abs().max().item() <= 1e-4
        assert torch.equal(back(ids).logits, expected)
