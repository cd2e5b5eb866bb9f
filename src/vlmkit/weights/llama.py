"""transformers `llama`, `mistral`, `qwen2` and `phi3` checkpoints <-> vlmkit CausalLM.

The four architectures are one decoder in vlmkit (models/lm.py); they differ in
config.json keys and in tensor layout:

    transformers (under prefix, "model." by default)       vlmkit
    embed_tokens.weight                                    embed.weight
    layers.{i}.self_attn.{q,k,v}_proj.{weight,bias}        layers.{i}.attn.qkv.*        (concatenated q|k|v)
    layers.{i}.self_attn.qkv_proj.weight       (Phi-3)     layers.{i}.attn.qkv.weight
    layers.{i}.self_attn.o_proj.*                          layers.{i}.attn.out.*
    layers.{i}.mlp.{gate,up}_proj.*                        layers.{i}.mlp.gate_up.*     (concatenated gate|up)
    layers.{i}.mlp.gate_up_proj.weight         (Phi-3)     layers.{i}.mlp.gate_up.weight
    layers.{i}.mlp.down_proj.*                             layers.{i}.mlp.down.*
    layers.{i}.input_layernorm.weight                      layers.{i}.attn_norm.weight
    layers.{i}.post_attention_layernorm.weight             layers.{i}.mlp_norm.weight
    norm.weight                                            norm.weight
    lm_head.weight  (under head_prefix; absent when tied)  lm_head.weight (always present)

config.json is read in transformers 5 form (`rope_parameters`) or the older
`rope_theta` + `rope_scaling` form; keys a checkpoint omits take the default of
the transformers config class of its model_type (small LLaVA text_configs rely
on this). Saving writes transformers 5 form.

The lm_* functions are shared with the LLaVA converter, whose language model
lives under `model.language_model.` with `lm_head.weight` at the top level.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from vlmkit.config import LMConfig
from vlmkit.models.lm import CausalLM
from vlmkit.models.rope import rope_parameters
from vlmkit.weights.converter import Converter, Joined, StateDict

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}

# The defaults of transformers' config classes (configuration_<type>.py) for the keys read here.
_COMMON = {"hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "pad_token_id": None,
           "num_hidden_layers": 32, "num_attention_heads": 32, "hidden_size": 4096}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {**_COMMON, "vocab_size": 32000, "intermediate_size": 11008, "num_key_value_heads": None,
              "max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2,
              "attention_bias": False, "mlp_bias": False},
    "mistral": {**_COMMON, "vocab_size": 32000, "intermediate_size": 14336, "num_key_value_heads": 8,
                "max_position_embeddings": 4096 * 32, "bos_token_id": 1, "eos_token_id": 2, "sliding_window": 4096},
    "qwen2": {**_COMMON, "vocab_size": 151936, "intermediate_size": 22016, "num_key_value_heads": 32,
              "max_position_embeddings": 32768, "bos_token_id": None, "eos_token_id": None,
              "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28},
    "phi3": {**_COMMON, "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192,
             "num_key_value_heads": None, "max_position_embeddings": 4096, "original_max_position_embeddings": 4096,
             "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000,
             "sliding_window": None},
}
# Model types whose checkpoints store q|k|v and gate|up as one tensor each.
_FUSED = ("phi3",)


def _check_model_type(model_type: str) -> None:
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type {model_type!r} is not a Llama-family LM; valid: {sorted(ARCHITECTURES)}")


def _rope_from_hf(hf: dict[str, Any], model_type: str) -> tuple[float, dict[str, Any] | None, float]:
    """(rope_theta, rope_scaling for LMConfig, partial_rotary_factor) from either config.json form."""
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})  # transformers: rope_scaling wins
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    partial = float(params.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    kind = params.pop("type", None)
    params["rope_type"] = params.get("rope_type") or kind or "default"
    if model_type == "phi3" and params["rope_type"] in ("su", "yarn"):
        params["rope_type"] = "longrope"  # transformers' Phi3Config renames these
    if model_type != "phi3":
        partial = 1.0  # only Phi-3's attention rotates part of a head; the others rotate all of it
    if params["rope_type"] == "default":
        return theta, None, partial
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        # A top-level original_max_position_embeddings (Phi-3) overrides the one in the rope dict.
        if "original_max_position_embeddings" in hf:
            params["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
        params.setdefault("original_max_position_embeddings", hf["max_position_embeddings"])
    return theta, params, partial


def _sliding_window_from_hf(hf: dict[str, Any], model_type: str) -> int | None:
    if model_type in ("mistral", "phi3"):
        return hf.get("sliding_window")
    if model_type == "qwen2":
        window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
        if window is None:
            return None
        n = hf["num_hidden_layers"]
        kinds = hf.get("layer_types") or ["sliding_attention" if i >= hf["max_window_layers"]
                                          else "full_attention" for i in range(n)]
        sliding = {kind == "sliding_attention" for kind in kinds}
        if len(sliding) > 1:
            raise ValueError(f"qwen2 config mixes sliding-window and full-attention layers ({kinds}); "
                             "vlmkit uses one attention kind for every layer")
        return window if sliding == {True} else None
    return None  # transformers' Llama has no sliding window


def lm_config_from_hf(hf: dict[str, Any]) -> LMConfig:
    """A transformers llama/mistral/qwen2/phi3 config.json dict (or a LLaVA text_config) -> LMConfig."""
    model_type = hf.get("model_type") or "llama"
    _check_model_type(model_type)
    hf = {**_DEFAULTS[model_type], **hf}
    theta, scaling, partial = _rope_from_hf(hf, model_type)
    attention_bias = model_type == "llama" and bool(hf["attention_bias"])
    return LMConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf["num_key_value_heads"],
        head_dim=hf.get("head_dim"),
        rms_norm_eps=hf["rms_norm_eps"],
        rope_theta=theta,
        rope_scaling=scaling,
        partial_rotary_factor=partial,
        max_position_embeddings=hf["max_position_embeddings"],
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=attention_bias,
        mlp_bias=model_type == "llama" and bool(hf["mlp_bias"]),
        tie_word_embeddings=bool(hf["tie_word_embeddings"]),
        sliding_window=_sliding_window_from_hf(hf, model_type),
        hidden_act=hf["hidden_act"],
        bos_token_id=hf["bos_token_id"],
        eos_token_id=hf["eos_token_id"],
        pad_token_id=hf["pad_token_id"],
    )


def _check_representable(cfg: LMConfig, model_type: str) -> None:
    """Refuse to save a config the target transformers class cannot express, naming one that can."""
    problems = []
    if cfg.num_experts:
        problems.append(f"{model_type} is dense; a mixture-of-experts LM saves as qwen2_moe")
    if model_type == "llama":
        if cfg.qkv_bias != cfg.o_bias:
            problems.append("llama biases q, k, v and o together (attention_bias); use qwen2 for q/k/v bias only")
        if cfg.sliding_window is not None:
            problems.append("llama has no sliding window; use mistral")
    elif model_type == "qwen2":
        if not cfg.qkv_bias or cfg.o_bias:
            problems.append("qwen2 always has q/k/v bias and no o bias")
    elif cfg.qkv_bias or cfg.o_bias:
        problems.append(f"{model_type} has no attention bias")
    if model_type != "llama" and cfg.mlp_bias:
        problems.append(f"{model_type} has no MLP bias; use llama")
    if model_type != "phi3" and cfg.partial_rotary_factor != 1.0:
        problems.append(f"{model_type} rotates whole heads (partial_rotary_factor 1); use phi3")
    kind = rope_parameters(cfg)["rope_type"]
    if model_type == "phi3" and kind not in ("default", "longrope"):
        problems.append(f"phi3 supports rope types default and longrope, not {kind!r}")
    if problems:
        raise ValueError(f"cannot save this LM as model_type {model_type!r}: " + "; ".join(problems))


def natural_model_type(cfg: LMConfig) -> str:
    """The transformers model_type that expresses cfg: the first of llama, qwen2, mistral, phi3 that
    _check_representable accepts (llama when none does, so the save error names what is wrong)."""
    for model_type in ("llama", "qwen2", "mistral", "phi3"):
        try:
            _check_representable(cfg, model_type)
        except ValueError:
            continue
        return model_type
    return "llama"


def lm_config_to_hf(cfg: LMConfig, model_type: str) -> dict[str, Any]:
    """LMConfig -> a transformers 5 config.json dict for model_type (llama, mistral, qwen2 or phi3)."""
    _check_model_type(model_type)
    _check_representable(cfg, model_type)
    rope = {"rope_theta": cfg.rope_theta, **rope_parameters(cfg)}
    hf: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [ARCHITECTURES[model_type]],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": cfg.hidden_act,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
    }
    if model_type == "llama":
        hf.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    elif model_type == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    elif model_type == "qwen2":
        sliding = cfg.sliding_window is not None
        hf.update(use_sliding_window=sliding, sliding_window=cfg.sliding_window,
                  max_window_layers=0 if sliding else cfg.num_layers,
                  layer_types=["sliding_attention" if sliding else "full_attention"] * cfg.num_layers)
    else:  # phi3
        rope["partial_rotary_factor"] = cfg.partial_rotary_factor
        hf.update(sliding_window=cfg.sliding_window,
                  original_max_position_embeddings=rope.get("original_max_position_embeddings",
                                                            cfg.max_position_embeddings))
    return hf


def _params(bias: bool) -> list[str]:
    return ["weight", "bias"] if bias else ["weight"]


class StateReader:
    """Pops named tensors from a checkpoint, so that leftovers can be reported as unexpected."""

    def __init__(self, state: StateDict) -> None:
        self.left = dict(state)

    def has(self, key: str) -> bool:
        return key in self.left

    def take(self, key: str, rows: int | None = None) -> torch.Tensor:
        if key not in self.left:
            raise ValueError(f"checkpoint lacks tensor {key!r}")
        tensor = self.left.pop(key)
        if rows is not None and tensor.shape[0] != rows:
            raise ValueError(f"tensor {key!r} has shape {tuple(tensor.shape)}, expected {rows} rows for this config")
        return tensor

    def joined(self, fused: str, parts: list[str], sizes: list[int]) -> torch.Tensor | Joined:
        """The fused tensor if the checkpoint has it, else its parts concatenated along dim 0 (a Joined: made
        when the loader reaches its module)."""
        if self.has(fused):
            return self.take(fused, sum(sizes))
        return Joined([self.take(p, n) for p, n in zip(parts, sizes)])


def attention_from_hf(src: StateReader, hf: str, vk: str, cfg: LMConfig) -> StateDict:
    """One layer's grouped-query attention (fused qkv, out) from separate q/k/v or a fused qkv_proj."""
    nh, nkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    out: StateDict = {}
    for p in _params(cfg.qkv_bias):
        out[f"{vk}attn.qkv.{p}"] = src.joined(f"{hf}self_attn.qkv_proj.{p}",
                                              [f"{hf}self_attn.{n}_proj.{p}" for n in "qkv"], [nh, nkv, nkv])
    for p in _params(cfg.o_bias):
        out[f"{vk}attn.out.{p}"] = src.take(f"{hf}self_attn.o_proj.{p}", cfg.hidden_size)
    return out


def norms_from_hf(src: StateReader, hf: str, vk: str, cfg: LMConfig) -> StateDict:
    """One layer's two RMSNorm weights (before attention, before the MLP)."""
    return {f"{vk}attn_norm.weight": src.take(f"{hf}input_layernorm.weight", cfg.hidden_size),
            f"{vk}mlp_norm.weight": src.take(f"{hf}post_attention_layernorm.weight", cfg.hidden_size)}


def head_from_hf(src: StateReader, embed: torch.Tensor, cfg: LMConfig, head: str = "lm_head.weight") -> torch.Tensor:
    """The output head: the embedding when tied (a stored copy is dropped), else the checkpoint's `head`."""
    if cfg.tie_word_embeddings:
        src.left.pop(head, None)  # a tied checkpoint may still store a copy; the embedding is authoritative
        return embed
    if src.has(head):
        return src.take(head, cfg.vocab_size)
    raise ValueError(f"checkpoint lacks {head!r} and its config does not tie word embeddings; "
                     "set tie_word_embeddings=true in config.json if the head shares the embedding")


def lm_state_from_hf(state: StateDict, cfg: LMConfig, prefix: str = "model.", head_prefix: str = "") -> StateDict:
    """transformers tensors -> the complete vlmkit CausalLM state dict (lm_head.weight included when tied).

    The decoder body is read under `prefix`, lm_head.weight under `head_prefix`;
    separate (q/k/v, gate/up) and fused (Phi-3) layouts are both accepted.
    Every tensor in `state` must be used (legacy rotary_emb.inv_freq buffers
    excepted), so pass only the language model's tensors.
    """
    src = StateReader(state)
    inter = cfg.intermediate_size
    out: StateDict = {"embed.weight": src.take(f"{prefix}embed_tokens.weight", cfg.vocab_size)}
    for i in range(cfg.num_layers):
        hf, vk = f"{prefix}layers.{i}.", f"layers.{i}."
        out.update(attention_from_hf(src, hf, vk, cfg))
        for p in _params(cfg.mlp_bias):
            out[f"{vk}mlp.gate_up.{p}"] = src.joined(f"{hf}mlp.gate_up_proj.{p}",
                                                     [f"{hf}mlp.gate_proj.{p}", f"{hf}mlp.up_proj.{p}"], [inter, inter])
            out[f"{vk}mlp.down.{p}"] = src.take(f"{hf}mlp.down_proj.{p}", cfg.hidden_size)
        out.update(norms_from_hf(src, hf, vk, cfg))
    out["norm.weight"] = src.take(f"{prefix}norm.weight", cfg.hidden_size)
    out["lm_head.weight"] = head_from_hf(src, out["embed.weight"], cfg, f"{head_prefix}lm_head.weight")
    unexpected = sorted(k for k in src.left if not k.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise ValueError(f"checkpoint has tensors a {cfg.num_layers}-layer LM does not use: {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    return out


def lm_state_to_hf(state: StateDict, cfg: LMConfig, model_type: str, prefix: str = "model.",
                   head_prefix: str = "") -> StateDict:
    """vlmkit CausalLM state dict -> transformers tensor names for model_type (lm_head omitted when tied)."""
    _check_model_type(model_type)
    fused = model_type in _FUSED
    nh, nkv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    out: StateDict = {f"{prefix}embed_tokens.weight": state["embed.weight"]}
    for i in range(cfg.num_layers):
        hf, vk = f"{prefix}layers.{i}.", f"layers.{i}."
        for p in _params(cfg.qkv_bias):
            qkv = state[f"{vk}attn.qkv.{p}"]
            if fused:
                out[f"{hf}self_attn.qkv_proj.{p}"] = qkv
            else:
                for name, part in zip("qkv", qkv.split([nh, nkv, nkv], dim=0)):
                    out[f"{hf}self_attn.{name}_proj.{p}"] = part
        for p in _params(cfg.o_bias):
            out[f"{hf}self_attn.o_proj.{p}"] = state[f"{vk}attn.out.{p}"]
        for p in _params(cfg.mlp_bias):
            gate_up = state[f"{vk}mlp.gate_up.{p}"]
            if fused:
                out[f"{hf}mlp.gate_up_proj.{p}"] = gate_up
            else:
                out[f"{hf}mlp.gate_proj.{p}"], out[f"{hf}mlp.up_proj.{p}"] = gate_up.split([inter, inter], dim=0)
            out[f"{hf}mlp.down_proj.{p}"] = state[f"{vk}mlp.down.{p}"]
        out[f"{hf}input_layernorm.weight"] = state[f"{vk}attn_norm.weight"]
        out[f"{hf}post_attention_layernorm.weight"] = state[f"{vk}mlp_norm.weight"]
    out[f"{prefix}norm.weight"] = state["norm.weight"]
    if not cfg.tie_word_embeddings:
        out[f"{head_prefix}lm_head.weight"] = state["lm_head.weight"]
    return out


def _converter(model_type: str) -> Converter:
    return Converter(
        config_from_hf=lm_config_from_hf,
        build=CausalLM,
        state_from_hf=lm_state_from_hf,
        config_to_hf=partial(lm_config_to_hf, model_type=model_type),
        state_to_hf=partial(lm_state_to_hf, model_type=model_type),
        natural=lambda cfg: not cfg.num_experts and not cfg.kv_lora_rank and natural_model_type(cfg) == model_type,
    )


LLAMA = _converter("llama")
MISTRAL = _converter("mistral")
QWEN2 = _converter("qwen2")
PHI3 = _converter("phi3")
