"""Vary checkpoints (`model_type: vary`, GitHub Ucas-HaoranWei/Vary and Vary-toy's code) <-> vlmkit VLM (dual scheme).

The layout of varyQwenForCausalLM (vary/model/vary_qwen_vary.py for Vary-base, vary_toy_qwen1_8.py for the
released Vary-toy; the module names are the same in both):

    checkpoint                                                 vlmkit
    transformer.vision_tower.vision_model.<clip>               vision.<tower>          CLIP-L/14-224 (weights/vision.py)
    transformer.vision_tower_high.pos_embed  (1, 64, 64, D)    vision_high.pos_embed   (64, 64, D)   SAM-B ViTDet
    transformer.vision_tower_high.patch_embed.proj.*           vision_high.patch_embed.*
    transformer.vision_tower_high.blocks.{i}.norm1 / norm2     vision_high.layers.{i}.attn_norm / mlp_norm
    transformer.vision_tower_high.blocks.{i}.attn.qkv / proj   vision_high.layers.{i}.attn.qkv / out  (+ rel_pos_h/w)
    transformer.vision_tower_high.blocks.{i}.mlp.lin1 / lin2   vision_high.layers.{i}.mlp.fc1 / fc2
    transformer.vision_tower_high.neck.{0,1,2,3}               vision_high.neck.{conv1,norm1,conv2,norm2}
    transformer.vision_tower_high.net_2 / net_3                vision_high.downsample.conv1 / conv2
    transformer.mm_projector.*       Linear(1024, C/2)         projector.mlp.0.*       CLIP tokens, first half of a row
    transformer.mm_projector_vary.*  Linear(1024, C/2)         projector_high.mlp.0.*  SAM tokens, second half
    transformer.<qwen-1 body>, lm_head.weight                  lm.*                    (weights/qwen1.py)

Each image is `<img>` + 256 x `<imgpad>` + `</img>`; the 256 rows cat([mm_projector(CLIP layer
vision_select_layer, CLS dropped), mm_projector_vary(SAM)], dim=-1) replace the `<imgpad>` embeddings
(im_patch_token, 151859). The projectors are C/2 wide each: Vary-base's code hard-codes Linear(1024, 2048) beside
Qwen-7B (C = 4096), Vary-toy's Linear(1024, 1024) beside Qwen-1.8B (C = 2048).

config.json: the Qwen-1 keys (weights/qwen1.py) and Vary's vision_select_layer (the reference's default -1 when
absent; Vary trains with -2), im_patch_token / im_start_token / im_end_token, image_token_len (256),
vision_tower (the CLIP path, not read: the tower is openai/clip-vit-large-patch14, constant below).
vlmkit-only keys (the reference ignores them; a tiny test checkpoint sets them, tests/reference/vary.py):
- "vision_config": the CLIP tower's CLIPVisionConfig keys when it is not CLIP-L/14-224;
- "sam_config": SamConfig fields when the SAM tower is not SAM-B (hidden_size, num_layers, num_heads,
  global_attn_indexes, output_channels, downsample_channels);
- "image_processor_high": the SAM branch's processor: "BlipImageEvalProcessor" (Vary-toy's demo: bicubic resize
  to 1024 x 1024, CLIP's mean/std) or "test_transform" (Vary-base's demo, plug/transforms.py: albumentations'
  cv2 bilinear resize, ImageNet's mean/std). Absent, it follows the code that fits the checkpoint: Qwen-7B's
  width 4096 is vary_qwen_vary.py's (test_transform), any other vary_toy_qwen1_8.py's.
Both demos prompt with Vary's conv "mpt" template (text/chat.py's built-in "vary").
"""

from __future__ import annotations

from typing import Any

from vlmkit.config import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, ProjectorConfig, SamConfig
from vlmkit.models.vlm import VLM, VLMConfig
from vlmkit.weights.converter import Converter, StateDict
from vlmkit.weights.qwen1 import (EOS_TOKEN_ID, lm_config_from_qwen, lm_config_to_qwen, lm_state_from_qwen,
                                  lm_state_to_qwen, read_generation_config, write_with_generation_config)
from vlmkit.weights.vision import vision_config_from_hf, vision_state_from_hf, vision_state_to_hf

MODEL_TYPE = "vary"
IMAGE_TOKEN_ID, IM_START_ID, IM_END_ID = 151859, 151857, 151858  # <imgpad>, <img>, </img> (vary_qwen_vary.py)
CLIP_MODEL_NAME = "openai/clip-vit-large-patch14"
CLIP_VIT_L_224 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                  "image_size": 224, "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
SAM_FIELDS = ("hidden_size", "num_layers", "num_heads", "global_attn_indexes", "output_channels",
              "downsample_channels")
# the SAM branch's processors: resize, mean, std
PROCESSORS = {"BlipImageEvalProcessor": ("bicubic", CLIP_MEAN, CLIP_STD),
              "test_transform": ("cv2_linear", IMAGENET_MEAN, IMAGENET_STD)}
VARY_BASE_WIDTH = 4096
_TOWER, _SAM, _PROJ, _PROJ_HIGH = ("transformer.vision_tower.", "transformer.vision_tower_high.",
                                   "transformer.mm_projector.", "transformer.mm_projector_vary.")
_VISION_PREFIXES = (_TOWER, _SAM, _PROJ, _PROJ_HIGH)
# Vary's sam.py names -> SamEncoder's, for modules with a weight (and maybe a bias) or bare parameters
_SAM_TOP = {"patch_embed.proj": "patch_embed", "neck.0": "neck.conv1", "neck.1": "neck.norm1", "neck.2": "neck.conv2",
            "neck.3": "neck.norm2", "net_2": "downsample.conv1", "net_3": "downsample.conv2"}
_SAM_BLOCK = {"norm1": "attn_norm", "attn.qkv": "attn.qkv", "attn.proj": "attn.out", "norm2": "mlp_norm",
              "mlp.lin1": "mlp.fc1", "mlp.lin2": "mlp.fc2"}


def _names(table: dict[str, str]) -> dict[str, str]:
    return {f"{theirs}.{p}": f"{ours}.{p}" for theirs, ours in table.items() for p in ("weight", "bias")}


_SAM_TOP_NAMES = _names(_SAM_TOP)
_SAM_BLOCK_NAMES = {**_names(_SAM_BLOCK), "attn.rel_pos_h": "attn.rel_pos_h", "attn.rel_pos_w": "attn.rel_pos_w"}


def processor_high(hf: dict) -> str:
    """The SAM branch's processor name of a config.json dict (module docstring)."""
    default = "test_transform" if hf.get("hidden_size") == VARY_BASE_WIDTH else "BlipImageEvalProcessor"
    name = hf.get("image_processor_high", default)
    if name not in PROCESSORS:
        raise ValueError(f"vary config image_processor_high {name!r} unknown; Vary's are {sorted(PROCESSORS)}")
    return name


def config_from_hf(hf: dict) -> VLMConfig:
    """config.json (+ generation_config.json's token ids) -> VLMConfig of the dual scheme."""
    lm = lm_config_from_qwen({k: v for k, v in hf.items() if k not in ("vision_config", "sam_config")})
    if lm.hidden_size % 2:
        raise ValueError(f"vary config hidden_size {lm.hidden_size} is odd; Vary's two projectors each give half")
    if hf.get("image_token_len", 256) != 256:
        raise ValueError(f"vary config image_token_len {hf['image_token_len']}: Vary's code has 256 tokens per image")
    unknown = sorted(set(hf.get("sam_config", {})) - set(SAM_FIELDS))
    if unknown:
        raise ValueError(f"vary config sam_config has {unknown}; it may set {list(SAM_FIELDS)}")
    resize, mean, std = PROCESSORS[processor_high(hf)]
    tower = {**CLIP_VIT_L_224, **hf.get("vision_config", {}), "model_type": "clip_vision_model"}
    vision = vision_config_from_hf({**tower, "select_layer": hf.get("vision_select_layer", -1),
                                    "select_feature": "patch", "image_mean": CLIP_MEAN, "image_std": CLIP_STD})
    sam_fields = {**{k: getattr(SamConfig, k) for k in SAM_FIELDS}, **hf.get("sam_config", {})}
    sam = SamConfig(**sam_fields, intermediate_size=4 * sam_fields["hidden_size"],  # sam.py's mlp_ratio=4
                    downsample="vary", image_mean=mean, image_std=std, resize=resize)
    half = lm.hidden_size // 2
    return VLMConfig(vision=vision, projector=ProjectorConfig("linear", vision.hidden_size, half), lm=lm,
                     image_token_id=hf.get("im_patch_token", IMAGE_TOKEN_ID), image_scheme="dual", vision_high=sam,
                     projector_high=ProjectorConfig("linear", sam.feature_dim, half))


def config_to_hf(cfg: VLMConfig) -> dict:
    """config.json of Vary's layout (with generation_config.json's dict under "generation", as weights/qwen1.py
    writes it); ValueError when the model is not one Vary's code builds."""
    high, v = cfg.vision_high, cfg.vision
    if (cfg.image_scheme != "dual" or v is None or high is None or cfg.projector.type != "linear"
            or cfg.projector_high.type != "linear" or cfg.projector.out_dim != cfg.projector_high.out_dim
            or high.downsample != "vary"):
        raise ValueError("model_type 'vary' holds the dual scheme with two equal-width linear projectors and a SAM "
                         "tower with Vary's convs (downsample='vary'); save this model as model_type='vlmkit'")
    processor = [name for name, (resize, mean, std) in PROCESSORS.items()
                 if (resize, tuple(mean), tuple(std)) == (high.resize, high.image_mean, high.image_std)]
    if not processor:
        raise ValueError(f"the SAM view ({high.resize} resize, mean {high.image_mean}) is neither of Vary's processors "
                         f"{sorted(PROCESSORS)}; save this model as model_type='vlmkit'")
    hf: dict[str, Any] = lm_config_to_qwen(cfg.lm)
    hf.update({"architectures": ["varyQwenForCausalLM"], "model_type": MODEL_TYPE,
               "vision_tower": CLIP_MODEL_NAME, "vision_select_layer": v.select_layer, "image_token_len": 256,
               "use_im_start_end": True, "freeze_vision_tower": False, "im_patch_token": cfg.image_token_id,
               "im_start_token": cfg.image_token_id - 2, "im_end_token": cfg.image_token_id - 1,
               "image_processor_high": processor[0]})
    hf.pop("auto_map", None)  # Vary's checkpoints are loaded by its own package, not remote code
    tower = {"hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_layers,
             "num_attention_heads": v.num_heads, "image_size": v.image_size, "patch_size": v.patch_size,
             "hidden_act": v.hidden_act, "layer_norm_eps": v.layer_norm_eps}
    if any(CLIP_VIT_L_224[k] != value for k, value in tower.items()):
        hf["vision_config"] = {**tower, "projection_dim": v.hidden_size}
    if (high.image_size, high.patch_size, high.window_size, high.intermediate_size) != (1024, 16, 14,
                                                                                       4 * high.hidden_size):
        raise ValueError("Vary's sam.py builds a 1024 px SAM with patch 16, windows of 14 and an MLP 4 x its width; "
                         "this tower differs: save the model as model_type='vlmkit'")
    sam = {name: getattr(high, name) for name in SAM_FIELDS}
    if any(getattr(SamConfig, k) != value for k, value in sam.items()):
        hf["sam_config"] = {k: list(value) if isinstance(value, tuple) else value for k, value in sam.items()}
    eos = cfg.lm.eos_token_id if cfg.lm.eos_token_id is not None else EOS_TOKEN_ID  # Qwen-1 pads with its eos
    hf["generation"] = {"chat_format": "chatml", "eos_token_id": eos,
                        "pad_token_id": cfg.lm.pad_token_id if cfg.lm.pad_token_id is not None else eos,
                        "max_new_tokens": 2048}  # Vary's demo's max_new_tokens
    return hf


def sam_state_from_vary(state: StateDict, prefix: str = _SAM) -> StateDict:
    """Vary's sam.py tensors under prefix -> SamEncoder names; unknown names pass through (load reports them)."""
    out: StateDict = {}
    for key, tensor in state.items():
        name = key.removeprefix(prefix)
        if name == "pos_embed":
            out["pos_embed"] = tensor[0]  # (1, g, g, D) -> (g, g, D)
        elif name in _SAM_TOP_NAMES:
            out[_SAM_TOP_NAMES[name]] = tensor
        elif name.startswith("blocks.") and name.split(".", 2)[2] in _SAM_BLOCK_NAMES:
            _, index, rest = name.split(".", 2)
            out[f"layers.{index}.{_SAM_BLOCK_NAMES[rest]}"] = tensor
        else:
            out[key] = tensor
    return out


def sam_state_to_vary(state: StateDict, prefix: str = _SAM) -> StateDict:
    """SamEncoder tensors -> Vary's sam.py names under prefix."""
    top = {ours: theirs for theirs, ours in _SAM_TOP_NAMES.items()}
    block = {ours: theirs for theirs, ours in _SAM_BLOCK_NAMES.items()}
    out: StateDict = {}
    for name, tensor in state.items():
        if name == "pos_embed":
            out[prefix + "pos_embed"] = tensor[None]  # (g, g, D) -> (1, g, g, D)
        elif name in top:
            out[prefix + top[name]] = tensor
        elif name.startswith("layers.") and name.split(".", 2)[2] in block:
            _, index, rest = name.split(".", 2)
            out[f"{prefix}blocks.{index}.{block[rest]}"] = tensor
        else:
            raise ValueError(f"SAM tensor {name!r} has no place in Vary's sam.py (is this a downsample='vary' tower?)")
    return out


def _part(state: StateDict, prefix: str) -> StateDict:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def state_from_hf(state: StateDict, cfg: VLMConfig) -> StateDict:
    out = {f"vision.{k}": v for k, v in vision_state_from_hf(_part(state, _TOWER), cfg.vision,
                                                              prefix="vision_model.").items()}
    out.update({f"vision_high.{k}": v for k, v in sam_state_from_vary(_part(state, _SAM), prefix="").items()})
    for prefix, ours in ((_PROJ, "projector"), (_PROJ_HIGH, "projector_high")):
        for param in ("weight", "bias"):
            if prefix + param not in state:
                raise ValueError(f"vary checkpoint lacks {prefix}{param}")
            out[f"{ours}.mlp.0.{param}"] = state[prefix + param]
    lm = {k: v for k, v in state.items() if not k.startswith(_VISION_PREFIXES)}
    out.update({f"lm.{k}": v for k, v in lm_state_from_qwen(lm, cfg.lm).items()})
    return out


def state_to_hf(state: StateDict, cfg: VLMConfig) -> StateDict:
    out = {_TOWER + k: v for k, v in vision_state_to_hf(_part(state, "vision."), cfg.vision).items()}
    out.update(sam_state_to_vary(_part(state, "vision_high.")))
    for prefix, ours in ((_PROJ, "projector"), (_PROJ_HIGH, "projector_high")):
        for param in ("weight", "bias"):
            out[prefix + param] = state[f"{ours}.mlp.0.{param}"]
    out.update(lm_state_to_qwen(_part(state, "lm."), cfg.lm))
    return out


VARY = Converter(config_from_hf=config_from_hf, build=VLM, state_from_hf=state_from_hf, config_to_hf=config_to_hf,
                 state_to_hf=state_to_hf, natural=None, read_config=read_generation_config,
                 write=write_with_generation_config)
