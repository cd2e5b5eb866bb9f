"""Mixture-of-experts feed-forward block: routed top-k SwiGLU experts plus always-on shared experts.

    p = softmax(router(x))                                  # (N, E) over the routed experts
    w, e = topk(p, k)                                       # (N, k) weights and expert ids per token
    w = w / w.sum(-1) if norm_topk_prob                     # renormalise the k weights to sum to 1
    y = sum_j w_j * expert_{e_j}(x)                         # each expert a SwiGLU of width moe_intermediate_size
    y = y + g * shared(x), g = sigmoid(shared_gate(x))      # Qwen2-MoE; g = 1 without the gate (DeepSeek)

This is transformers' Qwen2MoeSparseMoeBlock (models/qwen2_moe/modeling_qwen2_moe.py:
Qwen2MoeTopKRouter, Qwen2MoeExperts). DeepSeek-style several shared experts are one
SwiGLU whose width is their sum (transformers' DeepseekV2 builds them that way), so
shared_expert_intermediate_size covers both. Only the experts that received tokens run:
each gathers its tokens (index_select), and its weighted output is scattered back
(index_add_), so the cost is k expert MLPs per token rather than all E.

Routed expert weights are stored stacked, with gate and up fused like models/lm.py's MLP:
`experts_gate_up` (E, 2 I, C) holds [gate; up] and `experts_down` (E, C, I).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlmkit.config import LMConfig
from vlmkit.models.activations import ACTIVATIONS
from vlmkit.models.lm import MLP


def route(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each token's top_k experts from router logits (N, E): (weights (N, k), expert ids (N, k)).

    Weights are the softmax probabilities (computed in fp32) of the chosen experts, in
    descending order, renormalised to sum to 1 when norm_topk_prob; they come back in
    the logits' dtype. Example: logits [[0, ln 3, ln 2, ln 4]] -> p = [.1, .3, .2, .4];
    top-2 picks experts [3, 1] with weights [.4, .3], or [4/7, 3/7] renormalised.
    """
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)  # (N, E)
    weights, experts = torch.topk(probs, top_k, dim=-1)  # (N, k) each
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)  # (N, k)
    return weights.to(router_logits.dtype), experts


class MoE(nn.Module):
    """Routed top-k experts plus an optional (sigmoid-gated) shared expert; a drop-in for lm.MLP."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        E, C, inter = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.router = nn.Linear(C, E, bias=False)
        self.experts_gate_up = nn.Parameter(torch.empty(E, 2 * inter, C))  # [gate; up] per expert
        self.experts_down = nn.Parameter(torch.empty(E, C, inter))
        bound = C ** -0.5  # nn.Linear's default init range for the experts, so a fresh model is usable
        nn.init.uniform_(self.experts_gate_up, -bound, bound)
        nn.init.uniform_(self.experts_down, -inter ** -0.5, inter ** -0.5)
        self.act = ACTIVATIONS[cfg.hidden_act]
        shared = cfg.shared_expert_intermediate_size
        self.shared = MLP(cfg, shared) if shared else None
        self.shared_gate = nn.Linear(C, 1, bias=False) if cfg.shared_expert_gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, C), N = B * T tokens
        weights, experts = route(self.router(flat), self.top_k, self.norm_topk_prob)  # (N, k) each
        out = torch.zeros_like(flat)  # (N, C)
        counts = torch.bincount(experts.flatten(), minlength=self.experts_gate_up.shape[0])  # (E,)
        for e in counts.nonzero().flatten().tolist():  # only experts that received tokens
            token, slot = torch.nonzero(experts == e, as_tuple=True)  # (n_e,) each: which token, which of its k
            h = flat.index_select(0, token)  # (n_e, C)
            gate, up = F.linear(h, self.experts_gate_up[e]).chunk(2, dim=-1)  # (n_e, I) each
            y = F.linear(self.act(gate) * up, self.experts_down[e])  # (n_e, C)
            out.index_add_(0, token, y * weights[token, slot].unsqueeze(-1))  # (N, C)
        if self.shared is not None:
            shared = self.shared(flat)  # (N, C)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(flat)) * shared  # (N, 1) * (N, C)
            out = out + shared
        return out.view(shape)  # (B, T, C)


if __name__ == "__main__":
    cfg = LMConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                   num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                   shared_expert_intermediate_size=48, shared_expert_gate=True)
    print("moe", tuple(MoE(cfg)(torch.randn(2, 7, 64)).shape))  # (2, 7, 64)
