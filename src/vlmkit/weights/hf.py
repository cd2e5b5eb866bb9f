"""Load and save transformers-format model directories, dispatching on config.json's model_type."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from vlmkit.weights.converter import Converter, StateDict
from vlmkit.weights.safetensors_io import read_config, read_state_dict, write_dir


def converters() -> dict[str, Converter]:
    """model_type -> Converter for every transformers model type vlmkit reads and writes."""
    from vlmkit.weights import (deepseek_v2, deepseek_vl, got_ocr2, llama, llava, llava_next, native, qwen2_5_vl,
                                qwen2_moe, qwen2_vl, sam, vision)

    return {
        "llama": llama.LLAMA,
        "mistral": llama.MISTRAL,
        "qwen2": llama.QWEN2,
        "phi3": llama.PHI3,
        "qwen2_moe": qwen2_moe.QWEN2_MOE,
        "deepseek_v2": deepseek_v2.DEEPSEEK_V2,
        "deepseek_v3": deepseek_v2.DEEPSEEK_V3,
        "clip_vision_model": vision.CLIP_VISION,
        "siglip_vision_model": vision.SIGLIP_VISION,
        "llava": llava.LLAVA,
        "llava_next": llava_next.LLAVA_NEXT,
        "sam_vision_model": sam.SAM_VISION,
        "qwen2_vl": qwen2_vl.QWEN2_VL,
        "qwen2_5_vl": qwen2_5_vl.QWEN2_5_VL,
        "deepseek_vl_hybrid": deepseek_vl.DEEPSEEK_VL_HYBRID,
        "got_ocr2": got_ocr2.GOT_OCR2,
        native.MODEL_TYPE: native.NATIVE,
    }


def get_converter(model_type: str | None) -> Converter:
    table = converters()
    if model_type not in table:
        raise ValueError(f"model_type {model_type!r} is not supported; supported types: {', '.join(sorted(table))}")
    return table[model_type]


def load_state(model: nn.Module, state: StateDict, source: str) -> None:
    """Copy state into model, requiring the same names and shapes (no silent partial loads)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{source}: checkpoint does not match the model: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    for name, tensor in state.items():
        if tuple(own[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(own[name].shape)}")
    model.load_state_dict(state, strict=True)


def from_pretrained(path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """Build the vlmkit module for a transformers-format directory and load its weights."""
    config = read_config(path)
    model_type = config.get("model_type")
    conv = get_converter(model_type)
    cfg = conv.config_from_hf(config)
    model = conv.build(cfg)
    load_state(model, conv.state_from_hf(read_state_dict(path), cfg), str(path))
    model.hf_model_type = model_type
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def save_pretrained(model: nn.Module, path: str | Path, model_type: str | None = None,
                    max_shard_bytes: int = 2 * 1024**3) -> None:
    """Write model as a transformers-format directory (config.json + safetensors).

    model_type defaults to the type it was loaded from, or the model's natural
    type (llava for a VLM, the llama-family type that expresses a CausalLM's config,
    clip/siglip for a vision tower).
    """
    model_type = model_type or getattr(model, "hf_model_type", None) or default_model_type(model)
    conv = get_converter(model_type)
    cfg = model.cfg
    config = conv.config_to_hf(cfg)
    write_dir(path, config, conv.state_to_hf(model.state_dict(), cfg), max_shard_bytes)


def default_model_type(model: nn.Module) -> str:
    from vlmkit.models.lm import CausalLM
    from vlmkit.models.deepseek_vl import DeepseekVL
    from vlmkit.models.qwen2_5_vl import Qwen2_5_VL
    from vlmkit.models.qwen2_vl import Qwen2VL
    from vlmkit.models.sam import SamEncoder
    from vlmkit.models.vit import VisionTower
    from vlmkit.models.vlm import VLM

    if isinstance(model, VLM):
        if model.cfg.projector.type != "mlp2x_gelu" or model.cfg.image_scheme not in ("pad", "anyres"):
            return "vlmkit"  # only llava / llava_next express the rest: vlmkit's own format (weights/native.py)
        return "llava_next" if model.cfg.image_scheme == "anyres" else "llava"
    if isinstance(model, CausalLM):
        from vlmkit.weights.llama import natural_model_type

        if model.cfg.kv_lora_rank or (model.cfg.num_experts and not model.cfg.shared_expert_gate):
            from vlmkit.weights.deepseek_v2 import natural_model_type as deepseek_type

            return deepseek_type(model.cfg)
        if model.cfg.num_experts:
            return "qwen2_moe"
        return natural_model_type(model.cfg)
    if isinstance(model, DeepseekVL):
        return "deepseek_vl_hybrid"
    if isinstance(model, Qwen2_5_VL):  # before Qwen2VL, its base class
        return "qwen2_5_vl"
    if isinstance(model, Qwen2VL):
        return "qwen2_vl"
    if isinstance(model, SamEncoder):
        return "sam_vision_model"
    if isinstance(model, VisionTower):
        return "clip_vision_model" if model.cfg.use_cls_token else "siglip_vision_model"
    raise ValueError(f"cannot tell the transformers model_type of {type(model).__name__}; pass model_type=")
