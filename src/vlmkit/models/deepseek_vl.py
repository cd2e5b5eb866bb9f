"""DeepSeek-VL (v1): a hybrid vision encoder, SigLIP at 384 px for semantics + SAM-B at 1024 px for detail.

    pixel_values (N, 3, 384, 384)            --SigLIP, post-layernorm-->          (N, 576, Dv)
    high_res_pixel_values (N, 3, 1024, 1024) --SAM, neck, resize 96, 2 convs,
                                               + alpha * sam_hd global branch-->  (N, 576, 4 Cs)
    aligner: cat([high_proj(high), low_proj(low)], -1) (N, 576, C), GELU, Linear(C, C)
    input_ids (B, T) with 576 placeholder ids per image --embed, scatter_rows--> (B, T, C)
    --> language model --> logits (B, T, V)

The SAM branch lands on the SigLIP grid because it resizes its neck map to 4x that side before the two
stride-2 convs (SamConfig.resize_to). The aligner's two halves are vlmkit "linear" projectors, each to
half the LM width; the high-resolution half comes first, as in the reference. How images are prepared,
counted and encoded is the `hybrid` scheme (vlmkit/schemes/hybrid.py).

The reference is transformers' DeepseekVLHybridForConditionalGeneration
(models/deepseek_vl_hybrid/modeling_deepseek_vl_hybrid.py: get_image_features, the
DeepseekVLHybridAligner, get_high_res_image_features); the SAM branch is models/sam.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from vlmkit.config import LMConfig, SamConfig, Serializable, VisionConfig, require
from vlmkit.models.image_model import ImageModel
from vlmkit.models.lm import CausalLM
from vlmkit.models.projectors import build_projector
from vlmkit.models.sam import SamEncoder
from vlmkit.models.vit import VisionTower
from vlmkit.schemes.hybrid import hybrid_tokens


@dataclass
class DeepseekVLConfig(Serializable):
    """SigLIP tower (low resolution), SAM encoder with DeepSeek-VL's downsampling (high resolution), LM."""

    vision: VisionConfig = field(default_factory=lambda: VisionConfig(
        image_size=384, patch_size=16, hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16,
        use_cls_token=False, pre_layernorm=False, patch_bias=True, hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6, select_layer=-1, select_feature="cls_patch"))
    vision_high: SamConfig = field(default_factory=lambda: SamConfig(
        downsample="deepseek", resize_to=96, downsample_channels=(512, 1024), global_branch=True))
    lm: LMConfig = field(default_factory=lambda: LMConfig(  # DeepSeek-VL 7B's Llama
        vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_layers=30, num_heads=32))
    image_token_id: int = 100015

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = VisionConfig.from_dict(self.vision)
        if isinstance(self.vision_high, dict):
            self.vision_high = SamConfig.from_dict(self.vision_high)
        if isinstance(self.lm, dict):
            self.lm = LMConfig.from_dict(self.lm)
        v, s = self.vision, self.vision_high
        require(not v.use_cls_token, "DeepSeek-VL's low-resolution tower is SigLIP (no CLS token)")
        require(s.downsample == "deepseek" and s.global_branch,
                "DeepSeek-VL's SAM branch needs downsample='deepseek' and global_branch=True")
        require(s.resize_to == 4 * (v.image_size // v.patch_size),
                f"SAM resize_to {s.resize_to} must be 4x the SigLIP grid {v.image_size // v.patch_size} "
                "so both branches give the same tokens")
        require(self.lm.hidden_size % 2 == 0, f"lm.hidden_size {self.lm.hidden_size} must be even: the aligner "
                                              "projects each branch to half of it")
        require(0 <= self.image_token_id < self.lm.vocab_size,
                f"image_token_id {self.image_token_id} is outside the LM vocabulary (size {self.lm.vocab_size})")

    @property
    def image_scheme(self) -> str:
        """DeepSeek-VL plans every image as its two fixed views: vlmkit.schemes.hybrid."""
        return "hybrid"

    @property
    def tokens_per_image(self) -> int:
        """Placeholder tokens one image costs, whatever its size (the hybrid scheme's count: 576 at 384 / 16)."""
        return hybrid_tokens(self)


class HybridAligner(nn.Module):
    """DeepSeek-VL's aligner: each branch to C/2, concatenated [high, low], GELU, Linear(C, C)."""

    def __init__(self, low_dim: int, high_dim: int, out_dim: int) -> None:
        super().__init__()
        self.low = build_projector("linear", low_dim, out_dim // 2)
        self.high = build_projector("linear", high_dim, out_dim // 2)
        self.act = nn.GELU()
        self.proj = nn.Linear(out_dim, out_dim)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.high(high), self.low(low)], dim=-1)  # (N, P, C)
        return self.proj(self.act(x))  # (N, P, C)


class DeepseekVL(ImageModel):
    """DeepSeek-VL's hybrid model: VisionTower + SamEncoder -> HybridAligner -> scatter_rows -> CausalLM.
    The parts are named as VLM's (vision, vision_high, projector, lm), the groups training stages name;
    the `hybrid` scheme (vlmkit.schemes.hybrid) plans, makes the inputs and encodes."""

    config_class = DeepseekVLConfig

    def __init__(self, cfg: DeepseekVLConfig) -> None:
        super().__init__(cfg)
        self.vision = VisionTower(cfg.vision)
        self.vision_high = SamEncoder(cfg.vision_high)
        self.projector = HybridAligner(cfg.vision.hidden_size, cfg.vision_high.downsample_channels[1],
                                       cfg.lm.hidden_size)
        self.lm = CausalLM(cfg.lm)
