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
import skimage.data
import torch
from checkpoint_answers import check_cli_answer, check_serve_answer, greedy_answer_text, save_photos
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import vlmkit.models
from vlmkit.describe import describe_model
from vlmkit.generate import generate
from vlmkit.load import load_model
from vlmkit.sampling import GenerationConfig
from vlmkit.schemes.hd import plan_size_tokens

FIXTURES = Path(__file__).parent / "fixtures" / "phi3_v"
TINY = FIXTURES / "tiny"
REPORT = json.loads((FIXTURES / "reference.json").read_text())
QUESTION = "What do the two photos show?"


def photos() -> dict[str, Image.Image]:
    """The photos of tests/reference/phi3_v.py, made the same way."""
    coffee = skimage.data.coffee()
    return {
        "astronaut": Image.fromarray(skimage.data.astronaut()),
        "chelsea": Image.fromarray(skimage.data.chelsea()),
        "rocket": Image.fromarray(skimage.data.rocket()),
        "camera": Image.fromarray(skimage.data.camera()),
        "hubble": Image.fromarray(skimage.data.hubble_deep_field()),
        "coffee_strip": Image.fromarray(coffee[120:270]),
        "astronaut_tall": Image.fromarray(skimage.data.astronaut()[:, 180:330]),
    }


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "reference.safetensors")


@pytest.fixture(scope="module")
def loaded():
    return load_model(str(TINY))


@pytest.fixture(scope="module")
def two_photos() -> list[Image.Image]:
    pics = photos()
    return [pics[name] for name in REPORT["prompt_images"]]


def two_photo_messages(n: int = 2) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * n + [{"type": "text", "text": QUESTION}]}]


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


def test_twenty_greedy_tokens_match_the_reference(loaded, reference, two_photos):
    plans = loaded.plan_images(two_photos)
    ids = loaded.prompt_ids(two_photo_messages(), plans)
    result = generate(loaded.model, [ids], GenerationConfig(max_new_tokens=20),
                      prefill_inputs=loaded.image_inputs(plans))  # no tokenizer: no stop ids, as the reference ran
    assert result.token_ids[0] == reference["greedy_ids"].tolist()


def test_prompt_text_and_ids_match_the_reference(loaded, reference, two_photos):
    text = loaded.chat_template.render(two_photo_messages(), add_generation_prompt=True)
    assert text == REPORT["prompt"]
    plans = loaded.plan_images(two_photos)
    assert loaded.prompt_ids(two_photo_messages(), plans) == reference_ids(reference, loaded.image_token_id).tolist()


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
    image = photos()[name]
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


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)


def test_save_pretrained_writes_the_original_layout(tmp_path):
    model = vlmkit.models.from_pretrained(TINY)
    vlmkit.models.save_pretrained(model, tmp_path)
    saved, original = _tensors(tmp_path), _tensors(TINY)
    assert sorted(saved) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(saved[name], tensor), name
    config, want = (json.loads((d / "config.json").read_text()) for d in (tmp_path, TINY))
    bookkeeping = {"_name_or_path", "transformers_version", "initializer_range"}  # not read by the model
    assert set(want) - bookkeeping <= set(config)
    for key in set(want) - bookkeeping:
        assert config[key] == want[key], key
    pre, want_pre = (json.loads((d / "preprocessor_config.json").read_text()) for d in (tmp_path, TINY))
    assert {k: pre[k] for k in want_pre} == want_pre
    again = vlmkit.models.from_pretrained(tmp_path)
    assert again.cfg == model.cfg


@pytest.fixture(scope="module")
def answer_text(loaded, reference, two_photos) -> str:
    return greedy_answer_text(loaded, two_photo_messages(), two_photos, reference["greedy_ids"].tolist())


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory, two_photos) -> list[str]:
    return save_photos(tmp_path_factory.mktemp("photos"), two_photos)


@pytest.mark.parametrize("verb", ["generate", "chat"])
def test_cli_answers_with_the_reference_tokens(reference, photo_files, answer_text, verb, capsys):
    check_cli_answer(verb, TINY, photo_files, QUESTION, capsys, len(reference["input_ids"]), answer_text)


def test_serve_answers_with_the_reference_tokens(loaded, reference, two_photos, answer_text):
    check_serve_answer(loaded, two_photos, QUESTION, len(reference["input_ids"]), answer_text)


def test_inspect_reports_phi_35_vision_parameters():
    report = describe_model(str(FIXTURES / "real"))
    assert report.model_type == "phi3_v"
    assert report.loader is None and "no safetensors" in report.problem  # a config without weights
    assert abs(report.parameters - 4.15e9) / 4.15e9 < 0.02  # the model card's 4.2B; the weights' index: 4,146,621,440
    assert report.memory["bfloat16"] == 2 * report.parameters


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
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((TINY / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=message):
        vlmkit.models.from_pretrained(tmp_path)


def test_one_pass_tokenization_would_differ_from_the_reference(loaded, reference, two_photos):
    """Phi-3-V's processor tokenizes each text piece with its BOS: the usual one-pass encoding gives other ids."""
    from vlmkit.prompt import build_prompt_ids

    plans = loaded.plan_images(two_photos)
    one_pass = build_prompt_ids(loaded.tokenizer, loaded.chat_template, two_photo_messages(), loaded.image_token_id,
                                plans)
    assert one_pass != reference_ids(reference, loaded.image_token_id).tolist()
