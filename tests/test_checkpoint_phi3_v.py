"""Phi-3(.5)-vision checkpoints in their own layout (model_type phi3_v) against the Hub's remote code.

The oracle is tests/fixtures/phi3_v/, written by tests/reference/phi3_v.py running the reference code
(modeling_phi3_v.py, image_processing_phi3_v.py, processing_phi3_v.py; transformers 4.43.0) on a tiny
random checkpoint in the original layout: its logits and greedy tokens for a prompt with two photos, its
processor's views, canvas sizes and token counts on seven photos, and its chat template's prompts.
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
    write_checkpoint,
)
from reference.shared import photo  # the photos tests/reference/*.py processed, by name

import vlmkit.models
from vlmkit.schemes.hd import plan_size_tokens

FIXTURES = Path(__file__).parent / "fixtures" / "phi3_v"
TINY = FIXTURES / "tiny"
REPORT = json.loads((FIXTURES / "reference.json").read_text())
QUESTION = "What do the two photos show?"
PROMPT_PHOTOS = REPORT["prompt_images"]


def reference_ids(reference, image_token_id: int) -> torch.Tensor:
    ids = reference["input_ids"].clone()
    ids[ids < 0] = image_token_id  # the reference marks image k's run with -k
    return ids


def test_loads_into_the_hd_vlm_with_the_fixture_sizes():
    model = vlmkit.models.from_pretrained(TINY)
    cfg = model.cfg
    assert cfg.image_scheme == "hd" and cfg.max_crops == 4  # preprocessor_config.json's num_crops
    assert (cfg.vision.hidden_size, cfg.vision.num_layers, cfg.vision.select_layer) == (16, 3, -2)
    assert cfg.lm.rope_scaling["rope_type"] == "longrope" and cfg.lm.rope_scaling["original_max_position_embeddings"] == 4096
    assert cfg.projector.in_dim == 64 and cfg.projector.out_dim == 32


def test_logits_match_the_reference(loaded, reference, two_photos):
    plans = loaded.plan_images(two_photos)
    inputs = loaded.image_inputs(plans)
    assert inputs["image_sizes"].tolist() == reference["image_sizes"].tolist()
    ids = reference_ids(reference, loaded.image_token_id)
    with torch.no_grad():
        logits = loaded.model(ids[None], **inputs).logits[0]  # (T, V)
    rows = reference["logit_rows"]
    torch.testing.assert_close(logits[rows], reference["logits"], atol=1e-4, rtol=0)


def test_prompt_text_and_ids_match_the_reference(loaded, reference, two_photos):
    text = loaded.chat_template.render(two_photo_messages(QUESTION), add_generation_prompt=True)
    assert text == REPORT["prompt"]
    ids = loaded.prompt_ids(two_photo_messages(QUESTION), loaded.plan_images(two_photos))
    assert ids == reference_ids(reference, loaded.image_token_id).tolist()


def test_multi_turn_and_text_only_prompts_match_the_reference(loaded, two_photos):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": "An astronaut."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]}]
    assert loaded.chat_template.render(messages, add_generation_prompt=True) == REPORT["prompt_multi_turn"]
    want = [loaded.image_token_id if i < 0 else i for i in REPORT["multi_turn_ids"]]
    assert loaded.prompt_ids(messages, loaded.plan_images(two_photos)) == want
    assert loaded.prompt_ids([{"role": "user", "content": "Hello there"}]) == REPORT["text_only_ids"]


@pytest.mark.parametrize("name", sorted(REPORT["photos"]))
def test_processor_views_sizes_and_token_counts(loaded, reference, name):
    image = photo(name)
    want = REPORT["photos"][name]
    assert list(image.size) == want["size"] and image.mode == want["mode"]
    plan = loaded.plan_images([image])[0]
    assert plan.extra["image_size_hw"] == want["image_sizes"]
    assert plan.num_tokens == want["num_img_tokens"]
    views = plan.pixel_values  # (1 + crops, 3, 336, 336): global view first
    torch.testing.assert_close(views[:, :, ::7, ::7], reference[f"sample.{name}"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(views.double().sum(dim=(1, 2, 3)).numpy(), want["view_sums"], atol=0.05, rtol=1e-7)
    np.testing.assert_allclose(views.double().abs().sum(dim=(1, 2, 3)).numpy(), want["view_abs_sums"], rtol=1e-7)
    assert plan_size_tokens(*image.size, 16) == want["num_img_tokens_hd16"]


def test_real_size_token_counts_match_the_reference_processor():
    # HD-N upsamples a small image to fill floor(sqrt(N)) crops a side: 336x336 gives 313 only at N=1
    assert REPORT["real_sizes"]["4"] == {"336x336": 757, "672x672": 757, "1344x1344": 757}
    for n, sizes in REPORT["real_sizes"].items():
        for size, tokens in sizes.items():
            side = int(size.split("x")[0])
            assert plan_size_tokens(side, side, int(n)) == tokens, (n, size)


def test_save_pretrained_writes_the_original_layout(tmp_path):
    model = vlmkit.models.from_pretrained(TINY)
    vlmkit.models.save_pretrained(model, tmp_path)
    check_same_tensors(tmp_path, TINY)
    check_same_json(tmp_path, TINY, {"_name_or_path", "transformers_version", "initializer_range"})  # not read
    check_same_json(tmp_path, TINY, set(), "preprocessor_config.json")
    again = vlmkit.models.from_pretrained(tmp_path)
    assert again.cfg == model.cfg


def test_inspect_reports_phi_35_vision_parameters():
    # the model card's 4.2B; the weights' index: 4,146,621,440
    check_inspect_report(FIXTURES / "real", "phi3_v", 4.15e9)


@pytest.mark.parametrize("change, message", [
    ({"embd_layer": {"hd_transform_order": "glb_sub"}}, "hd_transform_order='glb_sub' is not supported"),
    ({"embd_layer": {"projection_cls": "linear"}}, "projection_cls='linear' is not supported"),
    ({"img_processor": {"type_feature": "cls_patch"}}, "only 'patch' is supported"),
    ({"img_processor": {"image_dim_out": 1024}}, "image_dim_out 1024 differs from the CLIP tower's width 16"),
])
def test_a_layout_the_reference_lacks_is_refused(tmp_path, change, message):
    config = json.loads((TINY / "config.json").read_text())
    for key, values in change.items():
        config[key] = {**config[key], **values}
    with pytest.raises(ValueError, match=message):
        vlmkit.models.from_pretrained(write_checkpoint(tmp_path, TINY, config))


def test_one_pass_tokenization_would_differ_from_the_reference(loaded, reference, two_photos):
    """Phi-3-V's processor tokenizes each text piece with its BOS: the usual one-pass encoding gives other ids."""
    from vlmkit.prompt import build_prompt_ids

    plans = loaded.plan_images(two_photos)
    one_pass = build_prompt_ids(loaded.tokenizer, loaded.chat_template, two_photo_messages(QUESTION),
                                loaded.image_token_id, plans)
    assert one_pass != reference_ids(reference, loaded.image_token_id).tolist()
