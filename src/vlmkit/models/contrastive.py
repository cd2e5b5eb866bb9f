"""Contrastive image-text pretraining: CLIP's and SigLIP's losses and a dual-encoder pair.

Both losses score every image of a batch against every text with a scaled cosine similarity

    logits[i, j] = exp(logit_scale) * <img_i / |img_i|, txt_j / |txt_j|> (+ logit_bias)   # (B, B)

where pair (i, i) matches and every (i, j != i) is a negative:

    CLIP   (Radford et al. 2021, Fig. 3):  mean(CE(logits, diag), CE(logits.T, diag))
    SigLIP (Zhai et al. 2023, Alg. 1):     -sum_ij log_sigmoid(z_ij * logits_ij) / B,  z = +1 on diag, -1 off it

as transformers' CLIPModel / SiglipModel (`return_loss=True`) and OpenCLIP's ClipLoss / SigLipLoss
compute them; the tests check both against transformers.

The temperature. The losses take the log-scale as given and do not clamp it: transformers does not
clamp in forward. CLIP's paper clips the scale at 100 and OpenCLIP does so by clamping the parameter
in place to [0, ln 100] after every optimizer step; `ContrastivePair.clamp_logit_scale_()` is that
step, for the training loop to call after `optimizer.step()`.

`ContrastivePair` is the dual encoder:

    image:  VisionTower(pixels).pooler_output -> Linear(no bias) -> (B, E)   CLIP's normed CLS or SigLIP's head
    text:   CausalLM body (no vocabulary head), hidden state of each row's last real token
            -> Linear(no bias) -> (B, E)

Training through the common loop (train/loop.py): `forward(**batch, loss_only=True).loss`, with the
batch from `collate_pairs` (pixel_values, input_ids, attention_mask and `labels`, the (B, B) pair
matrix: 1 where image i and text j belong together, the identity for a batch of pairs), and the stage
from train/recipes.py's `contrastive_stage`.

Last-token pooling: the text body is causal, so the last real token is the only one that has seen the
whole string (CLIP's text transformer pools at its end-of-text token for the same reason). Padding on
either side is allowed; `attention_mask` says which tokens are real.

    >>> cfg = ContrastiveConfig(
    ...     vision=VisionConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64,
    ...                         num_layers=1, num_heads=4),
    ...     text=LMConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4),
    ...     embed_dim=16, loss="siglip")
    >>> loss, logits = ContrastivePair(cfg)(torch.randn(3, 3, 16, 16), torch.randint(0, 50, (3, 5)))  # a NamedTuple
    >>> tuple(logits.shape)
    (3, 3)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlmkit.config import LMConfig, Serializable, VisionConfig, require
from vlmkit.models.lm import CausalLM
from vlmkit.models.vit import VisionTower

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP / OpenCLIP: the scale exp(logit_scale) never exceeds 100


def similarity_logits(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                      logit_bias: torch.Tensor | None = None) -> torch.Tensor:
    """logits_per_image (B, B): exp(logit_scale) * cos(image_i, text_j) (+ logit_bias).

    Embeddings are (B, D) and need not be normalised; logit_scale (and logit_bias) are scalars
    or 1-element tensors, logit_scale on the log scale.
    """
    if image_embeds.dim() != 2 or image_embeds.shape != text_embeds.shape:
        raise ValueError(f"image_embeds {tuple(image_embeds.shape)} and text_embeds {tuple(text_embeds.shape)} "
                         "must both be (batch, dim) with the same shape: one text per image, row i pairs with row i")
    image = F.normalize(image_embeds, dim=-1)  # (B, D)
    text = F.normalize(text_embeds, dim=-1)  # (B, D)
    logits = logit_scale.exp() * image @ text.T  # (B_img, B_txt)
    return logits + logit_bias if logit_bias is not None else logits


def symmetric_cross_entropy(logits_per_image: torch.Tensor) -> torch.Tensor:
    """CLIP's loss on (B, B) logits: mean of image->text and text->image cross-entropy, diagonal as labels."""
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)  # (B,)
    image_to_text = F.cross_entropy(logits_per_image, labels)
    text_to_image = F.cross_entropy(logits_per_image.T, labels)
    return (image_to_text + text_to_image) / 2


def pairwise_sigmoid_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    """SigLIP's loss on (B, B) logits: -sum of log_sigmoid(z * logits) / B, z = +1 on the diagonal, -1 elsewhere."""
    B = logits_per_image.shape[0]
    eye = torch.eye(B, device=logits_per_image.device, dtype=logits_per_image.dtype)
    labels = 2 * eye - 1  # (B, B)
    return -F.logsigmoid(labels * logits_per_image).sum() / B


def clip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy for (B, D) paired embeddings; logit_scale is log(1 / temperature)."""
    return symmetric_cross_entropy(similarity_logits(image_embeds, text_embeds, logit_scale))


def siglip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss for (B, D) paired embeddings with log-scale and bias."""
    return pairwise_sigmoid_loss(similarity_logits(image_embeds, text_embeds, logit_scale, logit_bias))


# loss name -> (loss on logits_per_image, initial logit_scale, initial logit_bias or None = no bias)
LOSSES: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], float, float | None]] = {
    "clip": (symmetric_cross_entropy, math.log(1 / 0.07), None),  # CLIP: temperature 0.07
    "siglip": (pairwise_sigmoid_loss, math.log(10.0), -10.0),  # SigLIP paper, Sec. 3.2: t' = log 10, b = -10
}


@dataclass
class ContrastiveConfig(Serializable):
    """An image tower and a text body projected to a shared embed_dim, trained with `loss`."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: LMConfig = field(default_factory=LMConfig)
    embed_dim: int = 512
    loss: str = "clip"  # one of LOSSES

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = VisionConfig.from_dict(self.vision)
        if isinstance(self.text, dict):
            self.text = LMConfig.from_dict(self.text)
        require(self.loss in LOSSES, f"contrastive loss {self.loss!r} unknown; valid: {sorted(LOSSES)}")
        require(self.embed_dim > 0, f"ContrastiveConfig.embed_dim must be positive, got {self.embed_dim}")
        require(self.vision.use_cls_token or self.vision.use_head,
                 "the image side pools the tower's output: set vision.use_cls_token=True (CLIP: normed CLS) "
                 "or vision.use_head=True (SigLIP: attention-pooling head)")


class ContrastiveOutput(NamedTuple):
    """What ContrastivePair.forward returns; unpacks as (loss, logits)."""

    loss: torch.Tensor  # scalar, over the batch
    logits: torch.Tensor  # (B_img, B_txt) logits_per_image


def collate_pairs(pixel_values: Sequence[torch.Tensor], token_ids: Sequence[Sequence[int]],
                  pad_id: int) -> dict[str, torch.Tensor]:
    """A batch of B image-text pairs (image i with text i) for ContrastivePair and train(): pixel_values
    (B, C, H, W), input_ids (B, T) right-padded with pad_id, attention_mask (B, T), labels (B, B) identity."""
    if len(pixel_values) != len(token_ids) or len(pixel_values) < 2:
        raise ValueError(f"got {len(pixel_values)} images and {len(token_ids)} texts; a contrastive batch needs "
                         "one text per image and at least 2 pairs (the other pairs are each pair's negatives)")
    if any(len(ids) == 0 for ids in token_ids):
        raise ValueError("a text has no tokens; every caption needs at least one")
    width = max(len(ids) for ids in token_ids)
    ids = torch.tensor([list(t) + [pad_id] * (width - len(t)) for t in token_ids])  # (B, T)
    mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in token_ids])  # (B, T)
    B = len(token_ids)
    return {"pixel_values": torch.stack(list(pixel_values)), "input_ids": ids, "attention_mask": mask,
            "labels": torch.eye(B, dtype=torch.long)}  # (B, B) pair matrix


class ContrastivePair(nn.Module):
    """Dual encoder for contrastive pretraining; forward returns ContrastiveOutput(loss, logits_per_image)."""

    def __init__(self, cfg: ContrastiveConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision)
        self.text = CausalLM(cfg.text)
        self.text.lm_head = nn.Identity()  # the body only: its "logits" are the final normed hidden states
        self.image_proj = nn.Linear(cfg.vision.hidden_size, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(cfg.text.hidden_size, cfg.embed_dim, bias=False)
        self.loss_fn, scale, bias = LOSSES[cfg.loss]
        self.logit_scale = nn.Parameter(torch.tensor(scale))
        self.logit_bias = nn.Parameter(torch.tensor(bias)) if bias is not None else None

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) pixels -> (B, embed_dim) image embeddings, not normalised."""
        return self.image_proj(self.vision(pixel_values).pooler_output)  # (B, E)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids (1 = real token in attention_mask) -> (B, embed_dim) text embeddings, not normalised."""
        hidden = self.text(input_ids, attention_mask=attention_mask).logits  # (B, T, C)
        B, T = input_ids.shape
        if attention_mask is None:
            last = torch.full((B,), T - 1, device=input_ids.device)  # (B,)
        else:
            if not attention_mask.bool().any(-1).all():
                raise ValueError("attention_mask has a row with no real token; every text needs at least one")
            last = T - 1 - attention_mask.long().flip(-1).argmax(-1)  # (B,) index of the last 1 in each row
        pooled = hidden[torch.arange(B, device=hidden.device), last]  # (B, C)
        return self.text_proj(pooled)  # (B, E)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, loss_only: bool = False) -> ContrastiveOutput:
        """Loss over the batch (image i pairs with text i) and the (B_img, B_txt) logits.

        labels: the (B, B) pair matrix collate_pairs gives; only the identity (one text per image, in
        order) is supported. loss_only is accepted for the training loop's call: the (B, B) logits are the
        loss's input and are returned either way."""
        B = pixel_values.shape[0]
        if labels is not None and not torch.equal(labels, torch.eye(B, dtype=labels.dtype, device=labels.device)):
            raise ValueError(f"labels must be the ({B}, {B}) identity (image i pairs with text i); got a "
                             f"{tuple(labels.shape)} matrix that is not: order the texts like the images")
        logits = similarity_logits(self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask),
                                   self.logit_scale, self.logit_bias)  # (B, B)
        return ContrastiveOutput(self.loss_fn(logits), logits)

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp logit_scale to [0, ln 100] in place, as OpenCLIP does after each optimizer step."""
        self.logit_scale.clamp_(0, MAX_LOGIT_SCALE)


if __name__ == "__main__":
    import doctest

    doctest.testmod()
