"""DeepSeek-VL (v1): a hybrid vision encoder, SigLIP at 384 px for semantics + SAM-B at 1024 px for detail.

    pixel_values (N, 3, 384, 384)            --SigLIP, post-layernorm-->          (N, 576, Dv)
    high_res_pixel_values (N, 3, 1024, 1024) --SAM, neck, resize 96, 2 convs,
                                               + alpha * sam_hd global branch-->  (N, 576, 4 Cs)
    aligner: cat([high_proj(high), low_proj(low)], -1) (N, 576, C), GELU, Linear(C, C)
    input_ids (B, T) with 576 placeholder ids per image --embed, masked scatter--> (B, T, C)
    --> language model --> logits (B, T, V)

One image costs (vision.image_size / vision.patch_size)**2 tokens (576 at 384 / 16); the SAM
branch lands on the same grid because it resizes its neck map to 4x that side before the two
stride-2 convs (SamConfig.resize_to). The aligner's two halves are vlmkit "linear" projectors,
each to half the LM width; the high-resolution half comes first, as in the reference.

The reference is transformers' DeepseekVLHybridForConditionalGeneration
(models/deepseek_vl_hybrid/modeling_deepseek_vl_hybrid.py: get_image_features, the
DeepseekVLHybridAligner, get_high_res_image_features); the SAM branch is models/sam.py.
Images are preprocessed by `deepseek_vl_pixels`, the steps of transformers'
DeepseekVLHybridImageProcessorPil: resize the long side to 1024 and pad to a square with
the mean colour, resize that to 384 and pad again, then normalize each. `plan_hybrid` wraps
them in an ImagePlan of scheme "hybrid" (the one place an image's 576 tokens are counted for
prompts), and `hybrid_inputs` turns a batch's plans into the forward's two pixel tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from vlmkit.config import LMConfig, Serializable, VisionConfig, require
from vlmkit.image.plan import ImagePlan
from vlmkit.models.lm import CausalLM, CausalLMOutput, KVCache
from vlmkit.models.projectors import build_projector
from vlmkit.models.sam import SamConfig, SamEncoder
from vlmkit.models.vit import VisionTower


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
    def tokens_per_image(self) -> int:
        """Placeholder tokens one image costs: the SigLIP patch grid, (384 / 16)**2 = 576."""
        return (self.vision.image_size // self.vision.patch_size) ** 2


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


class DeepseekVL(nn.Module):
    """DeepSeek-VL's hybrid model: VisionTower + SamEncoder -> HybridAligner -> masked scatter -> CausalLM.
    The parts are named as VLM's (vision, vision_high, projector, lm), the groups training stages name."""

    # The image_inputs entries forward still needs when given image_embeds instead of pixels: none.
    image_position_inputs: tuple[str, ...] = ()

    def __init__(self, cfg: DeepseekVLConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision)
        self.vision_high = SamEncoder(cfg.vision_high)
        self.projector = HybridAligner(cfg.vision.hidden_size, cfg.vision_high.downsample_channels[1],
                                     cfg.lm.hidden_size)
        self.lm = CausalLM(cfg.lm)

    @property
    def image_token_id(self) -> int:
        return self.cfg.image_token_id

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return self.lm.new_cache(batch_size, max_len)

    def encode_images(self, pixel_values: torch.Tensor, high_res_pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """(N, 3, 384, 384) and (N, 3, 1024, 1024) views of the same images -> N x (576, C) LM-width rows."""
        if pixel_values.ndim != 4 or high_res_pixel_values.ndim != 4:
            raise ValueError(f"pixel_values {tuple(pixel_values.shape)} and high_res_pixel_values "
                             f"{tuple(high_res_pixel_values.shape)} must both be (num_images, 3, H, W)")
        if pixel_values.shape[0] != high_res_pixel_values.shape[0]:
            raise ValueError(f"pixel_values holds {pixel_values.shape[0]} images but high_res_pixel_values "
                             f"{high_res_pixel_values.shape[0]}; pass both views of every image")
        dtype = self.projector.proj.weight.dtype
        low = self.vision.features(pixel_values.to(dtype))  # (N, 576, Dv), last layer
        low = self.vision.post_norm(low)  # (N, 576, Dv): SigLIP's last_hidden_state
        high = self.vision_high.features(high_res_pixel_values.to(dtype))  # (N, 576, 4 Cs)
        return list(self.projector(low, high).unbind(0))  # N x (576, C)

    def merge_image_features(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor,
                             image_embeds: Sequence[torch.Tensor]) -> torch.Tensor:
        """Scatter the images' (P, C) rows into inputs_embeds (B, T, C) where input_ids is the placeholder."""
        is_image = input_ids == self.image_token_id  # (B, T)
        placeholders, features = int(is_image.sum()), sum(e.shape[0] for e in image_embeds)
        if placeholders != features:
            raise ValueError(
                f"the prompt has {placeholders} image placeholder tokens (id {self.image_token_id}) but the "
                f"{len(image_embeds)} image(s) give {features} feature tokens ({self.cfg.tokens_per_image} each); "
                f"put cfg.tokens_per_image = {self.cfg.tokens_per_image} placeholders per image")
        flat = torch.cat(list(image_embeds)).to(inputs_embeds.dtype)  # (N * P, C)
        return inputs_embeds.masked_scatter(is_image.unsqueeze(-1), flat)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        pixel_values: torch.Tensor | None = None,  # (N, 3, 384, 384) SigLIP views, prompt order
        high_res_pixel_values: torch.Tensor | None = None,  # (N, 3, 1024, 1024) SAM views
        attention_mask: torch.Tensor | None = None,  # (B, S)
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        loss_only: bool = False,  # with labels: project only the labelled positions (train/loop.py)
        segment_ids: torch.Tensor | None = None,  # (B, T) packed samples, as CausalLM takes them
        image_embeds: Sequence[torch.Tensor] | None = None,  # N x (576, C) from encode_images, for the pixels
    ) -> CausalLMOutput:
        if (pixel_values is None) != (high_res_pixel_values is None):
            raise ValueError("DeepSeek-VL needs both pixel_values (384 px) and high_res_pixel_values (1024 px) "
                             "of the same images, or neither; deepseek_vl_pixels makes both")
        if pixel_values is not None:
            if image_embeds is not None:
                raise ValueError("pass the images once: pixel values or image_embeds (encoded rows), not both")
            image_embeds = self.encode_images(pixel_values, high_res_pixel_values)
        inputs_embeds = self.lm.embed(input_ids)  # (B, T, C)
        if image_embeds is not None:
            inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, image_embeds)
        elif cache is None or cache.length == 0:
            placeholders = int((input_ids == self.image_token_id).sum())
            if placeholders:
                raise ValueError(f"the prompt has {placeholders} image placeholder tokens but no pixel_values "
                                 "were given (0 feature tokens); pass the images or remove the placeholders")
        return self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                       cache=cache, labels=labels, logits_to_keep=logits_to_keep, loss_only=loss_only,
                       segment_ids=segment_ids)


def _resize_long_side(image: Image.Image, side: int, min_size: int) -> Image.Image:
    """Bicubic resize so the long side is `side` (each side at least min_size), rounding half to even."""
    w, h = image.size
    scale = side / max(w, h)
    return image.resize((max(round(w * scale), min_size), max(round(h * scale), min_size)), Image.BICUBIC)


def _pad_square(image: Image.Image, colour: tuple[int, int, int]) -> Image.Image:
    """Centre the image on a square canvas of its long side filled with colour (offset rounded down)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), colour)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def _normalize(image: Image.Image, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 RGB -> (3, H, W) float32 (x / 255 - mean) / std."""
    x = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(x).permute(2, 0, 1).contiguous()  # (3, H, W)


def deepseek_vl_pixels(cfg: DeepseekVLConfig, images: list[Image.Image],
                       min_size: int = 14) -> dict[str, torch.Tensor]:
    """Both views of every image, as transformers' DeepseekVLHybridImageProcessorPil makes them.

    The high-resolution view is the image resized (long side vision_high.image_size) and padded
    square with the colour int(255 * mean); the low-resolution view is that padded square resized
    to vision.image_size. Returns pixel_values (N, 3, 384, 384) and high_res_pixel_values
    (N, 3, 1024, 1024), the forward's keyword tensors (each view normalized with its tower's mean/std).
    """
    if not images:
        raise ValueError("no images given; pass at least one PIL image")
    low_cfg, high_cfg = cfg.vision, cfg.vision_high
    low, high = [], []
    for image in images:
        image = image.convert("RGB")
        big = _pad_square(_resize_long_side(image, high_cfg.image_size, min_size),
                          tuple(int(255 * m) for m in high_cfg.image_mean))  # type: ignore[arg-type]
        small = _pad_square(_resize_long_side(big, low_cfg.image_size, min_size),
                            tuple(int(255 * m) for m in low_cfg.image_mean))  # type: ignore[arg-type]
        high.append(_normalize(big, high_cfg.image_mean, high_cfg.image_std))
        low.append(_normalize(small, low_cfg.image_mean, low_cfg.image_std))
    return {"pixel_values": torch.stack(low), "high_res_pixel_values": torch.stack(high)}


HYBRID = "hybrid"  # the ImagePlan scheme name of DeepSeek-VL's two fixed views


def plan_hybrid(cfg: DeepseekVLConfig, image: Image.Image) -> ImagePlan:
    """One image's plan: its 384-px SigLIP view as pixel_values (1, 3, 384, 384), its 1024-px SAM view in
    extra["high_res_pixel_values"] (1, 3, 1024, 1024), and cfg.tokens_per_image (576) placeholders
    whatever the image size."""
    views = deepseek_vl_pixels(cfg, [image])
    side = cfg.vision.image_size // cfg.vision.patch_size
    return ImagePlan(HYBRID, views["pixel_values"], original_size=image.size,
                     resized_size=(cfg.vision.image_size, cfg.vision.image_size), grid=(side, side),
                     parts={"image": cfg.tokens_per_image},
                     extra={"high_res_pixel_values": views["high_res_pixel_values"]})


def hybrid_inputs(plans: list[ImagePlan]) -> dict[str, torch.Tensor]:
    """The forward keyword tensors of a batch's hybrid plans, in prompt order: pixel_values (N, 3, 384, 384)
    and high_res_pixel_values (N, 3, 1024, 1024)."""
    return {"pixel_values": torch.cat([p.pixel_values for p in plans]),
            "high_res_pixel_values": torch.cat([p.extra["high_res_pixel_values"] for p in plans])}
