"""transformers `llava` checkpoints <-> vlmkit VLM (vision tower + mlp2x_gelu projector + Llama-family LM).

Key layouts seen in the wild, all accepted on load:
    vision_tower.vision_model.<clip keys>      llava-hf checkpoints (transformers 4)
    vision_tower.<clip keys>                   written by transformers 5
    model.vision_tower[.vision_model].<...>    transformers 5 in-memory names
    multi_modal_projector.linear_{1,2}.*       (optionally under model.)
    language_model.model.<llama body>, language_model.lm_head.weight
    model.language_model.<llama body>, lm_head.weight
On save, the layout transformers 5 itself writes is used.
"""

from __future__ import annotations

from vlmkit.config import ProjectorConfig
from vlmkit.models.vlm import VLM, VLMConfig
from vlmkit.weights.converter import Converter, StateDict
from vlmkit.weights.llama import (lm_config_from_hf, lm_config_to_hf, lm_state_from_hf, lm_state_to_hf,
                                  natural_model_type)
from vlmkit.weights.vision import (vision_config_from_hf, vision_config_to_hf, vision_state_from_hf,
                                   vision_state_to_hf)

# vision_feature_select_strategy <-> VisionConfig.select_feature
_SELECT = {"default": "patch", "full": "cls_patch"}
# vlmkit projector type <-> the Linear layers transformers' LlavaMultiModalProjector names
_PROJECTOR_LINEARS = {"mlp": ("linear_1", "linear_2")}


def config_from_hf(hf: dict) -> VLMConfig:
    layer = hf.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer {layer!r}: only a single layer index is supported")
    strategy = hf.get("vision_feature_select_strategy", "default")
    if strategy not in _SELECT:
        raise ValueError(f"vision_feature_select_strategy {strategy!r} unknown; valid: {sorted(_SELECT)}")
    act = hf.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"projector_hidden_act {act!r} unsupported: vlmkit's LLaVA projector uses gelu")
    vision = vision_config_from_hf(hf.get("vision_config") or {})
    vision.select_layer, vision.select_feature = layer, _SELECT[strategy]
    vision.__post_init__()  # re-validate the overridden fields
    text = dict(hf.get("text_config") or {})
    text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", False))
    lm = lm_config_from_hf(text)
    projector = ProjectorConfig(type="mlp2x_gelu", in_dim=vision.hidden_size, out_dim=lm.hidden_size,
                                bias=hf.get("multimodal_projector_bias", True))
    image_token_id = hf.get("image_token_index", hf.get("image_token_id", 32000))
    return VLMConfig(vision=vision, projector=projector, lm=lm, image_token_id=image_token_id)


def _split(state: StateDict) -> tuple[StateDict, StateDict, StateDict]:
    """Sort checkpoint tensors into (vision, projector, lm) dicts with canonical names:
    vision keys without any prefix, projector keys `linear_1.weight`, lm keys `model.*` / `lm_head.weight`."""
    vision, projector, lm = {}, {}, {}
    for key, tensor in state.items():
        name = key.removeprefix("model.") if key.startswith(("model.vision_tower.", "model.multi_modal_projector.",
                                                              "model.language_model.")) else key
        if name.startswith("vision_tower."):
            vision[name.removeprefix("vision_tower.").removeprefix("vision_model.")] = tensor
        elif name.startswith("multi_modal_projector."):
            projector[name.removeprefix("multi_modal_projector.")] = tensor
        elif name.startswith("language_model.model."):
            lm["model." + name.removeprefix("language_model.model.")] = tensor
        elif name.startswith("language_model.lm_head."):
            lm[name.removeprefix("language_model.")] = tensor
        elif name.startswith("language_model."):
            lm["model." + name.removeprefix("language_model.")] = tensor
        elif name.startswith("lm_head."):
            lm[name] = tensor
        else:
            raise ValueError(f"unexpected tensor {key!r} in a llava checkpoint")
    return vision, projector, lm


def state_from_hf(state: StateDict, cfg: VLMConfig) -> StateDict:
    vision, projector, lm = _split(state)
    out = {f"vision.{k}": v for k, v in vision_state_from_hf(vision, cfg.vision, prefix="").items()}
    out.update({f"lm.{k}": v for k, v in lm_state_from_hf(lm, cfg.lm, prefix="model.").items()})
    for index, linear in zip((0, 2), _PROJECTOR_LINEARS["mlp"]):
        for param in ("weight", "bias") if cfg.projector.bias else ("weight",):
            key = f"{linear}.{param}"
            if key not in projector:
                raise ValueError(f"llava checkpoint lacks multi_modal_projector.{key}")
            out[f"projector.mlp.{index}.{param}"] = projector[key]
    return out


def config_to_hf(cfg: VLMConfig) -> dict:
    if cfg.image_scheme != "pad":
        raise ValueError(f"transformers' llava has only the pad image scheme, this model uses "
                         f"{cfg.image_scheme!r}; save it with model_type='llava_next' (anyres) instead")
    if cfg.projector.type != "mlp2x_gelu":
        raise ValueError(f"transformers' llava has only an mlp2x_gelu projector, this model has "
                         f"{cfg.projector.type!r}; save it with model_type='vlmkit' instead")
    strategy = {v: k for k, v in _SELECT.items()}[cfg.vision.select_feature]
    text = lm_config_to_hf(cfg.lm, natural_model_type(cfg.lm))
    return {
        "model_type": "llava",
        "architectures": ["LlavaForConditionalGeneration"],
        "vision_config": vision_config_to_hf(cfg.vision),
        "text_config": text,
        "image_token_index": cfg.image_token_id,
        "vision_feature_layer": cfg.vision.select_layer,
        "vision_feature_select_strategy": strategy,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": cfg.projector.bias,
        "tie_word_embeddings": cfg.lm.tie_word_embeddings,
    }


def state_to_hf(state: StateDict, cfg: VLMConfig) -> StateDict:
    def part(prefix: str) -> StateDict:
        return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}

    out = {f"vision_tower.{k}": v for k, v in vision_state_to_hf(part("vision."), cfg.vision, prefix="").items()}
    for key, tensor in lm_state_to_hf(part("lm."), cfg.lm, natural_model_type(cfg.lm), prefix="model.").items():
        out[f"language_model.{key}"] = tensor
    for index, linear in zip((0, 2), _PROJECTOR_LINEARS["mlp"]):
        for param in ("weight", "bias") if cfg.projector.bias else ("weight",):
            out[f"multi_modal_projector.{linear}.{param}"] = state[f"projector.mlp.{index}.{param}"]
    return out


LLAVA = Converter(config_from_hf=config_from_hf, build=VLM, state_from_hf=state_from_hf,
                  config_to_hf=config_to_hf, state_to_hf=state_to_hf,
                  natural=lambda cfg: cfg.image_scheme == "pad" and cfg.projector.type == "mlp2x_gelu")
