"""Convert transformers' SAM vision checkpoints (model_type sam_vision_model) to and from SamEncoder.

transformers' SamVisionModel stores its tensors under `vision_encoder.`; the same
encoder sits under `model.high_res_vision_model.vision_encoder.` in a DeepSeek-VL
hybrid checkpoint, next to that model's second neck (`high_res_vision_neck`), its
downsampling convs (`high_res_vision_proj`) and the neck's weight (`high_res_vision_alpha`).
Names differ from vlmkit's only by a fixed table; pos_embed drops its leading batch axis.

config.json also carries the vlmkit-only fields (downsample, downsample_channels,
resize_to, global_branch, image_mean, image_std) so a save reloads the same SamConfig;
transformers ignores them.

    encoder = sam_from_pretrained("path/to/sam_vision_dir")   # SamEncoder, eval mode
"""

from __future__ import annotations

import re
from pathlib import Path

from vlmkit.config import SamConfig
from vlmkit.models.sam import SamEncoder
from vlmkit.weights.converter import Converter, StateDict
from vlmkit.weights.safetensors_io import read_config, read_state_dict

PREFIX = "vision_encoder."
_VLMKIT_FIELDS = ("downsample", "downsample_channels", "resize_to", "global_branch", "image_mean", "image_std")

# hf name -> vlmkit name, for modules with .weight (and maybe .bias) or bare parameters.
_NECK = {"conv1": "conv1", "layer_norm1": "norm1", "conv2": "conv2", "layer_norm2": "norm2"}
_LAYER = {"layer_norm1": "attn_norm", "attn.qkv": "attn.qkv", "attn.proj": "attn.out",
          "layer_norm2": "mlp_norm", "mlp.lin1": "mlp.fc1", "mlp.lin2": "mlp.fc2"}
_TOP = {"patch_embed.projection": "patch_embed", **{f"neck.{k}": f"neck.{v}" for k, v in _NECK.items()}}
_HF_TO_VLMKIT = {f"{hf}.{p}": f"{ours}.{p}" for hf, ours in _TOP.items() for p in ("weight", "bias")}
_LAYER_HF_TO_VLMKIT = {
    **{f"{hf}.{p}": f"{ours}.{p}" for hf, ours in _LAYER.items() for p in ("weight", "bias")},
    "attn.rel_pos_h": "attn.rel_pos_h",
    "attn.rel_pos_w": "attn.rel_pos_w",
}
_VLMKIT_TO_HF = {v: k for k, v in _HF_TO_VLMKIT.items()}
_LAYER_VLMKIT_TO_HF = {v: k for k, v in _LAYER_HF_TO_VLMKIT.items()}
_HF_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
# DeepSeek-VL hybrid: hf name under its prefix -> vlmkit name.
DEEPSEEK_EXTRA_NAMES = {
    "high_res_vision_alpha": "global_alpha",
    "high_res_vision_proj.conv1.weight": "downsample.conv1.weight",
    "high_res_vision_proj.conv2.weight": "downsample.conv2.weight",
    **{f"high_res_vision_neck.{hf}.{p}": f"global_neck.{ours}.{p}" for hf, ours in _NECK.items()
       for p in ("weight", "bias")},
}


def sam_config_from_hf(d: dict) -> SamConfig:
    """A transformers SamVisionConfig dict (model_type sam_vision_model) -> SamConfig."""
    if d.get("model_type", "sam_vision_model") != "sam_vision_model":
        raise ValueError(f"model_type {d['model_type']!r} is not a SAM vision config (sam_vision_model); "
                         "for a full SamModel directory pass its vision_config")
    defaults = SamConfig()
    return SamConfig(
        image_size=d.get("image_size", 1024),
        patch_size=d.get("patch_size", 16),
        num_channels=d.get("num_channels", 3),
        hidden_size=d.get("hidden_size", 768),
        intermediate_size=d.get("mlp_dim") or int(d.get("hidden_size", 768) * d.get("mlp_ratio", 4.0)),
        num_layers=d.get("num_hidden_layers", 12),
        num_heads=d.get("num_attention_heads", 12),
        layer_norm_eps=d.get("layer_norm_eps", 1e-6),
        hidden_act=d.get("hidden_act", "gelu"),
        qkv_bias=d.get("qkv_bias", True),
        use_abs_pos=d.get("use_abs_pos", True),
        use_rel_pos=d.get("use_rel_pos", True),
        window_size=d.get("window_size", 14),
        global_attn_indexes=tuple(d.get("global_attn_indexes", (2, 5, 8, 11))),
        output_channels=d.get("output_channels", 256),
        **{name: d.get(name, getattr(defaults, name)) for name in _VLMKIT_FIELDS},
    )


def sam_config_to_hf(cfg: SamConfig) -> dict:
    """SamConfig -> transformers SamVisionConfig dict, plus the vlmkit-only fields."""
    return {
        "model_type": "sam_vision_model",
        "architectures": ["SamVisionModel"],
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "num_channels": cfg.num_channels,
        "hidden_size": cfg.hidden_size,
        "mlp_dim": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "layer_norm_eps": cfg.layer_norm_eps,
        "hidden_act": cfg.hidden_act,
        "qkv_bias": cfg.qkv_bias,
        "use_abs_pos": cfg.use_abs_pos,
        "use_rel_pos": cfg.use_rel_pos,
        "window_size": cfg.window_size,
        "global_attn_indexes": list(cfg.global_attn_indexes),
        "output_channels": cfg.output_channels,
        "attention_dropout": 0.0,
        **{name: getattr(cfg, name) for name in _VLMKIT_FIELDS},
    }


def sam_state_from_hf(sd: StateDict, cfg: SamConfig, prefix: str = PREFIX) -> StateDict:
    """transformers SAM encoder tensors under `prefix` -> SamEncoder state dict.

    Keys outside the prefix are skipped; unknown keys under it pass through
    unrenamed, so loading reports them instead of dropping them.
    """
    out: StateDict = {}
    for key, tensor in sd.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name == "pos_embed":
            out["pos_embed"] = tensor[0]  # (1, g, g, D) -> (g, g, D)
        elif name in _HF_TO_VLMKIT:
            out[_HF_TO_VLMKIT[name]] = tensor
        elif (m := _HF_LAYER.fullmatch(name)) and m[2] in _LAYER_HF_TO_VLMKIT:
            out[f"layers.{m[1]}.{_LAYER_HF_TO_VLMKIT[m[2]]}"] = tensor
        else:
            out[key] = tensor
    return out


def sam_state_to_hf(sd: StateDict, cfg: SamConfig, prefix: str = PREFIX) -> StateDict:
    """SamEncoder state dict -> transformers names under `prefix`.

    The downsampling and global-branch tensors, which SamVisionModel lacks, keep
    their vlmkit names (transformers reports them as unused when it loads the file).
    """
    out: StateDict = {}
    for name, tensor in sd.items():
        if name == "pos_embed":
            out[prefix + "pos_embed"] = tensor[None]  # (g, g, D) -> (1, g, g, D)
        elif name in _VLMKIT_TO_HF:
            out[prefix + _VLMKIT_TO_HF[name]] = tensor
        elif (m := _HF_LAYER.fullmatch(name)) and m[2] in _LAYER_VLMKIT_TO_HF:
            out[f"{prefix}layers.{m[1]}.{_LAYER_VLMKIT_TO_HF[m[2]]}"] = tensor
        elif name.split(".")[0] in ("downsample", "global_neck", "global_alpha"):
            out[name] = tensor
        else:
            raise ValueError(f"tensor {name!r} has no transformers name; is this a SamEncoder state dict?")
    return out


def _state_from_hf(sd: StateDict, cfg: SamConfig) -> StateDict:
    """Whole-checkpoint form: tensors outside `vision_encoder.` (vlmkit's downsampling) pass through."""
    out = sam_state_from_hf(sd, cfg)
    out.update({k: v for k, v in sd.items() if not k.startswith(PREFIX)})
    return out


def deepseek_sam_config_from_hf(d: dict) -> SamConfig:
    """The high-resolution SAM branch of a transformers DeepseekVLHybridConfig dict.

    DeepSeek-VL resizes the neck map to 4x the SigLIP grid (96 for 384 / 16), then
    convolves to 2x and 4x the neck channels, and adds the sam_hd global branch.
    """
    sam, low = d.get("high_res_vision_config"), d.get("vision_config")
    if sam is None or low is None:
        raise ValueError("this is not a DeepseekVLHybridConfig: it needs both vision_config and "
                         "high_res_vision_config")
    cfg = sam_config_from_hf(sam)
    channels = cfg.output_channels
    grid = low.get("image_size", 384) // low.get("patch_size", 16)
    return SamConfig.from_dict({**cfg.to_dict(), "downsample": "deepseek", "resize_to": 4 * grid,
                                "downsample_channels": (2 * channels, 4 * channels), "global_branch": True})


def deepseek_sam_state_from_hf(sd: StateDict, cfg: SamConfig, prefix: str = "model.") -> StateDict:
    """A DeepSeek-VL hybrid checkpoint's SAM branch (encoder, both necks, convs, alpha) -> SamEncoder state."""
    out = sam_state_from_hf(sd, cfg, prefix + "high_res_vision_model." + PREFIX)
    out.update({ours: sd[prefix + hf] for hf, ours in DEEPSEEK_EXTRA_NAMES.items() if prefix + hf in sd})
    return out


def sam_from_pretrained(path: str | Path) -> SamEncoder:
    """Build a SamEncoder from a transformers SamVisionModel directory (or a vlmkit save of one)."""
    from vlmkit.weights.hf import load_state

    cfg = sam_config_from_hf(read_config(path))
    model = SamEncoder(cfg)
    load_state(model, _state_from_hf(read_state_dict(path), cfg), str(path))
    return model.eval()


SAM_VISION = Converter(
    config_from_hf=sam_config_from_hf,
    build=SamEncoder,
    state_from_hf=_state_from_hf,
    config_to_hf=sam_config_to_hf,
    state_to_hf=sam_state_to_hf,
    natural=lambda cfg: True,
)
