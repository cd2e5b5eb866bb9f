"""Mixture-of-experts feed-forward block: routed top-k SwiGLU experts plus always-on shared experts.

    s = softmax(router(x)) or sigmoid(router(x))            # (N, E) scores over the routed experts
    e = experts picked from s (moe_topk_method, below)      # (N, k) expert ids per token
    w = s[e]; w = w / w.sum(-1) if norm_topk_prob           # (N, k) weights, renormalised to sum to 1
    w = w * routed_scaling_factor
    y = sum_j w_j * expert_{e_j}(x)                         # each expert a SwiGLU of width moe_intermediate_size
    y = y + g * shared(x), g = sigmoid(shared_gate(x))      # Qwen2-MoE; g = 1 without the gate (DeepSeek)

How the k experts are picked (DeepSeek-V2 paper sec. 2.2.2, DeepSeek-V3 paper sec. 2.1.2):
    greedy                the k best scores (Qwen2-MoE, DeepSeek-V2-Lite, DeepSeek-VL2-Tiny/Small);
    group_limited_greedy  experts split into moe_n_group groups, a group scored by its best expert,
                          the k best among the moe_topk_group best groups (DeepSeek-V2);
    noaux_tc              as above on s + correction_bias, a group scored by its two best, and the
                          weights read from s without the bias (DeepSeek-V3, DeepSeek-VL2).
This is transformers' Qwen2MoeSparseMoeBlock (models/qwen2_moe/modeling_qwen2_moe.py) and
DeepseekV2Moe / DeepseekV3MoE (DeepseekV2TopkRouter, DeepseekV3TopkRouter). DeepSeek's
n_shared_experts are one SwiGLU whose width is their sum (transformers builds them that way), so
shared_expert_intermediate_size covers both. Only the experts that received tokens run: each
gathers its tokens (index_select), and its weighted output is scattered back (index_add_), so
the cost is k expert MLPs per token rather than all E.

Two details differ between DeepSeek's own code and transformers, and vlmkit follows transformers:
noaux_tc drops the experts of unpicked groups with -inf (DeepSeek-VL2's MoEGate fills 0.0; the same
whenever bias-corrected scores are positive, and always with one group, as DeepSeek-VL2 has), and
norm_topk_prob renormalises also at k = 1. transformers' DeepseekV2 ignores norm_topk_prob; every
released V2 checkpoint sets it false.

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


def route(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool, *, scoring: str = "softmax",
          method: str = "greedy", n_group: int = 1, topk_group: int = 1,
          correction_bias: torch.Tensor | None = None, scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each token's top_k experts from router logits (N, E): (weights (N, k), expert ids (N, k)).

    Scores are softmax or sigmoid of the logits (in fp32); `method` picks the experts (module docstring);
    weights are the picked experts' scores, renormalised to sum to 1 when norm_topk_prob, times `scaling`,
    returned in the logits' dtype. Example: logits [[0, ln 3, ln 2, ln 4]] -> p = [.1, .3, .2, .4];
    greedy top-2 picks experts [3, 1] with weights [.4, .3], or [4/7, 3/7] renormalised.
    """
    logits = router_logits.float()
    scores = F.softmax(logits, dim=-1) if scoring == "softmax" else torch.sigmoid(logits)  # (N, E)
    if method == "greedy":
        weights, experts = torch.topk(scores, top_k, dim=-1)  # (N, k) each
    else:
        choice = scores if correction_bias is None else scores + correction_bias.float()  # (N, E)
        N, E = choice.shape
        grouped = choice.view(N, n_group, E // n_group)  # (N, G, E/G)
        if method == "group_limited_greedy":
            group_scores = grouped.max(dim=-1).values  # (N, G): a group's best expert
        else:  # noaux_tc
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, G): its two best
        best_groups = torch.topk(group_scores, topk_group, dim=-1).indices  # (N, topk_group)
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)  # (N, G)
        dropped = 0.0 if method == "group_limited_greedy" else float("-inf")  # as transformers' V2 / V3 routers
        choice = choice.masked_fill(~keep.repeat_interleave(E // n_group, dim=1), dropped)  # (N, E)
        experts = torch.topk(choice, top_k, dim=-1).indices  # (N, k)
        weights = scores.gather(1, experts)  # (N, k): scores without the correction bias
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)  # (N, k)
    return (weights * scaling).to(router_logits.dtype), experts


class MoE(nn.Module):
    """Routed top-k experts plus an optional (sigmoid-gated) shared expert; a drop-in for lm.MLP."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        E, C, inter = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.cfg = cfg
        self.router = nn.Linear(C, E, bias=False)
        if cfg.moe_topk_method == "noaux_tc":  # set by DeepSeek's load balancing, not by gradients: a buffer
            self.register_buffer("correction_bias", torch.zeros(E))
        else:
            self.correction_bias = None
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
        cfg = self.cfg
        if cfg.moe_router_fp32:
            logits = F.linear(flat.float(), self.router.weight.float())  # (N, E) fp32, as DeepSeek's router
        else:
            logits = self.router(flat)  # (N, E) in the model dtype, as Qwen2-MoE's
        weights, experts = route(logits, cfg.num_experts_per_tok, cfg.norm_topk_prob, scoring=cfg.moe_scoring,
                                 method=cfg.moe_topk_method, n_group=cfg.moe_n_group, topk_group=cfg.moe_topk_group,
                                 correction_bias=self.correction_bias, scaling=cfg.routed_scaling_factor)
        weights = weights.to(flat.dtype)  # (N, k) each
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
