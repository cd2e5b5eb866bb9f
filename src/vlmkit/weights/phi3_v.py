"""Phi-3-vision / Phi-3.5-vision checkpoints (`model_type: phi3_v`, the Hub's remote code) <-> vlmkit VLM (hd scheme).

The layout of microsoft/Phi-3.5-vision-instruct (modeling_phi3_v.py, image_embedding_phi3_v.py):

    checkpoint                                                     vlmkit
    model.vision_embed_tokens.img_processor.vision_model.<clip>    vision.<tower>        (weights/vision.py names)
    model.vision_embed_tokens.img_projection.{0,2}.{weight,bias}   projector.mlp.{0,2}.*  (4*Dv -> C, GELU, C -> C)
    model.vision_embed_tokens.glb_GN  (1, 1, 4*Dv)                 glb_gn  (4*Dv,)        local/global separator
    model.vision_embed_tokens.sub_GN  (1, 1, 1, 4*Dv)              sub_gn  (4*Dv,)        row newline
    model.<phi3 body>, lm_head.weight                              lm.*   (weights/llama.py, fused qkv / gate_up)

config.json: the Phi-3 LM keys at the top level (rope_scaling of type "su" is longrope, models/rope.py), and
    embd_layer    {"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                   "use_hd_transform": true, "with_learnable_separator": true}  -- the only layout the code has
    img_processor {"name": "clip_vision_model", "model_name": "openai/clip-vit-large-patch14-336",
                   "image_dim_out": 1024, "num_img_tokens": 144, "layer_idx" (default -2), "type_feature" ("patch")}
The reference builds its CLIP tower from a constant ViT-L/14-336 config; a checkpoint may give another size as
img_processor["vision_config"] (a CLIPVisionConfig dict: the tiny test fixture does, tests/reference/phi3_v.py).
The tower's post_layernorm is stored but unused (features come from layer layer_idx, CLS dropped).
preprocessor_config.json gives N of HD-N (`num_crops`; the reference's default 1 when absent) and the
normalisation. The image placeholder id is `<|image|>` (32044) unless config.json names `image_token_id`; the
reference's processor writes negative ids instead, which vlmkit's prompt replaces by this id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vlmkit.config import CLIP_MEAN, CLIP_STD, ProjectorConfig
from vlmkit.models.rope import rope_parameters
from vlmkit.models.vlm import VLM, VLMConfig
from vlmkit.weights.converter import Converter, StateDict, write_files
from vlmkit.weights.llama import lm_config_from_hf, lm_config_to_hf, lm_state_from_hf, lm_state_to_hf
from vlmkit.weights.vision import vision_config_from_hf, vision_state_from_hf, vision_state_to_hf

MODEL_TYPE = "phi3_v"
PREPROCESSOR_FILE = "preprocessor_config.json"
PHI3V_IMAGE_TOKEN_ID = 32044  # <|image|> in Phi-3(.5)-vision's vocabulary
CLIP_MODEL_NAME = "openai/clip-vit-large-patch14-336"
# image_embedding_phi3_v.CLIP_VIT_LARGE_PATCH14_336_CONFIG, the tower every released checkpoint has
CLIP_VIT_L_336 = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                  "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                  "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
EMBD_LAYER = {"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
              "use_hd_transform": True, "with_learnable_separator": True}
AUTO_MAP = {"AutoConfig": "configuration_phi3_v.Phi3VConfig", "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM"}
# config.json keys of the LM, in the old form the remote code reads (rope_theta + rope_scaling {type, factors})
_LM_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
            "bos_token_id", "eos_token_id", "sliding_window", "original_max_position_embeddings")
_VISION = "model.vision_embed_tokens."


def read_config(path: Path, config: dict) -> dict:
    """config.json with preprocessor_config.json (num_crops, image_mean, image_std) under "preprocessor"."""
    file = path / PREPROCESSOR_FILE
    if not file.is_file():
        return config
    try:
        return {**config, "preprocessor": json.loads(file.read_text())}
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e


def _check_layout(hf: dict) -> dict:
    embd = hf.get("embd_layer")
    if not isinstance(embd, dict):
        raise ValueError("phi3_v config.json has no embd_layer dict; Phi-3-vision checkpoints name their image "
                         f"embedding there ({EMBD_LAYER})")
    for key, want in EMBD_LAYER.items():
        if embd.get(key, want) != want:
            raise ValueError(f"phi3_v embd_layer {key}={embd[key]!r} is not supported: the released code and vlmkit "
                             f"have only {key}={want!r}")
    img = hf.get("img_processor")
    if not isinstance(img, dict) or img.get("name", "clip_vision_model") != "clip_vision_model":
        raise ValueError(f"phi3_v img_processor {img!r}: only a clip_vision_model tower is supported")
    if img.get("type_feature", "patch") != "patch":
        raise ValueError(f"phi3_v img_processor type_feature {img['type_feature']!r}: only 'patch' is supported")
    return img


def config_from_hf(hf: dict) -> VLMConfig:
    """read_config's dict (config.json + "preprocessor") -> VLMConfig of the hd scheme (module docstring)."""
    img = _check_layout(hf)
    tower = {**CLIP_VIT_L_336, **img.get("vision_config", {}), "model_type": "clip_vision_model"}
    pre = hf.get("preprocessor", {})
    vision = vision_config_from_hf({**tower, "select_layer": img.get("layer_idx", -2), "select_feature": "patch",
                                    "image_mean": tuple(pre.get("image_mean", CLIP_MEAN)),
                                    "image_std": tuple(pre.get("image_std", CLIP_STD))})
    if img.get("image_dim_out", vision.hidden_size) != vision.hidden_size:
        raise ValueError(f"phi3_v img_processor image_dim_out {img['image_dim_out']} differs from the CLIP tower's "
                         f"width {vision.hidden_size}")
    lm = lm_config_from_hf({**{k: hf[k] for k in (*_LM_KEYS, "rope_theta", "rope_scaling", "pad_token_id")
                              if k in hf}, "model_type": "phi3"})
    projector = ProjectorConfig("merge2x2_mlp2x_gelu", 4 * vision.hidden_size, lm.hidden_size)
    return VLMConfig(vision=vision, projector=projector, lm=lm,
                     image_token_id=hf.get("image_token_id", PHI3V_IMAGE_TOKEN_ID), image_scheme="hd",
                     max_crops=pre.get("num_crops", 1))


def config_to_hf(cfg: VLMConfig) -> dict:
    """config.json of the released layout, with the processor's settings under "preprocessor" (as read_config
    adds them; write puts them in preprocessor_config.json). Keys the model does not read (initializer_range,
    dropouts, use_cache) take the released values."""
    if cfg.image_scheme != "hd" or cfg.projector.type != "merge2x2_mlp2x_gelu" or cfg.vision is None:
        raise ValueError(f"phi3_v holds a CLIP tower, the hd scheme and a merge2x2_mlp2x_gelu projector; this model "
                         f"has scheme {cfg.image_scheme!r} and projector {cfg.projector.type!r}: save it as "
                         "model_type='vlmkit'")
    lm = lm_config_to_hf(cfg.lm, "phi3")
    rope = rope_parameters(cfg.lm)
    hf: dict[str, Any] = {"architectures": ["Phi3VForCausalLM"], "auto_map": dict(AUTO_MAP), "model_type": MODEL_TYPE,
                          "attention_dropout": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0,
                          "embd_layer": dict(EMBD_LAYER), "initializer_range": 0.02, "use_cache": True}
    hf.update({k: lm[k] for k in _LM_KEYS})
    hf["rope_theta"] = cfg.lm.rope_theta
    if rope["rope_type"] == "longrope":
        hf["rope_scaling"] = {"long_factor": list(rope["long_factor"]), "short_factor": list(rope["short_factor"]),
                              "type": "su"}
    elif rope["rope_type"] == "default":
        hf["rope_scaling"] = None
    else:
        raise ValueError(f"phi3_v supports rope types default and longrope ('su'), not {rope['rope_type']!r}")
    v = cfg.vision
    img: dict[str, Any] = {"image_dim_out": v.hidden_size, "model_name": CLIP_MODEL_NAME, "name": "clip_vision_model",
                           "num_img_tokens": 144}
    if v.select_layer != -2:
        img["layer_idx"] = v.select_layer
    tower = {"hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_layers,
             "num_attention_heads": v.num_heads, "image_size": v.image_size, "patch_size": v.patch_size,
             "hidden_act": v.hidden_act, "layer_norm_eps": v.layer_norm_eps}
    if any(CLIP_VIT_L_336[k] != value for k, value in tower.items()):
        img["vision_config"] = {**tower, "projection_dim": v.hidden_size}
    hf["img_processor"] = img
    if cfg.lm.pad_token_id is not None and cfg.lm.pad_token_id != 32000:  # Phi3VConfig's default
        hf["pad_token_id"] = cfg.lm.pad_token_id
    if cfg.image_token_id != PHI3V_IMAGE_TOKEN_ID:
        hf["image_token_id"] = cfg.image_token_id
    hf["preprocessor"] = {"num_crops": cfg.max_crops, "image_mean": list(v.image_mean), "image_std": list(v.image_std)}
    return hf


def write(path: Path, config: dict, state: StateDict, max_shard_bytes: int, tokenizer: Any = None) -> None:
    """The tokenizer, tensors and config.json (write_files), and preprocessor_config.json for the reference's
    processor (Phi3VProcessor / Phi3VImageProcessor)."""
    config = dict(config)
    pre = config.pop("preprocessor")
    config["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    path.mkdir(parents=True, exist_ok=True)
    (path / PREPROCESSOR_FILE).write_text(json.dumps({
        "auto_map": {"AutoProcessor": "processing_phi3_v.Phi3VProcessor",
                     "AutoImageProcessor": "image_processing_phi3_v.Phi3VImageProcessor"},
        "num_crops": pre["num_crops"], "image_mean": pre["image_mean"], "image_std": pre["image_std"],
        "image_processor_type": "Phi3VImageProcessor", "processor_class": "Phi3VProcessor",
        "num_img_tokens": 144}, indent=2) + "\n")
    write_files(path, config, state, max_shard_bytes, tokenizer)


def state_from_hf(state: StateDict, cfg: VLMConfig) -> StateDict:
    vision_prefix = _VISION + "img_processor."
    vision = {k.removeprefix(vision_prefix): v for k, v in state.items() if k.startswith(vision_prefix)}
    out = {f"vision.{k}": v for k, v in vision_state_from_hf(vision, cfg.vision, prefix="vision_model.").items()}
    width = 4 * cfg.vision.hidden_size
    for name, ours in (("glb_GN", "glb_gn"), ("sub_GN", "sub_gn")):
        tensor = state.get(_VISION + name)
        if tensor is None or tensor.numel() != width:
            raise ValueError(f"phi3_v checkpoint needs {_VISION}{name} with {width} values (4 x the tower width), "
                             f"got {None if tensor is None else tuple(tensor.shape)}")
        out[ours] = tensor.reshape(width)
    for index in (0, 2):
        for param in ("weight", "bias"):
            key = f"{_VISION}img_projection.{index}.{param}"
            if key not in state:
                raise ValueError(f"phi3_v checkpoint lacks {key}")
            out[f"projector.mlp.{index}.{param}"] = state[key]
    lm = {k: v for k, v in state.items() if not k.startswith(_VISION)}
    tied = state.get(_VISION + "wte.weight")  # the embedding the image module shares, when a save kept it
    if tied is not None and not torch.equal(tied, state.get("model.embed_tokens.weight", tied.new_empty(0))):
        raise ValueError(f"{_VISION}wte.weight differs from model.embed_tokens.weight; in Phi-3-vision they are "
                         "one tensor")
    out.update({f"lm.{k}": v for k, v in lm_state_from_hf(lm, cfg.lm, prefix="model.").items()})
    return out


def state_to_hf(state: StateDict, cfg: VLMConfig) -> StateDict:
    def part(prefix: str) -> StateDict:
        return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}

    out = {f"{_VISION}img_processor.{k}": v for k, v in vision_state_to_hf(part("vision."), cfg.vision).items()}
    width = 4 * cfg.vision.hidden_size
    out[_VISION + "glb_GN"] = state["glb_gn"].reshape(1, 1, width)
    out[_VISION + "sub_GN"] = state["sub_gn"].reshape(1, 1, 1, width)
    for index in (0, 2):
        for param in ("weight", "bias"):
            out[f"{_VISION}img_projection.{index}.{param}"] = state[f"projector.mlp.{index}.{param}"]
    out.update(lm_state_to_hf(part("lm."), cfg.lm, "phi3", prefix="model."))
    return out


PHI3_V = Converter(config_from_hf=config_from_hf, build=VLM, state_from_hf=state_from_hf, config_to_hf=config_to_hf,
                   state_to_hf=state_to_hf, natural=None, read_config=read_config, write=write)
