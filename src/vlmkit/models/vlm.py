"""The VLM glue: vision tower -> projector -> one masked scatter into the LM's embeddings.

    pixel_values (N, 3, H, W) --tower--> (N, P, Dv) --projector--> (N, P', C)
    input_ids (B, T) with P' placeholder ids per image --embed--> (B, T, C)
    the placeholder rows are replaced, in order, by the N * P' feature rows
    --> language model --> logits (B, T, V)

How many placeholders an image needs is computed once (`image_token_count`)
and is the same number the features have; a mismatch raises ValueError with
both counts instead of silently truncating.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from vlmkit.config import VLMConfig
from vlmkit.models.lm import CausalLM, CausalLMOutput, KVCache
from vlmkit.models.projectors import build_projector, tokens_after_projection
from vlmkit.models.vit import VisionTower


def image_token_count(cfg: VLMConfig) -> int:
    """Placeholder tokens one image at the tower's native size occupies in the prompt."""
    return tokens_after_projection(cfg.projector.type, cfg.vision.tokens_per_image)


class VLM(nn.Module):
    """A LLaVA-style vision-language model built from a VLMConfig."""

    def __init__(self, cfg: VLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision)
        p = cfg.projector
        self.projector = build_projector(p.type, p.in_dim, p.out_dim, p.bias)
        self.lm = CausalLM(cfg.lm)

    @property
    def image_token_id(self) -> int:
        return self.cfg.image_token_id

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return self.lm.new_cache(batch_size, max_len)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) pixels -> (N, P', C) LM-width image embeddings."""
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be (num_images, 3, H, W), got shape {tuple(pixel_values.shape)}")
        dtype = self.projector.mlp[0].weight.dtype
        features = self.vision.features(pixel_values.to(dtype))  # (N, P, Dv)
        return self.projector(features)  # (N, P', C)

    def merge_image_features(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor,
                             image_embeds: torch.Tensor) -> torch.Tensor:
        """Scatter image_embeds (N, P', C) into inputs_embeds (B, T, C) where input_ids is the placeholder."""
        is_image = input_ids == self.image_token_id  # (B, T)
        placeholders = int(is_image.sum())
        features = image_embeds.shape[0] * image_embeds.shape[1]
        if placeholders != features:
            raise ValueError(
                f"the prompt has {placeholders} image placeholder tokens (id {self.image_token_id}) but the "
                f"{image_embeds.shape[0]} image(s) give {features} feature tokens "
                f"({image_embeds.shape[1]} each); build the prompt with image_token_count() placeholders per image")
        flat = image_embeds.reshape(-1, image_embeds.shape[-1]).to(inputs_embeds.dtype)  # (N*P', C)
        return inputs_embeds.masked_scatter(is_image.unsqueeze(-1), flat)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,  # (B, T)
        pixel_values: torch.Tensor | None = None,  # (N, 3, H, W), all images of the batch in prompt order
        image_sizes: torch.Tensor | None = None,  # (N, 2) original (H, W); unused by the pad scheme
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
            inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, self.encode_images(pixel_values))
        elif input_ids is not None and (cache is None or cache.length == 0):
            placeholders = int((input_ids == self.image_token_id).sum())
            if placeholders:
                raise ValueError(f"the prompt has {placeholders} image placeholder tokens but no pixel_values "
                                 "were given (0 feature tokens); pass the images or remove the placeholders")
        return self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                       cache=cache, labels=labels, logits_to_keep=logits_to_keep, loss_only=loss_only)
