"""The VLM glue: vision tower -> projector -> feature layout -> one masked scatter into the LM's embeddings.

    pad (LLaVA-1.5):     pixel_values (N, 3, S, S) --tower--> (N, P, Dv) --projector--> (N, P', C)
    anyres (LLaVA-NeXT): pixel_values (N, V, 3, S, S) zero-padded views + image_sizes (N, 2) as (height, width)
                         --tower, projector--> per image (1 + tiles, P, C) --layouts.anyres--> (T_i, C)
    input_ids (B, T) with T_i placeholder ids per image --embed--> (B, T, C)
    the placeholder rows are replaced, in order, by the images' feature rows
    --> language model --> logits (B, T, V)

How many tokens an image costs comes from its ImagePlan (image/schemes/), built
by `plan_image` for the prompt and rebuilt from image_sizes inside forward; a
placeholder / feature count mismatch raises ValueError with both counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
from PIL import Image

from vlmkit.config import VLMConfig
from vlmkit.image.plan import ImagePlan
from vlmkit.image.schemes.anyres import anyres_plan, plan_anyres
from vlmkit.image.schemes.pad import pad_token_count, plan_pad
from vlmkit.models.layouts.anyres import pack_anyres
from vlmkit.models.lm import CausalLM, CausalLMOutput, KVCache
from vlmkit.models.projectors import build_projector, parse_projector_type
from vlmkit.models.vit import VisionTower


def _pad_args(cfg: VLMConfig) -> dict[str, int | bool]:
    v = cfg.vision
    return {"patch_size": v.patch_size, "keep_cls": v.use_cls_token and v.select_feature == "cls_patch",
            "merge": parse_projector_type(cfg.projector.type).merge}


def image_token_count(cfg: VLMConfig) -> int:
    """Placeholder tokens one image costs under the pad scheme (the same for every image size)."""
    if cfg.image_scheme != "pad":
        raise ValueError(f"under image_scheme={cfg.image_scheme!r} the token count depends on the image size; "
                         "use plan_image(cfg, image).num_tokens")
    return pad_token_count(cfg.vision.image_size, **_pad_args(cfg))  # type: ignore[arg-type]


def plan_image(cfg: VLMConfig, image: Image.Image) -> ImagePlan:
    """The ImagePlan of one image under the model's image scheme: its views and its token count."""
    v = cfg.vision
    if cfg.image_scheme == "anyres":
        return plan_anyres(image, cfg.grid_pinpoints, v.image_size, v.image_mean, v.image_std, v.patch_size)
    return plan_pad(image, v.image_size, v.image_mean, v.image_std, **_pad_args(cfg))  # type: ignore[arg-type]


def image_inputs(plans: Sequence[ImagePlan]) -> dict[str, torch.Tensor]:
    """The forward keyword tensors for the images of a batch, as transformers' processors make them:
    pad -> pixel_values (N, 3, S, S); anyres -> pixel_values (N, V_max, 3, S, S) zero-padded views
    and image_sizes (N, 2) as (height, width). No plans -> {}."""
    if not plans:
        return {}
    schemes = {p.scheme for p in plans}
    if len(schemes) > 1:
        raise ValueError(f"the images were planned with different schemes {sorted(schemes)}; use the model's one")
    if plans[0].scheme == "pad":
        return {"pixel_values": torch.cat([p.pixel_values for p in plans])}
    views = max(p.pixel_values.shape[0] for p in plans)
    pixels = torch.stack([torch.cat([p.pixel_values, p.pixel_values.new_zeros(
        views - p.pixel_values.shape[0], *p.pixel_values.shape[1:])]) for p in plans])  # (N, V_max, 3, S, S)
    sizes = torch.tensor([[p.original_size[1], p.original_size[0]] for p in plans])  # (N, 2) (height, width)
    return {"pixel_values": pixels, "image_sizes": sizes}


class VLM(nn.Module):
    """A LLaVA-style vision-language model built from a VLMConfig (LLaVA-1.5 pad or LLaVA-NeXT anyres)."""

    def __init__(self, cfg: VLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision)
        p = cfg.projector
        self.projector = build_projector(p.type, p.in_dim, p.out_dim, p.bias)
        self.lm = CausalLM(cfg.lm)
        if cfg.image_scheme == "anyres":  # LLaVA-NeXT's learned end-of-row embedding
            C = cfg.lm.hidden_size
            self.image_newline = nn.Parameter(torch.randn(C) / math.sqrt(C))  # (C,)

    @property
    def image_token_id(self) -> int:
        return self.cfg.image_token_id

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return self.lm.new_cache(batch_size, max_len)

    def _project(self, views: torch.Tensor) -> torch.Tensor:
        """(V, 3, S, S) views -> (V, P', C) LM-width features."""
        dtype = self.projector.mlp[0].weight.dtype
        return self.projector(self.vision.features(views.to(dtype)))  # (V, P', C)

    def encode_images(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Every image's token sequence (T_i, C), in order; see the module docstring for the input shapes."""
        if self.cfg.image_scheme == "anyres":
            return self._encode_anyres(pixel_values, image_sizes)
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be (num_images, 3, H, W), got shape {tuple(pixel_values.shape)}")
        return list(self._project(pixel_values).unbind(0))  # N x (P', C)

    def anyres_plans(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None) -> list[ImagePlan]:
        """Rebuild each image's anyres plan from transformers-style inputs: pixel_values (N, V, 3, S, S)
        padded, or all views concatenated (sum V, 3, S, S); image_sizes (N, 2) as (height, width)."""
        if image_sizes is None:
            raise ValueError("an anyres (LLaVA-NeXT) model needs image_sizes (num_images, 2) as (height, width) "
                             "next to pixel_values; image_inputs(plans) makes both")
        sizes = [(int(h), int(w)) for h, w in image_sizes.tolist()]
        v = self.cfg.vision
        geometry = (self.cfg.grid_pinpoints, v.image_size, v.patch_size)
        if pixel_values.ndim == 5:
            if pixel_values.shape[0] != len(sizes):
                raise ValueError(f"pixel_values holds {pixel_values.shape[0]} images but image_sizes "
                                 f"{len(sizes)}; pass one (height, width) per image")
            return [anyres_plan((w, h), pixel_values[i], *geometry) for i, (h, w) in enumerate(sizes)]
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be (images, views, 3, S, S) or (views, 3, S, S), "
                             f"got shape {tuple(pixel_values.shape)}")
        plans, offset = [], 0
        for h, w in sizes:
            plans.append(anyres_plan((w, h), pixel_values[offset:], *geometry))
            offset += plans[-1].pixel_values.shape[0]
        if offset != pixel_values.shape[0]:
            raise ValueError(f"pixel_values holds {pixel_values.shape[0]} views but the image_sizes plan {offset}")
        return plans

    def _encode_anyres(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None) -> list[torch.Tensor]:
        plans = self.anyres_plans(pixel_values, image_sizes)
        features = self._project(torch.cat([p.pixel_values for p in plans]))  # (sum V, P, C)
        chunks = features.split([p.pixel_values.shape[0] for p in plans])
        return [pack_anyres(f, p, self.image_newline) for f, p in zip(chunks, plans)]  # N x (T_i, C)

    def merge_image_features(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor,
                             image_embeds: Sequence[torch.Tensor]) -> torch.Tensor:
        """Scatter the images' (T_i, C) rows into inputs_embeds (B, T, C) where input_ids is the placeholder."""
        is_image = input_ids == self.image_token_id  # (B, T)
        placeholders = int(is_image.sum())
        counts = [e.shape[0] for e in image_embeds]
        if placeholders != sum(counts):
            each = f"{counts[0]} each" if len(set(counts)) == 1 else ", ".join(map(str, counts))
            raise ValueError(
                f"the prompt has {placeholders} image placeholder tokens (id {self.image_token_id}) but the "
                f"{len(counts)} image(s) give {sum(counts)} feature tokens ({each}); build the prompt with "
                "plan_image(cfg, image).num_tokens placeholders per image")
        flat = torch.cat(list(image_embeds)).to(inputs_embeds.dtype)  # (sum T_i, C)
        return inputs_embeds.masked_scatter(is_image.unsqueeze(-1), flat)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,  # (B, T)
        pixel_values: torch.Tensor | None = None,  # pad: (N, 3, S, S); anyres: (N, V, 3, S, S), prompt order
        image_sizes: torch.Tensor | None = None,  # (N, 2) original (height, width); anyres only
        attention_mask: torch.Tensor | None = None,  # (B, S)
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        inputs_embeds: torch.Tensor | None = None,
        loss_only: bool = False,
    ) -> CausalLMOutput:
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids (or inputs_embeds)")
            inputs_embeds = self.lm.embed(input_ids)  # (B, T, C)
        if pixel_values is not None:
            if input_ids is None:
                raise ValueError("pixel_values need input_ids to show where the image placeholders are")
            inputs_embeds = self.merge_image_features(input_ids, inputs_embeds,
                                                      self.encode_images(pixel_values, image_sizes))
        elif input_ids is not None and (cache is None or cache.length == 0):
            placeholders = int((input_ids == self.image_token_id).sum())
            if placeholders:
                raise ValueError(f"the prompt has {placeholders} image placeholder tokens but no pixel_values "
                                 "were given (0 feature tokens); pass the images or remove the placeholders")
        return self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                       cache=cache, labels=labels, logits_to_keep=logits_to_keep, loss_only=loss_only)
