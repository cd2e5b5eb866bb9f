"""transformers `got_ocr2` checkpoints (GOT-OCR2, Vary's successor) <-> a Vary-tiny-style vlmkit VLM.

GOT-OCR2 is Vary-tiny's design grown up: SAM ViTDet-B at 1024 px with its neck, Vary's two stride-2
convs, a linear projector and a Qwen2 decoder. In vlmkit it is a VLM with image_scheme "sam"
(schemes/sam.py): no CLIP tower, the SAM branch in `vision_high` with downsample "vary".

    transformers (with or without a leading "model.")        vlmkit
    vision_tower.<sam keys>                                   vision_high.*            (weights/sam.py)
    multi_modal_projector.conv_upsampler{1,2}.weight          vision_high.downsample.conv{1,2}.weight
    multi_modal_projector.multimodal_projector.{weight,bias}  projector.mlp.0.{weight,bias}
    language_model.[model.]<qwen2 body>, lm_head.weight       lm.*                     (weights/llama.py)

Where GOT-OCR2 departs from Vary (docs/references.md, Vary), vlmkit's config already expresses it:
- Vary's second conv (net_3) always gives 1024 channels and the projector maps 1024 -> the LM width
  (768 for Vary-tiny's OPT-125M); GOT-OCR2's conv_upsampler2 gives the LM width itself and its projector
  is a square Linear(H, H). Here: downsample_channels = (2 * output_channels, H), projector
  "linear" H -> H with bias. With GOT's 1024-wide Qwen2 the two shapes coincide (512 -> 1024 -> 1024).
- The image: GOT-OCR2's processor resizes bicubic to the tower's size ignoring the aspect ratio and
  normalises with OpenAI CLIP's mean / std, exactly Vary's BlipImageEvalProcessor, so vision_high gets
  CLIP's mean / std. Its optional crop_to_patches / multi-page tiling is not implemented here.
- Placeholders: `<img>` + tokens_per_image x `<imgpad>` + `</img>` as in Vary; config.json's
  image_seq_length is not read (transformers' processor uses its own num_image_tokens = 256), the count
  is vision_high.tokens_per_image.
The top-level tie_word_embeddings (default true) decides whether lm_head is the embedding, as in
transformers. Sub-config keys a file omits take the defaults of transformers' GotOcr2VisionConfig and,
without a text_config at all, GotOcr2Config's Qwen2 defaults.
"""

from __future__ import annotations

from typing import Any

from vlmkit.config import CLIP_MEAN, CLIP_STD, ProjectorConfig
from vlmkit.models.vlm import VLM, VLMConfig
from vlmkit.weights.converter import Converter, StateDict
from vlmkit.weights.llama import (lm_config_from_hf, lm_config_to_hf, lm_state_from_hf, lm_state_to_hf,
                                  natural_model_type)
from vlmkit.weights.sam import sam_config_from_hf, sam_state_from_hf, sam_state_to_hf

MODEL_TYPE = "got_ocr2"
_VISION, _PROJ, _LM = "vision_tower.", "multi_modal_projector.", "language_model."
# transformers GotOcr2VisionConfig defaults (SAM ViT-B at 1024 px)
_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "output_channels": 256, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_channels": 3, "image_size": 1024, "patch_size": 16, "hidden_act": "gelu", "layer_norm_eps": 1e-6,
    "qkv_bias": True, "use_abs_pos": True, "use_rel_pos": True, "window_size": 14,
    "global_attn_indexes": [2, 5, 8, 11], "mlp_dim": 3072}
# transformers GotOcr2Config's text_config when config.json has none (GOT-OCR-2.0's Qwen2-0.5B-sized LM)
_TEXT_DEFAULTS: dict[str, Any] = {
    "model_type": "qwen2", "vocab_size": 151860, "hidden_size": 1024, "intermediate_size": 2816,
    "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16, "hidden_act": "silu",
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    "rope_theta": 1000000.0, "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 21}
# hf projector tensor (under multi_modal_projector.) -> vlmkit name
_PROJECTOR = {
    "conv_upsampler1.weight": "vision_high.downsample.conv1.weight",
    "conv_upsampler2.weight": "vision_high.downsample.conv2.weight",
    "multimodal_projector.weight": "projector.mlp.0.weight",
    "multimodal_projector.bias": "projector.mlp.0.bias",
}


def _square(value: Any, name: str) -> int:
    """GotOcr2VisionConfig allows [h, w] sizes; vlmkit's SAM tower is square."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"vision_config.{name} {value!r}: vlmkit's SAM tower takes square sizes only")
        value = value[0]
    return int(value)


def config_from_hf(hf: dict) -> VLMConfig:
    """A GotOcr2Config dict -> VLMConfig (image_scheme 'sam', SAM + vary convs to the LM width, Linear H -> H)."""
    if hf.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise ValueError(f"model_type {hf['model_type']!r} is not {MODEL_TYPE!r}")
    vision = {**_VISION_DEFAULTS, **(hf.get("vision_config") or {})}
    text = dict(hf.get("text_config") or _TEXT_DEFAULTS)
    text["tie_word_embeddings"] = hf.get("tie_word_embeddings", True)  # the top level ties, as in transformers
    lm = lm_config_from_hf(text)
    channels = vision["output_channels"]
    sam = sam_config_from_hf({
        **vision, "model_type": "sam_vision_model",
        "image_size": _square(vision["image_size"], "image_size"),
        "patch_size": _square(vision["patch_size"], "patch_size"),
        "downsample": "vary", "downsample_channels": (2 * channels, lm.hidden_size),  # conv_upsampler1, 2
        "image_mean": CLIP_MEAN, "image_std": CLIP_STD})  # GotOcr2ImageProcessor's OPENAI_CLIP_MEAN / STD
    projector = ProjectorConfig("linear", lm.hidden_size, lm.hidden_size, bias=True)
    return VLMConfig(vision=None, projector=projector, lm=lm, image_token_id=hf.get("image_token_index", 151859),
                     image_scheme="sam", vision_high=sam)


def _check_expressible(cfg: VLMConfig) -> None:
    """Refuse a VLM that transformers' GotOcr2 cannot hold, saying what differs."""
    high, p, width = cfg.vision_high, cfg.projector, cfg.lm.hidden_size
    problems = []
    if cfg.image_scheme != "sam" or high is None:
        problems.append(f"image_scheme must be 'sam' with a SAM vision_high (got {cfg.image_scheme!r})")
    else:
        if high.downsample != "vary" or tuple(high.downsample_channels) != (2 * high.output_channels, width):
            problems.append(f"the SAM branch must end in Vary's convs {high.output_channels} -> "
                            f"{2 * high.output_channels} -> {width} (got {high.downsample!r}, "
                            f"{tuple(high.downsample_channels)})")
        if (tuple(high.image_mean), tuple(high.image_std)) != (CLIP_MEAN, CLIP_STD):
            problems.append("the SAM view must be normalised with CLIP's mean / std, as GOT-OCR2's processor does")
    if (p.type, p.in_dim, p.out_dim, p.bias) != ("linear", width, width, True):
        problems.append(f"the projector must be a biased Linear {width} -> {width} (got {p.type!r} "
                        f"{p.in_dim} -> {p.out_dim}, bias={p.bias})")
    if problems:
        raise ValueError("this model does not fit transformers' got_ocr2: " + "; ".join(problems)
                         + "; save it with model_type='vlmkit' instead")


def config_to_hf(cfg: VLMConfig) -> dict:
    """VLMConfig -> GotOcr2Config dict; raises ValueError when the model is not GOT-OCR2-shaped."""
    _check_expressible(cfg)
    high = cfg.vision_high
    return {
        "model_type": MODEL_TYPE,
        "architectures": ["GotOcr2ForConditionalGeneration"],
        "vision_config": {
            "model_type": "got_ocr2_vision", "hidden_size": high.hidden_size,
            "output_channels": high.output_channels, "num_hidden_layers": high.num_layers,
            "num_attention_heads": high.num_heads, "num_channels": high.num_channels, "image_size": high.image_size,
            "patch_size": high.patch_size, "hidden_act": high.hidden_act, "layer_norm_eps": high.layer_norm_eps,
            "qkv_bias": high.qkv_bias, "use_abs_pos": high.use_abs_pos, "use_rel_pos": high.use_rel_pos,
            "window_size": high.window_size, "global_attn_indexes": list(high.global_attn_indexes),
            "mlp_dim": high.intermediate_size, "attention_dropout": 0.0},
        "text_config": lm_config_to_hf(cfg.lm, natural_model_type(cfg.lm)),
        "image_token_index": cfg.image_token_id,
        "image_seq_length": high.tokens_per_image,
        "tie_word_embeddings": cfg.lm.tie_word_embeddings,
    }


def state_from_hf(state: StateDict, cfg: VLMConfig) -> StateDict:
    """A got_ocr2 checkpoint (transformers 4 or 5 names) -> VLM state dict; stray tensors raise ValueError."""
    vision, projector, lm = {}, {}, {}
    for key, tensor in state.items():
        name = key.removeprefix("model.") if key.startswith(("model." + _VISION, "model." + _PROJ,
                                                              "model." + _LM)) else key
        if name.startswith(_VISION):
            vision[name] = tensor
        elif name.startswith(_PROJ):
            projector[name.removeprefix(_PROJ)] = tensor
        elif name.startswith(_LM):  # language_model.model.* (saved) or language_model.* (in memory)
            body = name.removeprefix(_LM).removeprefix("model.")
            lm["model." + body] = tensor
        elif name == "lm_head.weight":
            lm[name] = tensor
        else:
            raise ValueError(f"unexpected tensor {key!r} in a {MODEL_TYPE} checkpoint")
    out = {f"vision_high.{k}": v for k, v in sam_state_from_hf(vision, cfg.vision_high, _VISION).items()}
    for hf, ours in _PROJECTOR.items():
        if hf not in projector:
            raise ValueError(f"{MODEL_TYPE} checkpoint lacks {_PROJ}{hf}")
        out[ours] = projector.pop(hf)
    if projector:
        raise ValueError(f"unexpected tensors in a {MODEL_TYPE} checkpoint: {sorted(_PROJ + k for k in projector)}")
    out.update({f"lm.{k}": v for k, v in lm_state_from_hf(lm, cfg.lm).items()})
    return out


def state_to_hf(state: StateDict, cfg: VLMConfig) -> StateDict:
    """VLM state dict -> the names transformers 5 writes for GotOcr2ForConditionalGeneration."""
    _check_expressible(cfg)
    ours_to_hf = {ours: _PROJ + hf for hf, ours in _PROJECTOR.items()}
    sam = {k.removeprefix("vision_high."): v for k, v in state.items()
           if k.startswith("vision_high.") and k not in ours_to_hf}
    out = sam_state_to_hf(sam, cfg.vision_high, _VISION)
    out.update({hf: state[ours] for ours, hf in ours_to_hf.items()})
    lm = {k.removeprefix("lm."): v for k, v in state.items() if k.startswith("lm.")}
    for key, tensor in lm_state_to_hf(lm, cfg.lm, natural_model_type(cfg.lm)).items():
        out[_LM + key if key.startswith("model.") else key] = tensor  # language_model.model.*; lm_head stays
    return out


GOT_OCR2 = Converter(config_from_hf=config_from_hf, build=VLM, state_from_hf=state_from_hf,
                     config_to_hf=config_to_hf, state_to_hf=state_to_hf)
