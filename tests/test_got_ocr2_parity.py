"""GOT-OCR2 (Vary's successor: SAM ViTDet + Vary's convs + Linear + Qwen2) against transformers'
GotOcr2ForConditionalGeneration, loaded as a Vary-tiny-style vlmkit VLM (image_scheme 'sam').

A tiny random transformers model (every weight perturbed: SAM's 1e-10 init and zero relative
positions would hide the vision branch) is saved and loaded by vlmkit.models.from_pretrained. A real
photo (skimage's astronaut, cropped non-square so the aspect-ratio-ignoring resize shows) goes through
transformers' GotOcr2ImageProcessorPil; vlmkit's `sam` plan must give the same pixels, and with them
the same logits (fp32, <= 1e-4) and the same 20 greedy tokens. The save goes back to transformers.
"""

import numpy as np
import pytest
import skimage.data
import torch
import transformers
from PIL import Image

from vlmkit.generate import GenerationConfig, generate
from vlmkit.weights import from_pretrained, save_pretrained
from vlmkit.models.vlm import VLM
from vlmkit.schemes import image_inputs, plan_image
from vlmkit.presets import get_preset

IMAGE_TOKEN, IMG_START, IMG_END = 500, 501, 502
SIZE, CHANNELS, WIDTH = 256, 16, 64  # 16x16 patches (windows of 6, padded to 18) -> convs -> 4x4 = 16 tokens
TOL = 1e-4


def _hf_model() -> transformers.GotOcr2ForConditionalGeneration:
    torch.manual_seed(0)
    cfg = transformers.GotOcr2Config(
        vision_config=dict(hidden_size=32, output_channels=CHANNELS, num_hidden_layers=3, num_attention_heads=2,
                           image_size=SIZE, patch_size=16, window_size=6, global_attn_indexes=[1], mlp_dim=64),
        text_config=dict(model_type="qwen2", vocab_size=512, hidden_size=WIDTH, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512),
        image_token_index=IMAGE_TOKEN, image_seq_length=16)
    model = transformers.GotOcr2ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = _hf_model()
    path = tmp_path_factory.mktemp("got_ocr2")
    hf.save_pretrained(path)
    return hf, from_pretrained(path)


def _photos() -> list[Image.Image]:
    astronaut = skimage.data.astronaut()  # (512, 512, 3) uint8
    return [Image.fromarray(np.ascontiguousarray(astronaut[40:440, 60:360])),  # 300 x 400, portrait
            Image.fromarray(np.ascontiguousarray(astronaut[100:300]))]  # 512 x 200, landscape


def _processor_pixels(photos: list[Image.Image]) -> torch.Tensor:
    processor = transformers.GotOcr2ImageProcessorPil(size={"height": SIZE, "width": SIZE})
    return processor(images=photos, return_tensors="pt")["pixel_values"]  # (N, 3, SIZE, SIZE)


def _ids(num_images: int, text_len: int = 7) -> torch.Tensor:
    """GOT's prompt shape: text, then per image <img> + 16 x <imgpad> + </img>, then text."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 400, (3,), generator=g).tolist()
    for _ in range(num_images):
        ids += [IMG_START] + [IMAGE_TOKEN] * 16 + [IMG_END] + torch.randint(3, 400, (2,), generator=g).tolist()
    return torch.tensor([ids + torch.randint(3, 400, (text_len,), generator=g).tolist()])


def test_loaded_config_is_vary_tiny_shaped(models):
    hf, ours = models
    assert isinstance(ours, VLM) and ours.cfg.image_scheme == "sam" and ours.cfg.vision is None
    high = ours.cfg.vision_high
    assert (high.downsample, high.downsample_channels) == ("vary", (2 * CHANNELS, WIDTH))  # conv_upsampler1, 2
    assert high.tokens_per_image == 16
    p = ours.cfg.projector
    assert (p.type, p.in_dim, p.out_dim, p.bias) == ("linear", WIDTH, WIDTH, True)  # multimodal_projector
    assert hf.lm_head.weight is hf.model.language_model.embed_tokens.weight  # the top-level tie ...
    assert ours.lm.lm_head.weight is ours.lm.embed.weight  # ... is kept


def test_sam_plan_pixels_equal_the_image_processor(models):
    _, ours = models
    photos = _photos()
    plans = [plan_image(ours.cfg, photo) for photo in photos]
    assert [(p.scheme, p.num_tokens, p.context_tokens) for p in plans] == [("sam", 16, 18)] * 2
    got, expected = image_inputs(plans)["pixel_values"], _processor_pixels(photos)
    assert got.shape == expected.shape == (2, 3, SIZE, SIZE)
    assert (got - expected).abs().max().item() <= 1e-6


def test_logits_match_with_two_images(models):
    hf, ours = models
    ids, pixels = _ids(2), _processor_pixels(_photos())
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=pixels).logits
        got = ours(input_ids=ids, pixel_values=pixels).logits
        flipped = ours(input_ids=ids, pixel_values=pixels.flip(-1)).logits
    assert (got - expected).abs().max().item() <= TOL
    assert (got - flipped).abs().max().item() > 1e-2  # the image reaches the logits


def test_greedy_generation_ids_match(models):
    hf, ours = models
    ids, pixels = _ids(1), _processor_pixels(_photos()[:1])
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=20, min_new_tokens=20,
                               do_sample=False)[0, ids.shape[1]:].tolist()
    result = generate(ours, ids, GenerationConfig(max_new_tokens=20), prefill_inputs={"pixel_values": pixels})
    assert len(expected) == 20
    assert result.token_ids[0] == expected


def test_save_round_trip_loads_in_transformers(models, tmp_path):
    hf, ours = models
    save_pretrained(ours, tmp_path)
    back = transformers.GotOcr2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids, pixels = _ids(1), _processor_pixels(_photos()[:1])
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids, pixel_values=pixels).logits,
                           hf(input_ids=ids, pixel_values=pixels).logits)
    assert from_pretrained(tmp_path).cfg == ours.cfg


def test_vary_tiny_does_not_save_as_got_ocr2(tmp_path):
    """Vary-tiny's convs end at 1024 (here 32) channels and its Linear maps them to the LM width: GOT-OCR2's
    conv_upsampler2 must give the LM width itself, so the save refuses and says why."""
    model = VLM(get_preset("vary-tiny-small"))
    with pytest.raises(ValueError, match=r"Vary's convs 16 -> 32 -> 64 \(got 'vary', \(16, 32\)\).*"
                                         r"Linear 64 -> 64 \(got 'linear' 32 -> 64"):
        save_pretrained(model, tmp_path, model_type="got_ocr2")
