"""Tests for models/contrastive.py: CLIP and SigLIP losses against transformers and hand-computed values,
and a tiny ContrastivePair that learns to match 8 random images with 8 random texts."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

from vlmkit.config import LMConfig, VisionConfig
from vlmkit.models.contrastive import (
    MAX_LOGIT_SCALE,
    ContrastiveConfig,
    ContrastivePair,
    clip_loss,
    siglip_loss,
)


def softplus(x: float) -> float:
    """-log_sigmoid(-x) = log(1 + e^x), for writing the hand-computed losses."""
    return math.log1p(math.exp(x))


# 2x2 example. Unnormalised inputs whose unit vectors are img = [[1, 0], [0, 1]], txt = [[1, 0], [0.6, 0.8]],
# so the cosines are [[1, 0.6], [0, 0.8]].
IMG = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
TXT = torch.tensor([[2.0, 0.0], [3.0, 4.0]])


def test_clip_loss_hand_computed() -> None:
    # scale 2: logits [[2, 1.2], [0, 1.6]]. CE of a 2-way row with the right logit ahead by d is log(1 + e^-d):
    # image rows are ahead by 0.8 and 1.6, text columns ([2, 0] and [1.2, 1.6]) by 2 and 0.4.
    expected = (softplus(-0.8) + softplus(-1.6) + softplus(-2.0) + softplus(-0.4)) / 4
    got = clip_loss(IMG, TXT, torch.tensor(math.log(2.0)))
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_siglip_loss_hand_computed() -> None:
    # scale 2, bias -1: logits [[1, 0.2], [-1, 0.6]]; -log_sigmoid(z * l) = softplus(-z * l) with z = +1 on
    # the diagonal, -1 off it: softplus(-1) + softplus(0.2) + softplus(-1) + softplus(-0.6), over B = 2.
    expected = (2 * softplus(-1.0) + softplus(0.2) + softplus(-0.6)) / 2
    got = siglip_loss(IMG, TXT, torch.tensor(math.log(2.0)), torch.tensor(-1.0))
    assert got.item() == pytest.approx(expected, abs=1e-6)


def _tiny_inputs(vocab: int, B: int = 4, T: int = 7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pixels = torch.randn(B, 3, 16, 16)
    ids = torch.randint(1, vocab, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    return pixels, ids, mask


def test_clip_loss_matches_transformers_clip_model() -> None:
    torch.manual_seed(0)
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16)
    vision = dict(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(1.3)
    pixels, ids, mask = _tiny_inputs(64)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_loss=True)
        image = model.get_image_features(pixel_values=pixels).pooler_output  # projected, not normalised
        text_raw = model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
    ours = clip_loss(image, text_raw, model.logit_scale.detach())
    assert abs(ours.item() - out.loss.item()) <= 1e-5
    assert abs(clip_loss(out.image_embeds, out.text_embeds, model.logit_scale.detach()) - out.loss).item() <= 1e-5


def test_siglip_loss_matches_transformers_siglip_model() -> None:
    torch.manual_seed(0)
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16)
    vision = dict(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(1.7)
        model.logit_bias.fill_(-2.3)
    pixels, ids, _ = _tiny_inputs(64)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, return_loss=True)
        image = model.get_image_features(pixel_values=pixels).pooler_output  # not normalised
        text_raw = model.get_text_features(input_ids=ids).pooler_output
    scale, bias = model.logit_scale.detach(), model.logit_bias.detach()
    assert abs(siglip_loss(image, text_raw, scale, bias).item() - out.loss.item()) <= 1e-5
    assert abs(siglip_loss(out.image_embeds, out.text_embeds, scale, bias) - out.loss).item() <= 1e-5


def test_gradients_reach_scale_and_bias() -> None:
    torch.manual_seed(0)
    img, txt = torch.randn(5, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    scale, bias = torch.tensor(1.0, requires_grad=True), torch.tensor(-1.0, requires_grad=True)
    (clip_loss(img, txt, scale) + siglip_loss(img, txt, scale, bias)).backward()
    for name, t in (("image", img), ("text", txt), ("scale", scale), ("bias", bias)):
        assert t.grad is not None and t.grad.abs().sum() > 0, name
    # d/db of the sigmoid loss: sum_ij -z_ij * sigmoid(-z_ij * l_ij) / B, checked against the closed form.
    bias.grad = None
    siglip_loss(img.detach(), txt.detach(), scale.detach(), bias).backward()
    with torch.no_grad():
        cos = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).T
        logits = scale.exp() * cos + bias
        z = 2 * torch.eye(5) - 1
        expected = (-z * torch.sigmoid(-z * logits)).sum() / 5
    assert abs(bias.grad.item() - expected.item()) <= 1e-5


def _pair_config(loss: str) -> ContrastiveConfig:
    vision = VisionConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2,
                          num_heads=4)
    text = LMConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4)
    return ContrastiveConfig(vision=vision, text=text, embed_dim=16, loss=loss)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_pair_learns_to_match_random_pairs(loss: str) -> None:
    torch.manual_seed(0)
    model = ContrastivePair(_pair_config(loss))
    B, T = 8, 6
    pixels = torch.randn(B, 3, 16, 16)
    ids = torch.randint(1, 64, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[::2, 4:] = 0  # half of the texts are right-padded to 4 tokens
    ids[mask == 0] = 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first, _ = model(pixels, ids, mask)
    for _ in range(40):
        optimizer.zero_grad()
        loss_value, _ = model(pixels, ids, mask)
        loss_value.backward()
        optimizer.step()
        model.clamp_logit_scale_()
    with torch.no_grad():
        last, logits = model(pixels, ids, mask)
    assert last.item() < 0.5 * first.item()
    assert (logits.argmax(dim=1) == torch.arange(B)).all()  # image -> text retrieval
    assert (logits.argmax(dim=0) == torch.arange(B)).all()  # text -> image retrieval


def test_pair_init_and_parameters() -> None:
    clip, sig = ContrastivePair(_pair_config("clip")), ContrastivePair(_pair_config("siglip"))
    assert clip.logit_scale.item() == pytest.approx(math.log(1 / 0.07)) and clip.logit_bias is None
    assert sig.logit_scale.item() == pytest.approx(math.log(10)) and sig.logit_bias.item() == -10.0
    torch.manual_seed(0)
    loss, _ = sig(torch.randn(3, 3, 16, 16), torch.randint(0, 64, (3, 5)))
    loss.backward()
    no_grad = [n for n, p in sig.named_parameters() if p.grad is None]
    assert no_grad == []
    with torch.no_grad():
        clip.logit_scale.fill_(7.0)
    clip.clamp_logit_scale_()
    assert clip.logit_scale.item() == pytest.approx(MAX_LOGIT_SCALE)


def test_text_pooling_takes_last_real_token() -> None:
    torch.manual_seed(0)
    model = ContrastivePair(_pair_config("clip")).eval()
    ids = torch.randint(1, 64, (1, 4))
    with torch.no_grad():
        plain = model.encode_text(ids)
        right = model.encode_text(torch.cat([ids, torch.tensor([[5, 9]])], 1), torch.tensor([[1, 1, 1, 1, 0, 0]]))
        left = model.encode_text(torch.cat([torch.tensor([[7, 3]]), ids], 1), torch.tensor([[0, 0, 1, 1, 1, 1]]))
    assert torch.allclose(right, plain, atol=1e-5)
    assert torch.allclose(left, plain, atol=1e-5)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="valid: \\['clip', 'siglip'\\]"):
        _pair_config("infonce")
    vision = VisionConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=1,
                          num_heads=4, use_cls_token=False, pre_layernorm=False)
    with pytest.raises(ValueError, match="use_head=True"):
        ContrastiveConfig(vision=vision, text=_pair_config("clip").text, embed_dim=16)
    with pytest.raises(ValueError, match="same shape"):
        clip_loss(torch.randn(3, 4), torch.randn(2, 4), torch.tensor(0.0))
    model = ContrastivePair(_pair_config("clip"))
    with pytest.raises(ValueError, match="no real token"):
        model.encode_text(torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 1, 0], [0, 0, 0]]))


def test_config_round_trip() -> None:
    cfg = _pair_config("siglip")
    assert ContrastiveConfig.from_dict(cfg.to_dict()) == cfg
