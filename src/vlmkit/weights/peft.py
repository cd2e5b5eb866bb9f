"""A model's LoRA adapters (train/lora.py) as a PEFT adapter directory in the transformers layout.

    write_peft_adapter(model, "adapter")   # adapter_config.json + adapter_model.safetensors
    # transformers + peft:  PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "adapter")

The tensor names come from the model's converter (weights/hf.py, the same one save_pretrained writes the base
model with), so the adapters sit on the modules that hold the base weights in that layout: each adapted layer's
B (out, r) is passed through the converter in place of its weight, and every transformers tensor that is rows of
it (found by shared storage: the converters split fused weights into row views) becomes an adapter with those
rows of B and the layer's whole A. That is exact: for a fused qkv = [q; k; v], (B A) x split by rows is
(B_q A) x, (B_k A) x, (B_v A) x. Keys are `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`, as
peft saves them; target_modules lists the modules by full name.

The names are transformers' module names: for a Llama-family LM the checkpoint's tensor names, for LLaVA those
renamed as transformers 5 renames them on loading (RUNTIME_NAMES: `language_model.model.*` is
`model.language_model.*`, `vision_tower.*` is `model.vision_tower.*`); tested against transformers + peft for Llama,
Mistral, Qwen2, Phi-3 (whose fused qkv_proj / gate_up_proj keep one adapter) and LLaVA. Other model types are refused
(VERIFIED_TYPES) until their names are checked so.
Only the adapters are exported: a group the run trained in full (e.g. a LoRA run's projector at an lr > 0) is in the
run's base weights, not here; export with --merge to keep it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from vlmkit.train.lora import lora_layers, without_adapters
from vlmkit.weights.hf import default_model_type, get_converter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
# The checkpoint's tensor-name prefixes a model type's transformers model holds under other module names (transformers
# 5 renames them when it loads the checkpoint; peft applies adapters by module name), in the order they are tried.
RUNTIME_NAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "llava": (("language_model.model.", "model.language_model."), ("language_model.lm_head", "lm_head"),
              ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector.")),
}
# the model types whose adapters transformers + peft load by these names, checked in tests/test_lora.py
VERIFIED_TYPES = ("llama", "mistral", "qwen2", "phi3", "llava")


def peft_adapter(model: nn.Module, model_type: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config.json's content, adapter_model.safetensors' tensors) of model's adapters in model_type's
    layout (default: the type it was loaded from, else its natural type, as save_pretrained). Raises ValueError
    when the model has no adapters or the layout has no place for one of them."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to export (train it with --lora)")
    model_type = model_type or getattr(model, "hf_model_type", None) or default_model_type(model)
    if model_type not in VERIFIED_TYPES:
        raise ValueError(f"PEFT adapters are exported for the Llama-family LMs ({', '.join(VERIFIED_TYPES)}) only, whose "
                         f"names are checked against transformers + peft; this model is {model_type}, whose modules "
                         "transformers renames on loading: export it with --merge")
    state = without_adapters(model.state_dict())
    owner = {}
    for name, layer in layers.items():
        b = layer.lora_B.detach().clone()  # its own storage: the converter's row views of it point back here
        state[f"{name}.weight"] = b
        owner[b.untyped_storage().data_ptr()] = name
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, list[str]] = {name: [] for name in layers}
    for key, tensor in get_converter(model_type).state_to_hf(state, model.cfg).items():
        source = owner.get(tensor.untyped_storage().data_ptr())
        if source is None:
            continue
        if not key.endswith(".weight") or tensor.dim() != 2 or tensor.shape[1] != layers[source].lora_B.shape[1]:
            raise ValueError(f"{model_type}'s layout writes the weight of {source} as {key} {tuple(tensor.shape)}, "
                             "not as rows of a linear weight: its LoRA adapter cannot be exported there")
        module = runtime_name(key.removesuffix(".weight"), model_type)
        tensors[f"{PREFIX}{module}.lora_A.weight"] = layers[source].lora_A.detach().contiguous().clone()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = tensor.contiguous().clone()
        modules[source].append(module)
    lost = [name for name, found in modules.items() if not found]
    if lost:
        raise ValueError(f"{model_type}'s layout has no place for the adapters of {lost[:3]}: they were copied or "
                         "recomputed, not split; export --merge instead")
    cfg = model.lora_config
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.alpha,
              "lora_dropout": cfg.dropout, "target_modules": sorted(m for found in modules.values() for m in found),
              "bias": "none", "fan_in_fan_out": False, "modules_to_save": None, "use_rslora": False,
              "use_dora": False, "init_lora_weights": True, "inference_mode": True, "base_model_name_or_path": None}
    return config, tensors


def runtime_name(name: str, model_type: str) -> str:
    """The transformers module name of a checkpoint tensor-name prefix (RUNTIME_NAMES; most types: the same)."""
    for old, new in RUNTIME_NAMES.get(model_type, ()):
        if name.startswith(old):
            return new + name[len(old):]
    return name


def write_peft_adapter(model: nn.Module, folder: str | Path, model_type: str | None = None) -> Path:
    """Write model's adapters as a PEFT adapter directory (peft_adapter); returns the folder."""
    config, tensors = peft_adapter(model, model_type)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
    return folder
