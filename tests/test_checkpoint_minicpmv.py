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
from vlmkit.load import load_model
from vlmkit.weights.minicpmv import reference_pixel_layout

FIXTURES = Path(__file__).parent / "fixtures" / "minicpmv"
TINY = FIXTURES / "tiny"
REPORT = json.loads((FIXTURES / "reference.json").read_text())
QUESTION = REPORT["question"]
PROMPT_PHOTOS = REPORT["prompt_images"]


def test_loads_into_the_slices_vlm_with_the_fixture_sizes(loaded):
    cfg = loaded.model.cfg
    assert cfg.image_scheme == "slices" and cfg.max_crops == 9 and cfg.slice_size == 448
    v = cfg.vision
    assert (v.hidden_size, v.num_layers, v.image_size, v.position_buckets, v.feature_post_norm) == (16, 3, 448, True, True)
    assert cfg.projector.type == "minicpmv_resampler64q" and (cfg.projector.in_dim, cfg.projector.out_dim) == (16, 128)
    assert loaded.tokenizer.id_to_token(cfg.image_token_id) == "<unk>"  # the processor's query token
    assert next(loaded.model.parameters()).dtype == torch.float32  # the bf16 file, computed in float32


def test_prompt_ids_match_the_reference(loaded, reference, two_photos):
    assert loaded.chat_template.render(two_photo_messages(QUESTION), add_generation_prompt=True).replace(
        "<image>", "(<image>./</image>)") == REPORT["prompt"]
    plans = loaded.plan_images(two_photos)
    assert loaded.prompt_ids(two_photo_messages(QUESTION), plans) == reference["input_ids"].tolist()


def test_multi_turn_and_text_only_prompts_match_the_reference(loaded):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": "An astronaut."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]}]
    plans = loaded.plan_images([photo(n) for n in REPORT["multi_turn_images"]])
    assert loaded.prompt_ids(messages, plans) == REPORT["multi_turn_ids"]
    assert loaded.prompt_ids([{"role": "user", "content": "Hello there"}]) == REPORT["text_only_ids"]


def test_logits_match_the_reference(loaded, reference, two_photos):
    plans = loaded.plan_images(two_photos)
    ids = torch.tensor(loaded.prompt_ids(two_photo_messages(QUESTION), plans))
    with torch.no_grad():
        logits = loaded.model(ids[None], **loaded.image_inputs(plans)).logits[0]  # (T, V)
    torch.testing.assert_close(logits[reference["logit_rows"]], reference["logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits[-1], reference["last_logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(REPORT["photos"]))
def test_processor_views_grids_and_token_counts(loaded, reference, name):
    image = photo(name)
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


def test_save_pretrained_writes_the_original_layout(tmp_path):
    loaded = load_model(str(TINY))
    loaded.save_pretrained(tmp_path)  # with the tokenizer files, where the image token and terminators are
    model = loaded.model
    check_same_tensors(tmp_path, TINY, torch.float32)  # read into float32, written as such
    bookkeeping = {"transformers_version", "torch_dtype", "sliding_window"}  # not read by the model
    config = check_same_json(tmp_path, TINY, bookkeeping | {"vision_config"})
    assert json.loads((TINY / "config.json").read_text())["vision_config"].items() <= config["vision_config"].items()
    check_same_json(tmp_path, TINY, set(), "preprocessor_config.json")
    again = load_model(str(tmp_path))
    assert again.model.cfg == model.cfg and again.end_token_ids == loaded.end_token_ids


def test_stops_at_im_end_and_endoftext(loaded):
    stops = {loaded.tokenizer.id_to_token(i) for i in loaded.end_token_ids}
    assert {"<|im_end|>", "<|endoftext|>"} <= stops  # MiniCPMV.terminators


def test_inspect_reports_minicpm_v_26_parameters():
    check_inspect_report(FIXTURES / "real", "minicpmv", 8.1e9)  # the model card's 8B (SigLIP-400M + Qwen2-7B)


@pytest.mark.parametrize("change, message", [
    ({"slice_mode": False}, "slice_mode false"),
    ({"use_image_id": False}, "use_image_id false"),
    ({"vision_config": {"model_type": "clip_vision_model"}}, "only SigLIP"),
])
def test_a_layout_vlmkit_lacks_is_refused(tmp_path, change, message):
    config = json.loads((TINY / "config.json").read_text())
    for key, value in change.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    files = ("model.safetensors", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json")
    with pytest.raises(ValueError, match=message):
        vlmkit.models.from_pretrained(write_checkpoint(tmp_path, TINY, config, files))


def test_training_labels_use_the_reference_prompt(loaded, reference, two_photos):
    """A conversation to train on starts with the reference's prompt ids (wrappers included) and only the
    reply and its <|im_end|> are labelled."""
    from vlmkit.data.labels import build_training_example
    from vlmkit.models.lm import IGNORE_INDEX

    messages = [*two_photo_messages(QUESTION), {"role": "assistant", "content": "A cat."}]
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
