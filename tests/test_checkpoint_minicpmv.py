"""MiniCPM-V 2.6 checkpoints in their own layout (model_type minicpmv) against the Hub's remote code.

The oracle is tests/fixtures/minicpmv/, written by tests/reference/minicpmv.py running the reference code
(modeling_minicpmv.py, modeling_navit_siglip.py, resampler.py, image_processing_minicpmv.py,
processing_minicpmv.py; transformers 4.40.2) on a tiny random checkpoint in the original layout: its logits
and greedy tokens for a prompt with two photos, its processor's views (in its reshaped patch layout), slice
grids, view patch grids and placeholder token counts on eight photos, and its chat prompts' ids.
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
from vlmkit.weights.minicpmv import reference_pixel_layout

FIXTURES = Path(__file__).parent / "fixtures" / "minicpmv"
TINY = FIXTURES / "tiny"
REPORT = json.loads((FIXTURES / "reference.json").read_text())
QUESTION = REPORT["question"]


def photos() -> dict[str, Image.Image]:
    """The photos of tests/reference/minicpmv.py, made the same way."""
    coffee = skimage.data.coffee()
    return {
        "astronaut": Image.fromarray(skimage.data.astronaut()),
        "chelsea": Image.fromarray(skimage.data.chelsea()),
        "rocket": Image.fromarray(skimage.data.rocket()),
        "camera": Image.fromarray(skimage.data.camera()),
        "hubble": Image.fromarray(skimage.data.hubble_deep_field()),
        "coffee_strip": Image.fromarray(coffee[120:270]),
        "astronaut_tall": Image.fromarray(skimage.data.astronaut()[:, 180:330]),
        "coffee_big": Image.fromarray(coffee).resize((1400, 1050)),
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


def two_photo_messages() -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": QUESTION}]}]


def test_loads_into_the_slices_vlm_with_the_fixture_sizes(loaded):
    cfg = loaded.model.cfg
    assert cfg.image_scheme == "slices" and cfg.max_crops == 9 and cfg.slice_size == 448
    v = cfg.vision
    assert (v.hidden_size, v.num_layers, v.image_size, v.position_buckets, v.feature_post_norm) == (16, 3, 448, True, True)
    assert cfg.projector.type == "minicpmv_resampler64q" and (cfg.projector.in_dim, cfg.projector.out_dim) == (16, 128)
    assert loaded.tokenizer.id_to_token(cfg.image_token_id) == "<unk>"  # the processor's query token
    assert next(loaded.model.parameters()).dtype == torch.float32  # the bf16 file, computed in float32


def test_prompt_ids_match_the_reference(loaded, reference, two_photos):
    assert loaded.chat_template.render(two_photo_messages(), add_generation_prompt=True).replace(
        "<image>", "(<image>./</image>)") == REPORT["prompt"]
    plans = loaded.plan_images(two_photos)
    assert loaded.prompt_ids(two_photo_messages(), plans) == reference["input_ids"].tolist()


def test_multi_turn_and_text_only_prompts_match_the_reference(loaded):
    pics = photos()
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": "An astronaut."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]}]
    plans = loaded.plan_images([pics[n] for n in REPORT["multi_turn_images"]])
    assert loaded.prompt_ids(messages, plans) == REPORT["multi_turn_ids"]
    assert loaded.prompt_ids([{"role": "user", "content": "Hello there"}]) == REPORT["text_only_ids"]


def test_logits_match_the_reference(loaded, reference, two_photos):
    plans = loaded.plan_images(two_photos)
    ids = torch.tensor(loaded.prompt_ids(two_photo_messages(), plans))
    with torch.no_grad():
        logits = loaded.model(ids[None], **loaded.image_inputs(plans)).logits[0]  # (T, V)
    torch.testing.assert_close(logits[reference["logit_rows"]], reference["logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits[-1], reference["last_logits"], atol=1e-4, rtol=0)


def test_twenty_greedy_tokens_match_the_reference(loaded, reference, two_photos):
    plans = loaded.plan_images(two_photos)
    ids = loaded.prompt_ids(two_photo_messages(), plans)
    result = generate(loaded.model, [ids], GenerationConfig(max_new_tokens=20),
                      prefill_inputs=loaded.image_inputs(plans))  # no tokenizer: no stop ids, as the reference ran
    assert result.token_ids[0] == reference["greedy_ids"].tolist()


@pytest.mark.parametrize("name", sorted(REPORT["photos"]))
def test_processor_views_grids_and_token_counts(loaded, reference, name):
    image = photos()[name]
    want = REPORT["photos"][name]
    assert list(image.size) == want["size"] and image.mode == want["mode"]
    plan = loaded.plan_images([image])[0]
    rows, cols = plan.grid
    assert ([cols, rows] if rows else None) == want["grid_cols_rows"]  # the reference's grid is [x, y]
    assert [list(t) for t in plan.extra["tgt_sizes"]] == want["tgt_sizes"]
    assert plan.num_tokens == want["query_tokens"]
    text = loaded.model.scheme.image_text(plan, 0, "<unk>")
    assert len(loaded.tokenizer.encode(text)) == want["placeholder_tokens"]
    sums, abs_sums = [], []
    for k, (w, h) in enumerate(plan.extra["view_sizes"]):
        view = reference_pixel_layout(plan.pixel_values[k, :, :h, :w])  # (3, 14, L * 14)
        torch.testing.assert_close(view[:, ::5, ::97], reference[f"sample.{name}.{k}"], atol=1e-5, rtol=0)
        sums.append(view.double().sum().item())
        abs_sums.append(view.double().abs().sum().item())
    np.testing.assert_allclose(sums, want["view_sums"], atol=0.05, rtol=1e-6)
    np.testing.assert_allclose(abs_sums, want["view_abs_sums"], rtol=1e-6)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)


def test_save_pretrained_writes_the_original_layout(tmp_path):
    loaded = load_model(str(TINY))
    loaded.save_pretrained(tmp_path)  # with the tokenizer files, where the image token and terminators are
    model = loaded.model
    saved, original = _tensors(tmp_path), _tensors(TINY)
    assert sorted(saved) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(saved[name], tensor.float()), name  # read into float32, written as such
    config, want = (json.loads((d / "config.json").read_text()) for d in (tmp_path, TINY))
    bookkeeping = {"transformers_version", "torch_dtype", "sliding_window"}  # not read by the model
    assert set(want) - bookkeeping <= set(config)
    for key in set(want) - bookkeeping:
        if key == "vision_config":
            assert want[key].items() <= config[key].items(), key
        else:
            assert config[key] == want[key], key
    pre, want_pre = (json.loads((d / "preprocessor_config.json").read_text()) for d in (tmp_path, TINY))
    assert {k: pre[k] for k in want_pre} == want_pre
    again = load_model(str(tmp_path))
    assert again.model.cfg == model.cfg and again.end_token_ids == loaded.end_token_ids


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


def test_stops_at_im_end_and_endoftext(loaded):
    stops = {loaded.tokenizer.id_to_token(i) for i in loaded.end_token_ids}
    assert {"<|im_end|>", "<|endoftext|>"} <= stops  # MiniCPMV.terminators


def test_inspect_reports_minicpm_v_26_parameters():
    report = describe_model(str(FIXTURES / "real"))
    assert report.model_type == "minicpmv"
    assert report.loader is None and "no safetensors" in report.problem  # a config without weights
    assert abs(report.parameters - 8.1e9) / 8.1e9 < 0.02  # the model card's 8B (SigLIP-400M + Qwen2-7B)
    assert report.memory["bfloat16"] == 2 * report.parameters


@pytest.mark.parametrize("change, message", [
    ({"slice_mode": False}, "slice_mode false"),
    ({"use_image_id": False}, "use_image_id false"),
    ({"vision_config": {"model_type": "clip_vision_model"}}, "only SigLIP"),
])
def test_a_layout_vlmkit_lacks_is_refused(tmp_path, change, message):
    config = json.loads((TINY / "config.json").read_text())
    for key, value in change.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    (tmp_path / "config.json").write_text(json.dumps(config))
    for name in ("model.safetensors", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((TINY / name).read_bytes())
    with pytest.raises(ValueError, match=message):
        vlmkit.models.from_pretrained(tmp_path)


def test_training_labels_use_the_reference_prompt(loaded, reference, two_photos):
    """A conversation to train on starts with the reference's prompt ids (wrappers included) and only the
    reply and its <|im_end|> are labelled."""
    from vlmkit.data.labels import build_training_example
    from vlmkit.models.lm import IGNORE_INDEX

    messages = [*two_photo_messages(), {"role": "assistant", "content": "A cat."}]
    example = build_training_example(loaded.tokenizer, loaded.chat_template, messages, loaded.image_token_id,
                                     loaded.plan_images(two_photos), **loaded.image_text_hooks)
    prompt = reference["input_ids"].tolist()
    assert example.input_ids[:len(prompt)] == prompt
    labelled = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    assert loaded.tokenizer.decode(labelled) == "A cat.<|im_end|>"


def test_the_minicpm_v_preset_is_the_released_architecture():
    from vlmkit.presets import count_parameters, get_preset
    from vlmkit.weights.minicpmv import config_from_hf, read_config

    real = config_from_hf(read_config(FIXTURES / "real", json.loads((FIXTURES / "real" / "config.json").read_text())))
    preset = get_preset("minicpm-v")
    assert (preset.vision, preset.projector, preset.image_scheme, preset.max_crops, preset.slice_size,
            preset.image_token_id) == (real.vision, real.projector, "slices", 9, 448, 128244)
    lm_fields = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "rope_theta", "qkv_bias", "tie_word_embeddings")
    assert all(getattr(preset.lm, f) == getattr(real.lm, f) for f in lm_fields)
    assert count_parameters(preset) == 8_099_175_152  # `vlmkit presets`: 8099.18M, the model card's 8B
