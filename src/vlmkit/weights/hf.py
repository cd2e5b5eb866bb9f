"""Load and save model directories, dispatching on config.json's model_type through the family registry.

Every model family is a Converter (weights/converter.py) under its model_type: the transformers layouts
vlmkit reads and writes (llava, qwen2_vl, ...) and vlmkit's own format (weights/native.py, "vlmkit").
A plugin registers its own families with `register_converter` (the demo registers "vlmkit-demo"); an
unknown model_type loads the installed plugins (vlmkit.plugins) before it is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule

from vlmkit.hub import hub_folder, is_hub_spec
from vlmkit.plugins import load_plugins
from vlmkit.train.lora import without_adapters
from vlmkit.weights.converter import Converter, StateDict, resolve
from vlmkit.weights.materialize import LayerQuantizer, build_on_meta, check_state, from_state, materialize
from vlmkit.weights.safetensors_io import read_config

_REGISTERED: dict[str, Converter] = {}  # families added by register_converter (plugins, the demo)


def register_converter(model_type: str, converter: Converter) -> None:
    """Register a model family under model_type (ValueError if a built-in family has that name)."""
    if model_type in _builtin_converters():
        raise ValueError(f"model_type {model_type!r} is vlmkit's own; register the family under another name")
    _REGISTERED[model_type] = converter


def converters() -> dict[str, Converter]:
    """model_type -> Converter for every model type vlmkit reads and writes: the built-in ones, then the
    registered ones."""
    return {**_builtin_converters(), **_REGISTERED}


def _builtin_converters() -> dict[str, Converter]:
    from vlmkit.weights import (deepseek_v2, deepseek_vl, deepseek_vl2, got_ocr2, llama, llava, llava_next, minicpmv,
                                native, phi3_v, qwen2_5_vl, qwen2_moe, qwen2_vl, qwen_vl, sam, vary, vision)

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
        "deepseek_vl_v2": deepseek_vl2.DEEPSEEK_VL_V2,
        "got_ocr2": got_ocr2.GOT_OCR2,
        "phi3_v": phi3_v.PHI3_V,
        "minicpmv": minicpmv.MINICPMV,
        "vary": vary.VARY,
        "qwen": qwen_vl.QWEN,
        native.MODEL_TYPE: native.NATIVE,
    }


def get_converter(model_type: str | None) -> Converter:
    """The Converter of model_type; ValueError listing the supported types if there is none."""
    if model_type not in converters():
        load_plugins()
    table = converters()
    if model_type not in table:
        raise ValueError(f"model_type {model_type!r} is not supported; supported types: {', '.join(sorted(table))}")
    return table[model_type]


def load_state(model: nn.Module, state: StateDict, source: str) -> None:
    """Copy state (a converter's: fused tensors made here) into model, requiring the same names and shapes (no
    silent partial loads)."""
    check_state(model, state, source)
    model.load_state_dict({name: resolve(value) for name, value in state.items()}, strict=True)


def from_pretrained(path: str | Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                    quantize: Callable[[nn.Module], Mapping[str, LayerQuantizer]] | None = None) -> nn.Module:
    """Build the vlmkit module for a transformers-format directory, or a Hugging Face hub id (owner/name or
    owner/name@revision, when no folder has that name: vlmkit.hub.hub_folder), and load its weights: built on
    the meta device and materialized module by module (weights/materialize.py) in dtype (float tensors; default
    fp32) on device, with the layers quantize(model on meta) names replaced by their quantized form as they are
    loaded (vlmkit.quantize.quantize_plan, train/qlora.py frozen_linears), so no full float copy ever exists:
    the checkpoint is memory-mapped and the tensors the converter fuses (Joined) are made as their module is."""
    if not Path(path).is_dir() and is_hub_spec(str(path)):
        path = hub_folder(str(path))
    config = read_config(path)
    model_type = config.get("model_type")
    conv = get_converter(model_type)
    cfg = conv.config_from_hf(conv.read_config(Path(path), config))
    state = conv.state_from_hf(conv.read_state(Path(path), config), cfg)
    model = build_on_meta(conv.build, cfg)
    check_state(model, state, str(path))
    plan = quantize(model) if quantize is not None else None
    materialize(model, from_state(state), dtype=dtype, device=device, quantize=plan)
    model.hf_model_type = model_type
    return model.eval()


def save_pretrained(model: nn.Module, path: str | Path, model_type: str | None = None,
                    max_shard_bytes: int = 2 * 1024**3, tokenizer: Any = None,
                    state: dict[str, torch.Tensor] | None = None) -> None:
    """Write model as a model directory in model_type's layout (config.json + safetensors), and the tokenizer
    (a text.tokenizer.Tokenizer: its save_pretrained files) when given. LoadedModel.save_pretrained passes
    the model's own, so the folder is one vlmkit.load.load_model reads back.

    A model with LoRA adapters (train/lora.py) is written without them: its base weights.
    model_type defaults to the type it was loaded from, or the model's natural type (default_model_type):
    llava / llava_next for a VLM they express, vlmkit's own format for any other VLM, the llama-family
    type that expresses a CausalLM's config, clip/siglip for a vision tower.
    state is the weights to write under the model's names, default model.state_dict() (a sharded model's
    full weights, gathered to one process by train.run).
    """
    model_type = model_type or getattr(model, "hf_model_type", None) or default_model_type(model)
    conv = get_converter(model_type)
    cfg = model.cfg
    state = without_adapters(model.state_dict() if state is None else state)  # the base model; LoadedModel
    # .save_pretrained writes the adapters
    conv.write(Path(path), conv.config_to_hf(cfg), conv.state_to_hf(state, cfg), max_shard_bytes, tokenizer)


def default_model_type(model: nn.Module) -> str:
    """The first registered model_type whose family builds exactly this model's class and calls this config
    natural (Converter.natural)."""
    cls = type(model)
    if isinstance(model, FSDPModule):  # fully_shard (train --fsdp) made its class FSDP's subclass FSDP<Name>
        cls = cls.__bases__[-1]
    for model_type, conv in converters().items():
        if cls is conv.build and conv.natural is not None and conv.natural(model.cfg):
            return model_type
    raise ValueError(f"cannot tell the model_type of {type(model).__name__}; pass model_type=")
