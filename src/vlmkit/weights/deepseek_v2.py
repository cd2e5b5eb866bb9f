"""transformers `deepseek_v2` / `deepseek_v3` checkpoints <-> vlmkit CausalLM with latent attention and DeepSeekMoE.

The body is models/lm.py's decoder with models/mla.py's attention and models/moe.py's experts:

    transformers (under "model.")                                   vlmkit
    layers.{i}.self_attn.q_proj.weight           (q_lora_rank null)  layers.{i}.attn.q_proj.weight
    layers.{i}.self_attn.q_a_proj.*, q_a_layernorm.weight, q_b_proj   layers.{i}.attn.q_a.*, q_norm.weight, q_b
    layers.{i}.self_attn.kv_a_proj_with_mqa.*    (r + dr, C)         layers.{i}.attn.kv_a.*
    layers.{i}.self_attn.kv_a_layernorm.weight                       layers.{i}.attn.kv_norm.weight
    layers.{i}.self_attn.kv_b_proj.weight        (nh (dn + dv), r)   layers.{i}.attn.kv_b.weight
    layers.{i}.self_attn.o_proj.*                                    layers.{i}.attn.out.*
    layers.{i}.mlp.gate.weight                   (E, C)              layers.{i}.mlp.router.weight
    layers.{i}.mlp.gate.e_score_correction_bias  (E,)  (noaux_tc)    layers.{i}.mlp.correction_bias
    layers.{i}.mlp.experts.{j}.{gate,up,down}_proj.weight            layers.{i}.mlp.experts_gate_up[j], experts_down[j]
    layers.{i}.mlp.shared_experts.{gate,up,down}_proj.weight         layers.{i}.mlp.shared.gate_up / down
    layers.{i}.mlp.{gate,up,down}_proj.weight    (dense layers)      layers.{i}.mlp.gate_up / down

Layer i is an MoE layer when i >= first_k_dense_replace and i % moe_layer_freq == 0 (DeepSeek's
DeepseekV2DecoderLayer; transformers has no moe_layer_freq, i.e. 1); vlmkit lists the others in
LMConfig.dense_layers. DeepSeek-VL2's `language_config` is a deepseek_v2 config with DeepSeek's own
keys, which are read too: `scoring_func` (softmax / sigmoid), `topk_method` noaux_tc, `moe_layer_freq`
and `use_mla` (false for DeepSeek-VL2-Tiny: ordinary multi-head attention with q/k/v_proj, rotate-half RoPE).
deepseek_v3 always routes with noaux_tc over sigmoid scores, as transformers' DeepseekV3TopkRouter does.
DeepSeek-V2 rotates interleaved RoPE pairs; deepseek_v3 does when `rope_interleave` (default true).
Checkpoints with multi-token-prediction layers (num_nextn_predict_layers) keep them after the last
layer; they are not part of the next-token model and are skipped, as transformers skips them.
"""

from __future__ import annotations

from typing import Any

from vlmkit.config import LMConfig
from vlmkit.models.lm import CausalLM
from vlmkit.weights.converter import Converter, StateDict
from vlmkit.weights.llama import (StateReader, _params, _rope_from_hf, attention_from_hf, head_from_hf,
                                  norms_from_hf)
from vlmkit.weights.qwen2_moe import _experts_from_hf, _gate_up, dense_mlp_from_hf

# The defaults of transformers' DeepseekV2Config / DeepseekV3Config for the keys read here, plus DeepSeek's own
# keys (scoring_func, moe_layer_freq, use_mla) with the defaults of DeepSeek-VL2's configuration_deepseek.py.
_COMMON: dict[str, Any] = {
    "num_key_value_heads": None, "hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "attention_bias": False, "mlp_bias": False, "pad_token_id": None, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "kv_lora_rank": 512, "q_lora_rank": 1536, "moe_layer_freq": 1,
    "use_mla": True, "num_nextn_predict_layers": 0,
}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v2": {**_COMMON, "vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 11008,
                    "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 2048,
                    "bos_token_id": 1, "eos_token_id": 2, "first_k_dense_replace": 0, "n_group": None,
                    "topk_group": None, "n_routed_experts": 64, "n_shared_experts": 2, "routed_scaling_factor": 1.0,
                    "topk_method": "greedy", "scoring_func": "softmax", "norm_topk_prob": False,
                    "num_experts_per_tok": None, "moe_intermediate_size": 1407, "rope_interleave": True},
    "deepseek_v3": {**_COMMON, "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
                    "num_hidden_layers": 61, "num_attention_heads": 128, "max_position_embeddings": 4096,
                    "bos_token_id": 0, "eos_token_id": 1, "first_k_dense_replace": 3, "n_group": 8, "topk_group": 4,
                    "n_routed_experts": 256, "n_shared_experts": 1, "routed_scaling_factor": 2.5,
                    "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
                    "num_experts_per_tok": 8, "moe_intermediate_size": 2048, "rope_interleave": True},
}
ARCHITECTURES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}


def _moe_fields(hf: dict[str, Any], model_type: str) -> dict[str, Any]:
    """The LMConfig mixture-of-experts fields of a DeepSeek config ({} for a dense one)."""
    experts, n = hf["n_routed_experts"] or 0, hf["num_hidden_layers"]
    if not experts:
        return {}
    if not hf["num_experts_per_tok"]:
        raise ValueError(f"{model_type} config has {experts} routed experts but num_experts_per_tok is "
                         f"{hf['num_experts_per_tok']!r}; set how many experts each token goes through")
    if hf["mlp_bias"]:
        raise ValueError(f"{model_type} mlp_bias=true: vlmkit's experts have no bias; set mlp_bias=false")
    method, scoring = hf["topk_method"], hf["scoring_func"]
    if model_type == "deepseek_v3" and (method, scoring) != ("noaux_tc", "sigmoid"):
        raise ValueError(f"deepseek_v3 routes with noaux_tc over sigmoid scores, the config says topk_method="
                         f"{method!r}, scoring_func={scoring!r}; use model_type deepseek_v2 for other routing")
    first, freq = hf["first_k_dense_replace"], hf["moe_layer_freq"]
    return dict(
        num_experts=experts, num_experts_per_tok=hf["num_experts_per_tok"],
        moe_intermediate_size=hf["moe_intermediate_size"], norm_topk_prob=bool(hf["norm_topk_prob"]),
        shared_expert_intermediate_size=hf["moe_intermediate_size"] * (hf["n_shared_experts"] or 0),
        dense_layers=tuple(i for i in range(n) if i < first or i % freq != 0),
        moe_scoring=scoring, moe_topk_method=method, moe_n_group=hf["n_group"] or 1,
        moe_topk_group=hf["topk_group"] or 1, routed_scaling_factor=float(hf["routed_scaling_factor"]),
        moe_router_fp32=True)


def config_from_hf(hf: dict[str, Any]) -> LMConfig:
    """A deepseek_v2 / deepseek_v3 config.json dict (or DeepSeek-VL2's language_config) -> LMConfig."""
    model_type = hf.get("model_type") or "deepseek_v2"
    if model_type not in _DEFAULTS:
        raise ValueError(f"model_type {model_type!r} is not a DeepSeek LM; valid: {sorted(_DEFAULTS)}")
    hf = {**_DEFAULTS[model_type], **hf}
    theta, scaling, _ = _rope_from_hf(hf, "llama")  # rope_theta and rope_scaling in either config.json form
    heads = hf["num_attention_heads"]
    if hf["use_mla"]:
        attention = dict(num_kv_heads=heads, head_dim=hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"],
                         kv_lora_rank=hf["kv_lora_rank"], q_lora_rank=hf["q_lora_rank"] or 0,
                         qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
                         v_head_dim=hf["v_head_dim"],
                         rope_interleave=model_type == "deepseek_v2" or bool(hf["rope_interleave"]))
    else:  # DeepSeek-VL2-Tiny: Llama's attention
        attention = dict(num_kv_heads=hf["num_key_value_heads"] or heads)
    return LMConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads, rms_norm_eps=hf["rms_norm_eps"], rope_theta=theta,
        rope_scaling=scaling, max_position_embeddings=hf["max_position_embeddings"],
        qkv_bias=bool(hf["attention_bias"]), o_bias=bool(hf["attention_bias"]), mlp_bias=bool(hf["mlp_bias"]),
        tie_word_embeddings=bool(hf["tie_word_embeddings"]), hidden_act=hf["hidden_act"],
        bos_token_id=hf["bos_token_id"], eos_token_id=hf["eos_token_id"], pad_token_id=hf["pad_token_id"],
        **attention, **_moe_fields(hf, model_type))


def is_deepseek_lm(cfg: LMConfig) -> bool:
    """Latent attention, or experts with an ungated shared expert: what only the DeepSeek types express."""
    return bool(cfg.kv_lora_rank or (cfg.num_experts and not cfg.shared_expert_gate))


def natural_model_type(cfg: LMConfig) -> str:
    """deepseek_v3 for noaux_tc routing over sigmoid scores (what transformers' DeepseekV3 runs), else deepseek_v2."""
    return "deepseek_v3" if (cfg.moe_topk_method, cfg.moe_scoring) == ("noaux_tc", "sigmoid") else "deepseek_v2"


def config_to_hf(cfg: LMConfig, model_type: str | None = None) -> dict[str, Any]:
    """LMConfig -> a deepseek_v2 / deepseek_v3 config.json dict (DeepSeek's own keys where transformers has none)."""
    model_type = model_type or natural_model_type(cfg)
    if cfg.num_experts and (cfg.shared_expert_gate or cfg.shared_expert_intermediate_size % cfg.moe_intermediate_size):
        raise ValueError("cannot save as a DeepSeek LM: its shared experts are ungated and a whole number of "
                         "routed experts wide; a gated shared expert saves as qwen2_moe")
    if cfg.partial_rotary_factor != 1.0 or cfg.sliding_window is not None or cfg.qkv_bias != cfg.o_bias:
        raise ValueError("cannot save as a DeepSeek LM: it rotates whole heads, has no sliding window and biases "
                         "q, kv and o together (attention_bias)")
    if model_type == "deepseek_v3" and cfg.num_experts and natural_model_type(cfg) != "deepseek_v3":
        raise ValueError("deepseek_v3 routes with noaux_tc over sigmoid scores; save this config as deepseek_v2")
    hf: dict[str, Any] = {
        "model_type": model_type, "architectures": [ARCHITECTURES[model_type]], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "hidden_act": cfg.hidden_act, "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings, "attention_bias": cfg.qkv_bias,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default", **(cfg.rope_scaling or {})},
        "tie_word_embeddings": cfg.tie_word_embeddings, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id, "use_mla": bool(cfg.kv_lora_rank),
        "n_routed_experts": cfg.num_experts or None, "num_nextn_predict_layers": 0,
    }
    if cfg.kv_lora_rank:
        if model_type == "deepseek_v2" and not cfg.rope_interleave:
            raise ValueError("deepseek_v2 rotates interleaved RoPE pairs; save rope_interleave=False as deepseek_v3")
        hf.update(kv_lora_rank=cfg.kv_lora_rank, q_lora_rank=cfg.q_lora_rank or None,
                  qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
                  v_head_dim=cfg.v_head_dim, rope_interleave=cfg.rope_interleave)
    if cfg.num_experts:
        first = next((i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)), cfg.num_layers)
        freq = next((f for f in range(1, cfg.num_layers + 1) if tuple(
            i for i in range(cfg.num_layers) if i < first or i % f) == cfg.dense_layers), None)
        if freq is None:
            raise ValueError(f"dense_layers {cfg.dense_layers} is not 'the first k, then every moe_layer_freq-th "
                             "layer an MoE', which is all a DeepSeek config can say")
        hf.update(n_shared_experts=cfg.shared_expert_intermediate_size // cfg.moe_intermediate_size,
                  num_experts_per_tok=cfg.num_experts_per_tok, moe_intermediate_size=cfg.moe_intermediate_size,
                  norm_topk_prob=cfg.norm_topk_prob, first_k_dense_replace=first, moe_layer_freq=freq,
                  topk_method=cfg.moe_topk_method, scoring_func=cfg.moe_scoring, n_group=cfg.moe_n_group,
                  topk_group=cfg.moe_topk_group, routed_scaling_factor=cfg.routed_scaling_factor)
    return hf


# hf self_attn module -> vlmkit attn module, for latent attention
_MLA = {"q_proj": "q_proj", "q_a_proj": "q_a", "q_a_layernorm": "q_norm", "q_b_proj": "q_b",
        "kv_a_proj_with_mqa": "kv_a", "kv_a_layernorm": "kv_norm", "kv_b_proj": "kv_b", "o_proj": "out"}


def _mla_names(cfg: LMConfig) -> list[tuple[str, str, bool]]:
    """(hf module, vlmkit module, has bias) of one latent attention layer."""
    q = [("q_a_proj", True), ("q_a_layernorm", False), ("q_b_proj", False)] if cfg.q_lora_rank else [("q_proj", False)]
    names = q + [("kv_a_proj_with_mqa", True), ("kv_a_layernorm", False), ("kv_b_proj", False), ("o_proj", True)]
    return [(hf, _MLA[hf], bias and cfg.qkv_bias) for hf, bias in names]


def state_from_hf(state: StateDict, cfg: LMConfig) -> StateDict:
    """transformers deepseek_v2/v3 tensors -> the complete vlmkit CausalLM state dict; every tensor must be used."""
    src = StateReader(state)
    C = cfg.hidden_size
    out: StateDict = {"embed.weight": src.take("model.embed_tokens.weight", cfg.vocab_size)}
    for i in range(cfg.num_layers):
        hf, vk = f"model.layers.{i}.", f"layers.{i}."
        if cfg.kv_lora_rank:
            for hf_name, name, bias in _mla_names(cfg):
                for p in _params(bias):
                    out[f"{vk}attn.{name}.{p}"] = src.take(f"{hf}self_attn.{hf_name}.{p}")
        else:
            out.update(attention_from_hf(src, hf, vk, cfg))
        out.update(norms_from_hf(src, hf, vk, cfg))
        if not cfg.is_moe_layer(i):
            out.update(dense_mlp_from_hf(src, hf, vk, cfg))
            continue
        out[f"{vk}mlp.router.weight"] = src.take(f"{hf}mlp.gate.weight", cfg.num_experts)
        if cfg.moe_topk_method == "noaux_tc":
            out[f"{vk}mlp.correction_bias"] = src.take(f"{hf}mlp.gate.e_score_correction_bias", cfg.num_experts)
        out[f"{vk}mlp.experts_gate_up"], out[f"{vk}mlp.experts_down"] = _experts_from_hf(src, hf, cfg)
        if cfg.shared_expert_intermediate_size:
            out[f"{vk}mlp.shared.gate_up.weight"] = _gate_up(src, f"{hf}mlp.shared_experts.",
                                                             cfg.shared_expert_intermediate_size)
            out[f"{vk}mlp.shared.down.weight"] = src.take(f"{hf}mlp.shared_experts.down_proj.weight", C)
    out["norm.weight"] = src.take("model.norm.weight", C)
    out["lm_head.weight"] = head_from_hf(src, out["embed.weight"], cfg)
    mtp = tuple(p for p in {k[: k.index("eh_proj.")] for k in src.left if ".eh_proj." in k}
                if int(p.split(".")[2]) >= cfg.num_layers)  # "model.layers.{i}." of each prediction module
    unexpected = sorted(k for k in src.left if not (k.endswith("rotary_emb.inv_freq") or k.startswith(mtp)))
    if unexpected:
        raise ValueError(f"checkpoint has tensors this DeepSeek config does not use: {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    return out


def state_to_hf(state: StateDict, cfg: LMConfig) -> StateDict:
    """vlmkit CausalLM state dict -> transformers deepseek_v2/v3 tensor names (per-expert layout; no head when tied)."""
    out: StateDict = {"model.embed_tokens.weight": state["embed.weight"]}
    for i in range(cfg.num_layers):
        hf, vk = f"model.layers.{i}.", f"layers.{i}."
        if cfg.kv_lora_rank:
            for hf_name, name, bias in _mla_names(cfg):
                for p in _params(bias):
                    out[f"{hf}self_attn.{hf_name}.{p}"] = state[f"{vk}attn.{name}.{p}"]
        else:
            sizes = [cfg.num_heads * cfg.head_dim] + [cfg.num_kv_heads * cfg.head_dim] * 2
            for p in _params(cfg.qkv_bias):
                for n, part in zip("qkv", state[f"{vk}attn.qkv.{p}"].split(sizes)):
                    out[f"{hf}self_attn.{n}_proj.{p}"] = part
            for p in _params(cfg.o_bias):
                out[f"{hf}self_attn.o_proj.{p}"] = state[f"{vk}attn.out.{p}"]
        out[f"{hf}input_layernorm.weight"] = state[f"{vk}attn_norm.weight"]
        out[f"{hf}post_attention_layernorm.weight"] = state[f"{vk}mlp_norm.weight"]
        if not cfg.is_moe_layer(i):
            out[f"{hf}mlp.gate_proj.weight"], out[f"{hf}mlp.up_proj.weight"] = state[f"{vk}mlp.gate_up.weight"].chunk(2)
            out[f"{hf}mlp.down_proj.weight"] = state[f"{vk}mlp.down.weight"]
            continue
        out[f"{hf}mlp.gate.weight"] = state[f"{vk}mlp.router.weight"]
        if cfg.moe_topk_method == "noaux_tc":
            out[f"{hf}mlp.gate.e_score_correction_bias"] = state[f"{vk}mlp.correction_bias"]
        for j, (gate_up, down) in enumerate(zip(state[f"{vk}mlp.experts_gate_up"], state[f"{vk}mlp.experts_down"])):
            out[f"{hf}mlp.experts.{j}.gate_proj.weight"], out[f"{hf}mlp.experts.{j}.up_proj.weight"] = gate_up.chunk(2)
            out[f"{hf}mlp.experts.{j}.down_proj.weight"] = down  # (C, I)
        if cfg.shared_expert_intermediate_size:
            gate, up = state[f"{vk}mlp.shared.gate_up.weight"].chunk(2)
            out[f"{hf}mlp.shared_experts.gate_proj.weight"], out[f"{hf}mlp.shared_experts.up_proj.weight"] = gate, up
            out[f"{hf}mlp.shared_experts.down_proj.weight"] = state[f"{vk}mlp.shared.down.weight"]
    out["model.norm.weight"] = state["norm.weight"]
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return out


def _converter(model_type: str) -> Converter:
    return Converter(config_from_hf=config_from_hf, build=CausalLM, state_from_hf=state_from_hf,
                     config_to_hf=lambda cfg: config_to_hf(cfg, model_type), state_to_hf=state_to_hf,
                     natural=lambda cfg: is_deepseek_lm(cfg) and natural_model_type(cfg) == model_type)


DEEPSEEK_V2 = _converter("deepseek_v2")
DEEPSEEK_V3 = _converter("deepseek_v3")
