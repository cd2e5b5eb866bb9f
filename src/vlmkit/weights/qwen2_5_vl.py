"""transformers `qwen2_5_vl` checkpoints <-> vlmkit Qwen2_5_VL (models/qwen2_5_vl.py).

    transformers                                     vlmkit
    [model.]visual.patch_embed.proj.weight (E,C,T,P,P)  vision.patch_embed.weight (E, C*T*P*P)
    [model.]visual.blocks.{i}.{norm1,norm2,attn.qkv,attn.proj}.*   vision.blocks.{i}.<same>
    [model.]visual.blocks.{i}.mlp.{gate_proj,up_proj}.*   vision.blocks.{i}.mlp.gate_up.* (gate rows first)
    [model.]visual.blocks.{i}.mlp.down_proj.*        vision.blocks.{i}.mlp.down.*
    [model.]visual.merger.ln_q.weight                vision.merger.norm.weight (an RMSNorm)
    [model.]visual.merger.mlp.{0,2}.*                vision.merger.fc{1,2}.*
    model.<qwen2 body> or model.language_model.<qwen2 body>, lm_head.weight    lm.* (see weights/llama.py)

config.json is read as weights/qwen2_vl.py reads Qwen2-VL's (text_config or flat transformers 4
keys, rope_scaling type 'mrope', vision `in_chans`); vision keys a file omits take the defaults
of transformers' Qwen2_5_VLVisionConfig. Saving writes the transformers 5 config and the tensor
names transformers 5 itself writes to disk (the first column, without `model.` before `visual.`).
"""

from __future__ import annotations

from typing import Any

from vlmkit.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig, Qwen2_5_VLVisionConfig
from vlmkit.weights.converter import Converter, Joined, StateDict
from vlmkit.weights.llama import lm_state_from_hf, lm_state_to_hf
from vlmkit.weights.qwen2_vl import text_config_from_hf, split_checkpoint, text_config_to_hf

# vlmkit name -> (config.json key, transformers' Qwen2_5_VLVisionConfig default)
_VISION_KEYS: dict[str, tuple[str, Any]] = {
    "depth": ("depth", 32), "embed_dim": ("hidden_size", 3584), "num_heads": ("num_heads", 16),
    "intermediate_size": ("intermediate_size", 3420), "hidden_act": ("hidden_act", "silu"),
    "in_channels": ("in_channels", 3), "patch_size": ("patch_size", 14),
    "temporal_patch_size": ("temporal_patch_size", 2), "spatial_merge_size": ("spatial_merge_size", 2),
    "out_hidden_size": ("out_hidden_size", 3584), "window_size": ("window_size", 112),
    "fullatt_block_indexes": ("fullatt_block_indexes", [7, 15, 23, 31]),
    "tokens_per_second": ("tokens_per_second", 4),
}
_VISION_THETA = 10000.0
_TOKEN_IDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
_MERGER = {"ln_q": "norm", "mlp.0": "fc1", "mlp.2": "fc2"}  # transformers -> vlmkit module names
_GATE, _UP, _DOWN = ".mlp.gate_proj.", ".mlp.up_proj.", ".mlp.down_proj."


def config_from_hf(hf: dict) -> Qwen2_5_VLConfig:
    """A transformers qwen2_5_vl config.json dict -> Qwen2_5_VLConfig."""
    raw = dict(hf.get("vision_config") or {})
    if "in_chans" in raw:
        raw.setdefault("in_channels", raw.pop("in_chans"))
    vision = {ours: raw.get(theirs, default) for ours, (theirs, default) in _VISION_KEYS.items()}
    vision["fullatt_block_indexes"] = list(vision["fullatt_block_indexes"])
    vision["rope_theta"] = float((raw.get("rope_parameters") or {}).get("rope_theta", _VISION_THETA))
    ids = {name: hf[name] for name in _TOKEN_IDS if hf.get(name) is not None}
    return Qwen2_5_VLConfig(vision=Qwen2_5_VLVisionConfig(**vision), lm=text_config_from_hf(hf), **ids)


def config_to_hf(cfg: Qwen2_5_VLConfig) -> dict:
    """Qwen2_5_VLConfig -> a transformers 5 qwen2_5_vl config.json dict."""
    vision = {theirs: getattr(cfg.vision, ours) for ours, (theirs, _) in _VISION_KEYS.items()}
    vision.update(model_type="qwen2_5_vl_vision", rope_parameters={"rope_type": "axial",
                                                                   "rope_theta": cfg.vision.rope_theta})
    return {"model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "text_config": text_config_to_hf(cfg.lm, "qwen2_5_vl_text"), "vision_config": vision,
            "tie_word_embeddings": cfg.lm.tie_word_embeddings, **{name: getattr(cfg, name) for name in _TOKEN_IDS}}


def _vision_from_hf(state: StateDict) -> StateDict:
    out = {}
    for key, tensor in state.items():
        if key == "patch_embed.proj.weight":
            out["patch_embed.weight"] = tensor.reshape(tensor.shape[0], -1)  # (E, C*T*P*P)
        elif key.startswith("merger."):
            module, _, param = key.removeprefix("merger.").rpartition(".")
            if module not in _MERGER:
                raise ValueError(f"unexpected tensor visual.{key!r} in a qwen2_5_vl checkpoint")
            out[f"merger.{_MERGER[module]}.{param}"] = tensor
        elif _GATE in key:
            up = state.get(key.replace(_GATE, _UP))
            if up is None:
                raise ValueError(f"qwen2_5_vl checkpoint has visual.{key} but no {key.replace(_GATE, _UP)}")
            out[key.replace(_GATE, ".mlp.gate_up.")] = Joined([tensor, up])  # (2I, E) or (2I,)
        elif _UP in key:
            continue  # joined to its gate_proj above
        else:
            out[key.replace(_DOWN, ".mlp.down.")] = tensor
    return out


def state_from_hf(state: StateDict, cfg: Qwen2_5_VLConfig) -> StateDict:
    vision, lm = split_checkpoint(state)
    out = {f"vision.{k}": v for k, v in _vision_from_hf(vision).items()}
    out.update({f"lm.{k}": v for k, v in lm_state_from_hf(lm, cfg.lm, prefix="model.").items()})
    return out


def state_to_hf(state: StateDict, cfg: Qwen2_5_VLConfig) -> StateDict:
    v = cfg.vision
    theirs = {ours: hf for hf, ours in _MERGER.items()}
    out = {}
    for key, tensor in state.items():
        if not key.startswith("vision."):
            continue
        name = key.removeprefix("vision.")
        if name == "patch_embed.weight":
            out["visual.patch_embed.proj.weight"] = tensor.reshape(
                v.embed_dim, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
        elif name.startswith("merger."):
            module, _, param = name.removeprefix("merger.").rpartition(".")
            out[f"visual.merger.{theirs[module]}.{param}"] = tensor
        elif ".mlp.gate_up." in name:
            gate, up = tensor.chunk(2)  # (I, E) or (I,) each
            out[f"visual.{name.replace('.mlp.gate_up.', _GATE)}"] = gate
            out[f"visual.{name.replace('.mlp.gate_up.', _UP)}"] = up
        else:
            out[f"visual.{name.replace('.mlp.down.', _DOWN)}"] = tensor
    lm = {k.removeprefix("lm."): t for k, t in state.items() if k.startswith("lm.")}
    out.update(lm_state_to_hf(lm, cfg.lm, "qwen2", prefix="model."))
    return out


QWEN2_5_VL = Converter(config_from_hf=config_from_hf, build=Qwen2_5_VL, state_from_hf=state_from_hf,
                       config_to_hf=config_to_hf, state_to_hf=state_to_hf, natural=lambda cfg: True)
