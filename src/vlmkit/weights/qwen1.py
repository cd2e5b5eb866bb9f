"""Qwen-1's language model (`model_type: qwen`, the Hub's remote code modeling_qwen.py) <-> vlmkit CausalLM.

The decoder of Qwen-7B(-Chat), Qwen-VL(-Chat) and Vary. Its checkpoint layout (QWenLMHeadModel), with the
prefix "transformer." by default:

    checkpoint                                     vlmkit CausalLM
    transformer.wte.weight                         embed.weight
    transformer.h.{i}.ln_1.weight                  layers.{i}.attn_norm.weight     RMSNorm (layer_norm_epsilon)
    transformer.h.{i}.attn.c_attn.{weight,bias}    layers.{i}.attn.qkv.*           fused q|k|v, biased
    transformer.h.{i}.attn.c_proj.weight           layers.{i}.attn.out.weight      (no_bias: no bias)
    transformer.h.{i}.ln_2.weight                  layers.{i}.mlp_norm.weight
    transformer.h.{i}.mlp.w2.weight                layers.{i}.mlp.gate_up.weight   rows [w2 (gate); w1 (up)]: QWenMLP
    transformer.h.{i}.mlp.w1.weight                                                is c_proj(w1(x) * silu(w2(x)))
    transformer.h.{i}.mlp.c_proj.weight            layers.{i}.mlp.down.weight
    transformer.ln_f.weight                        norm.weight
    lm_head.weight                                 lm_head.weight                  (never tied in Qwen-1)

config.json keys read: vocab_size, hidden_size, num_hidden_layers, num_attention_heads, kv_channels (the head
width; must be hidden_size / heads, as QWenAttention splits by that), intermediate_size (TWICE the MLP width:
QWenMLP's w1 and w2 are intermediate_size // 2 wide), layer_norm_epsilon, rotary_emb_base, rotary_pct (the
rotated fraction of a head: Qwen rotates its first rotary_pct * kv_channels channels, rotate-half style),
no_bias (must be true: only c_attn has a bias), seq_length, tie_word_embeddings.

Length: past seq_length (2048) tokens the reference changes its attention: with use_dynamic_ntk it stretches the
RoPE base (base * alpha ** (d / (d - 2)), alpha = 2 ** ceil(log2(T / 2048) + 1) - 1, fixed at the prefill
length) and with use_logn_attn it scales the query at position n > 2048 by log_2048(n). vlmkit implements
neither: up to seq_length both are the identity and vlmkit equals the reference; so the LMConfig's
max_position_embeddings is seq_length, and past it vlmkit's plain RoPE differs from the reference (documented
in docs/what-works.md). config.json's own max_position_embeddings (8192) is read by no code of the reference.
Saving writes the released values of the keys vlmkit does not model (use_dynamic_ntk and use_logn_attn true,
max_position_embeddings 8192, dtype flags, dropouts 0).

Qwen-1's config.json has no token ids: <|endoftext|> (151643 in the real vocabulary) ends text and pads, and
generation_config.json names it as eos_token_id and pad_token_id; `lm_config_from_qwen` takes them from
there when the dict it is given has them (read_generation_config), else from EOS_TOKEN_ID.

Shared API (Vary's LM is this one): lm_config_from_qwen, lm_config_to_qwen, lm_state_from_qwen,
lm_state_to_qwen, read_generation_config, and QWEN1, the Converter of a text-only Qwen-1 checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlmkit.config import LMConfig
from vlmkit.models.lm import CausalLM
from vlmkit.models.rope import rope_parameters
from vlmkit.weights.converter import Converter, Joined, StateDict, write_files
from vlmkit.weights.llama import StateReader

MODEL_TYPE = "qwen"
EOS_TOKEN_ID = 151643  # <|endoftext|> in Qwen-1's vocabulary: generation_config.json's eos and pad id
GENERATION_CONFIG_FILE = "generation_config.json"
AUTO_MAP = {"AutoConfig": "configuration_qwen.QWenConfig", "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"}
# QWenConfig's defaults (configuration_qwen.py) for the keys read here
_DEFAULTS: dict[str, Any] = {"vocab_size": 151936, "hidden_size": 4096, "num_hidden_layers": 32,
                             "num_attention_heads": 32, "intermediate_size": 22016, "layer_norm_epsilon": 1e-6,
                             "rotary_emb_base": 10000, "rotary_pct": 1.0, "no_bias": True, "seq_length": 2048,
                             "tie_word_embeddings": False, "max_position_embeddings": 8192}
# What a save writes for the keys vlmkit does not model: the released Qwen-VL-Chat / Qwen-7B-Chat values.
_RELEASED: dict[str, Any] = {"attn_dropout_prob": 0.0, "emb_dropout_prob": 0.0, "initializer_range": 0.02,
                             "bf16": False, "fp16": False, "fp32": False, "onnx_safe": None,
                             "scale_attn_weights": True, "use_cache": True, "use_dynamic_ntk": True,
                             "use_flash_attn": "auto", "use_logn_attn": True, "tokenizer_type": "QWenTokenizer",
                             "max_position_embeddings": 8192}


def read_generation_config(path: Path, config: dict) -> dict:
    """config.json with generation_config.json's eos_token_id / pad_token_id (Qwen-1 keeps its token ids there)
    when the folder has that file and config.json does not name them."""
    file = path / GENERATION_CONFIG_FILE
    if not file.is_file():
        return config
    try:
        generation = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    return {**{k: generation[k] for k in ("eos_token_id", "pad_token_id") if k in generation}, **config}


def lm_config_from_qwen(hf: dict[str, Any]) -> LMConfig:
    """A Qwen-1 config.json dict -> LMConfig (keys and their meaning in the module docstring)."""
    hf = {**_DEFAULTS, **hf}
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "quantized")
        raise ValueError(f"this qwen checkpoint holds {method} weights (e.g. Qwen-VL-Chat-Int4), which vlmkit does not "
                         "read; load the unquantized checkpoint (Qwen/Qwen-VL-Chat) and pass --quantize int4 instead")
    heads, width = hf["num_attention_heads"], hf["hidden_size"]
    if width % heads:
        raise ValueError(f"qwen config: hidden_size {width} is not divisible by num_attention_heads {heads}")
    head_dim = width // heads
    if hf.get("kv_channels", head_dim) != head_dim:
        raise ValueError(f"qwen config: kv_channels {hf['kv_channels']} differs from hidden_size / "
                         f"num_attention_heads = {head_dim}; Qwen-1's attention splits heads by the latter, so the "
                         "checkpoint's c_attn would not fit")
    if not hf["no_bias"]:
        raise ValueError("qwen config: no_bias is false (biased c_proj and MLP); the released Qwen-1 models and "
                         "vlmkit have a bias on c_attn only")
    if hf["intermediate_size"] % 2:
        raise ValueError(f"qwen config: intermediate_size {hf['intermediate_size']} is odd; Qwen-1's MLP branches "
                         "are intermediate_size // 2 wide each")
    rotary_pct = float(hf["rotary_pct"])
    if not 0.0 < rotary_pct <= 1.0:
        raise ValueError(f"qwen config: rotary_pct {rotary_pct} is not in (0, 1]")
    eos = hf.get("eos_token_id", EOS_TOKEN_ID)
    return LMConfig(vocab_size=hf["vocab_size"], hidden_size=width, intermediate_size=hf["intermediate_size"] // 2,
                    num_layers=hf["num_hidden_layers"], num_heads=heads, num_kv_heads=heads,
                    rms_norm_eps=hf["layer_norm_epsilon"], rope_theta=float(hf["rotary_emb_base"]),
                    partial_rotary_factor=rotary_pct, max_position_embeddings=hf["seq_length"], qkv_bias=True,
                    tie_word_embeddings=bool(hf["tie_word_embeddings"]), hidden_act="silu",
                    eos_token_id=eos, pad_token_id=hf.get("pad_token_id", eos))


def lm_config_to_qwen(cfg: LMConfig) -> dict[str, Any]:
    """LMConfig -> the LM keys of a Qwen-1 config.json (with model_type, architectures, auto_map); ValueError
    naming what Qwen-1 cannot hold."""
    problems = []
    if cfg.num_experts or cfg.kv_lora_rank:
        problems.append("Qwen-1 is a dense decoder with ordinary attention")
    if cfg.num_kv_heads != cfg.num_heads:
        problems.append(f"Qwen-1 has no grouped-query attention ({cfg.num_kv_heads} kv heads, {cfg.num_heads} heads)")
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        problems.append(f"Qwen-1's head width is hidden_size / heads, not {cfg.head_dim}")
    if not cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias:
        problems.append("Qwen-1 has a bias on q/k/v only")
    if cfg.sliding_window is not None:
        problems.append("Qwen-1 has no sliding window")
    if cfg.hidden_act != "silu":
        problems.append(f"Qwen-1's MLP is SwiGLU (silu), not {cfg.hidden_act!r}")
    if rope_parameters(cfg)["rope_type"] != "default":
        problems.append(f"Qwen-1 has plain RoPE, not {rope_parameters(cfg)['rope_type']!r}")
    if problems:
        raise ValueError("cannot save this LM as model_type 'qwen': " + "; ".join(problems))
    return {"architectures": ["QWenLMHeadModel"], "auto_map": dict(AUTO_MAP), "model_type": MODEL_TYPE,
            **_RELEASED, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "intermediate_size": 2 * cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads, "kv_channels": cfg.head_dim, "layer_norm_epsilon": cfg.rms_norm_eps,
            "rotary_emb_base": cfg.rope_theta, "rotary_pct": cfg.partial_rotary_factor, "no_bias": True,
            "seq_length": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings}


def generation_config(cfg: LMConfig) -> dict[str, Any]:
    """generation_config.json: Qwen-VL-Chat's (model.chat reads chat_format and max_window_size there) with the
    model's token ids (Qwen-1 keeps them there, not in config.json)."""
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else EOS_TOKEN_ID
    return {"chat_format": "chatml", "eos_token_id": eos,
            "pad_token_id": cfg.pad_token_id if cfg.pad_token_id is not None else eos, "max_window_size": 6144,
            "max_new_tokens": 512, "do_sample": True, "top_k": 0, "top_p": 0.5}


def lm_state_from_qwen(state: StateDict, cfg: LMConfig, prefix: str = "transformer.",
                       head: str = "lm_head.weight") -> StateDict:
    """Qwen-1 tensors -> the complete vlmkit CausalLM state dict. Every tensor of `state` must be used (the
    legacy rotary_emb.inv_freq / masked_bias buffers excepted), so pass only the language model's tensors."""
    src = StateReader(state)
    inter, width = cfg.intermediate_size, cfg.hidden_size
    out: StateDict = {"embed.weight": src.take(f"{prefix}wte.weight", cfg.vocab_size)}
    for i in range(cfg.num_layers):
        q, vk = f"{prefix}h.{i}.", f"layers.{i}."
        out[f"{vk}attn_norm.weight"] = src.take(f"{q}ln_1.weight", width)
        out[f"{vk}attn.qkv.weight"] = src.take(f"{q}attn.c_attn.weight", 3 * width)
        out[f"{vk}attn.qkv.bias"] = src.take(f"{q}attn.c_attn.bias", 3 * width)
        out[f"{vk}attn.out.weight"] = src.take(f"{q}attn.c_proj.weight", width)
        out[f"{vk}mlp_norm.weight"] = src.take(f"{q}ln_2.weight", width)
        out[f"{vk}mlp.gate_up.weight"] = Joined([src.take(f"{q}mlp.w2.weight", inter),
                                                 src.take(f"{q}mlp.w1.weight", inter)])
        out[f"{vk}mlp.down.weight"] = src.take(f"{q}mlp.c_proj.weight", width)
    out["norm.weight"] = src.take(f"{prefix}ln_f.weight", width)
    if cfg.tie_word_embeddings:
        src.left.pop(head, None)
        out["lm_head.weight"] = out["embed.weight"]
    else:
        out["lm_head.weight"] = src.take(head, cfg.vocab_size)
    unexpected = sorted(k for k in src.left if not k.endswith(("rotary_emb.inv_freq", "attn.masked_bias")))
    if unexpected:
        raise ValueError(f"checkpoint has tensors a {cfg.num_layers}-layer Qwen-1 LM does not use: {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    return out


def lm_state_to_qwen(state: StateDict, cfg: LMConfig, prefix: str = "transformer.",
                     head: str = "lm_head.weight") -> StateDict:
    """vlmkit CausalLM state dict -> Qwen-1 tensor names (lm_head omitted when tied)."""
    inter = cfg.intermediate_size
    out: StateDict = {f"{prefix}wte.weight": state["embed.weight"]}
    for i in range(cfg.num_layers):
        q, vk = f"{prefix}h.{i}.", f"layers.{i}."
        out[f"{q}ln_1.weight"] = state[f"{vk}attn_norm.weight"]
        out[f"{q}attn.c_attn.weight"] = state[f"{vk}attn.qkv.weight"]
        out[f"{q}attn.c_attn.bias"] = state[f"{vk}attn.qkv.bias"]
        out[f"{q}attn.c_proj.weight"] = state[f"{vk}attn.out.weight"]
        out[f"{q}ln_2.weight"] = state[f"{vk}mlp_norm.weight"]
        out[f"{q}mlp.w2.weight"], out[f"{q}mlp.w1.weight"] = state[f"{vk}mlp.gate_up.weight"].split([inter, inter])
        out[f"{q}mlp.c_proj.weight"] = state[f"{vk}mlp.down.weight"]
    out[f"{prefix}ln_f.weight"] = state["norm.weight"]
    if not cfg.tie_word_embeddings:
        out[head] = state["lm_head.weight"]
    return out


def write_with_generation_config(path: Path, config: dict, state: StateDict, max_shard_bytes: int,
                                 tokenizer: Any = None) -> None:
    """write_files, after generation_config.json from the "generation" entry config_to_hf puts in the dict.
    torch_dtype and the reference's precision flag (bf16 / fp16 / fp32) follow the tensors' dtype, so the
    reference computes in the dtype saved (with none set it picks bf16 or fp16 on a GPU by itself)."""
    config = dict(config)
    generation = config.pop("generation")
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    flags = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
    config.update({flag: name == dtype for name, flag in flags.items()}, torch_dtype=dtype)
    path.mkdir(parents=True, exist_ok=True)
    (path / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2) + "\n")
    write_files(path, config, state, max_shard_bytes, tokenizer)


def _config_to_hf(cfg: LMConfig) -> dict[str, Any]:
    return {**lm_config_to_qwen(cfg), "generation": generation_config(cfg)}


QWEN1 = Converter(config_from_hf=lm_config_from_qwen, build=CausalLM, state_from_hf=lm_state_from_qwen,
                  config_to_hf=_config_to_hf, state_to_hf=lm_state_to_qwen, natural=None,
                  read_config=read_generation_config, write=write_with_generation_config)
"""A text-only Qwen-1 checkpoint (Qwen-7B(-Chat)): config.json without a `visual` dict. weights/qwen_vl.py's
converter, registered under model_type "qwen", hands such folders to this one."""
