"""Qwen-VL / Qwen-VL-Chat checkpoints (`model_type: qwen` with a `visual` dict; the Hub's remote code
modeling_qwen.py and visual.py) <-> vlmkit VLM (squash scheme, qwen_resampler projector).

The language model is Qwen-1's (weights/qwen1.py, under "transformer."); the image part sits in the same
QWenModel, under "transformer.visual." (visual.py VisionTransformer):

    checkpoint (transformer.visual.)                     vlmkit
    conv1.weight  (no bias)                              vision.patch_embed.weight
    positional_embedding  (256, W): a 16 x 16 table      vision.pos_embed   (position_grid 16: resized bicubically
                                                                             to the 32 x 32 patches, get_abs_pos)
    ln_pre.*                                             vision.pre_norm.*
    transformer.resblocks.{i}.ln_1.*                     vision.layers.{i}.attn_norm.*
    transformer.resblocks.{i}.attn.in_proj.*             vision.layers.{i}.attn.qkv.*   rows reordered: Qwen's
                                                                   are per head [q_h; k_h; v_h], vlmkit's [q; k; v]
    transformer.resblocks.{i}.attn.out_proj.*            vision.layers.{i}.attn.out.*
    transformer.resblocks.{i}.ln_2.*                     vision.layers.{i}.mlp_norm.*
    transformer.resblocks.{i}.mlp.c_fc.* / c_proj.*      vision.layers.{i}.mlp.fc1.* / fc2.*   (exact GELU)
    attn_pool.{query, pos_embed, kv_proj.weight,         projector.*  (models/resampler.QwenResampler, same names)
      attn.in_proj_weight, attn.in_proj_bias,
      attn.out_proj.*, ln_q.*, ln_kv.*}
    ln_post.*, proj  (C, C), used as x @ proj            projector.ln_post.*, projector.proj

config.json's "visual": width, layers, heads, mlp_ratio (the MLP is int(width * mlp_ratio) wide), image_size,
patch_size, output_dim (the LM width), image_start_id (`<img>`; `</img>` and `<imgpad>` follow it, so the
image placeholder is image_start_id + 2), n_queries (default 256). visual.py fixes the rest: LayerNorm eps
1e-6, no CLS, no patch bias, the last layer's features, CLIP's mean / std, a 256-row position table, the
resampler's heads (output_dim // 128). The image is squashed to image_size (schemes/squash.py).

The reference fills the 256 positions between `<img>` and `</img>` (the path's bytes and the `<imgpad>` after
them) with the image's rows; vlmkit's prompt writes 256 `<imgpad>` there (chat template qwen_vl), which the
reference's tokenizer gives for an empty path, so the LM sees the same embeddings.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from vlmkit.config import CLIP_MEAN, CLIP_STD, LMConfig, ProjectorConfig, VisionConfig
from vlmkit.models.lm import CausalLM
from vlmkit.models.vlm import VLM, VLMConfig
from vlmkit.weights import qwen1
from vlmkit.weights.converter import Converter, StateDict
from vlmkit.weights.llama import StateReader

VISUAL = "transformer.visual."
POSITION_GRID = 16  # visual.py: positional_embedding = randn(256, width), whatever the image size
VISUAL_DEFAULTS = {"n_queries": 256}
IMGPAD_OFFSET = 2  # <img>, </img>, <imgpad>: consecutive ids (tokenization_qwen.py)


def _vision_config(visual: dict[str, Any]) -> VisionConfig:
    missing = [k for k in ("width", "layers", "heads", "mlp_ratio", "image_size", "patch_size", "output_dim")
               if k not in visual]
    if missing:
        raise ValueError(f"qwen config.json's visual dict lacks {missing}; Qwen-VL's visual.py needs them")
    width = visual["width"]
    return VisionConfig(image_size=visual["image_size"], patch_size=visual["patch_size"], hidden_size=width,
                        intermediate_size=int(width * visual["mlp_ratio"]), num_layers=visual["layers"],
                        num_heads=visual["heads"], layer_norm_eps=1e-6, hidden_act="gelu", use_cls_token=False,
                        pre_layernorm=True, post_layernorm=False, patch_bias=False, select_layer=-1,
                        select_feature="patch", image_mean=CLIP_MEAN, image_std=CLIP_STD,
                        position_grid=POSITION_GRID)


def config_from_hf(hf: dict) -> VLMConfig | LMConfig:
    """A Qwen-VL config.json (+ generation_config.json's ids, qwen1.read_generation_config) -> VLMConfig; a
    text-only Qwen-1 one (no "visual") -> LMConfig."""
    lm = qwen1.lm_config_from_qwen(hf)
    if "visual" not in hf:
        return lm
    visual = {**VISUAL_DEFAULTS, **hf["visual"]}
    if "image_start_id" not in visual:
        raise ValueError("qwen config.json's visual dict has no image_start_id (the id of <img>)")
    if visual["output_dim"] != lm.hidden_size:
        raise ValueError(f"qwen visual output_dim {visual['output_dim']} differs from the LM's hidden_size "
                         f"{lm.hidden_size}; the resampler's rows go into the LM's embeddings")
    vision = _vision_config(visual)
    projector = ProjectorConfig(f"qwen_resampler{visual['n_queries']}q", vision.hidden_size, lm.hidden_size)
    return VLMConfig(vision=vision, projector=projector, lm=lm,
                     image_token_id=visual["image_start_id"] + IMGPAD_OFFSET, image_scheme="squash")


def _check_vlm(cfg: VLMConfig) -> None:
    v = cfg.vision
    problems = []
    if cfg.image_scheme != "squash" or not cfg.projector.type.startswith("qwen_resampler") or v is None:
        problems.append(f"Qwen-VL has a ViT, the squash scheme and a qwen_resampler projector, not scheme "
                        f"{cfg.image_scheme!r} with projector {cfg.projector.type!r}")
    else:
        fixed = {"use_cls_token": False, "pre_layernorm": True, "post_layernorm": False, "patch_bias": False,
                 "hidden_act": "gelu", "layer_norm_eps": 1e-6, "select_feature": "patch",
                 "position_grid": POSITION_GRID, "image_mean": CLIP_MEAN, "image_std": CLIP_STD}
        problems += [f"vision {k}={getattr(v, k)!r} (visual.py has {want!r})" for k, want in fixed.items()
                     if getattr(v, k) != want]
        if v.select_layer not in (-1, v.num_layers):
            problems.append(f"vision select_layer {v.select_layer} (visual.py takes the last layer)")
    if problems:
        raise ValueError("cannot save this model as model_type 'qwen' (Qwen-VL): " + "; ".join(problems)
                         + "; save it as model_type='vlmkit'")


def _mlp_ratio(width: int, hidden: int) -> float:
    """The shortest mlp_ratio with int(width * ratio) == hidden (Qwen-VL's 8192 / 1664 is written 4.9231)."""
    for digits in range(1, 12):
        ratio = round(hidden / width, digits)
        if int(width * ratio) == hidden:
            return ratio
    raise ValueError(f"no mlp_ratio gives int({width} * ratio) == {hidden}")


def config_to_hf(cfg: VLMConfig | LMConfig) -> dict:
    """config.json (with generation_config.json's dict under "generation", as qwen1's writer takes it)."""
    if isinstance(cfg, LMConfig):
        return {**qwen1.lm_config_to_qwen(cfg), "generation": qwen1.generation_config(cfg)}
    _check_vlm(cfg)
    v = cfg.vision
    hf = qwen1.lm_config_to_qwen(cfg.lm)
    hf["visual"] = {"heads": v.num_heads, "image_size": v.image_size,
                    "image_start_id": cfg.image_token_id - IMGPAD_OFFSET, "layers": v.num_layers,
                    "mlp_ratio": _mlp_ratio(v.hidden_size, v.intermediate_size), "output_dim": cfg.projector.out_dim,
                    "patch_size": v.patch_size, "width": v.hidden_size}
    if cfg.projector.spec.queries != VISUAL_DEFAULTS["n_queries"]:
        hf["visual"]["n_queries"] = cfg.projector.spec.queries
    hf["generation"] = qwen1.generation_config(cfg.lm)
    return hf


def _heads_major(tensor: torch.Tensor, heads: int, to_qwen: bool) -> torch.Tensor:
    """Reorder fused attention rows between Qwen's per-head [q_h; k_h; v_h] (visual.py VisualAttention views the
    in_proj output as (heads, 3 * head_dim)) and vlmkit's [q; k; v] (each heads x head_dim)."""
    rest = tensor.shape[1:]
    hd = tensor.shape[0] // (3 * heads)
    shape = (3, heads, hd) if to_qwen else (heads, 3, hd)
    return tensor.reshape(*shape, *rest).transpose(0, 1).reshape(3 * heads * hd, *rest)


_BLOCK = {"ln_1": "attn_norm", "attn.out_proj": "attn.out", "ln_2": "mlp_norm", "mlp.c_fc": "mlp.fc1",
          "mlp.c_proj": "mlp.fc2"}
_POOL = ("query", "pos_embed", "kv_proj.weight", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
         "attn.out_proj.bias", "ln_q.weight", "ln_q.bias", "ln_kv.weight", "ln_kv.bias")


def _visual_from_hf(src: StateReader, cfg: VLMConfig) -> StateDict:
    v = cfg.vision
    out: StateDict = {"vision.patch_embed.weight": src.take(VISUAL + "conv1.weight", v.hidden_size),
                      "vision.pos_embed": src.take(VISUAL + "positional_embedding", v.num_positions)}
    for p in ("weight", "bias"):
        out[f"vision.pre_norm.{p}"] = src.take(f"{VISUAL}ln_pre.{p}", v.hidden_size)
    for i in range(v.num_layers):
        q, vk = f"{VISUAL}transformer.resblocks.{i}.", f"vision.layers.{i}."
        for p in ("weight", "bias"):
            out[f"{vk}attn.qkv.{p}"] = _heads_major(src.take(f"{q}attn.in_proj.{p}", 3 * v.hidden_size),
                                                    v.num_heads, to_qwen=False)
            for theirs, ours in _BLOCK.items():
                out[f"{vk}{ours}.{p}"] = src.take(f"{q}{theirs}.{p}")
    for name in _POOL:
        if name == "kv_proj.weight" and cfg.projector.in_dim == cfg.projector.out_dim:
            continue  # visual.py's kv_proj is an Identity when the widths agree
        out[f"projector.{name}"] = src.take(f"{VISUAL}attn_pool.{name}")
    for p in ("weight", "bias"):
        out[f"projector.ln_post.{p}"] = src.take(f"{VISUAL}ln_post.{p}", cfg.projector.out_dim)
    out["projector.proj"] = src.take(VISUAL + "proj", cfg.projector.out_dim)
    return out


def state_from_hf(state: StateDict, cfg: VLMConfig | LMConfig) -> StateDict:
    if isinstance(cfg, LMConfig):
        return qwen1.lm_state_from_qwen(state, cfg)
    src = StateReader({k: t for k, t in state.items() if k.startswith(VISUAL)})
    out = _visual_from_hf(src, cfg)
    if src.left:
        raise ValueError(f"checkpoint has {VISUAL}* tensors Qwen-VL's visual.py does not have: {sorted(src.left)[:8]}")
    lm = {k: t for k, t in state.items() if not k.startswith(VISUAL)}
    out.update({f"lm.{k}": t for k, t in qwen1.lm_state_from_qwen(lm, cfg.lm).items()})
    return out


def state_to_hf(state: StateDict, cfg: VLMConfig | LMConfig) -> StateDict:
    if isinstance(cfg, LMConfig):
        return qwen1.lm_state_to_qwen(state, cfg)
    v = cfg.vision
    out: StateDict = {VISUAL + "conv1.weight": state["vision.patch_embed.weight"],
                      VISUAL + "positional_embedding": state["vision.pos_embed"]}
    for p in ("weight", "bias"):
        out[f"{VISUAL}ln_pre.{p}"] = state[f"vision.pre_norm.{p}"]
    for i in range(v.num_layers):
        q, vk = f"{VISUAL}transformer.resblocks.{i}.", f"vision.layers.{i}."
        for p in ("weight", "bias"):
            out[f"{q}attn.in_proj.{p}"] = _heads_major(state[f"{vk}attn.qkv.{p}"], v.num_heads, to_qwen=True)
            for theirs, ours in _BLOCK.items():
                out[f"{q}{theirs}.{p}"] = state[f"{vk}{ours}.{p}"]
    for name in _POOL:
        if f"projector.{name}" in state:
            out[f"{VISUAL}attn_pool.{name}"] = state[f"projector.{name}"]
    for p in ("weight", "bias"):
        out[f"{VISUAL}ln_post.{p}"] = state[f"projector.ln_post.{p}"]
    out[VISUAL + "proj"] = state["projector.proj"]
    lm = {k.removeprefix("lm."): t for k, t in state.items() if k.startswith("lm.")}
    out.update(qwen1.lm_state_to_qwen(lm, cfg.lm))
    return out


def build(cfg: VLMConfig | LMConfig) -> nn.Module:
    """The vlmkit module of a `qwen` checkpoint: a VLM for Qwen-VL, a CausalLM for a text-only Qwen-1."""
    return CausalLM(cfg) if isinstance(cfg, LMConfig) else VLM(cfg)


QWEN = Converter(config_from_hf=config_from_hf, build=build, state_from_hf=state_from_hf, config_to_hf=config_to_hf,
                 state_to_hf=state_to_hf, natural=None, read_config=qwen1.read_generation_config,
                 write=qwen1.write_with_generation_config)
"""model_type "qwen": Qwen-VL(-Chat) when config.json has a visual dict, else a text-only Qwen-1 (qwen1.QWEN1)."""
