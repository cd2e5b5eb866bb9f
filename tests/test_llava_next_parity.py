"""LLaVA-NeXT (anyres) against transformers' LlavaNextForConditionalGeneration on a tiny random config.

A tiny transformers model (CLIP 32 px / patch 8, pinpoints in multiples of 32)
is saved, loaded by vlmkit, and compared on a real photo: the image processor's
pixels, logits (fp32, <= 1e-4) with two images of different shapes, 20 greedy
tokens, the save round trip, and the placeholder-count error.
"""

import matplotlib.cbook
import pytest
import torch
import transformers
from PIL import Image

from vlmkit.generate import GenerationConfig, generate
from vlmkit.weights import from_pretrained, save_pretrained
from vlmkit.models.vlm import VLM
from vlmkit.schemes import image_inputs, plan_image

IMAGE_TOKEN = 100
PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
TOL = 1e-4


def _photo(width: int, height: int) -> Image.Image:
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        return Image.open(f).convert("RGB").resize((width, height))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=32, patch_size=8)
    text = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=120,
                                    bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = transformers.LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                                       image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2,
                                       vision_feature_select_strategy="default")
    hf = transformers.LlavaNextForConditionalGeneration(cfg).eval()
    path = tmp_path_factory.mktemp("llava_next")
    hf.save_pretrained(path)
    return hf, from_pretrained(path)


def _inputs(ours: VLM, sizes, text_len: int = 6, seed: int = 1):
    plans = [plan_image(ours.cfg, _photo(*s)) for s in sizes]
    g = torch.Generator().manual_seed(seed)
    ids = [1]
    for plan in plans:
        ids += torch.randint(3, 90, (2,), generator=g).tolist() + [IMAGE_TOKEN] * plan.num_tokens
    ids += torch.randint(3, 90, (text_len,), generator=g).tolist()
    return torch.tensor([ids]), image_inputs(plans), plans


def test_loaded_config(models):
    _, ours = models
    assert ours.cfg.image_scheme == "anyres"
    assert ours.cfg.grid_pinpoints == tuple(tuple(p) for p in PINPOINTS)
    assert ours.image_newline.shape == (64,)


def test_pixels_equal_the_image_processor(models):
    _, ours = models
    processor = transformers.LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS)
    images = [_photo(90, 40), _photo(30, 100)]
    expected = processor(images=images, return_tensors="pt")
    _, inputs, _ = _inputs(ours, [(90, 40), (30, 100)])
    assert inputs["pixel_values"].shape == expected["pixel_values"].shape
    assert (inputs["pixel_values"] - expected["pixel_values"]).abs().max().item() <= 1e-5
    assert torch.equal(inputs["image_sizes"], expected["image_sizes"])


def test_logits_match_with_two_images(models):
    hf, ours = models
    ids, inputs, plans = _inputs(ours, [(90, 40), (30, 100)])
    assert [p.grid for p in plans] == [(1, 3), (3, 1)]
    with torch.no_grad():
        expected = hf(input_ids=ids, **inputs).logits
        got = ours(input_ids=ids, **inputs).logits
    assert (got - expected).abs().max().item() <= TOL


def test_greedy_generation_ids_match(models):
    hf, ours = models
    ids, inputs, _ = _inputs(ours, [(70, 50)])
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, **inputs, max_new_tokens=20, min_new_tokens=20,
                               do_sample=False)[0, ids.shape[1]:].tolist()
    result = generate(ours, ids, GenerationConfig(max_new_tokens=20), prefill_inputs=inputs)
    assert result.token_ids[0] == expected


def test_save_round_trip_loads_in_transformers(models, tmp_path):
    hf, ours = models
    save_pretrained(ours, tmp_path)
    back = transformers.LlavaNextForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert back.config.image_grid_pinpoints == PINPOINTS
    ids, inputs, _ = _inputs(ours, [(50, 70)])
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids, **inputs).logits, hf(input_ids=ids, **inputs).logits)
    assert from_pretrained(tmp_path).cfg == ours.cfg


def test_placeholder_count_mismatch_names_both_counts(models):
    _, ours = models
    ids, inputs, plans = _inputs(ours, [(90, 40)])
    n = plans[0].num_tokens
    short = torch.cat([ids[:, :3], ids[:, 4:]], dim=1)  # one placeholder fewer
    with pytest.raises(ValueError, match=rf"{n - 1} image placeholder tokens .* give {n} feature tokens"):
        ours(input_ids=short, **inputs)
    with pytest.raises(ValueError, match="needs image_sizes"):
        ours(input_ids=ids, pixel_values=inputs["pixel_values"])
