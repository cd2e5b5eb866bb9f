"""Named model configurations. A preset is data: a function returning a config, nothing more.

Each reference architecture has a preset at its published size and a `-small` twin for CPU runs
and tests: the same scheme, image geometry, projector type and parts, with tiny widths, two
layers and a 512-token vocabulary (`shrink`). Qwen2-VL, Qwen2.5-VL and DeepSeek-VL are their own model
classes, so their presets return a Qwen2VLConfig / Qwen2_5_VLConfig / DeepseekVLConfig; every other preset
returns a VLMConfig.

    >>> get_preset("llava-1.5").vision.num_patches
    576
    >>> get_preset("phi-3.5-v-small").image_scheme
    'hd'
    >>> summarize("llava-1.5")["tokens"]["336x336"]
    576

`build_model` turns any preset into its module (on the meta device to count parameters without
memory), `plan_tokens` counts an image's tokens through the model's own scheme, and
`summarize` gives the row `vlmkit presets` prints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from vlmkit.config import (CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, LMConfig, ProjectorConfig, SamConfig,
                           VisionConfig)
from vlmkit.models.deepseek_vl import DeepseekVLConfig
from vlmkit.models.image_model import build_model
from vlmkit.models.qwen2_5_vl import Qwen2_5_VLConfig
from vlmkit.models.qwen2_vl import Qwen2VLConfig
from vlmkit.models.vlm import VLMConfig
from vlmkit.schemes import get_scheme, plan_image
from vlmkit.schemes.anyres import LLAVA_V16_PINPOINTS
from vlmkit.weights.deepseek_v2 import config_from_hf as deepseek_lm_config

Preset = VLMConfig | Qwen2VLConfig | DeepseekVLConfig
SUMMARY_SIZES = ((336, 336), (1344, 672))  # (width, height) of the images `vlmkit presets` counts tokens for


# ---- parts shared by several presets ------------------------------------------------------------------

def clip_vit_l(image_size: int = 336) -> VisionConfig:
    """OpenAI CLIP ViT-L/14 at image_size, penultimate layer, CLS dropped (LLaVA's feature choice)."""
    return VisionConfig(image_size=image_size, patch_size=14, hidden_size=1024, intermediate_size=4096,
                        num_layers=24, num_heads=16, select_layer=-2, select_feature="patch")


def siglip_so400m(image_size: int, select_layer: int = -1) -> VisionConfig:
    """SigLIP so400m/14: 1152 wide, 27 layers, no CLS, no pre-layernorm, biased patch conv."""
    return VisionConfig(image_size=image_size, patch_size=14, hidden_size=1152, intermediate_size=4304,
                        num_layers=27, num_heads=16, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
                        use_cls_token=False, pre_layernorm=False, patch_bias=True, select_layer=select_layer,
                        select_feature="patch", image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD)


def vicuna_7b() -> LMConfig:
    """Vicuna-7B v1.5 as LLaVA's HF checkpoints carry it (vocabulary padded to 32064)."""
    return LMConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                    rms_norm_eps=1e-5, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def qwen_7b() -> LMConfig:
    """Qwen-7B (the first Qwen): 4096 wide, 32 layers, MLP 11008 per branch, biased qkv, vocab 151936."""
    return LMConfig(vocab_size=151936, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                    rms_norm_eps=1e-6, max_position_embeddings=8192, qkv_bias=True, eos_token_id=151643)


QWEN_IMGPAD = 151859  # Qwen-VL's and Vary's <imgpad>, after <img> 151857 and </img> 151858


# ---- published sizes -----------------------------------------------------------------------------------

def llava_15() -> VLMConfig:
    """LLaVA-1.5-7B: CLIP ViT-L/14-336, layer -2 without CLS (576 tokens), mlp2x_gelu, Vicuna-7B
    (docs/references.md, LLaVA)."""
    return VLMConfig(vision=clip_vit_l(336), projector=ProjectorConfig("mlp2x_gelu", 1024, 4096), lm=vicuna_7b(),
                     image_token_id=32000)


def llava_next() -> VLMConfig:
    """LLaVA-NeXT (v1.6) Vicuna-7B: LLaVA-1.5's parts under anyres with v1.6's five 336-px pinpoints."""
    return dataclasses.replace(llava_15(), image_scheme="anyres", grid_pinpoints=LLAVA_V16_PINPOINTS)


def phi_35_v() -> VLMConfig:
    """Phi-3.5-vision: CLIP ViT-L/14-336, HD-16, 2x2 merge then Linear 4096 -> 3072, GELU, Linear 3072 -> 3072,
    Phi-3-mini (3072 wide, 32 layers, 32 heads, vocab 32064); docs/references.md, Phi-3.5-vision.

    The LM uses plain RoPE over 4096 positions: the released model's longrope factors (128k context)
    come from a checkpoint's config. image_token_id 32044 is vLLM's `<|image|>` id; the reference
    processor writes negative ids instead."""
    lm = LMConfig(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_layers=32, num_heads=32,
                  rms_norm_eps=1e-5, max_position_embeddings=4096, bos_token_id=1, eos_token_id=32007,
                  pad_token_id=32000)
    return VLMConfig(vision=clip_vit_l(336), projector=ProjectorConfig("merge2x2_mlp2x_gelu", 4096, 3072), lm=lm,
                     image_token_id=32044, image_scheme="hd", max_crops=16)


def vary_base() -> VLMConfig:
    """Vary-base (Vary, Wei et al. 2023, sec. 3.3.1; docs/references.md, Vary): CLIP-L/14 at 224 (256 tokens)
    beside SAM ViTDet-B at 1024 with Vary's two stride-2 convs (256 tokens of 1024), each through its own
    Linear, concatenated along channels into Qwen-7B. The linears are 1024 -> 2048, as in the paper and in
    GitHub Ucas-HaoranWei/Vary's vary_qwen_vary.py, so the halves fill Qwen-7B's 4096; Vary-toy's
    vary_toy_qwen1_8.py uses 1024 -> 1024 beside the 2048-wide Qwen-1.8B."""
    return VLMConfig(vision=clip_vit_l(224), projector=ProjectorConfig("linear", 1024, 2048), lm=qwen_7b(),
                     image_token_id=QWEN_IMGPAD, image_scheme="dual",
                     vision_high=SamConfig(downsample="vary", image_mean=CLIP_MEAN, image_std=CLIP_STD),
                     projector_high=ProjectorConfig("linear", 1024, 2048))


def vary_tiny() -> VLMConfig:
    """Vary-tiny (Vary's first stage, Wei et al. 2023, sec. 3.2; docs/references.md, Vary): SAM ViTDet-B at
    1024 px with Vary's two stride-2 convs (256 tokens of 1024), a Linear 1024 -> 768, and a 768-wide decoder;
    no CLIP tower (image_scheme 'sam').
    The SAM view is bicubic-resized to 1024 x 1024 and normalised with CLIP's mean / std, as Vary's
    BlipImageEvalProcessor does.

    The decoder is NOT Vary-tiny's: the paper uses OPT-125M (learned absolute positions, LayerNorm,
    ReLU MLP), which vlmkit does not implement. This is a Llama-family decoder of OPT-125M's size:
    12 layers, 768 wide, 12 heads, FFN 3072, vocabulary 50272, 2048 positions, tied embeddings, so its
    parameters (SwiGLU has three FFN matrices to OPT's two) are not OPT-125M's. image_token_id 50265
    assumes <imgpad> is the first token added after OPT's 50265, inside the padded 50272."""
    lm = LMConfig(vocab_size=50272, hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12,
                  max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=2, eos_token_id=2,
                  pad_token_id=1)
    sam = SamConfig(downsample="vary", image_mean=CLIP_MEAN, image_std=CLIP_STD)
    return VLMConfig(vision=None, projector=ProjectorConfig("linear", sam.feature_dim, 768), lm=lm,
                     image_token_id=50265, image_scheme="sam", vision_high=sam)


def qwen_vl() -> VLMConfig:
    """Qwen-VL: ViT-bigG/14 at 448 (1664 wide, 48 layers, MLP 8192, no CLS, last layer, a 16 x 16 position
    table resized to the 32 x 32 patches), one cross-attention resampler of 256 queries (qwen_resampler256q,
    with its ln_post and proj), Qwen-7B; images squashed to 448 x 448 (Qwen-VL, Bai et al. 2023, sec. 2.1,
    and config.json / visual.py of Qwen/Qwen-VL on the Hugging Face Hub; docs/references.md, Qwen-VL)."""
    vision = VisionConfig(image_size=448, patch_size=14, hidden_size=1664, intermediate_size=8192, num_layers=48,
                          num_heads=16, layer_norm_eps=1e-6, hidden_act="gelu", use_cls_token=False,
                          post_layernorm=False, select_layer=-1, select_feature="patch", position_grid=16)
    return VLMConfig(vision=vision, projector=ProjectorConfig("qwen_resampler256q", 1664, 4096), lm=qwen_7b(),
                     image_token_id=QWEN_IMGPAD, image_scheme="squash")


def qwen2_vl() -> Qwen2VLConfig:
    """Qwen2-VL-7B: 675M-parameter ViT (32 layers, 1280 wide, 2-D RoPE, 2x2 merger to 3584) and Qwen2-7B with M-RoPE."""
    return Qwen2VLConfig()


def qwen2_5_vl() -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-7B: Qwen2-VL's native-resolution ViT (32 layers, 1280 wide) with 112-px window attention
    (full attention in blocks 7, 15, 23, 31), RMSNorm and SwiGLU (3420), 2x2 merger to 3584, and Qwen2-7B
    with M-RoPE over 128000 positions. Images are planned by plan_dynamic as for Qwen2-VL."""
    return Qwen2_5_VLConfig()


def deepseek_vl() -> DeepseekVLConfig:
    """DeepSeek-VL-7B (DeepSeek-VL, Lu et al. 2024, sec. 3.1; docs/references.md, DeepSeek-VL): SigLIP-L/16 at
    384 px (576 tokens of 1024) beside SAM-B at 1024 px (64x64x256, resized to 96x96, two stride-2 convs ->
    24x24x1024 = 576 tokens), the hybrid aligner (each branch to 2048, concatenated, GELU, Linear 4096 -> 4096)
    and DeepSeek-LLM-7B (30 layers, 4096 wide, 32 heads, FFN 11008, vocabulary 102400). 576 placeholders per
    image whatever its size (schemes/hybrid.py)."""
    lm = LMConfig(vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_layers=30, num_heads=32,
                  max_position_embeddings=4096, bos_token_id=100000, eos_token_id=100001)
    return DeepseekVLConfig(lm=lm, image_token_id=100015)


# DeepSeek-VL2's language_config (deepseek-ai/deepseek-vl2, config.json), the keys that differ from the
# deepseek_v2 defaults: DeepSeekMoE with 72 routed experts (top-6, noaux_tc over sigmoid scores, weights
# renormalised and scaled by 2.0) + 2 shared, layer 0 dense, and latent attention without a query bottleneck.
DEEPSEEK_VL2_LM = {
    "model_type": "deepseek_v2", "vocab_size": 129280, "hidden_size": 2560, "intermediate_size": 12288,
    "num_hidden_layers": 30, "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
    "bos_token_id": 0, "eos_token_id": 1, "moe_intermediate_size": 1536, "n_routed_experts": 72,
    "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
    "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.0,
    "use_mla": True, "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128,
}


def deepseek_vl2() -> VLMConfig:
    """DeepSeek-VL2 (DeepSeek-VL2, Wu et al. 2024, sec. 2; the base size, 4.5B activated of 27B parameters):
    SigLIP-so400m/14 at 384 (the conv reads 378 px: 27x27 = 729 patches), tiles of up to 9, 2x2 downsample then
    a two-layer MLP 4608 -> 2560, and the DeepSeekMoE language model read from its published language_config
    (DEEPSEEK_VL2_LM) by weights/deepseek_v2.py: 30 layers of multi-head latent attention, 72 routed + 2 shared
    experts (docs/references.md, DeepSeek-VL2)."""
    return VLMConfig(vision=siglip_so400m(378), projector=ProjectorConfig("merge2x2_mlp2x_gelu", 4608, 2560),
                     lm=deepseek_lm_config(DEEPSEEK_VL2_LM), image_token_id=128815, image_scheme="tiles",
                     max_crops=9)


def minicpm_v() -> VLMConfig:
    """MiniCPM-V 2.6 (MiniCPM-V, Yao et al. 2024, sec. 3.1; docs/references.md, MiniCPM-V) as released
    (openbmb/MiniCPM-V-2_6's config.json, weights/minicpmv.py): SigLIP-400m (27 layers, a 70x70 position
    table at 980 px looked up by bucketed coordinates, features after post_layernorm), slices at 448 px (up to
    9), MiniCPM-V's resampler of 64 queries per view (one cross-attention at the LM width, 2-D sin-cos
    positions per view grid), Qwen2-7B; 8,099.18M parameters (the model card's 8B). image_token_id 128244 is
    the `<unk>` the prompt repeats, as the 2.6 tokenizer numbers it."""
    lm = LMConfig(vocab_size=151666, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                  num_kv_heads=4, rope_theta=1000000.0, max_position_embeddings=32768, qkv_bias=True)
    vision = dataclasses.replace(siglip_so400m(980), position_buckets=True, feature_post_norm=True)
    return VLMConfig(vision=vision, projector=ProjectorConfig("minicpmv_resampler64q", 1152, 3584), lm=lm,
                     image_token_id=128244, image_scheme="slices", max_crops=9, slice_size=448)


def tiny_random(vocab_size: int = 128, image_token_id: int | None = None) -> VLMConfig:
    """A LLaVA-shaped model of about 200k parameters for smoke runs and protocol tests.
    The image placeholder is the last vocabulary id unless image_token_id says otherwise."""
    vision = VisionConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, num_layers=2,
                          num_heads=4, select_layer=-2, select_feature="patch")
    lm = LMConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, max_position_embeddings=512)
    return VLMConfig(vision=vision, projector=ProjectorConfig("mlp2x_gelu", 64, 64), lm=lm,
                     image_token_id=vocab_size - 1 if image_token_id is None else image_token_id)


def bench_tiny() -> VLMConfig:
    """The benchmark model of bench/: ViT 96 px, patch 8, 192 wide, 4 layers; LM 256 wide, 4 layers."""
    vision = VisionConfig(image_size=96, patch_size=8, hidden_size=192, intermediate_size=768, num_layers=4,
                          num_heads=3, select_layer=-2, select_feature="patch")
    lm = LMConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4,
                  num_kv_heads=2, max_position_embeddings=1024)
    return VLMConfig(vision=vision, projector=ProjectorConfig("mlp2x_gelu", 192, 256), lm=lm,
                     image_token_id=4095)


# ---- -small twins -------------------------------------------------------------------------------------

SMALL_VOCAB = 512


def _small_lm(lm: LMConfig) -> LMConfig:
    """Two layers of width 64 (4 heads of 16), GQA kept if the original has it, biases and RoPE kept; a mixture
    of experts keeps its routing, shared experts and dense first layer with 8 experts of 32 (top-2), latent
    attention its layout at ranks 16 (kv) and 24 (q, if it has one)."""
    kv = 2 if lm.num_kv_heads != lm.num_heads else 4
    small = dict(vocab_size=SMALL_VOCAB, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=kv, head_dim=None, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if lm.num_experts:
        shared = round(lm.shared_expert_intermediate_size / lm.moe_intermediate_size)  # shared experts' count
        small.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                     shared_expert_intermediate_size=32 * shared, moe_n_group=min(lm.moe_n_group, 2),
                     moe_topk_group=min(lm.moe_topk_group, 2),
                     dense_layers=tuple(i for i in lm.dense_layers if i < 1))
    if lm.kv_lora_rank:
        small.update(kv_lora_rank=16, q_lora_rank=24 if lm.q_lora_rank else 0, qk_nope_head_dim=8,
                     qk_rope_head_dim=8, v_head_dim=16)
    return dataclasses.replace(lm, **small)


def _small_projector(p: ProjectorConfig, in_dim: int, out_dim: int) -> ProjectorConfig:
    """The same projector family at tiny widths; a BERT-base Q-Former becomes one 32-wide layer."""
    spec = p.spec
    kind = f"perceiver{spec.queries}q_1x32" if spec.family == "perceiver" else p.type
    return dataclasses.replace(p, type=kind, in_dim=in_dim, out_dim=out_dim)


def _shrink_deepseek_vl(cfg: DeepseekVLConfig) -> DeepseekVLConfig:
    """DeepSeek-VL: both towers shrunk, 384 / 1024 px kept."""
    vision = dataclasses.replace(cfg.vision, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2)
    high = dataclasses.replace(cfg.vision_high, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                               global_attn_indexes=(1,), output_channels=8,  # convs 2x and 4x it, as in
                               downsample_channels=(16, 32))  # transformers' DeepSeek-VL hybrid
    return DeepseekVLConfig(vision=vision, vision_high=high, lm=_small_lm(cfg.lm), image_token_id=SMALL_VOCAB - 1)


def _shrink_qwen2_vl(cfg: Qwen2VLConfig) -> Qwen2VLConfig:
    """Qwen2-VL and Qwen2.5-VL (whose tower also has an MLP width and full-attention blocks to shrink)."""
    lm = dataclasses.replace(_small_lm(cfg.lm), rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]})
    windowed = {"intermediate_size": 64, "fullatt_block_indexes": [1]}
    fields = {f.name for f in dataclasses.fields(cfg.vision)}
    vision = dataclasses.replace(cfg.vision, depth=2, embed_dim=32, num_heads=2, out_hidden_size=64,
                                 **{k: v for k, v in windowed.items() if k in fields})
    return type(cfg)(vision=vision, lm=lm, image_token_id=SMALL_VOCAB - 1, video_token_id=SMALL_VOCAB - 2,
                     vision_start_token_id=SMALL_VOCAB - 4, vision_end_token_id=SMALL_VOCAB - 3)


def _shrink_vlm(cfg: VLMConfig) -> VLMConfig:
    """The LLaVA-style glue under any scheme: towers and projectors shrunk, the SAM branch too when there is one."""
    lm = _small_lm(cfg.lm)
    vision = high = proj_high = None
    if cfg.vision is not None:
        vision = dataclasses.replace(cfg.vision, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2)
    in_dim = 32 * cfg.projector.spec.merge ** 2
    width = lm.hidden_size
    if cfg.vision_high is not None:
        high = dataclasses.replace(cfg.vision_high, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                                   global_attn_indexes=(1,), output_channels=16, downsample_channels=(16, 32))
    if cfg.image_scheme == "sam":  # the SAM tower feeds the only projector
        in_dim = high.feature_dim
    if cfg.projector_high is not None:  # dual: each branch fills half of the LM width
        width = lm.hidden_size // 2
        proj_high = _small_projector(cfg.projector_high, high.feature_dim, lm.hidden_size - width)
    return dataclasses.replace(cfg, vision=vision, projector=_small_projector(cfg.projector, in_dim, width),
                               lm=lm, image_token_id=SMALL_VOCAB - 1, vision_high=high, projector_high=proj_high)


def shrink(cfg: Preset) -> Preset:
    """The `-small` twin of a preset: same scheme, image and patch sizes, projector family and parts;
    vision towers 32 wide with 2 layers, LM 64 wide with 2 layers and a 512-token vocabulary, the image
    placeholder its last id."""
    return family(cfg).shrink(cfg)


# ---- the registry --------------------------------------------------------------------------------------

PUBLISHED: dict[str, Callable[[], Preset]] = {
    "llava-1.5": llava_15,
    "llava-next": llava_next,
    "phi-3.5-v": phi_35_v,
    "vary-base": vary_base,
    "vary-tiny": vary_tiny,
    "qwen-vl": qwen_vl,
    "qwen2-vl": qwen2_vl,
    "qwen2.5-vl": qwen2_5_vl,
    "deepseek-vl": deepseek_vl,
    "deepseek-vl2": deepseek_vl2,
    "minicpm-v": minicpm_v,
}


def _small(full: Callable[[], Preset]) -> Callable[[], Preset]:
    def small() -> Preset:
        return shrink(full())
    small.__doc__ = f"{full.__name__} at tiny widths (see shrink)."
    return small


# "deepseek-vl2-small" is the tiny twin of "deepseek-vl2", not the published DeepSeek-VL2-Small.
PRESETS: dict[str, Callable[[], Preset]] = {
    **PUBLISHED,
    **{f"{name}-small": _small(fn) for name, fn in PUBLISHED.items()},
    "tiny-random": tiny_random,
    "bench-tiny": bench_tiny,
}


def get_preset(name: str) -> Preset:
    """The config of a named preset; ValueError listing the valid names if it is unknown."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


# ---- what a preset builds and costs --------------------------------------------------------------------

def count_parameters(cfg: Preset) -> int:
    """Parameters of the preset's model, counted on the meta device (no memory, no initialisation)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(cfg).parameters())


def plan_tokens(cfg: Preset, size: tuple[int, int]) -> int:
    """Image placeholders a blank (width, height) image costs, from the model's own scheme."""
    return plan_image(cfg, Image.new("RGB", size)).num_tokens


def _vlm_parts(cfg: VLMConfig) -> tuple[str, str]:
    towers = []
    if cfg.vision is not None:
        v = cfg.vision
        towers.append(f"ViT {v.image_size}px/{v.patch_size} x{v.num_layers} w{v.hidden_size}")
    if cfg.vision_high is not None:
        h = cfg.vision_high
        towers.append(f"SAM {h.image_size}px/{h.patch_size} x{h.num_layers} w{h.hidden_size} ({h.downsample})")
    projector = cfg.projector.type + (f" + {cfg.projector_high.type}" if cfg.projector_high is not None else "")
    return " + ".join(towers), projector


def _qwen2_vl_parts(cfg: Qwen2VLConfig) -> tuple[str, str]:
    v = cfg.vision
    vision = f"Qwen2-VL ViT {v.patch_size}px patches x{v.depth} w{v.embed_dim}"
    if hasattr(v, "window_size"):
        vision = f"Qwen2.5-VL ViT {v.patch_size}px patches x{v.depth} w{v.embed_dim} window {v.window_size}px"
    return vision, f"merger{v.spatial_merge_size}x{v.spatial_merge_size}_mlp"


def _deepseek_vl_parts(cfg: DeepseekVLConfig) -> tuple[str, str]:
    v, h = cfg.vision, cfg.vision_high
    vision = (f"ViT {v.image_size}px/{v.patch_size} x{v.num_layers} w{v.hidden_size} + "
              f"SAM {h.image_size}px/{h.patch_size} x{h.num_layers} w{h.hidden_size} ({h.downsample})")
    return vision, "hybrid_split_mlp"


@dataclass(frozen=True)
class Family:
    """What presets do with the configs of one model class: its -small twin, its towers and projector as text."""

    shrink: Callable[[Any], Any]
    parts: Callable[[Any], tuple[str, str]]


FAMILIES: dict[str, Family] = {  # by the model class the config's scheme runs in (Scheme.model_class)
    "VLM": Family(_shrink_vlm, _vlm_parts),
    "Qwen2VL": Family(_shrink_qwen2_vl, _qwen2_vl_parts),
    "DeepseekVL": Family(_shrink_deepseek_vl, _deepseek_vl_parts),
}


def family(cfg: Preset) -> Family:
    """The Family of a preset's config."""
    return FAMILIES[get_scheme(cfg.image_scheme).model_class]


def describe_parts(cfg: Preset) -> dict[str, str]:
    """Short text for each part: vision tower(s), image scheme, projector(s), language model."""
    vision, projector = family(cfg).parts(cfg)
    return {"vision": vision, "scheme": cfg.image_scheme, "projector": projector, "lm": describe_lm(cfg.lm)}


def describe_lm(lm: LMConfig) -> str:
    """A language model as short text: x layers, w width, vocabulary, MoE experts, MLA."""
    text = f"x{lm.num_layers} w{lm.hidden_size} vocab {lm.vocab_size}"
    if lm.num_experts:
        text += f" MoE {lm.num_experts}e top{lm.num_experts_per_tok}"
    if lm.kv_lora_rank:
        text += " MLA"
    return text


def summarize(name: str) -> dict[str, Any]:
    """The `vlmkit presets` row of one preset: name, parts, parameters, and tokens per image size
    ("WxH" keys for SUMMARY_SIZES)."""
    cfg = get_preset(name)
    return {"name": name, **describe_parts(cfg), "parameters": count_parameters(cfg),
            "tokens": {f"{w}x{h}": plan_tokens(cfg, (w, h)) for w, h in SUMMARY_SIZES}}
