"""Vary checkpoints in their own layout (model_type vary) against Vary's own code.

The oracle is tests/fixtures/vary/, written by tests/reference/vary.py running the reference code (GitHub
Ucas-HaoranWei/Vary-toy's vary_toy_qwen1_8.py, sam.py, the Qwen-1 LM, tokenization_qwen.py, conversation.py,
its CLIPImageProcessor and both SAM processors; transformers 4.32.1) on a tiny random checkpoint in the
original layout: its logits and greedy tokens for a prompt with two photos, its processors' views of seven
photos, and its conversation template's prompt ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoint_answers import (  # noqa: F401 (the test_* run here, on this module's fixtures)
    check_inspect_report,
    check_same_json,
    check_same_tensors,
    test_cli_answers_with_the_reference_tokens,
    test_serve_answers_with_the_reference_tokens,
    test_twenty_greedy_tokens_match_the_reference,
    two_photo_messages,
)
from reference.shared import photo  # the photos tests/reference/*.py processed, by name
from safetensors.torch import load_file

import vlmkit.models
from vlmkit.config import IMAGENET_MEAN, IMAGENET_STD
from vlmkit.describe import describe_model
from vlmkit.generate import generate
from vlmkit.load import load_model
from vlmkit.sampling import GenerationConfig
from vlmkit.schemes.dual import sam_view

FIXTURES = Path(__file__).parent / "fixtures" / "vary"
TINY = FIXTURES / "tiny"
REPORT = json.loads((FIXTURES / "reference.json").read_text())
QUESTION = REPORT["question"]
PROMPT_PHOTOS = REPORT["prompt_images"]  # among the photos of tests/reference/phi3_v.py


def test_loads_into_the_dual_vlm_with_the_fixture_sizes():
    cfg = vlmkit.models.from_pretrained(TINY).cfg
    assert cfg.image_scheme == "dual" and cfg.image_token_id == REPORT["special_ids"]["<imgpad>"]
    assert (cfg.vision.hidden_size, cfg.vision.num_layers, cfg.vision.select_layer, cfg.vision.image_size) == \
        (16, 3, -2, 224)
    high = cfg.vision_high
    assert (high.hidden_size, high.num_layers, high.downsample, high.tokens_per_image, high.resize) == \
        (8, 2, "vary", 256, "bicubic")
    assert (cfg.projector.out_dim, cfg.projector_high.out_dim, cfg.lm.hidden_size) == (16, 16, 32)


def test_logits_match_the_reference(loaded, reference, two_photos):
    inputs = loaded.image_inputs(loaded.plan_images(two_photos))
    with torch.no_grad():
        logits = loaded.model(reference["input_ids"][None], **inputs).logits[0]  # (T, V)
    torch.testing.assert_close(logits[reference["logit_rows"]], reference["logits"], atol=1e-4, rtol=0)


def test_images_change_the_logits(loaded, reference, two_photos):
    """The oracle would not see a model that ignored the pictures: swapping them changes the logits."""
    inputs = loaded.image_inputs(loaded.plan_images(two_photos[::-1]))
    with torch.no_grad():
        logits = loaded.model(reference["input_ids"][None], **inputs).logits[0]
    assert (logits[reference["logit_rows"]] - reference["logits"]).abs().max() > 1e-3


def test_prompt_text_and_ids_match_the_reference(loaded, reference, two_photos):
    messages = two_photo_messages(QUESTION)
    text = loaded.chat_template.render(messages, add_generation_prompt=True)
    assert text.replace("<imgpad>", "<imgpad>" * 256) == REPORT["prompt"]
    assert loaded.prompt_ids(messages, loaded.plan_images(two_photos)) == reference["input_ids"].tolist()


def test_multi_turn_and_text_only_prompts_match_the_reference(loaded, two_photos):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": "An astronaut."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]}]
    assert loaded.prompt_ids(messages, loaded.plan_images(two_photos)) == REPORT["multi_turn_ids"]
    assert loaded.prompt_ids([{"role": "user", "content": "Hello there"}]) == REPORT["text_only_ids"]
    ids = REPORT["special_ids"]
    assert set(loaded.end_token_ids) == {ids["<|im_end|>"], ids["<|endoftext|>"]}  # conv "mpt"'s stop, Qwen's eos


@pytest.mark.parametrize("name", sorted(REPORT["photos"]))
def test_processors_match_the_reference(loaded, reference, name):
    image = photo(name)
    want = REPORT["photos"][name]
    assert list(image.size) == want["size"] and image.mode == want["mode"]
    plan = loaded.plan_images([image])[0]
    assert plan.num_tokens == 256 and plan.context_tokens == 258
    clip, blip = plan.pixel_values[0], plan.extra["pixel_values_high"][0]  # (3, 224, 224), (3, 1024, 1024)
    torch.testing.assert_close(clip[:, 3::14, 3::14], reference[f"clip.{name}"], atol=1e-5, rtol=0)
    torch.testing.assert_close(blip[:, 5::64, 5::64], reference[f"blip.{name}"], atol=1e-5, rtol=0)
    for view, key in ((clip, "clip"), (blip, "blip")):
        np.testing.assert_allclose(view.double().sum().item(), want[f"{key}_sum"], atol=0.5, rtol=1e-6)
        np.testing.assert_allclose(view.double().abs().sum().item(), want[f"{key}_abs_sum"], rtol=1e-6)


@pytest.mark.parametrize("name", sorted(REPORT["photos"]))
def test_vary_base_sam_processor_matches_albumentations(reference, name):
    """Vary-base's demo feeds the SAM branch plug/transforms.test_transform (cv2 bilinear, ImageNet mean/std)."""
    pytest.importorskip("cv2")
    view = sam_view(photo(name), 1024, IMAGENET_MEAN, IMAGENET_STD, "cv2_linear")  # (3, 1024, 1024)
    torch.testing.assert_close(view[:, 5::64, 5::64], reference[f"test_transform.{name}"], atol=1e-5, rtol=0)
    want = REPORT["photos"][name]
    np.testing.assert_allclose(view.double().abs().sum().item(), want["test_transform_abs_sum"], rtol=1e-6)


def test_save_pretrained_writes_the_original_layout(tmp_path):
    model = vlmkit.models.from_pretrained(TINY)
    vlmkit.models.save_pretrained(model, tmp_path)
    check_same_tensors(tmp_path, TINY)
    unread = {"initializer_range", "use_flash_attn", "torch_dtype", "vision_tower"}  # not read by the model code
    precision = {"bf16", "fp16", "fp32"}  # a save names the tensors' dtype (weights/qwen1.py)
    config = check_same_json(tmp_path, TINY, unread | precision)
    assert (config["fp32"], config["bf16"], config["fp16"]) == (True, False, False)
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation == json.loads((TINY / "generation_config.json").read_text())
    again = vlmkit.models.from_pretrained(tmp_path)
    assert again.cfg == model.cfg


def test_a_model_vary_cannot_hold_is_refused(tmp_path):
    model = vlmkit.models.from_pretrained(TINY)
    model.cfg.vision_high.resize = "cv2_linear"  # cv2 resize with CLIP's mean: neither of Vary's processors
    with pytest.raises(ValueError, match="neither of Vary's processors"):
        vlmkit.models.save_pretrained(model, tmp_path)


# Published sizes of Vary-base's parts (no Vary-base checkpoint or card gives a total): Qwen-7B's weights
# (its safetensors index: 15,442,649,088 bytes of bfloat16), CLIP-L/14-224's vision_model, SAM ViT-B's image
# encoder (89.67M), Vary's net_2 / net_3 (3x3 convs 256 -> 512 -> 1024, no bias) and two Linear(1024, 2048).
VARY_BASE_PARTS = {"qwen_7b": 15_442_649_088 // 2, "clip_l_224": 303_179_776, "sam_b": 89_670_912,
                   "net_2_3": 9 * (256 * 512 + 512 * 1024), "projectors": 2 * (1024 * 2048 + 2048)}


def test_inspect_reports_vary_base_parameters():
    check_inspect_report(FIXTURES / "real", "vary", sum(VARY_BASE_PARTS.values()))


def test_inspect_reports_vary_toy_parameters():
    """Vary-toy (real_toy/config.json: Qwen-1.8B's sizes, the Vary-toy paper's "1.8B" language model): the LM by
    hand from Qwen-1.8B's config (embedding and head, per layer c_attn with bias, c_proj, w1 / w2 / c_proj at
    11008 / 2 = 5504, two norms; ln_f) plus the Vary-base vision parts with Vary-toy's Linear(1024, 1024) twice."""
    hidden, vocab, layers, ff = 2048, 151936, 24, 5504
    qwen_1_8b = 2 * vocab * hidden + layers * (hidden * 3 * hidden + 3 * hidden + hidden * hidden
                                               + 3 * hidden * ff + 2 * hidden) + hidden
    want = qwen_1_8b + sum(VARY_BASE_PARTS[k] for k in ("clip_l_224", "sam_b", "net_2_3")) + 2 * (1024 * 1024 + 1024)
    report = describe_model(str(FIXTURES / "real_toy"))
    assert report.model_type == "vary" and report.parameters == want


@pytest.mark.parametrize("folder, resize, mean", [("real", "cv2_linear", IMAGENET_MEAN), ("real_toy", "bicubic", None)])
def test_the_sam_processor_follows_the_code_that_fits_the_checkpoint(folder, resize, mean):
    """Qwen-7B's width is vary_qwen_vary.py's (test_transform), Qwen-1.8B's vary_toy_qwen1_8.py's (Blip, CLIP mean)."""
    from vlmkit.config import CLIP_MEAN
    from vlmkit.weights.vary import config_from_hf

    cfg = config_from_hf(json.loads((FIXTURES / folder / "config.json").read_text()))
    assert (cfg.vision_high.resize, cfg.vision_high.image_mean) == (resize, mean or CLIP_MEAN)
    assert cfg.vision.select_layer == -2 and cfg.image_token_id == 151859


def test_text_only_logits_match_the_reference(loaded, reference):
    ids = loaded.prompt_ids([{"role": "user", "content": "Hello there"}])
    with torch.no_grad():
        logits = loaded.model(torch.tensor([ids])).logits[0, -8:]
    torch.testing.assert_close(logits, reference["text_only_logits"], atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def loaded_base(tmp_path_factory):
    """The tiny checkpoint as Vary-base's code reads it: config.json naming its SAM processor (test_transform)."""
    pytest.importorskip("cv2")
    folder = tmp_path_factory.mktemp("vary-base")
    for file in TINY.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads((TINY / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "image_processor_high": "test_transform"}))
    return load_model(str(folder))


@pytest.fixture(scope="module")
def reference_base() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "reference_base.safetensors")


def test_vary_base_code_path_matches_the_reference(loaded_base, reference_base, two_photos):
    """vary_qwen_vary.py with its demo's prompt (no newline after </img>) and test_transform SAM views: prompt
    ids, logits and 20 greedy tokens (the reference decodes with its KV cache, as its generate does)."""
    assert loaded_base.chat_template.name == "vary_base"
    plans = loaded_base.plan_images(two_photos)
    ids = loaded_base.prompt_ids(two_photo_messages(QUESTION), plans)
    assert ids == reference_base["input_ids"].tolist()
    inputs = loaded_base.image_inputs(plans)
    with torch.no_grad():
        logits = loaded_base.model(torch.tensor([ids]), **inputs).logits[0]
    torch.testing.assert_close(logits[reference_base["logit_rows"]], reference_base["logits"], atol=1e-4, rtol=0)
    result = generate(loaded_base.model, [ids], GenerationConfig(max_new_tokens=20), prefill_inputs=inputs)
    assert result.token_ids[0] == reference_base["greedy_ids"].tolist()
