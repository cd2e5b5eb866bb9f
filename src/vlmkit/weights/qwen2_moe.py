"""transformers `qwen2_moe` checkpoints (Qwen1.5-MoE, Qwen2-57B-A14B) <-> vlmkit CausalLM with MoE layers.

Attention, norms, embeddings and the head are Qwen2's (weights/llama.py describes
them); the feed-forward of a sparse layer is models/moe.py's MoE:

    transformers (under "model.")                              vlmkit
    layers.{i}.mlp.gate.weight                    (E, C)       layers.{i}.mlp.router.weight
    layers.{i}.mlp.experts.{j}.{gate,up}_proj.weight           layers.{i}.mlp.experts_gate_up[j]  (2I, C)
    layers.{i}.mlp.experts.{j}.down_proj.weight                layers.{i}.mlp.experts_down[j]     (C, I)
    layers.{i}.mlp.experts.gate_up_proj           (E, 2I, C)   layers.{i}.mlp.experts_gate_up     (read only)
    layers.{i}.mlp.experts.down_proj              (E, C, I)    layers.{i}.mlp.experts_down        (read only)
    layers.{i}.mlp.shared_expert.{gate,up}_proj.weight         layers.{i}.mlp.shared.gate_up.weight
    layers.{i}.mlp.shared_expert.down_proj.weight              layers.{i}.mlp.shared.down.weight
    layers.{i}.mlp.shared_expert_gate.weight      (1, C)       layers.{i}.mlp.shared_gate.weight

Layer i is sparse unless i is in mlp_only_layers or (i + 1) % decoder_sparse_step != 0
(modeling_qwen2_moe.py, Qwen2MoeDecoderLayer); vlmkit stores the dense ones as
LMConfig.dense_layers. Saving writes the per-expert layout, as transformers' save_pretrained does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from vlmkit.config import LMConfig
from vlmkit.models.lm import CausalLM
from vlmkit.weights.converter import Converter, Joined, StateDict
from vlmkit.weights.llama import (StateReader, attention_from_hf, head_from_hf, lm_config_from_hf, lm_config_to_hf,
                                  norms_from_hf)

MODEL_TYPE = "qwen2_moe"
ARCHITECTURE = "Qwen2MoeForCausalLM"

# The defaults of transformers' Qwen2MoeConfig (configuration_qwen2_moe.py) for the keys read here.
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24,
    "num_attention_heads": 16, "num_key_value_heads": 16, "hidden_act": "silu", "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": 4096,
    "max_window_layers": 28, "decoder_sparse_step": 1, "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632, "num_experts_per_tok": 4, "num_experts": 60,
    "norm_topk_prob": False, "mlp_only_layers": None, "qkv_bias": True,
    "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
}
_MOE_KEYS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
             "shared_expert_intermediate_size", "shared_expert_gate", "dense_layers")


def config_from_hf(hf: dict[str, Any]) -> LMConfig:
    """A transformers qwen2_moe config.json dict -> LMConfig with the MoE fields set."""
    hf = {**_DEFAULTS, **hf}
    n, step, experts = hf["num_hidden_layers"], hf["decoder_sparse_step"], hf["num_experts"]
    if step < 1:
        raise ValueError(f"qwen2_moe decoder_sparse_step must be >= 1, got {step}")
    if hf.get("layer_types") is None:  # Qwen2MoeConfig's rule: sliding attention on odd-numbered layers
        hf["layer_types"] = ["sliding_attention" if (i + 1) % 2 and i < hf["max_window_layers"]
                             and hf["use_sliding_window"] else "full_attention" for i in range(n)]
    cfg = lm_config_from_hf({**hf, "model_type": "qwen2"})
    if experts == 0:
        return dataclasses.replace(cfg, qkv_bias=bool(hf["qkv_bias"]))
    mlp_only = set(hf["mlp_only_layers"] or ())
    return dataclasses.replace(
        cfg,
        qkv_bias=bool(hf["qkv_bias"]),
        num_experts=experts,
        num_experts_per_tok=hf["num_experts_per_tok"],
        moe_intermediate_size=hf["moe_intermediate_size"],
        norm_topk_prob=bool(hf["norm_topk_prob"]),
        shared_expert_intermediate_size=hf["shared_expert_intermediate_size"],
        shared_expert_gate=True,
        dense_layers=tuple(i for i in range(n) if i in mlp_only or (i + 1) % step != 0),
    )


def config_to_hf(cfg: LMConfig) -> dict[str, Any]:
    """LMConfig -> a transformers 5 qwen2_moe config.json dict (mlp_only_layers lists the dense layers)."""
    if cfg.num_experts == 0 or not cfg.shared_expert_gate or cfg.shared_expert_intermediate_size == 0:
        raise ValueError("cannot save as qwen2_moe: it needs experts (num_experts > 0) and one sigmoid-gated "
                         "shared expert (shared_expert_intermediate_size > 0, shared_expert_gate=True)")
    defaults = {f.name: f.default for f in dataclasses.fields(LMConfig) if f.name in _MOE_KEYS}
    hf = lm_config_to_hf(dataclasses.replace(cfg, qkv_bias=True, **defaults), "qwen2")
    hf.update(
        model_type=MODEL_TYPE,
        architectures=[ARCHITECTURE],
        qkv_bias=cfg.qkv_bias,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        moe_intermediate_size=cfg.moe_intermediate_size,
        norm_topk_prob=cfg.norm_topk_prob,
        shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
        decoder_sparse_step=1,
        mlp_only_layers=list(cfg.dense_layers),
    )
    return hf


def _gate_up(src: StateReader, prefix: str, inter: int) -> Joined:
    """[gate; up] (2 inter, C) from {prefix}gate_proj.weight and {prefix}up_proj.weight, made when loaded."""
    return Joined([src.take(f"{prefix}gate_proj.weight", inter), src.take(f"{prefix}up_proj.weight", inter)])


def dense_mlp_from_hf(src: StateReader, hf: str, vk: str, cfg: LMConfig) -> StateDict:
    """One dense (non-expert) layer's SwiGLU MLP: fused gate|up and down."""
    return {f"{vk}mlp.gate_up.weight": _gate_up(src, f"{hf}mlp.", cfg.intermediate_size),
            f"{vk}mlp.down.weight": src.take(f"{hf}mlp.down_proj.weight", cfg.hidden_size)}


def _experts_from_hf(src: StateReader, hf: str, cfg: LMConfig) -> tuple[torch.Tensor | Joined, torch.Tensor | Joined]:
    """Stacked (E, 2I, C) gate|up and (E, C, I) down weights, from the fused or the per-expert layout (stacked
    when loaded)."""
    E, inter = cfg.num_experts, cfg.moe_intermediate_size
    if src.has(f"{hf}mlp.experts.gate_up_proj"):
        return src.take(f"{hf}mlp.experts.gate_up_proj", E), src.take(f"{hf}mlp.experts.down_proj", E)
    gate_up = Joined([_gate_up(src, f"{hf}mlp.experts.{j}.", inter) for j in range(E)], stack=True)  # (E, 2I, C)
    down = Joined([src.take(f"{hf}mlp.experts.{j}.down_proj.weight", cfg.hidden_size)
                   for j in range(E)], stack=True)  # (E, C, I)
    return gate_up, down


def state_from_hf(state: StateDict, cfg: LMConfig) -> StateDict:
    """transformers qwen2_moe tensors -> the complete vlmkit CausalLM state dict; every tensor must be used."""
    src = StateReader(state)
    C = cfg.hidden_size
    out: StateDict = {"embed.weight": src.take("model.embed_tokens.weight", cfg.vocab_size)}
    for i in range(cfg.num_layers):
        hf, vk = f"model.layers.{i}.", f"layers.{i}."
        out.update(attention_from_hf(src, hf, vk, cfg))
        out.update(norms_from_hf(src, hf, vk, cfg))
        if not cfg.is_moe_layer(i):
            out.update(dense_mlp_from_hf(src, hf, vk, cfg))
            continue
        out[f"{vk}mlp.router.weight"] = src.take(f"{hf}mlp.gate.weight", cfg.num_experts)
        out[f"{vk}mlp.experts_gate_up"], out[f"{vk}mlp.experts_down"] = _experts_from_hf(src, hf, cfg)
        shared = cfg.shared_expert_intermediate_size
        out[f"{vk}mlp.shared.gate_up.weight"] = _gate_up(src, f"{hf}mlp.shared_expert.", shared)
        out[f"{vk}mlp.shared.down.weight"] = src.take(f"{hf}mlp.shared_expert.down_proj.weight", C)
        out[f"{vk}mlp.shared_gate.weight"] = src.take(f"{hf}mlp.shared_expert_gate.weight", 1)
    out["norm.weight"] = src.take("model.norm.weight", C)
    out["lm_head.weight"] = head_from_hf(src, out["embed.weight"], cfg)
    unexpected = sorted(k for k in src.left if not k.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise ValueError(f"checkpoint has tensors this qwen2_moe config does not use: {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    return out


def state_to_hf(state: StateDict, cfg: LMConfig) -> StateDict:
    """vlmkit CausalLM state dict -> transformers qwen2_moe tensor names (per-expert layout; no head when tied)."""
    nh, nkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    out: StateDict = {"model.embed_tokens.weight": state["embed.weight"]}
    for i in range(cfg.num_layers):
        hf, vk = f"model.layers.{i}.", f"layers.{i}."
        for p in ["weight", "bias"] if cfg.qkv_bias else ["weight"]:
            for n, part in zip("qkv", state[f"{vk}attn.qkv.{p}"].split([nh, nkv, nkv])):
                out[f"{hf}self_attn.{n}_proj.{p}"] = part
        out[f"{hf}self_attn.o_proj.weight"] = state[f"{vk}attn.out.weight"]
        out[f"{hf}input_layernorm.weight"] = state[f"{vk}attn_norm.weight"]
        out[f"{hf}post_attention_layernorm.weight"] = state[f"{vk}mlp_norm.weight"]
        if not cfg.is_moe_layer(i):
            out[f"{hf}mlp.gate_proj.weight"], out[f"{hf}mlp.up_proj.weight"] = \
                state[f"{vk}mlp.gate_up.weight"].chunk(2)
            out[f"{hf}mlp.down_proj.weight"] = state[f"{vk}mlp.down.weight"]
            continue
        out[f"{hf}mlp.gate.weight"] = state[f"{vk}mlp.router.weight"]
        for j, (gate_up, down) in enumerate(zip(state[f"{vk}mlp.experts_gate_up"], state[f"{vk}mlp.experts_down"])):
            out[f"{hf}mlp.experts.{j}.gate_proj.weight"], out[f"{hf}mlp.experts.{j}.up_proj.weight"] = \
                gate_up.chunk(2)  # (I, C) each
            out[f"{hf}mlp.experts.{j}.down_proj.weight"] = down  # (C, I)
        gate, up = state[f"{vk}mlp.shared.gate_up.weight"].chunk(2)
        out[f"{hf}mlp.shared_expert.gate_proj.weight"], out[f"{hf}mlp.shared_expert.up_proj.weight"] = gate, up
        out[f"{hf}mlp.shared_expert.down_proj.weight"] = state[f"{vk}mlp.shared.down.weight"]
        out[f"{hf}mlp.shared_expert_gate.weight"] = state[f"{vk}mlp.shared_gate.weight"]
    out["model.norm.weight"] = state["norm.weight"]
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return out


QWEN2_MOE = Converter(config_from_hf=config_from_hf, build=CausalLM, state_from_hf=state_from_hf,
                      config_to_hf=config_to_hf, state_to_hf=state_to_hf,
                      natural=lambda cfg: bool(cfg.num_experts) and cfg.shared_expert_gate and not cfg.kv_lora_rank)
