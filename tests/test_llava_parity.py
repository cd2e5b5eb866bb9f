"""LLaVA (CLIP tower + mlp2x_gelu + Llama) against transformers' LlavaForConditionalGeneration.

A tiny random transformers model is saved, loaded by vlmkit, and compared on a
real photo: logits (fp32, <= 1e-4), greedy generation ids, a left-padded batch
with two images, the save round trip, and the placeholder-count errors.
"""

import matplotlib.cbook
import pytest
import torch
import transformers
from PIL import Image

from vlmkit.generate import GenerationConfig, generate
from vlmkit.schemes.pad import preprocess_pad
from vlmkit.weights import from_pretrained, save_pretrained
from vlmkit.models.vlm import VLM
from vlmkit.schemes.pad import image_token_count

IMAGE_TOKEN = 100
TOL = 1e-4


def _hf_llava(**vision_overrides):
    torch.manual_seed(0)
    vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  image_size=32, patch_size=8)
    vision.update(vision_overrides)
    text = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=120,
                                    bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**vision), text_config=text,
                                   image_token_index=IMAGE_TOKEN, vision_feature_layer=-2,
                                   vision_feature_select_strategy="default")
    return transformers.LlavaForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = _hf_llava()
    path = tmp_path_factory.mktemp("llava")
    hf.save_pretrained(path)
    ours = from_pretrained(path)
    return hf, ours


def _pixels(ours: VLM, sizes=((300, 200),)) -> torch.Tensor:
    v = ours.cfg.vision
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        photo = Image.open(f).convert("RGB")
    return torch.stack([preprocess_pad(photo.resize(s), v.image_size, v.image_mean, v.image_std) for s in sizes])


def _prompt(n_images: int, n_tokens: int, text_len: int = 7, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    ids = [1]
    for _ in range(n_images):
        ids += torch.randint(3, 90, (2,), generator=g).tolist() + [IMAGE_TOKEN] * n_tokens
    return ids + torch.randint(3, 90, (text_len,), generator=g).tolist()


def test_loaded_config(models):
    _, ours = models
    assert isinstance(ours, VLM)
    assert ours.cfg.vision.select_layer == -2 and ours.cfg.vision.select_feature == "patch"
    assert ours.cfg.projector.type == "mlp2x_gelu"
    assert image_token_count(ours.cfg) == 16  # (32 / 8)^2 patches, CLS dropped


def test_logits_match(models):
    hf, ours = models
    pixels = _pixels(ours)
    ids = torch.tensor([_prompt(1, image_token_count(ours.cfg))])
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=pixels).logits
        got = ours(input_ids=ids, pixel_values=pixels).logits
    assert (got - expected).abs().max().item() <= TOL


def test_left_padded_batch_with_two_images(models):
    hf, ours = models
    n = image_token_count(ours.cfg)
    pixels = _pixels(ours, sizes=((300, 200), (120, 260)))
    short, long = _prompt(1, n, 3, seed=2), _prompt(1, n, 9, seed=3)
    width = len(long)
    ids = torch.tensor([[0] * (width - len(short)) + short, long])
    mask = (torch.arange(width)[None] >= torch.tensor([[width - len(short)], [0]])).long()
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        got = ours(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max().item() <= TOL


def test_greedy_generation_ids_match(models):
    hf, ours = models
    pixels = _pixels(ours)
    ids = torch.tensor([_prompt(1, image_token_count(ours.cfg))])
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=20, min_new_tokens=20,
                               do_sample=False)[0, ids.shape[1]:].tolist()
    result = generate(ours, ids, GenerationConfig(max_new_tokens=20), prefill_inputs={"pixel_values": pixels})
    assert result.token_ids[0] == expected


def test_save_round_trip_loads_in_transformers(models, tmp_path):
    hf, ours = models
    save_pretrained(ours, tmp_path)
    back = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    pixels = _pixels(ours)
    ids = torch.tensor([_prompt(1, image_token_count(ours.cfg))])
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids, pixel_values=pixels).logits, hf(input_ids=ids, pixel_values=pixels).logits)
    assert from_pretrained(tmp_path).cfg == ours.cfg


def test_placeholder_count_mismatch_names_both_counts(models):
    _, ours = models
    pixels = _pixels(ours)
    ids = torch.tensor([_prompt(1, image_token_count(ours.cfg) - 1)])
    with pytest.raises(ValueError, match=r"15 image placeholder tokens .* give 16 feature tokens"):
        ours(input_ids=ids, pixel_values=pixels)
    with pytest.raises(ValueError, match=r"16 image placeholder tokens but no pixel_values"):
        ours(input_ids=torch.tensor([_prompt(1, 16)]))


def test_loss_and_loss_only_path_match_transformers(models):
    hf, ours = models
    pixels = _pixels(ours)
    ids = torch.tensor([_prompt(1, image_token_count(ours.cfg), text_len=12)])
    labels = ids.masked_fill(ids == IMAGE_TOKEN, -100)
    labels[0, :5] = -100  # an unlabelled prompt prefix, as in SFT
    expected = hf(input_ids=ids, pixel_values=pixels, labels=labels).loss
    full = ours(input_ids=ids, pixel_values=pixels, labels=labels)
    ours.zero_grad()
    fast = ours(input_ids=ids, pixel_values=pixels, labels=labels, loss_only=True)
    assert fast.logits is None
    assert abs(full.loss.item() - expected.item()) <= 1e-5
    assert abs(fast.loss.item() - expected.item()) <= 1e-5
    fast.loss.backward()
    grad_fast = ours.projector.mlp[0].weight.grad.clone()
    ours.zero_grad()
    full.loss.backward()
    torch.testing.assert_close(grad_fast, ours.projector.mlp[0].weight.grad, atol=1e-6, rtol=1e-4)
    ours.zero_grad()


def test_llava_with_a_qwen2_language_model_round_trips(tmp_path):
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=16, patch_size=8)
    text = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=120)
    hf = transformers.LlavaForConditionalGeneration(
        transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN)).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = from_pretrained(tmp_path / "hf")
    assert ours.cfg.lm.qkv_bias and not ours.cfg.lm.o_bias
    save_pretrained(ours, tmp_path / "ours")
    back = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    assert back.config.text_config.model_type == "qwen2"
    ids = torch.tensor([_prompt(1, image_token_count(ours.cfg))])
    pixels = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=pixels).logits
        assert (ours(input_ids=ids, pixel_values=pixels).logits - expected).abs().max().item() <= TOL
        assert torch.equal(back(input_ids=ids, pixel_values=pixels).logits, expected)
