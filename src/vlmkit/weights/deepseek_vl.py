"""transformers `deepseek_vl_hybrid` checkpoints <-> vlmkit DeepseekVL (SigLIP + SAM-B hybrid, Llama LM).

Key layout (transformers 5's DeepseekVLHybridForConditionalGeneration):

    model.vision_model.<siglip keys>                       vision.*        (weights/vision.py)
    model.high_res_vision_model.vision_encoder.<sam keys>  vision_high.*   (weights/sam.py)
    model.high_res_vision_neck.*                           vision_high.global_neck.*
    model.high_res_vision_proj.conv{1,2}.weight            vision_high.downsample.conv{1,2}.weight
    model.high_res_vision_alpha                            vision_high.global_alpha
    model.aligner.vision_proj.*                            projector.low.mlp.0.*
    model.aligner.high_res_vision_proj.*                   projector.high.mlp.0.*
    model.aligner.proj.*                                   projector.proj.*
    model.language_model.<llama body>, lm_head.weight      lm.*            (weights/llama.py)

The top-level tie_word_embeddings (default true) decides whether lm_head is the embedding,
as it does in transformers. Image mean/std are not in config.json: both views default to
the processor's (OpenAI CLIP's), and a vlmkit save writes them into the sub-configs.
"""

from __future__ import annotations

from vlmkit.config import CLIP_MEAN, CLIP_STD
from vlmkit.models.deepseek_vl import DeepseekVL, DeepseekVLConfig
from vlmkit.weights.converter import Converter, StateDict
from vlmkit.weights.llama import lm_config_from_hf, lm_config_to_hf, lm_state_from_hf, lm_state_to_hf
from vlmkit.weights.sam import (DEEPSEEK_EXTRA_NAMES, deepseek_sam_config_from_hf, deepseek_sam_state_from_hf,
                                sam_config_to_hf, sam_state_to_hf)
from vlmkit.weights.vision import vision_config_from_hf, vision_config_to_hf, vision_state_from_hf, vision_state_to_hf

MODEL_TYPE = "deepseek_vl_hybrid"
_VISION = "model.vision_model."
_SAM = "model.high_res_vision_model.vision_encoder."
_LM = "model.language_model."
# hf aligner module -> vlmkit module (each with weight and bias)
_ALIGNER = {"vision_proj": "low.mlp.0", "high_res_vision_proj": "high.mlp.0", "proj": "proj"}
_SAM_EXTRA_TO_HF = {ours: "model." + hf for hf, ours in DEEPSEEK_EXTRA_NAMES.items()}


def _with_clip_norm(d: dict) -> dict:
    """A vision sub-config with the processor's default mean/std unless it carries its own."""
    return {"image_mean": CLIP_MEAN, "image_std": CLIP_STD, **d}


def config_from_hf(hf: dict) -> DeepseekVLConfig:
    """A DeepseekVLHybridConfig dict -> DeepseekVLConfig."""
    if hf.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise ValueError(f"model_type {hf['model_type']!r} is not {MODEL_TYPE!r}")
    low, high, text = hf.get("vision_config"), hf.get("high_res_vision_config"), hf.get("text_config")
    if not (low and high and text):
        raise ValueError("a deepseek_vl_hybrid config.json needs vision_config, high_res_vision_config "
                         "and text_config")
    low = {"model_type": "siglip_vision_model", **low}
    if low["model_type"] != "siglip_vision_model":
        raise ValueError(f"vision_config model_type {low['model_type']!r}: DeepSeek-VL's low-resolution "
                         "tower is siglip_vision_model")
    vision = vision_config_from_hf(_with_clip_norm(low))
    vision_high = deepseek_sam_config_from_hf({"vision_config": low,
                                               "high_res_vision_config": _with_clip_norm(high)})
    lm = lm_config_from_hf({**text, "tie_word_embeddings": hf.get("tie_word_embeddings", True)})
    return DeepseekVLConfig(vision=vision, vision_high=vision_high, lm=lm,
                            image_token_id=hf.get("image_token_id", 100015))


def config_to_hf(cfg: DeepseekVLConfig) -> dict:
    """DeepseekVLConfig -> DeepseekVLHybridConfig dict (plus vlmkit-only fields in the sub-configs)."""
    if cfg.vision.select_layer != -1:
        raise ValueError(f"transformers' DeepSeek-VL reads the SigLIP tower's last layer, this model selects "
                         f"layer {cfg.vision.select_layer}; set vision.select_layer=-1")
    return {
        "model_type": MODEL_TYPE,
        "architectures": ["DeepseekVLHybridForConditionalGeneration"],
        "vision_config": vision_config_to_hf(cfg.vision),
        "high_res_vision_config": sam_config_to_hf(cfg.vision_high),
        "text_config": lm_config_to_hf(cfg.lm, "llama"),
        "image_token_id": cfg.image_token_id,
        "tie_word_embeddings": cfg.lm.tie_word_embeddings,
    }


def _lm_part(state: StateDict) -> StateDict:
    """The LM's tensors renamed to plain Llama names (model.*, lm_head.weight)."""
    out = {"model." + k.removeprefix(_LM): v for k, v in state.items() if k.startswith(_LM)}
    out.update({k: v for k, v in state.items() if k == "lm_head.weight"})
    return out


def state_from_hf(state: StateDict, cfg: DeepseekVLConfig) -> StateDict:
    """A deepseek_vl_hybrid checkpoint -> DeepseekVL state dict; tensors no part reads raise ValueError."""
    known = (_VISION, "model.high_res_vision", "model.aligner.", _LM, "lm_head.weight")
    stray = sorted(k for k in state if not k.startswith(known))
    if stray:
        raise ValueError(f"unexpected tensors in a {MODEL_TYPE} checkpoint: {stray[:8]}")
    out = {f"vision.{k}": v for k, v in vision_state_from_hf(state, cfg.vision, prefix=_VISION).items()}
    out.update({f"vision_high.{k}": v for k, v in deepseek_sam_state_from_hf(state, cfg.vision_high).items()})
    for hf, ours in _ALIGNER.items():
        for param in ("weight", "bias"):
            key = f"model.aligner.{hf}.{param}"
            if key not in state:
                raise ValueError(f"{MODEL_TYPE} checkpoint lacks {key}")
            out[f"projector.{ours}.{param}"] = state[key]
    out.update({f"lm.{k}": v for k, v in lm_state_from_hf(_lm_part(state), cfg.lm).items()})
    return out


def state_to_hf(state: StateDict, cfg: DeepseekVLConfig) -> StateDict:
    """DeepseekVL state dict -> transformers deepseek_vl_hybrid tensor names."""
    def part(prefix: str) -> StateDict:
        return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}

    out = vision_state_to_hf(part("vision."), cfg.vision, prefix=_VISION)
    for key, tensor in sam_state_to_hf(part("vision_high."), cfg.vision_high, prefix=_SAM).items():
        out[_SAM_EXTRA_TO_HF.get(key, key)] = tensor  # downsample / global branch: the hybrid model's names
    for hf, ours in _ALIGNER.items():
        for param in ("weight", "bias"):
            out[f"model.aligner.{hf}.{param}"] = state[f"projector.{ours}.{param}"]
    for key, tensor in lm_state_to_hf(part("lm."), cfg.lm, "llama").items():
        out[(_LM + key.removeprefix("model.")) if key.startswith("model.") else key] = tensor  # lm_head stays
    return out


DEEPSEEK_VL_HYBRID = Converter(config_from_hf=config_from_hf, build=DeepseekVL, state_from_hf=state_from_hf,
                               config_to_hf=config_to_hf, state_to_hf=state_to_hf, natural=lambda cfg: True)
