"""transformers `clip_vision_model` / `siglip_vision_model` checkpoints <-> vlmkit VisionTower.

Key names (transformers' CLIPVisionModel / SiglipVisionModel, below the prefix):

    embeddings.class_embedding                   cls_token                  (CLIP)
    embeddings.patch_embedding.{weight,bias}     patch_embed.*              (bias: SigLIP)
    embeddings.position_embedding.weight         pos_embed
    pre_layrnorm.*                               pre_norm.*                 (CLIP; transformers' spelling)
    encoder.layers.{i}.self_attn.{q,k,v}_proj.*  layers.{i}.attn.qkv.*      (concatenated q; k; v)
    encoder.layers.{i}.self_attn.out_proj.*      layers.{i}.attn.out.*
    encoder.layers.{i}.layer_norm{1,2}.*         layers.{i}.{attn,mlp}_norm.*
    encoder.layers.{i}.mlp.fc{1,2}.*             layers.{i}.mlp.fc{1,2}.*
    post_layernorm.*                             post_norm.*
    head.attention.in_proj_{weight,bias}         head.q.*, head.kv.*        (SigLIP head: rows [q | k; v])
    head.attention.out_proj.*, head.layernorm.*  head.out.*, head.norm.*
    head.probe, head.mlp.fc{1,2}.*               same names

The prefix is `vision_model.` in checkpoints written by transformers 4 and by
vlmkit (transformers 4 and 5 both load it) and empty in ones transformers 5
writes; loading accepts either. The LLaVA converter reuses these functions for
its vision_tower sub-tree.

config.json also carries the vlmkit-only fields (select_layer, select_feature,
image_mean, image_std) so a save reloads the same VisionConfig; transformers
keeps unknown config keys as attributes and ignores them.
"""

from __future__ import annotations

import re
from typing import Callable

import torch

from vlmkit.config import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, VisionConfig
from vlmkit.models.vit import VisionTower
from vlmkit.weights.converter import Converter, Joined, StateDict

# Per-architecture facts transformers' config does not spell out (it is the model_type).
_ARCH = {
    "clip_vision_model": dict(
        architecture="CLIPVisionModel", use_cls_token=True, pre_layernorm=True, patch_bias=False,
        hidden_act="quick_gelu", layer_norm_eps=1e-5, image_size=224, patch_size=32,
        select_layer=-2, select_feature="patch", image_mean=CLIP_MEAN, image_std=CLIP_STD),
    "siglip_vision_model": dict(
        architecture="SiglipVisionModel", use_cls_token=False, pre_layernorm=False, patch_bias=True,
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, image_size=224, patch_size=16,
        select_layer=-1, select_feature="cls_patch", image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD),
}
_VLMKIT_FIELDS = ("select_layer", "select_feature", "image_mean", "image_std")

# Modules renamed one to one (each has .weight and possibly .bias); hf name -> vlmkit name.
_TOP = {
    "embeddings.patch_embedding": "patch_embed",
    "pre_layrnorm": "pre_norm",
    "post_layernorm": "post_norm",
    "head.attention.out_proj": "head.out",
    "head.layernorm": "head.norm",
    "head.mlp.fc1": "head.mlp.fc1",
    "head.mlp.fc2": "head.mlp.fc2",
}
_LAYER = {
    "layer_norm1": "attn_norm",
    "self_attn.out_proj": "attn.out",
    "layer_norm2": "mlp_norm",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_PARAMS = {
    "embeddings.class_embedding": "cls_token",
    "embeddings.position_embedding.weight": "pos_embed",
    "head.probe": "head.probe",
}
_HF_TO_VLMKIT = {
    **_PARAMS,
    **{f"{hf}.{p}": f"{ours}.{p}" for hf, ours in _TOP.items() for p in ("weight", "bias")},
}
_VLMKIT_TO_HF = {v: k for k, v in _HF_TO_VLMKIT.items()}
_LAYER_HF_TO_VLMKIT = {f"{hf}.{p}": f"{ours}.{p}" for hf, ours in _LAYER.items() for p in ("weight", "bias")}
_LAYER_VLMKIT_TO_HF = {v: k for k, v in _LAYER_HF_TO_VLMKIT.items()}
_HF_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_OUR_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
# Non-persistent buffer some older checkpoints still hold; it is always arange(num_positions).
_IGNORED = ("embeddings.position_ids",)


def vision_config_from_hf(d: dict) -> VisionConfig:
    """A transformers CLIP/SigLIP vision config dict -> VisionConfig.

    model_type defaults to clip_vision_model (what LLaVA's vision_config holds).
    select_layer/select_feature default to LLaVA's choice for CLIP (-2, drop CLS)
    and to the last layer, all tokens for SigLIP; callers may override them.
    """
    model_type = d.get("model_type", "clip_vision_model")
    if model_type not in _ARCH:
        raise ValueError(f"vision model_type {model_type!r} is not supported; supported: {sorted(_ARCH)}")
    arch = _ARCH[model_type]
    return VisionConfig(
        image_size=_side(d.get("image_size", arch["image_size"]), "image_size"),
        patch_size=_side(d.get("patch_size", arch["patch_size"]), "patch_size"),
        num_channels=d.get("num_channels", 3),
        hidden_size=d.get("hidden_size", 768),
        intermediate_size=d.get("intermediate_size", 3072),
        num_layers=d.get("num_hidden_layers", 12),
        num_heads=d.get("num_attention_heads", 12),
        layer_norm_eps=d.get("layer_norm_eps", arch["layer_norm_eps"]),
        hidden_act=d.get("hidden_act", arch["hidden_act"]),
        use_cls_token=arch["use_cls_token"],
        pre_layernorm=arch["pre_layernorm"],
        post_layernorm=True,
        use_head=model_type == "siglip_vision_model" and d.get("vision_use_head", True),
        patch_bias=arch["patch_bias"],
        **{name: d.get(name, arch[name]) for name in _VLMKIT_FIELDS},
    )


def vision_config_to_hf(cfg: VisionConfig) -> dict:
    """VisionConfig -> transformers config dict (CLIP when it has a CLS token, else SigLIP)."""
    model_type = _model_type(cfg)
    d = {
        "model_type": model_type,
        "architectures": [_ARCH[model_type]["architecture"]],
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "num_channels": cfg.num_channels,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "layer_norm_eps": cfg.layer_norm_eps,
        "hidden_act": cfg.hidden_act,
        "attention_dropout": 0.0,
        **{name: getattr(cfg, name) for name in _VLMKIT_FIELDS},
    }
    if model_type == "siglip_vision_model":
        d["vision_use_head"] = cfg.use_head
    return d


def detect_vision_prefix(sd: StateDict) -> str:
    """The tensor-name prefix of a vision checkpoint: `vision_model.` (transformers 4, vlmkit) or empty."""
    return "vision_model." if any(k.startswith("vision_model.") for k in sd) else ""


def vision_state_from_hf(sd: StateDict, cfg: VisionConfig, prefix: str | None = None) -> StateDict:
    """transformers vision tensors under `prefix` -> VisionTower state dict (keys outside prefix are skipped).

    prefix=None detects "vision_model." or "". Unknown keys under the prefix are
    passed through unrenamed, so loading reports them instead of dropping them.
    """
    prefix = detect_vision_prefix(sd) if prefix is None else prefix
    out: StateDict = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}  # (layer, weight|bias) -> {q, k, v}
    for key, tensor in sd.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name in _IGNORED:
            continue
        if name in _HF_TO_VLMKIT:
            out[_HF_TO_VLMKIT[name]] = tensor
        elif name in ("head.attention.in_proj_weight", "head.attention.in_proj_bias"):
            param = name.rsplit("_", 1)[-1]
            out[f"head.q.{param}"] = tensor[:cfg.hidden_size]
            out[f"head.kv.{param}"] = tensor[cfg.hidden_size:]
        elif m := _HF_LAYER.fullmatch(name):
            layer, rest = int(m[1]), m[2]
            if rest in _LAYER_HF_TO_VLMKIT:
                out[f"layers.{layer}.{_LAYER_HF_TO_VLMKIT[rest]}"] = tensor
            elif qkv_part := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
                qkv.setdefault((layer, qkv_part[2]), {})[qkv_part[1]] = tensor
            else:
                out[key] = tensor
        else:
            out[key] = tensor
    for (layer, param), parts in qkv.items():
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            raise ValueError(f"checkpoint layer {layer} has no self_attn.{missing[0]}_proj.{param}: "
                             "the q, k and v projections must all be present")
        out[f"layers.{layer}.attn.qkv.{param}"] = Joined([parts["q"], parts["k"], parts["v"]])
    return out


def vision_state_to_hf(sd: StateDict, cfg: VisionConfig, prefix: str = "vision_model.") -> StateDict:
    """VisionTower state dict -> transformers tensor names under `prefix`."""
    out: StateDict = {}
    D = cfg.hidden_size
    for name, tensor in sd.items():
        if name in _VLMKIT_TO_HF:
            out[prefix + _VLMKIT_TO_HF[name]] = tensor
        elif name in ("head.q.weight", "head.q.bias"):
            param = name.rsplit(".", 1)[-1]
            out[f"{prefix}head.attention.in_proj_{param}"] = torch.cat([tensor, sd[f"head.kv.{param}"]], dim=0)
        elif name in ("head.kv.weight", "head.kv.bias"):
            continue  # written together with head.q above
        elif m := _OUR_LAYER.fullmatch(name):
            layer, rest = int(m[1]), m[2]
            hf_layer = f"{prefix}encoder.layers.{layer}."
            if rest in ("attn.qkv.weight", "attn.qkv.bias"):
                param = rest.rsplit(".", 1)[-1]
                for part, t in zip("qkv", tensor.split(D, dim=0)):
                    out[f"{hf_layer}self_attn.{part}_proj.{param}"] = t
            else:
                out[hf_layer + _LAYER_VLMKIT_TO_HF[rest]] = tensor
        else:
            raise ValueError(f"tensor {name!r} has no transformers name; is this a VisionTower state dict?")
    return out


def _state_from_hf(sd: StateDict, cfg: VisionConfig) -> StateDict:
    """Whole-checkpoint form: tensors outside the detected prefix stay, so loading reports them."""
    prefix = detect_vision_prefix(sd)
    out = vision_state_from_hf(sd, cfg, prefix)
    out.update({k: v for k, v in sd.items() if not k.startswith(prefix)})
    return out


def _config_to_hf(model_type: str) -> Callable[[VisionConfig], dict]:
    """config_to_hf for one model_type: refuses a tower that type cannot represent."""
    def convert(cfg: VisionConfig) -> dict:
        if _model_type(cfg) != model_type:
            raise ValueError(f"this VisionTower is a {_model_type(cfg)} (use_cls_token={cfg.use_cls_token}), "
                             f"it cannot be saved as {model_type}")
        return vision_config_to_hf(cfg)
    return convert


def _model_type(cfg: VisionConfig) -> str:
    """The transformers model_type that represents cfg, or ValueError naming the field that rules both out."""
    model_type = "clip_vision_model" if cfg.use_cls_token else "siglip_vision_model"
    arch = _ARCH[model_type]
    for name in ("pre_layernorm", "patch_bias"):
        if getattr(cfg, name) != arch[name]:
            raise ValueError(f"VisionConfig.{name}={getattr(cfg, name)} does not fit {model_type} "
                             f"(which has {name}={arch[name]}); transformers has no such vision model")
    if not cfg.post_layernorm:
        raise ValueError("VisionConfig.post_layernorm=False has no transformers equivalent: "
                         "CLIP and SigLIP vision models always have a post_layernorm")
    if cfg.use_head and model_type == "clip_vision_model":
        raise ValueError("VisionConfig.use_head=True needs a SigLIP tower (use_cls_token=False)")
    return model_type


def _side(value: int | list[int], name: str) -> int:
    """transformers allows image_size/patch_size as [h, w]; vlmkit towers are square."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"vision {name} {value} is not square; vlmkit vision towers need square sizes")
        return int(value[0])
    return int(value)


CLIP_VISION = Converter(
    config_from_hf=vision_config_from_hf,
    build=VisionTower,
    state_from_hf=_state_from_hf,
    config_to_hf=_config_to_hf("clip_vision_model"),
    state_to_hf=vision_state_to_hf,
    natural=lambda cfg: cfg.use_cls_token,
)
SIGLIP_VISION = Converter(
    config_from_hf=vision_config_from_hf,
    build=VisionTower,
    state_from_hf=_state_from_hf,
    config_to_hf=_config_to_hf("siglip_vision_model"),
    state_to_hf=vision_state_to_hf,
    natural=lambda cfg: not cfg.use_cls_token,
)
