"""transformers `qwen2_vl` checkpoints <-> vlmkit Qwen2VL (models/qwen2_vl.py).

    transformers                                     vlmkit
    [model.]visual.patch_embed.proj.weight (E,C,T,P,P)  vision.patch_embed.weight (E, C*T*P*P)
    [model.]visual.blocks.{i}.{norm1,norm2,attn.qkv,attn.proj,mlp.fc1,mlp.fc2}.*   vision.blocks.{i}.<same>
    [model.]visual.merger.ln_q.*                     vision.merger.norm.*
    [model.]visual.merger.mlp.{0,2}.*                vision.merger.fc{1,2}.*
    model.<qwen2 body> or model.language_model.<qwen2 body>, lm_head.weight    lm.* (see weights/llama.py)

config.json: transformers 5 nests the LM under text_config with rope_parameters
{"rope_type": "default", "rope_theta", "mrope_section"}; Qwen2-VL's own (transformers 4)
files keep the LM keys at the top level with rope_scaling {"type": "mrope", "mrope_section"}
and call the vision input channels `in_chans`. Both are read; keys a file omits take the
defaults of transformers' Qwen2VL{Text,Vision}Config. Saving writes the transformers 5
config and the tensor names transformers 5 itself writes to disk (the first column,
without the `model.` before `visual.`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vlmkit.config import LMConfig
from vlmkit.models.qwen2_vl import Qwen2VL, Qwen2VLConfig, Qwen2VLVisionConfig
from vlmkit.models.rope import rope_parameters
from vlmkit.weights.converter import Converter, StateDict
from vlmkit.weights.llama import lm_config_from_hf, lm_config_to_hf, lm_state_from_hf, lm_state_to_hf

# transformers' Qwen2VLTextConfig defaults (configuration_qwen2_vl.py) for the keys read here.
_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
    "num_attention_heads": 64, "num_key_value_heads": 8, "hidden_act": "silu", "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5, "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 80,
    "bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": None,
}
_TEXT_THETA = 1000000.0
_MROPE_SECTION = [16, 24, 24]
# transformers' Qwen2VLVisionConfig defaults, in vlmkit names, and the config.json key of each.
_VISION_KEYS = {"depth": "depth", "embed_dim": "embed_dim", "num_heads": "num_heads", "mlp_ratio": "mlp_ratio",
                "hidden_act": "hidden_act", "in_channels": "in_channels", "patch_size": "patch_size",
                "temporal_patch_size": "temporal_patch_size", "spatial_merge_size": "spatial_merge_size",
                "out_hidden_size": "hidden_size"}
_VISION_DEFAULTS = Qwen2VLVisionConfig(out_hidden_size=3584)
_TOKEN_IDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
_MERGER = {"ln_q": "norm", "mlp.0": "fc1", "mlp.2": "fc2"}  # transformers -> vlmkit module names


def _text_config(hf: dict) -> dict:
    """The LM's config keys: text_config (transformers 5) or the top level (Qwen2-VL's own files)."""
    if hf.get("text_config"):
        return dict(hf["text_config"])
    return {k: hf[k] for k in (*_TEXT_DEFAULTS, "rope_theta", "rope_scaling", "rope_parameters") if k in hf}


def text_config_from_hf(hf: dict) -> LMConfig:
    """The language model's LMConfig (with its M-RoPE sections) from a qwen2_vl / qwen2_5_vl config.json dict."""
    text = {**_TEXT_DEFAULTS, **_text_config(hf)}
    rope = dict(text.pop("rope_scaling", None) or text.pop("rope_parameters", None) or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "mrope"):
        raise ValueError(f"qwen2_vl rope type {kind!r} unsupported; Qwen2-VL uses M-RoPE ('default' or 'mrope')")
    theta = float(rope.get("rope_theta", text.get("rope_theta", _TEXT_THETA)))
    section = [int(n) for n in rope.get("mrope_section", _MROPE_SECTION)]
    text.update(model_type="qwen2", rope_parameters={"rope_type": "default", "rope_theta": theta})
    text.pop("head_dim", None)  # Qwen2-VL's attention always uses hidden_size // num_attention_heads
    text["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    lm = lm_config_from_hf(text)
    return dataclasses.replace(lm, rope_scaling={"rope_type": "default", "mrope_section": section})


def config_from_hf(hf: dict) -> Qwen2VLConfig:
    """A transformers qwen2_vl config.json dict -> Qwen2VLConfig."""
    raw = dict(hf.get("vision_config") or {})
    if "in_chans" in raw:
        raw.setdefault("in_channels", raw.pop("in_chans"))
    vision = {ours: raw.get(theirs, getattr(_VISION_DEFAULTS, ours)) for ours, theirs in _VISION_KEYS.items()}
    vision["rope_theta"] = float((raw.get("rope_parameters") or {}).get("rope_theta", _VISION_DEFAULTS.rope_theta))
    ids = {name: hf[name] for name in _TOKEN_IDS if hf.get(name) is not None}
    return Qwen2VLConfig(vision=Qwen2VLVisionConfig(**vision), lm=text_config_from_hf(hf), **ids)


def text_config_to_hf(lm: LMConfig, model_type: str = "qwen2_vl_text") -> dict:
    """The LM as a transformers 5 text_config dict (rope_parameters carrying mrope_section)."""
    text = lm_config_to_hf(lm, "qwen2")
    for key in ("architectures", "head_dim", "tie_word_embeddings"):
        text.pop(key)
    text["model_type"] = model_type
    text["rope_parameters"] = {"rope_theta": lm.rope_theta, **rope_parameters(lm)}
    return text


def config_to_hf(cfg: Qwen2VLConfig) -> dict:
    """Qwen2VLConfig -> a transformers 5 qwen2_vl config.json dict."""
    text = text_config_to_hf(cfg.lm)
    vision = {theirs: getattr(cfg.vision, ours) for ours, theirs in _VISION_KEYS.items()}
    vision.update(model_type="qwen2_vl_vision", rope_parameters={"rope_type": "axial",
                                                                 "rope_theta": cfg.vision.rope_theta})
    return {"model_type": "qwen2_vl", "architectures": ["Qwen2VLForConditionalGeneration"],
            "text_config": text, "vision_config": vision, "tie_word_embeddings": cfg.lm.tie_word_embeddings,
            **{name: getattr(cfg, name) for name in _TOKEN_IDS}}


def split_checkpoint(state: StateDict) -> tuple[StateDict, StateDict]:
    """(vision tensors without prefix, LM tensors as `model.*` / `lm_head.weight`)."""
    vision, lm = {}, {}
    for key, tensor in state.items():
        name = key.removeprefix("model.") if key.startswith(("model.visual.", "model.language_model.")) else key
        if name.startswith("visual."):
            vision[name.removeprefix("visual.")] = tensor
        elif name.startswith("language_model."):
            lm["model." + name.removeprefix("language_model.")] = tensor
        elif name.startswith(("model.", "lm_head.")):
            lm[name] = tensor
        else:
            raise ValueError(f"unexpected tensor {key!r} in a qwen2_vl checkpoint")
    return vision, lm


def _vision_from_hf(state: StateDict, cfg: Qwen2VLVisionConfig) -> StateDict:
    out = {}
    for key, tensor in state.items():
        name = key
        if key == "patch_embed.proj.weight":
            name, tensor = "patch_embed.weight", tensor.reshape(tensor.shape[0], -1)  # (E, C*T*P*P)
        elif key.startswith("merger."):
            module, _, param = key.removeprefix("merger.").rpartition(".")
            if module not in _MERGER:
                raise ValueError(f"unexpected tensor visual.{key!r} in a qwen2_vl checkpoint")
            name = f"merger.{_MERGER[module]}.{param}"
        out[name] = tensor
    return out


def state_from_hf(state: StateDict, cfg: Qwen2VLConfig) -> StateDict:
    vision, lm = split_checkpoint(state)
    out = {f"vision.{k}": v for k, v in _vision_from_hf(vision, cfg.vision).items()}
    out.update({f"lm.{k}": v for k, v in lm_state_from_hf(lm, cfg.lm, prefix="model.").items()})
    return out


def state_to_hf(state: StateDict, cfg: Qwen2VLConfig) -> StateDict:
    v = cfg.vision
    out = {}
    theirs = {ours: hf for hf, ours in _MERGER.items()}
    for key, tensor in state.items():
        if not key.startswith("vision."):
            continue
        name = key.removeprefix("vision.")
        if name == "patch_embed.weight":
            name = "patch_embed.proj.weight"
            tensor = tensor.reshape(v.embed_dim, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
        elif name.startswith("merger."):
            module, _, param = name.removeprefix("merger.").rpartition(".")
            name = f"merger.{theirs[module]}.{param}"
        out[f"visual.{name}"] = tensor
    lm = {k.removeprefix("lm."): t for k, t in state.items() if k.startswith("lm.")}
    out.update(lm_state_to_hf(lm, cfg.lm, "qwen2", prefix="model."))
    return out


QWEN2_VL = Converter(config_from_hf=config_from_hf, build=Qwen2VL, state_from_hf=state_from_hf,
                     config_to_hf=config_to_hf, state_to_hf=state_to_hf, natural=lambda cfg: True)
