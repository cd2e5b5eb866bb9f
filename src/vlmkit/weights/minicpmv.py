"""MiniCPM-V 2.6 checkpoints (`model_type: minicpmv`, the Hub's remote code) <-> vlmkit VLM (slices scheme).

The layout of openbmb/MiniCPM-V-2_6 (modeling_minicpmv.py, modeling_navit_siglip.py, resampler.py):

    checkpoint                                   vlmkit
    vpm.<siglip tower>  (no head)                vision.<tower>       weights/vision.py names; NaViT positions
    resampler.query (Q, C)                       projector.query      minicpmv_resampler{Q}q
    resampler.kv_proj.weight (C, Dv)             projector.kv_proj.weight
    resampler.attn.{in_proj_*, out_proj.*}       projector.attn.*     torch MultiheadAttention layout
    resampler.{ln_q, ln_kv, ln_post}.*, .proj    projector.*          (models/minicpmv_resampler.py)
    llm.model.<qwen2 body>, llm.lm_head.weight   lm.*                 weights/llama.py

config.json: the Qwen2 LM keys at the top level, and
    vision_config   SigLIP so400m (`model_type: siglip`, image_size 980: a 70 x 70 position table looked up by
                    bucketed coordinates, VisionConfig.position_buckets), drop_vision_last_layer (2.6: false)
    query_num       the resampler's queries (64); its heads are hidden_size // 128
    slice_config    {max_slice_nums 9, scale_resolution 448, patch_size 14} -> max_crops, slice_size
    use_image_id, slice_mode (2.6: true; vlmkit writes `<image_id>N</image_id>` before each image and slices)
preprocessor_config.json (MiniCPMVImageProcessor) repeats max_slice_nums, scale_resolution, patch_size,
image_feature_size (= query_num), use_image_id, and gives norm_mean / norm_std (0.5): read_config puts it under
"preprocessor" and write writes it back. The image token is `<unk>` (128244 in the 2.6 vocabulary; the
processor's `unk`), whose id read_config takes from the tokenizer files when config.json has no image_token_id.
Generation ends at MiniCPMV.terminators, `<|im_end|>` (config.json's eos_token_id) and `<|endoftext|>`: their ids
in the tokenizer files join the LM's eos_token_id list (config_to_hf writes config.json's single id back).
The vision tower's features are its last layer after post_layernorm (VisionConfig.feature_post_norm).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from vlmkit.config import ProjectorConfig
from vlmkit.models.rope import rope_parameters
from vlmkit.models.vlm import VLM, VLMConfig
from vlmkit.weights.converter import Converter, StateDict, write_files
from vlmkit.weights.llama import lm_config_from_hf, lm_config_to_hf, lm_state_from_hf, lm_state_to_hf
from vlmkit.weights.vision import vision_config_from_hf, vision_state_from_hf, vision_state_to_hf

MODEL_TYPE = "minicpmv"
PREPROCESSOR_FILE = "preprocessor_config.json"
IMAGE_TOKEN = "<unk>"
MINICPMV_UNK_ID = 128244  # <unk> in MiniCPM-V 2.6's vocabulary
TERMINATORS = ("<|im_end|>", "<|endoftext|>")  # MiniCPMV.terminators: generation ends at either
AUTO_MAP = {"AutoConfig": "configuration_minicpm.MiniCPMVConfig", "AutoModel": "modeling_minicpmv.MiniCPMV",
            "AutoModelForCausalLM": "modeling_minicpmv.MiniCPMV"}
# MiniCPMVConfig.default_vision_config: SigLIP so400m at 980 px
DEFAULT_VISION = {"hidden_size": 1152, "image_size": 980, "intermediate_size": 4304, "model_type": "siglip",
                  "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14}
_LM_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
            "bos_token_id", "eos_token_id", "rope_theta", "rope_scaling", "sliding_window", "use_sliding_window",
            "max_window_layers")
_RESAMPLER = "resampler."


def reference_pixel_layout(view: torch.Tensor, patch: int = 14) -> torch.Tensor:
    """A (3, h, w) view in the reference processor's layout (image_processing_minicpmv.reshape_by_patch):
    (3, patch, L * patch), the L = (h/P)(w/P) patches side by side in row-major order. The reference's tower
    convolves that strip, which gives the same patch embeddings, in the same order, as vlmkit's tower on the
    (3, h, w) view; vlmkit keeps views whole and uses this only to compare pixels with the reference.

        >>> reference_pixel_layout(torch.arange(16.0).view(1, 4, 4), patch=2)[0].tolist()
        [[0.0, 1.0, 2.0, 3.0, 8.0, 9.0, 10.0, 11.0], [4.0, 5.0, 6.0, 7.0, 12.0, 13.0, 14.0, 15.0]]
    """
    C = view.shape[0]
    patches = torch.nn.functional.unfold(view[None], (patch, patch), stride=(patch, patch))[0]  # (C*P*P, L)
    return patches.reshape(C, patch, patch, -1).permute(0, 1, 3, 2).reshape(C, patch, -1)  # (C, P, L*P)


def _tokenizer_ids(folder: Path) -> dict[str, int]:
    """Token text -> id of the added tokens in the folder's tokenizer files."""
    ids: dict[str, int] = {}
    file = folder / "tokenizer.json"
    if file.is_file():
        data = json.loads(file.read_text(encoding="utf-8"))
        ids.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
    file = folder / "tokenizer_config.json"
    if file.is_file():
        decoder = json.loads(file.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
        ids.update({t["content"]: int(i) for i, t in decoder.items() if t["content"] not in ids})
    return ids


def read_config(path: Path, config: dict) -> dict:
    """config.json with preprocessor_config.json under "preprocessor" and, unless config.json names one,
    image_token_id = the id of `<unk>` in the tokenizer files (the processor's query token)."""
    out = dict(config)
    file = path / PREPROCESSOR_FILE
    if file.is_file():
        try:
            out["preprocessor"] = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file} is not valid JSON: {e}") from e
    ids = _tokenizer_ids(path)
    if "image_token_id" not in out:
        unk = out.get("preprocessor", {}).get("unk", IMAGE_TOKEN)
        if unk in ids:
            out["image_token_id"] = ids[unk]
    out["terminator_ids"] = [ids[t] for t in TERMINATORS if t in ids]
    return out


def _check_layout(hf: dict) -> None:
    if not hf.get("slice_mode", True):
        raise ValueError("minicpmv config.json has slice_mode false; vlmkit's slices scheme always slices, as "
                         "MiniCPM-V 2.6 does")
    pre = hf.get("preprocessor", {})
    for key, want in (("image_feature_size", hf.get("query_num", 64)), ("use_image_id", True),
                      ("slice_mode", True)):
        if pre.get(key, want) != want:
            raise ValueError(f"minicpmv preprocessor_config.json has {key}={pre[key]!r} but vlmkit supports "
                             f"{key}={want!r} (MiniCPM-V 2.6's)")
    if not hf.get("use_image_id", True):
        raise ValueError("minicpmv config.json has use_image_id false; vlmkit writes MiniCPM-V 2.6's "
                         "<image_id>N</image_id> tags (use_image_id true)")
    vision = {**DEFAULT_VISION, **hf.get("vision_config", {})}
    if vision.get("model_type", "siglip") not in ("siglip", "siglip_vision_model"):
        raise ValueError(f"minicpmv vision_config model_type {vision['model_type']!r}: only SigLIP is supported")


def config_from_hf(hf: dict) -> VLMConfig:
    """read_config's dict (config.json + "preprocessor" + image_token_id) -> VLMConfig of the slices scheme."""
    _check_layout(hf)
    tower = {**DEFAULT_VISION, **hf.get("vision_config", {})}
    layers = tower["num_hidden_layers"] - int(bool(hf.get("drop_vision_last_layer", True)))
    pre = hf.get("preprocessor", {})
    vision = vision_config_from_hf({**tower, "model_type": "siglip_vision_model", "num_hidden_layers": layers,
                                    "vision_use_head": False, "select_layer": -1, "select_feature": "patch",
                                    "image_mean": tuple(pre.get("norm_mean", (0.5, 0.5, 0.5))),
                                    "image_std": tuple(pre.get("norm_std", (0.5, 0.5, 0.5)))})
    vision = dataclasses.replace(vision, position_buckets=True, feature_post_norm=True)
    lm = lm_config_from_hf({**{k: hf[k] for k in (*_LM_KEYS, "pad_token_id") if k in hf}, "model_type": "qwen2"})
    eos = [] if lm.eos_token_id is None else [lm.eos_token_id] if isinstance(lm.eos_token_id, int) else lm.eos_token_id
    stops = list(dict.fromkeys([*eos, *hf.get("terminator_ids", [])]))
    lm = dataclasses.replace(lm, eos_token_id=stops[0] if len(stops) == 1 else stops or None)
    slices = hf.get("slice_config") or {}
    patch = slices.get("patch_size", hf.get("patch_size", vision.patch_size))
    if patch != vision.patch_size:
        raise ValueError(f"minicpmv slice_config patch_size {patch} differs from the tower's {vision.patch_size}")
    projector = ProjectorConfig(f"minicpmv_resampler{hf.get('query_num', 64)}q", vision.hidden_size, lm.hidden_size)
    return VLMConfig(vision=vision, projector=projector, lm=lm,
                     image_token_id=hf.get("image_token_id", MINICPMV_UNK_ID), image_scheme="slices",
                     max_crops=slices.get("max_slice_nums", 1), slice_size=slices.get("scale_resolution", 448))


def config_to_hf(cfg: VLMConfig) -> dict:
    """config.json of the released layout, with the processor's settings under "preprocessor" (write puts them
    in preprocessor_config.json). Keys the model does not read (initializer_range, vision_batch_size) take the
    released values."""
    if cfg.image_scheme != "slices" or cfg.projector.spec.family != "minicpmv_resampler" or cfg.vision is None:
        raise ValueError(f"minicpmv holds a SigLIP tower, the slices scheme and a minicpmv_resampler projector; this "
                         f"model has scheme {cfg.image_scheme!r} and projector {cfg.projector.type!r}: save it as "
                         "model_type='vlmkit'")
    v = cfg.vision
    if not v.position_buckets or not v.feature_post_norm or v.use_cls_token or v.use_head:
        raise ValueError("minicpmv's tower is a NaViT SigLIP (position_buckets, no CLS, no head) whose last layer "
                         "after post_layernorm the resampler reads (feature_post_norm); this tower differs: save as model_type='vlmkit'")
    lm = lm_config_to_hf(cfg.lm, "qwen2")
    hf: dict[str, Any] = {"architectures": ["MiniCPMV"], "auto_map": dict(AUTO_MAP), "model_type": MODEL_TYPE,
                          "attention_dropout": 0.0, "batch_vision_input": True, "drop_vision_last_layer": False,
                          "image_size": cfg.slice_size or v.image_size, "initializer_range": 0.02,
                          "patch_size": v.patch_size, "query_num": cfg.projector.spec.queries,
                          "slice_mode": True, "use_cache": True, "use_image_id": True, "version": 2.6,
                          "vision_batch_size": 16}
    hf.update({k: lm[k] for k in _LM_KEYS if k in lm})
    if isinstance(hf["eos_token_id"], list):  # config.json's own eos first; read_config adds the terminators
        hf["eos_token_id"] = hf["eos_token_id"][0]
    rope = rope_parameters(cfg.lm)
    if rope["rope_type"] != "default":
        raise ValueError(f"minicpmv's Qwen2 LM has plain RoPE; this model's is {rope['rope_type']!r}")
    hf["rope_theta"], hf["rope_scaling"] = cfg.lm.rope_theta, None
    if cfg.lm.pad_token_id is not None:
        hf["pad_token_id"] = cfg.lm.pad_token_id
    hf["slice_config"] = {"max_slice_nums": cfg.max_crops, "model_type": MODEL_TYPE, "patch_size": v.patch_size,
                          "scale_resolution": cfg.slice_size or v.image_size}
    hf["vision_config"] = {"hidden_size": v.hidden_size, "image_size": v.image_size,
                           "intermediate_size": v.intermediate_size, "model_type": "siglip",
                           "num_attention_heads": v.num_heads, "num_hidden_layers": v.num_layers,
                           "patch_size": v.patch_size, "layer_norm_eps": v.layer_norm_eps, "hidden_act": v.hidden_act}
    if cfg.image_token_id != MINICPMV_UNK_ID:
        hf["image_token_id"] = cfg.image_token_id
    hf["preprocessor"] = {"max_slice_nums": cfg.max_crops, "scale_resolution": cfg.slice_size or v.image_size,
                          "patch_size": v.patch_size, "image_feature_size": cfg.projector.spec.queries,
                          "norm_mean": list(v.image_mean), "norm_std": list(v.image_std)}
    return hf


def write(path: Path, config: dict, state: StateDict, max_shard_bytes: int, tokenizer: Any = None) -> None:
    """The tokenizer, tensors and config.json (write_files), and preprocessor_config.json for the reference's
    MiniCPMVImageProcessor."""
    config = dict(config)
    pre = config.pop("preprocessor")
    config["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    path.mkdir(parents=True, exist_ok=True)
    (path / PREPROCESSOR_FILE).write_text(json.dumps({
        "image_processor_type": "MiniCPMVImageProcessor",
        "auto_map": {"AutoProcessor": "processing_minicpmv.MiniCPMVProcessor",
                     "AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor"},
        "processor_class": "MiniCPMVProcessor", **pre, "use_image_id": True, "im_start": "<image>",
        "im_end": "</image>", "slice_start": "<slice>", "slice_end": "</slice>", "unk": IMAGE_TOKEN,
        "im_id_start": "<image_id>", "im_id_end": "</image_id>", "slice_mode": True, "version": 2.6},
        indent=2) + "\n")
    write_files(path, config, state, max_shard_bytes, tokenizer)


def state_from_hf(state: StateDict, cfg: VLMConfig) -> StateDict:
    vision = {k: v for k, v in state.items() if k.startswith("vpm.")}
    out = {f"vision.{k}": v for k, v in vision_state_from_hf(vision, cfg.vision, prefix="vpm.").items()}
    out.update({"projector." + k.removeprefix(_RESAMPLER): v for k, v in state.items() if k.startswith(_RESAMPLER)})
    lm = {k.removeprefix("llm."): v for k, v in state.items() if k.startswith("llm.")}
    out.update({f"lm.{k}": v for k, v in lm_state_from_hf(lm, cfg.lm, prefix="model.").items()})
    other = sorted(k for k in state if not k.startswith(("vpm.", _RESAMPLER, "llm.")))
    if other:
        raise ValueError(f"minicpmv checkpoint has tensors outside vpm., resampler. and llm.: {other[:8]}")
    return out


def state_to_hf(state: StateDict, cfg: VLMConfig) -> StateDict:
    def part(prefix: str) -> StateDict:
        return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}

    out = vision_state_to_hf(part("vision."), cfg.vision, prefix="vpm.")
    out.update({_RESAMPLER + k: v for k, v in part("projector.").items()})
    out.update(lm_state_to_hf(part("lm."), cfg.lm, "qwen2", prefix="llm.model.", head_prefix="llm."))
    return out


MINICPMV = Converter(config_from_hf=config_from_hf, build=VLM, state_from_hf=state_from_hf, config_to_hf=config_to_hf,
                     state_to_hf=state_to_hf, natural=None, read_config=read_config, write=write)
