"""Training recipes: each preset's stages in order, as data (train/stages.py `Stage`s).

    stages = recipe("qwen-vl")        # [pretrain, multitask, sft], each with its module groups and lrs
    stages = recipe("qwen-vl-small")  # a `-small` twin trains like its published preset
    stage = contrastive_stage("siglip")   # CLIP / SigLIP pretraining of a ContrastivePair

A stage says which module groups train at which peak learning rate (0 freezes the group). The
groups are those of train/stages.py: `vision` (CLIP/SigLIP tower and Vary's SAM branch),
`projector` (projectors and the learned layout vectors) and `lm`; Qwen2-VL and Qwen2.5-VL have
no separate projector (their 2x2 merger lives inside the vision tower), so their stages name
`vision` and `lm` only.

Where the numbers come from. Each recipe's docstring names the paper section its stages, frozen parts
and learning rates come from; docs/references.md has one section per model with those facts and their
sources. A learning rate no source gives is marked "vlmkit's choice". Batch sizes, epochs and data are
not part of a Stage: they are the run's (`train(..., steps=...)`), and are quoted in the docstrings for
reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from vlmkit.train.stages import Stage, get_stage

QWEN_VL_BETAS = (0.9, 0.98)  # Qwen-VL paper, Table 8 (all three stages), with eps 1e-6


def llava() -> list[Stage]:
    """LLaVA-1.5, with LLaVA's training (LLaVA, Liu et al. 2023, sec. 4.2 and 5; docs/references.md, LLaVA):
    stage 1, feature alignment: vision encoder and LLM frozen, projector trained (CC-595K, 1 epoch, lr 2e-3,
    batch 128); stage 2, end-to-end fine-tuning: encoder frozen, projector + LLM trained (158K instructions,
    3 epochs, lr 2e-5, batch 32). These are train/stages.py's `align` and `sft`. LLaVA-1.5's own runs
    pretrain at lr 1e-3 with batch 256 on 558K pairs (README of GitHub haotian-liu/LLaVA)."""
    return [get_stage("align"), get_stage("sft")]


def llava_next() -> list[Stage]:
    """LLaVA-NeXT: LLaVA's two stages as they are (docs/references.md, LLaVA). The LLaVA-NeXT training scripts
    also tune the vision tower in stage 2 at lr 2e-6 (GitHub LLaVA-VL/LLaVA-NeXT, scripts/train/); vlmkit
    keeps it frozen."""
    return llava()


def vary_tiny() -> list[Stage]:
    """Vary-tiny (Vary's stage 1, "vision vocabulary" generation; Wei et al. 2023, sec. 3.2 and 4.2): every
    parameter trained (the SAM branch, its linear and the tiny decoder), autoregressively on documents and
    charts with natural images as negatives; AdamW with cosine decay, lr 5e-5, batch 512, 3 epochs. This is
    train/stages.py's `full` (its weight decay 0.05 is vlmkit's choice: the paper gives none)."""
    return [get_stage("full")]


def vary_base() -> list[Stage]:
    """Vary-base (stage 2; Wei et al. 2023, sec. 3.3 and 4.2; docs/references.md, Vary): both vision
    vocabularies (CLIP-L and the SAM branch) frozen, the input embedding layers (the two projectors) and the
    LLM trained, "more like pure LLM pretraining"; pretraining on 4M LAION-COCO pairs at lr 5e-5, then SFT
    (LLaVA-80k / 665k, DocVQA, ChartQA) at lr 1e-5, batch 256, 1 epoch each, AdamW with cosine decay."""
    frozen_vision = {"vision": 0.0}
    return [
        Stage("pretrain", {**frozen_vision, "projector": 5e-5, "lm": 5e-5},
              description="both vision branches frozen; projectors + LM at 5e-5 (Vary-base pretraining)"),
        Stage("sft", {**frozen_vision, "projector": 1e-5, "lm": 1e-5},
              description="both vision branches frozen; projectors + LM at 1e-5 (Vary-base SFT)"),
    ]


def qwen_vl() -> list[Stage]:
    """Qwen-VL (Bai et al. 2023, sec. 3; docs/references.md, Qwen-VL): three stages, AdamW, cosine decay,
    weight decay 0.05, gradient clip 1.0, bf16.
    1. pretraining (224 px, 1.4B weakly labelled pairs, 50k steps of batch 30720): LLM frozen, ViT and the
       cross-attention adapter trained, peak lr 2e-4;
    2. multi-task pretraining (448 px, 7 tasks): everything trained;
    3. SFT (350k instructions): ViT frozen, LLM and adapter trained.
    Stage 2 and 3 peak lrs (5e-5, 1e-5), the minimum lrs (1e-6, 1e-5, 1e-6 -> min_lr_ratio), betas
    (0.9, 0.98) and eps 1e-6 are from the paper's hyperparameter table (appendix, Table 8)."""
    common = {"weight_decay": 0.05, "grad_clip": 1.0, "betas": QWEN_VL_BETAS, "eps": 1e-6}
    return [
        Stage("pretrain", {"vision": 2e-4, "projector": 2e-4, "lm": 0.0}, min_lr_ratio=1e-6 / 2e-4, **common,
              description="LLM frozen; ViT + resampler at 2e-4, 224 px (Qwen-VL stage 1)"),
        Stage("multitask", {"vision": 5e-5, "projector": 5e-5, "lm": 5e-5}, min_lr_ratio=1e-5 / 5e-5, **common,
              description="everything trained at 5e-5, 448 px (Qwen-VL stage 2)"),
        Stage("sft", {"vision": 0.0, "projector": 1e-5, "lm": 1e-5}, min_lr_ratio=1e-6 / 1e-5, **common,
              description="ViT frozen; resampler + LLM at 1e-5 (Qwen-VL stage 3, Qwen-VL-Chat)"),
    ]


def qwen2_vl() -> list[Stage]:
    """Qwen2-VL (the stages are the Qwen2-VL paper's, Wang et al. 2024, sec. 2.2; docs/references.md, Qwen2-VL):
    1. the ViT is trained (image-text pairs, OCR, classification) with the LLM frozen;
    2. everything is unfrozen (a wider mix, interleaved data, video);
    3. the ViT is locked and the LLM fine-tuned on instructions.
    The 2x2 merger is part of vlmkit's Qwen2-VL vision tower, so it trains and freezes with the ViT. The
    paper gives no learning rates: Qwen-VL's (2e-4, 5e-5, 1e-5) are vlmkit's choice, with its AdamW
    settings."""
    common = {"weight_decay": 0.05, "grad_clip": 1.0, "betas": QWEN_VL_BETAS, "eps": 1e-6}
    return [
        Stage("vision-pretrain", {"vision": 2e-4, "lm": 0.0}, **common,
              description="LLM frozen; ViT (+ merger) trained (Qwen2-VL stage 1)"),
        Stage("pretrain", {"vision": 5e-5, "lm": 5e-5}, **common,
              description="everything trained (Qwen2-VL stage 2)"),
        Stage("sft", {"vision": 0.0, "lm": 1e-5}, **common,
              description="ViT (+ merger) frozen; LLM fine-tuned (Qwen2-VL stage 3)"),
    ]


def qwen2_5_vl() -> list[Stage]:
    """Qwen2.5-VL: Qwen2-VL's three stages (vision pretraining, full pretraining, SFT with the ViT frozen),
    reused as vlmkit's choice (docs/references.md, Qwen2-VL). Learning rates as qwen2_vl(): vlmkit's choice."""
    return qwen2_vl()


def deepseek_vl() -> list[Stage]:
    """DeepSeek-VL (the stages are the DeepSeek-VL paper's, Lu et al. 2024, sec. 3.2; docs/references.md,
    DeepSeek-VL): 1. training the VL adaptor: the hybrid vision encoder (SigLIP + SAM-B) and the LLM frozen;
    2. joint VL pretraining: the LLM and adaptor trained, the encoder frozen; 3. SFT: the LLM and adaptor
    (and SigLIP, which vlmkit does not separate from SAM-B: both stay frozen here). Learning rates are
    vlmkit's choice (LLaVA's 2e-3 warm-up; 5e-5 and 2e-5 afterwards)."""
    return [
        Stage("adaptor-warmup", {"vision": 0.0, "projector": 2e-3, "lm": 0.0},
              description="encoder and LLM frozen; the VL adaptor trained (DeepSeek-VL stage 1)"),
        Stage("pretrain", {"vision": 0.0, "projector": 5e-5, "lm": 5e-5},
              description="encoder frozen; adaptor + LLM trained (DeepSeek-VL stage 2)"),
        Stage("sft", {"vision": 0.0, "projector": 2e-5, "lm": 2e-5},
              description="encoder frozen; adaptor + LLM fine-tuned (DeepSeek-VL stage 3)"),
    ]


def deepseek_vl2() -> list[Stage]:
    """DeepSeek-VL2 (the stages are the DeepSeek-VL2 paper's, Wu et al. 2024, sec. 4.1; docs/references.md,
    DeepSeek-VL2): 1. vision-language alignment, a warm-up of the adaptor: the SigLIP encoder and the 2-layer
    MLP adaptor trained on image-text pairs, the LLM frozen; 2. vision-language pretraining on VL and
    text-only data with every parameter unlocked; 3. SFT, every parameter unlocked. Learning rates are
    vlmkit's choice (the paper's differ by model size)."""
    return [
        Stage("alignment", {"vision": 2e-4, "projector": 2e-4, "lm": 0.0},
              description="LLM frozen; SigLIP + adaptor warmed up (DeepSeek-VL2 stage 1)"),
        Stage("pretrain", {"vision": 5e-5, "projector": 5e-5, "lm": 5e-5},
              description="everything trained on VL + text data (DeepSeek-VL2 stage 2)"),
        Stage("sft", {"vision": 2e-5, "projector": 2e-5, "lm": 2e-5},
              description="everything fine-tuned (DeepSeek-VL2 stage 3)"),
    ]


def phi_35_v() -> list[Stage]:
    """Phi-3.5-vision (Phi-3 report, Abdin et al. 2024, sec. 7.1; docs/references.md, Phi-3.5-vision):
    pre-training on 0.5T tokens (interleaved documents, image-text pairs, synthetic OCR, charts/tables,
    text-only) with the next-token loss on text tokens only (image tokens ignored) and images up to
    1344x1344, then post-training: SFT, then DPO. The report states no frozen parts and no hyperparameters:
    vlmkit trains every part in pre-training (lr 5e-5) and the projector + LM in SFT (2e-5); DPO is a
    preference loss, not a stage of vlmkit's loop."""
    return [
        Stage("pretrain", {"vision": 5e-5, "projector": 5e-5, "lm": 5e-5}, weight_decay=0.1,
              description="everything trained, loss on text tokens (Phi-3.5-V pre-training)"),
        Stage("sft", {"vision": 0.0, "projector": 2e-5, "lm": 2e-5}, weight_decay=0.1,
              description="projector + LM fine-tuned (Phi-3.5-V SFT; DPO not included)"),
    ]


def minicpm_v() -> list[Stage]:
    """MiniCPM-V (the stages are the MiniCPM-V paper's, Yao et al. 2024, sec. 4; docs/references.md, MiniCPM-V):
    pretraining in three steps with the LLM frozen: 1. only the compression layer (the resampler) at
    224 px; 2. the vision encoder, its input raised from 224 to 448 px; 3. the encoder and the
    resampler together on sliced high-resolution images; then SFT with every parameter unlocked.
    vlmkit's `perceiver64q` stands in for the resampler (see presets.minicpm_v). Learning rates are
    vlmkit's choice (LLaVA's 2e-3 for a fresh resampler; 1e-4 and 2e-5 afterwards)."""
    return [
        Stage("resampler-warmup", {"vision": 0.0, "projector": 2e-3, "lm": 0.0},
              description="encoder and LLM frozen; resampler trained, 224 px (MiniCPM-V pretraining 1)"),
        Stage("resolution", {"vision": 1e-4, "projector": 0.0, "lm": 0.0},
              description="encoder trained at 448 px; resampler and LLM frozen (MiniCPM-V pretraining 2)"),
        Stage("slices", {"vision": 1e-4, "projector": 1e-4, "lm": 0.0},
              description="encoder + resampler on sliced images; LLM frozen (MiniCPM-V pretraining 3)"),
        Stage("sft", {"vision": 2e-5, "projector": 2e-5, "lm": 2e-5},
              description="everything fine-tuned (MiniCPM-V SFT)"),
    ]


RECIPES: dict[str, Callable[[], list[Stage]]] = {
    "llava-1.5": llava,
    "llava-next": llava_next,
    "phi-3.5-v": phi_35_v,
    "vary-tiny": vary_tiny,
    "vary-base": vary_base,
    "qwen-vl": qwen_vl,
    "qwen2-vl": qwen2_vl,
    "qwen2.5-vl": qwen2_5_vl,
    "deepseek-vl": deepseek_vl,
    "deepseek-vl2": deepseek_vl2,
    "minicpm-v": minicpm_v,
    # the LLaVA-shaped development presets of presets.py train as LLaVA does
    "tiny-random": llava,
    "bench-tiny": llava,
}
SMALL_SUFFIX = "-small"


def recipe(preset_name: str) -> list[Stage]:
    """The training stages of a preset, in order; a `-small` twin has its published preset's recipe.
    Raises ValueError naming the presets that have one."""
    base = preset_name.removesuffix(SMALL_SUFFIX)
    if base not in RECIPES:
        raise ValueError(f"no training recipe for preset {preset_name!r}; recipes exist for "
                         f"{', '.join(RECIPES)} (and their -small twins)")
    return RECIPES[base]()


def describe_recipe(preset_name: str) -> list[dict]:
    """The recipe as JSON-ready rows (what `vlmkit presets --json` shows): name, lrs, description."""
    return [{"name": s.name, "lrs": dict(s.lrs), "description": s.description} for s in recipe(preset_name)]


# ---- contrastive image-text pretraining (models/contrastive.py) ------------------------------------------

# loss -> (peak lr, weight decay, betas, eps), from the papers (the losses: docs/references.md, CLIP and SigLIP):
CONTRASTIVE_OPTIM: dict[str, tuple[float, float, tuple[float, float], float]] = {
    "clip": (5e-4, 0.2, (0.9, 0.98), 1e-6),  # CLIP (Radford et al. 2021), appendix hyperparameters, ViT-B/32
    "siglip": (1e-3, 1e-4, (0.9, 0.95), 1e-8),  # SigLIP (Zhai et al. 2023): lr 1e-3, wd 1e-4, beta2 0.95
}


def contrastive_stage(loss: str, lr: float | None = None, warmup_steps: int | None = None) -> Stage:
    """The `contrastive` stage of a ContrastivePair (CLIP's symmetric cross-entropy with a learned temperature,
    SigLIP's pairwise sigmoid with a learned scale and bias; docs/references.md, CLIP and SigLIP): every part
    trains, the image tower, the text body, both projections and the learned logit scale (and SigLIP's bias),
    at the paper's lr unless lr is given. Call `model.clamp_logit_scale_()` after each step (train's on_step)
    to keep the scale at most 100, as CLIP does."""
    if loss not in CONTRASTIVE_OPTIM:
        raise ValueError(f"contrastive loss {loss!r} unknown; valid: {sorted(CONTRASTIVE_OPTIM)}")
    peak, decay, betas, eps = CONTRASTIVE_OPTIM[loss]
    peak = peak if lr is None else lr
    groups = ["vision", "text", "image_proj", "text_proj", "logit_scale"]
    groups += ["logit_bias"] if loss == "siglip" else []
    if not math.isfinite(peak) or peak <= 0:
        raise ValueError(f"the contrastive stage needs a learning rate > 0, got {peak}")
    return Stage("contrastive", {g: peak for g in groups}, weight_decay=decay, betas=betas, eps=eps,
                 warmup_steps=warmup_steps, description=f"image-text contrastive pretraining ({loss} loss)")
