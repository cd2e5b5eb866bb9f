"""DeepSeek-VL2 checkpoints (`deepseek_vl_v2`: deepseek-vl2-tiny, -small and deepseek-vl2) <-> vlmkit VLM, `tiles` scheme.

The layout of DeepSeek's own code (GitHub deepseek-ai/DeepSeek-VL2, deepseek_vl2/models/:
modeling_deepseek_vl_v2.py `DeepseekVLV2ForCausalLM`, siglip_vit.py `VisionTransformer`, a timm ViT):

    checkpoint                                          vlmkit VLM
    vision.patch_embed.proj.{weight,bias}               vision.patch_embed.*
    vision.pos_embed                  (1, 729, D)       vision.pos_embed (729, D)
    vision.blocks.{i}.norm1 / norm2                     vision.layers.{i}.attn_norm / mlp_norm
    vision.blocks.{i}.attn.qkv / attn.proj              vision.layers.{i}.attn.qkv / attn.out
    vision.blocks.{i}.mlp.fc1 / fc2                     vision.layers.{i}.mlp.fc1 / fc2
    vision.norm                                         vision.post_norm (applied to the features: schemes/tiles.py)
    vision.attn_pool.latent / q / kv / proj / norm / mlp  vision.head.probe / q / kv / out / norm / mlp (unused)
    projector.layers.{0,2}            (4D -> C -> C)    projector.mlp.{0,2}, after the 2x2 unfold (tiles.downsample_2x2)
    image_newline, view_seperator     (C,)              image_newline, view_separator
    language.model.*, language.lm_head.weight           lm.* (weights/deepseek_v2.py)

config.json keeps three sub-configs: `vision_config` (timm names: width, layers, heads, mlp_ratio, patch_size,
image_size 384, of which the stride-14 conv reads 378 px), `projector_config` (downsample_mlp_gelu, depth 2,
mlp_ratio 1, downsample_ratio 2; input_dim defaults to 1152) and `language_config`, a DeepSeek-V2 config read
with the defaults of DeepSeek-VL2's configuration_deepseek.py: tiny without latent attention (use_mla false),
small with it, the base model with noaux_tc routing over sigmoid scores. `candidate_resolutions` must be the
23 tilings of at most 9 tiles of 384 (schemes/tiles.candidate_resolutions) and tile_tag "2D", global_view_pos
"head": what every release has and what the tiles scheme plans.

config.json does not name the image placeholder; its processor takes the `<image>` token's id from the
tokenizer. `read_config` adds it from the folder's tokenizer.json (128815 in the released tokenizers of
tiny and base); a folder without one must carry `image_token_id` in config.json. Saving writes the release's
keys back and no `image_token_id`, so the saved folder needs its tokenizer beside it (LoadedModel.save_pretrained
writes it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from vlmkit.config import SIGLIP_MEAN, SIGLIP_STD, ProjectorConfig, VisionConfig
from vlmkit.models.vlm import VLM, VLMConfig
from vlmkit.schemes.tiles import PATCH, TILE, candidate_resolutions
from vlmkit.weights import deepseek_v2
from vlmkit.weights.converter import Converter, StateDict

MODEL_TYPE = "deepseek_vl_v2"
SO400M_MLP_RATIO = 3.7362
IMAGE_TOKEN = "<image>"
# DeepSeek-VL2's configuration_deepseek.py DeepseekV2Config defaults where they differ from transformers'
# (which weights/deepseek_v2.py fills in): a config.json without these keys means these values there.
_LANGUAGE_DEFAULTS: dict[str, Any] = {
    "num_hidden_layers": 30, "n_routed_experts": None, "n_shared_experts": None, "bos_token_id": 100000,
    "eos_token_id": 100001, "max_position_embeddings": 2048, "moe_intermediate_size": 1407,
    "use_mla": True, "rope_theta": 10000.0,
}
_VISION_DEFAULTS = {"image_size": 384, "patch_size": 16, "width": 1024, "layers": 24, "heads": 16, "mlp_ratio": 4,
                    "global_pool": "map", "model_name": "siglip_large_patch16_384"}
_PROJECTOR_DEFAULTS = {"projector_type": "downsample_mlp_gelu", "input_dim": 1152, "n_embed": 2048, "depth": 2,
                       "mlp_ratio": 1, "downsample_ratio": 2}
# timm block module -> vlmkit EncoderLayer module
_BLOCK = {"norm1": "attn_norm", "attn.qkv": "attn.qkv", "attn.proj": "attn.out", "norm2": "mlp_norm",
          "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
# timm AttentionPoolLatent module -> vlmkit AttentionPoolHead module
_POOL = {"q": "q", "kv": "kv", "proj": "out", "norm": "norm", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def read_config(folder: Path, config: dict) -> dict:
    """config.json plus `image_token_id`: the id of `<image>` in the folder's tokenizer files (tokenizer.json's
    added tokens or vocabulary, else tokenizer_config.json's added_tokens_decoder), when config.json has none;
    DeepSeek-VL2's processor reads it from the tokenizer the same way."""
    if "image_token_id" in config:
        return config
    ids: dict[str, int] = {}
    file = folder / "tokenizer.json"
    if file.is_file():
        data = json.loads(file.read_text(encoding="utf-8"))
        vocab = data.get("model", {}).get("vocab")
        ids.update(vocab if isinstance(vocab, dict) else {})
        ids.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
    file = folder / "tokenizer_config.json"
    if IMAGE_TOKEN not in ids and file.is_file():
        decoder = json.loads(file.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
        ids.update({t["content"]: int(i) for i, t in decoder.items()})
    if IMAGE_TOKEN not in ids:
        return config  # config_from_hf says what is missing
    return {**config, "image_token_id": ids[IMAGE_TOKEN]}


def _check_tiling(hf: dict) -> int:
    """The most tiles per image that candidate_resolutions allows; ValueError unless the tiles scheme plans them."""
    given = [tuple(r) for r in hf.get("candidate_resolutions", [(TILE, TILE)])]
    most = max(w * h for w, h in given) // (TILE * TILE) if given else 0
    if most < 1 or given != candidate_resolutions(most):
        raise ValueError(f"candidate_resolutions {given[:4]}... are not the tilings of at most N tiles of {TILE} px "
                         f"in DeepSeek-VL2's order (e.g. {candidate_resolutions(9)[:4]}...), which is all vlmkit's "
                         "tiles scheme plans")
    for key, want in (("tile_tag", "2D"), ("global_view_pos", "head")):
        if hf.get(key, want) != want:
            raise ValueError(f"{key}={hf[key]!r}: vlmkit's tiles scheme lays images out as {key}={want!r} (what "
                             "every DeepSeek-VL2 release uses)")
    return most


def language_config(hf: dict) -> dict:
    """language_config with DeepSeek-VL2's defaults filled in."""
    lang = {**_LANGUAGE_DEFAULTS, **hf, "model_type": "deepseek_v2"}
    if lang["n_routed_experts"] and lang.get("topk_method") in (None, "gready"):
        raise ValueError("language_config has routed experts but no topk_method (DeepSeek-VL2's default is the "
                         "misspelt 'gready', which its MoEGate cannot run); set topk_method")
    return lang


def config_from_hf(hf: dict) -> VLMConfig:
    """A deepseek_vl_v2 config.json dict (with image_token_id: read_config) -> VLMConfig, tiles scheme."""
    if hf.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise ValueError(f"model_type {hf['model_type']!r} is not {MODEL_TYPE!r}")
    max_tiles = _check_tiling(hf)
    v = {**_VISION_DEFAULTS, **hf.get("vision_config", {})}
    p = {**_PROJECTOR_DEFAULTS, **hf.get("projector_config", {})}
    if p["projector_type"] != "downsample_mlp_gelu" or p["downsample_ratio"] != 2 or p["mlp_ratio"] != 1:
        raise ValueError(f"projector_config {p['projector_type']!r} (downsample_ratio {p['downsample_ratio']}, "
                         f"mlp_ratio {p['mlp_ratio']}): DeepSeek-VL2 releases use downsample_mlp_gelu with a 2x2 "
                         "downsample and mlp_ratio 1, the only form vlmkit's tiles scheme runs")
    if v["global_pool"] not in ("map", ""):
        raise ValueError(f"vision_config global_pool {v['global_pool']!r}: expected 'map' (SigLIP) or ''")
    if v["image_size"] != TILE or v["patch_size"] != PATCH:
        raise ValueError(f"vision_config image_size {v['image_size']} / patch_size {v['patch_size']}: the tiles scheme "
                         f"plans {TILE}-px views of {PATCH}-px patches")
    if p["input_dim"] != v["width"]:
        raise ValueError(f"projector_config input_dim {p['input_dim']} != vision_config width {v['width']}")
    vision = VisionConfig(image_size=TILE // PATCH * PATCH, patch_size=PATCH, hidden_size=v["width"],
                          intermediate_size=int(v["width"] * v["mlp_ratio"]), num_layers=v["layers"],
                          num_heads=v["heads"], layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
                          use_cls_token=False, pre_layernorm=False, post_layernorm=True,
                          use_head=v["global_pool"] == "map", patch_bias=True, select_layer=-1,
                          select_feature="patch", image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD)
    projector = ProjectorConfig(f"merge2x2_mlp{p['depth']}x_gelu", 4 * p["input_dim"], p["n_embed"])
    lm = deepseek_v2.config_from_hf(language_config(hf.get("language_config", {})))
    if "image_token_id" not in hf:
        raise ValueError("a deepseek_vl_v2 folder needs its tokenizer.json (with the <image> token) beside "
                         "config.json, or image_token_id in config.json: copy the checkpoint's tokenizer files")
    return VLMConfig(vision=vision, projector=projector, lm=lm, image_token_id=hf["image_token_id"],
                     image_scheme="tiles", max_crops=max_tiles)


def _mlp_ratio(width: int, hidden: int) -> float:
    """An mlp_ratio with int(width * ratio) == hidden, as timm sizes the MLP: SigLIP-so400m's 3.7362 when it
    gives that width (1152 -> 4304, what the releases write), else the plain quotient or a half step above it
    (4304 / 1152 alone would give 4303 after float rounding)."""
    return next(r for r in (SO400M_MLP_RATIO, hidden / width, (hidden + 0.5) / width) if int(width * r) == hidden)


def config_to_hf(cfg: VLMConfig) -> dict:
    """VLMConfig -> config.json in the release's keys (language_config in DeepSeek's own keys)."""
    v = cfg.vision
    timm_siglip = v is not None and (v.use_cls_token, v.pre_layernorm, v.patch_bias, v.hidden_act, v.layer_norm_eps,
                                     v.select_layer) == (False, False, True, "gelu_pytorch_tanh", 1e-6, -1)
    if cfg.image_scheme != "tiles" or not timm_siglip:
        raise ValueError("deepseek_vl_v2 saves a tiles-scheme VLM whose tower is DeepSeek-VL2's SigLIP (no CLS, no "
                         "pre-layernorm, gelu-tanh, LayerNorm eps 1e-6, the last layer); save this model as 'vlmkit'")
    lang = deepseek_v2.config_to_hf(cfg.lm, "deepseek_v2")
    rope = lang.pop("rope_parameters")
    lang.update(rope_theta=rope.pop("rope_theta"), use_mla=bool(cfg.lm.kv_lora_rank))
    if rope.get("rope_type", "default") != "default":  # DeepSeek's own key: rope_scaling {"type": ...}
        lang["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    return {
        "architectures": ["DeepseekVLV2ForCausalLM"], "model_type": MODEL_TYPE,
        "candidate_resolutions": [list(r) for r in candidate_resolutions(cfg.max_crops or 9)],
        "tile_tag": "2D", "global_view_pos": "head",
        "vision_config": {"model_type": "vision", "model_name": "siglip_so400m_patch14_384", "image_size": TILE,
                          "patch_size": v.patch_size, "width": v.hidden_size, "layers": v.num_layers,
                          "heads": v.num_heads, "mlp_ratio": _mlp_ratio(v.hidden_size, v.intermediate_size),
                          "global_pool": "map" if v.use_head else ""},
        "projector_config": {"model_type": "mlp_projector", "projector_type": "downsample_mlp_gelu",
                             "input_dim": v.hidden_size, "n_embed": cfg.projector.out_dim, "depth": _depth(cfg),
                             "mlp_ratio": 1, "downsample_ratio": 2},
        "language_config": lang,
    }


def state_from_hf(state: StateDict, cfg: VLMConfig) -> StateDict:
    """A deepseek_vl_v2 checkpoint -> VLM state dict; a tensor no part reads raises ValueError."""
    src = dict(state)

    def take(key: str) -> torch.Tensor:
        if key not in src:
            raise ValueError(f"{MODEL_TYPE} checkpoint lacks tensor {key!r}")
        return src.pop(key)

    out: StateDict = {"vision.patch_embed.weight": take("vision.patch_embed.proj.weight"),
                      "vision.patch_embed.bias": take("vision.patch_embed.proj.bias"),
                      "vision.pos_embed": take("vision.pos_embed")[0],  # (729, D)
                      "vision.post_norm.weight": take("vision.norm.weight"),
                      "vision.post_norm.bias": take("vision.norm.bias")}
    for i in range(cfg.vision.num_layers):  # type: ignore[union-attr]
        for theirs, ours in _BLOCK.items():
            for p in ("weight", "bias"):
                out[f"vision.layers.{i}.{ours}.{p}"] = take(f"vision.blocks.{i}.{theirs}.{p}")
    if cfg.vision.use_head:  # type: ignore[union-attr]
        out["vision.head.probe"] = take("vision.attn_pool.latent")  # (1, 1, D)
        for theirs, ours in _POOL.items():
            for p in ("weight", "bias"):
                out[f"vision.head.{ours}.{p}"] = take(f"vision.attn_pool.{theirs}.{p}")
    for j in range(0, 2 * _depth(cfg) - 1, 2):  # the Linear layers of the MLP
        for p in ("weight", "bias"):
            out[f"projector.mlp.{j}.{p}"] = take(f"projector.layers.{j}.{p}")
    out["image_newline"] = take("image_newline")
    out["view_separator"] = take("view_seperator")
    lm = {k.removeprefix("language."): src.pop(k) for k in [k for k in src if k.startswith("language.")]}
    if src:
        raise ValueError(f"{MODEL_TYPE} checkpoint has tensors this config does not use: {sorted(src)[:8]}")
    out.update({f"lm.{k}": v for k, v in deepseek_v2.state_from_hf(lm, cfg.lm).items()})
    return out


def _depth(cfg: VLMConfig) -> int:
    return int(re.match(r"merge2x2_mlp(\d+)x_gelu", cfg.projector.type).group(1))  # type: ignore[union-attr]


def state_to_hf(state: StateDict, cfg: VLMConfig) -> StateDict:
    """VLM state dict -> deepseek_vl_v2 tensor names."""
    out: StateDict = {"vision.patch_embed.proj.weight": state["vision.patch_embed.weight"],
                      "vision.patch_embed.proj.bias": state["vision.patch_embed.bias"],
                      "vision.pos_embed": state["vision.pos_embed"][None],  # (1, 729, D)
                      "vision.norm.weight": state["vision.post_norm.weight"],
                      "vision.norm.bias": state["vision.post_norm.bias"]}
    for i in range(cfg.vision.num_layers):  # type: ignore[union-attr]
        for theirs, ours in _BLOCK.items():
            for p in ("weight", "bias"):
                out[f"vision.blocks.{i}.{theirs}.{p}"] = state[f"vision.layers.{i}.{ours}.{p}"]
    if cfg.vision.use_head:  # type: ignore[union-attr]
        out["vision.attn_pool.latent"] = state["vision.head.probe"]
        for theirs, ours in _POOL.items():
            for p in ("weight", "bias"):
                out[f"vision.attn_pool.{theirs}.{p}"] = state[f"vision.head.{ours}.{p}"]
    for j in range(0, 2 * _depth(cfg) - 1, 2):
        for p in ("weight", "bias"):
            out[f"projector.layers.{j}.{p}"] = state[f"projector.mlp.{j}.{p}"]
    out["image_newline"] = state["image_newline"]
    out["view_seperator"] = state["view_separator"]
    lm = {k.removeprefix("lm."): v for k, v in state.items() if k.startswith("lm.")}
    out.update({f"language.{k}": v for k, v in deepseek_v2.state_to_hf(lm, cfg.lm).items()})
    return out


DEEPSEEK_VL_V2 = Converter(config_from_hf=config_from_hf, build=VLM, state_from_hf=state_from_hf,
                           config_to_hf=config_to_hf, state_to_hf=state_to_hf,
                           read_config=read_config)
