"""Tests for models/contrastive.py: CLIP and SigLIP losses against transformers and hand-computed values,
a tiny ContrastivePair that learns to match 8 random images with 8 random texts, and the `contrastive`
stage (train/recipes.py) trained by the common loop on synthetic shape captions."""

from __future__ import annotations

import math
import string

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

from vlmkit.config import LMConfig, VisionConfig
from vlmkit.data.synth_scenes import COLOURS, SHAPES, draw_shape
from vlmkit.models.contrastive import (
    MAX_LOGIT_SCALE,
    ContrastiveConfig,
    ContrastivePair,
    clip_loss,
    collate_pairs,
    siglip_loss,
)
from vlmkit.text.tokenizer import CharTokenizer
from vlmkit.train.loop import train
from vlmkit.train.recipes import contrastive_stage
from vlmkit.train.stages import module_groups


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


# ---- the `contrastive` stage through the common training loop --------------------------------------------

CAPTION_CHARS = string.ascii_lowercase + " "


def _shape_pair(rng: np.random.Generator, size: int = 32) -> tuple[Image.Image, str]:
    """A synthetic pair: one coloured shape (data/synth_scenes.py's drawing) on a light background, and its
    caption "a red circle"."""
    shape, colour = SHAPES[int(rng.integers(len(SHAPES)))], list(COLOURS)[int(rng.integers(len(COLOURS)))]
    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(205, 256, 3)))
    side = int(rng.integers(size // 3, 2 * size // 3))
    x, y = (int(v) for v in rng.integers(0, size - side, 2))
    draw_shape(ImageDraw.Draw(image), shape, (x, y, x + side - 1, y + side - 1), COLOURS[colour])
    return image, f"a {colour} {shape}"


def _pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W) in [-1, 1]


def _pair_batches(tokenizer: CharTokenizer, batch_size: int, seed: int):
    """An endless seeded stream of collate_pairs batches of fresh synthetic pairs."""
    rng = np.random.default_rng(seed)
    while True:
        pairs = [_shape_pair(rng) for _ in range(batch_size)]
        yield collate_pairs([_pixels(im) for im, _ in pairs], [tokenizer.encode(c) for _, c in pairs], pad_id=0)


def _held_out(tokenizer: CharTokenizer, count: int = 8) -> dict[str, torch.Tensor]:
    """count pairs with distinct captions from another seed, so retrieval has exactly one right answer."""
    rng, pairs = np.random.default_rng(123), {}
    while len(pairs) < count:
        image, caption = _shape_pair(rng)
        pairs.setdefault(caption, image)
    return collate_pairs([_pixels(im) for im in pairs.values()], [tokenizer.encode(c) for c in pairs], pad_id=0)


# SigLIP starts with bias -10 (every pair scored negative) and needs more steps to separate the pairs.
CONTRASTIVE_STEPS = {"clip": 60, "siglip": 200}


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_contrastive_stage_trains_through_the_loop(loss: str) -> None:
    """CLIP / SigLIP pretraining of a tiny ContrastivePair by train/loop.train with recipes.contrastive_stage
    (batches of 24 fresh pairs out of 18 colour-shape captions): the loss goes down, and on 8 held-out pairs
    with distinct captions image->text retrieval is right for at least 4 (chance: 1 in 8)."""
    tokenizer = CharTokenizer(CAPTION_CHARS)
    vision = VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2,
                          num_heads=4)
    text = LMConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4)
    torch.manual_seed(0)
    model = ContrastivePair(ContrastiveConfig(vision=vision, text=text, embed_dim=32, loss=loss))
    stage = contrastive_stage(loss, lr=3e-3, warmup_steps=5)
    assert stage.name == "contrastive"
    held_out = _held_out(tokenizer)
    with torch.no_grad():
        before = model.eval()(**held_out).logits.argmax(dim=1)
    result = train(model, _pair_batches(tokenizer, batch_size=24, seed=0), stage, steps=CONTRASTIVE_STEPS[loss],
                   progress=False,
                   on_step=lambda step, value: model.clamp_logit_scale_())  # CLIP's cap: scale <= 100
    first, last = np.mean(result.losses[:5]), np.mean(result.losses[-5:])
    assert last < 0.7 * first, (first, last)
    assert 0 <= model.logit_scale.item() <= MAX_LOGIT_SCALE
    with torch.no_grad():
        out = model.eval()(**held_out)
    accuracy = (out.logits.argmax(dim=1) == torch.arange(8)).float().mean().item()
    assert accuracy >= 0.5, (accuracy, before.tolist())


def test_contrastive_stage_groups_and_batches() -> None:
    clip, siglip = ContrastivePair(_pair_config("clip")), ContrastivePair(_pair_config("siglip"))
    for model, loss in ((clip, "clip"), (siglip, "siglip")):
        groups = module_groups(model, contrastive_stage(loss))  # every parameter claimed, none twice
        assert sum(len(g) for g in groups.values()) == len(list(model.parameters()))
    assert contrastive_stage("clip").lrs["logit_scale"] == 5e-4 and "logit_bias" not in contrastive_stage("clip").lrs
    with pytest.raises(ValueError, match="valid: \\['clip', 'siglip'\\]"):
        contrastive_stage("infonce")
    batch = collate_pairs([torch.zeros(3, 16, 16)] * 3, [[5, 6], [7], [8, 9, 10]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 0], [7, 0, 0], [8, 9, 10]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1]]
    assert torch.equal(batch["labels"], torch.eye(3, dtype=torch.long))
    out = clip(**batch, loss_only=True)
    assert out.loss.dim() == 0 and out.logits.shape == (3, 3)
    with pytest.raises(ValueError, match="identity"):
        clip(**{**batch, "labels": torch.ones(3, 3, dtype=torch.long)})
    with pytest.raises(ValueError, match="at least 2 pairs"):
        collate_pairs([torch.zeros(3, 16, 16)], [[5]], pad_id=0)
