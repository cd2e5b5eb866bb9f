"""DeepSeek-VL hybrid (SigLIP + SAM-B + Llama) against transformers' DeepseekVLHybridForConditionalGeneration.

A tiny random transformers model (every weight perturbed and the sam_hd alpha set
non-zero, so the global branch counts) is saved, loaded by vlmkit, and compared on a
real photo preprocessed by transformers' DeepseekVLHybridImageProcessorPil: pixels,
logits (fp32, <= 1e-4), 20 greedy tokens, the save round trip and the count errors.
"""

import matplotlib.cbook
import pytest
import torch
import transformers
from PIL import Image

from vlmkit.generate import GenerationConfig, generate
from vlmkit.weights import from_pretrained, save_pretrained
from vlmkit.models.deepseek_vl import DeepseekVL
from vlmkit.schemes.hybrid import deepseek_vl_pixels
from vlmkit.schemes import image_inputs, plan_image

IMAGE_TOKEN = 100
TOL = 1e-4
LOW, HIGH = 64, 128  # SigLIP 4x4 grid of 16-px patches; SAM 8x8 grid, resized to 16, convs to 4x4


def _hf_model():
    torch.manual_seed(0)
    cfg = transformers.DeepseekVLHybridConfig(
        vision_config=dict(model_type="siglip_vision_model", image_size=LOW, patch_size=16, hidden_size=32,
                           intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        high_res_vision_config=dict(model_type="sam_vision_model", image_size=HIGH, patch_size=16,
                                    hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                    window_size=3, global_attn_indexes=[1], output_channels=8),
        text_config=dict(model_type="llama", vocab_size=120, hidden_size=48, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0),
        image_token_id=IMAGE_TOKEN)
    model = transformers.DeepseekVLHybridForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # SAM's tiny init (1e-10) and the zero alpha would hide the high-res branch
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.model.high_res_vision_alpha.fill_(0.8)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = _hf_model()
    path = tmp_path_factory.mktemp("deepseek_vl")
    hf.save_pretrained(path)
    return hf, from_pretrained(path)


def _photos(sizes=((300, 200),)) -> list[Image.Image]:
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        photo = Image.open(f).convert("RGB")
    return [photo.resize(s) for s in sizes]


def _processor():
    return transformers.DeepseekVLHybridImageProcessorPil(size={"height": LOW, "width": LOW},
                                                          high_res_size={"height": HIGH, "width": HIGH})


def _inputs(ours: DeepseekVL, sizes=((300, 200),), text_len: int = 7):
    inputs = deepseek_vl_pixels(ours.cfg, _photos(sizes))
    g = torch.Generator().manual_seed(1)
    ids = [1]
    for _ in sizes:
        ids += torch.randint(3, 90, (2,), generator=g).tolist() + [IMAGE_TOKEN] * ours.cfg.tokens_per_image
    ids += torch.randint(3, 90, (text_len,), generator=g).tolist()
    return torch.tensor([ids]), inputs


def test_loaded_config(models):
    _, ours = models
    assert isinstance(ours, DeepseekVL)
    assert ours.cfg.tokens_per_image == 16  # (64 / 16)^2
    assert ours.cfg.vision_high.resize_to == 16 and ours.cfg.vision_high.downsample_channels == (16, 32)
    assert ours.cfg.lm.tie_word_embeddings  # the top-level default, as transformers ties them


@pytest.mark.parametrize("size", [(300, 200), (120, 260), (90, 90)])
def test_pixels_equal_the_image_processor(models, size):
    _, ours = models
    photo = _photos([size])
    expected = _processor()(images=photo, return_tensors="pt")
    got = deepseek_vl_pixels(ours.cfg, photo)
    for key in ("pixel_values", "high_res_pixel_values"):
        assert got[key].shape == expected[key].shape
        assert (got[key] - expected[key]).abs().max().item() <= 1e-6


def test_logits_match_with_two_images(models):
    hf, ours = models
    ids, inputs = _inputs(ours, ((300, 200), (120, 260)))
    with torch.no_grad():
        expected = hf(input_ids=ids, **inputs).logits
        got = ours(input_ids=ids, **inputs).logits
    assert (got - expected).abs().max().item() <= TOL


def test_high_res_branch_matters(models):
    _, ours = models
    ids, inputs = _inputs(ours)
    with torch.no_grad():
        base = ours(input_ids=ids, **inputs).logits
        flipped = ours(input_ids=ids, pixel_values=inputs["pixel_values"],
                       high_res_pixel_values=inputs["high_res_pixel_values"].flip(-1)).logits
    assert (base - flipped).abs().max().item() > 1e-3


def test_greedy_generation_ids_match(models):
    hf, ours = models
    ids, inputs = _inputs(ours)
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, **inputs, max_new_tokens=20, min_new_tokens=20,
                               do_sample=False)[0, ids.shape[1]:].tolist()
    result = generate(ours, ids, GenerationConfig(max_new_tokens=20), prefill_inputs=inputs)
    assert len(expected) == 20
    assert result.token_ids[0] == expected


def test_save_round_trip_loads_in_transformers(models, tmp_path):
    hf, ours = models
    save_pretrained(ours, tmp_path)
    back = transformers.DeepseekVLHybridForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids, inputs = _inputs(ours)
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids, **inputs).logits, hf(input_ids=ids, **inputs).logits)
    assert from_pretrained(tmp_path).cfg == ours.cfg


def test_placeholder_count_mismatch_names_both_counts(models):
    _, ours = models
    ids, inputs = _inputs(ours)
    short = torch.cat([ids[:, :3], ids[:, 4:]], dim=1)  # one placeholder fewer
    with pytest.raises(ValueError, match=r"15 image placeholder tokens .* give 16 feature tokens"):
        ours(input_ids=short, **inputs)
    with pytest.raises(ValueError, match="both pixel_values"):
        ours(input_ids=ids, pixel_values=inputs["pixel_values"])
    with pytest.raises(ValueError, match="16 image placeholder tokens but no pixel_values"):
        ours(input_ids=ids)


def test_image_plan_feeds_the_same_pixels(models):
    """vlmkit's prompt path (models.vlm.plan_image -> image_inputs) gives the processor's two views and the
    token count the model checks: DeepSeek-VL's plans are of scheme 'hybrid', 16 tokens at this tiny size."""
    hf, ours = models
    photos = _photos(((300, 200), (120, 260)))
    plans = [plan_image(ours.cfg, p) for p in photos]
    assert [(p.scheme, p.num_tokens) for p in plans] == [("hybrid", 16), ("hybrid", 16)]
    got, expected = image_inputs(plans), _processor()(images=photos, return_tensors="pt")
    for key in ("pixel_values", "high_res_pixel_values"):
        assert (got[key] - expected[key]).abs().max().item() <= 1e-6
    ids, _ = _inputs(ours, ((300, 200), (120, 260)))
    with torch.no_grad():
        assert (ours(input_ids=ids, **got).logits - hf(input_ids=ids, **got).logits).abs().max().item() <= TOL
