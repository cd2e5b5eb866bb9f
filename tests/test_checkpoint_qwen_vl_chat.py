"""Qwen-VL-Chat checkpoints in their own layout (model_type qwen with a visual dict) against the Hub's remote code.

The oracle is tests/fixtures/qwen_vl_chat/, written by tests/reference/qwen_vl_chat.py running the reference
code (modeling_qwen.py, visual.py, qwen_generation_utils.py, tokenization_qwen.py; transformers 4.32.0) on a
tiny random checkpoint in the original layout: its logits and greedy tokens for a prompt with two photos,
visual.py's preprocessed pixels of seven photos, and make_context's prompt ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from checkpoint_answers import (  # noqa: F401 (the test_* run here, on this module's fixtures)
    check_cli_answer,
    check_inspect_report,
    check_same_json,
    check_same_tensors,
    read_tensors,
    test_cli_answers_with_the_reference_tokens,
    test_serve_answers_with_the_reference_tokens,
    test_twenty_greedy_tokens_match_the_reference,
    two_photo_messages,
    write_checkpoint,
)
from reference.shared import photo  # the photos tests/reference/*.py processed, by name
from safetensors.torch import load_file

import vlmkit.models
from vlmkit.load import load_model
from vlmkit.models.lm import CausalLM
from vlmkit.weights.qwen_vl import config_to_hf as qwen_vl_config_to_hf

FIXTURES = Path(__file__).parent / "fixtures" / "qwen_vl_chat"
TINY = FIXTURES / "tiny"
REPORT = json.loads((FIXTURES / "reference.json").read_text())
QUESTION = "What do the two photos show?"
PROMPT_PHOTOS = REPORT["prompt_photos"]
pytest.importorskip("tiktoken")


def image_spans(ids: list[int], start: int, end: int) -> list[tuple[int, int]]:
    """(first, last + 1) positions strictly between each <img> and its </img>."""
    opens = [i for i, t in enumerate(ids) if t == start]
    closes = [i for i, t in enumerate(ids) if t == end]
    return [(a + 1, b) for a, b in zip(opens, closes)]


def test_loads_into_the_squash_vlm_with_the_fixture_sizes():
    model = vlmkit.models.from_pretrained(TINY)
    cfg = model.cfg
    assert cfg.image_scheme == "squash" and cfg.projector.type == "qwen_resampler256q"
    v = cfg.vision
    assert (v.hidden_size, v.num_layers, v.intermediate_size, v.position_grid, v.image_size) == (16, 2, 32, 16, 448)
    assert (cfg.lm.hidden_size, cfg.lm.intermediate_size, cfg.lm.max_position_embeddings) == (32, 32, 2048)
    assert cfg.image_token_id == REPORT["stop_ids"][0] + 214  # <imgpad>: <|im_end|> + 205 extras + 8 tags + 1
    assert model.vision.pos_embed.shape == (256, 16)  # the 16 x 16 table, resized to 32 x 32 patches


def test_logits_match_the_reference(loaded, reference, two_photos):
    ids = loaded.prompt_ids(two_photo_messages(QUESTION), loaded.plan_images(two_photos))
    inputs = loaded.image_inputs(loaded.plan_images(two_photos))
    with torch.no_grad():
        logits = loaded.model(torch.tensor([ids]), **inputs).logits[0]  # (T, V)
    rows = reference["logit_rows"]
    torch.testing.assert_close(logits[rows], reference["logits"], atol=1e-4, rtol=0)


def test_prompt_ids_match_make_context(loaded, reference, two_photos):
    ids = loaded.prompt_ids(two_photo_messages(QUESTION), loaded.plan_images(two_photos))
    assert ids == REPORT["no_path_ids"]  # make_context of the query with empty image paths
    # with the photos' paths, the reference differs only inside the 256-id image spans (which both overwrite)
    theirs = reference["input_ids"].tolist()
    tok = loaded.tokenizer
    spans = image_spans(theirs, tok.img_start_id, tok.img_end_id)
    assert spans == image_spans(ids, tok.img_start_id, tok.img_end_id) and [b - a for a, b in spans] == [256, 256]
    inside = {i for a, b in spans for i in range(a, b)}
    assert [t for i, t in enumerate(ids) if i not in inside] == [t for i, t in enumerate(theirs) if i not in inside]
    assert tok.decode(theirs) == REPORT["prompt"]
    text = loaded.chat_template.render(two_photo_messages(QUESTION), add_generation_prompt=True)
    assert text == REPORT["prompt"].replace("astronaut.png", "<imgpad>").replace("coffee.png", "<imgpad>")


def test_multi_turn_and_text_only_prompts_match_make_context(loaded, two_photos):
    (q1, a1), (q2, a2) = REPORT["multi_turn"]["history"]
    assert q1 == "Picture 1:<img></img>\nWhat is this?" and q2 == "And the cup?"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": a1},
                {"role": "user", "content": q2},
                {"role": "assistant", "content": a2},
                {"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                             {"type": "text", "text": "And these?"}]}]
    plans = loaded.plan_images([two_photos[0], *two_photos])
    assert loaded.prompt_ids(messages, plans) == REPORT["multi_turn"]["ids"]  # "Picture N" restarts per query
    assert loaded.prompt_ids([{"role": "user", "content": "Hello there"}]) == REPORT["text_only_ids"]


def test_generation_stops_at_im_end_and_endoftext(loaded):
    im_end, _, endoftext = REPORT["stop_ids"]
    assert {im_end, endoftext} <= set(loaded.end_token_ids)
    # seq_length: past it the reference rescales RoPE (dynamic NTK) and the queries (logn); the server refuses more
    assert loaded.context_length == 2048


@pytest.mark.parametrize("name", sorted(REPORT["photos"]))
def test_preprocessed_pixels_match_visual_py(loaded, reference, name):
    image = photo(name)
    want = REPORT["photos"][name]
    assert list(image.size) == want["size"] and image.mode == want["mode"]
    plan = loaded.plan_images([image])[0]
    assert plan.num_tokens == 256 and plan.pixel_values.shape == (1, 3, 448, 448)
    pixels = plan.pixel_values[0]
    torch.testing.assert_close(pixels[:, ::11, ::11], reference[f"sample.{name}"], atol=1e-5, rtol=0)
    assert abs(pixels.double().sum().item() - want["sum"]) < 0.05
    assert abs(pixels.double().abs().sum().item() - want["abs_sum"]) / want["abs_sum"] < 1e-7


def test_text_only_qwen_checkpoint_loads_as_a_causal_lm(tmp_path, reference):
    """The same folder without its visual dict and tensors is a Qwen-1 LM; the reference's text-only logits."""
    config = json.loads((TINY / "config.json").read_text())
    del config["visual"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = {k: v for k, v in load_file(TINY / "model.safetensors").items() if ".visual." not in k}
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "model.safetensors"))
    model = vlmkit.models.from_pretrained(tmp_path)
    assert isinstance(model, CausalLM)
    with torch.no_grad():
        logits = model(torch.tensor([REPORT["text_only_ids"]])).logits[0, -8:]
    torch.testing.assert_close(logits, reference["text_only_logits"], atol=1e-4, rtol=0)
    vlmkit.models.save_pretrained(model, tmp_path / "saved")
    assert sorted(read_tensors(tmp_path / "saved")) == sorted(state)


def test_save_pretrained_writes_the_original_layout(tmp_path):
    model = vlmkit.models.from_pretrained(TINY)
    vlmkit.models.save_pretrained(model, tmp_path)
    check_same_tensors(tmp_path, TINY)
    check_same_json(tmp_path, TINY, {"transformers_version", "initializer_range", "use_flash_attn"})  # unread
    check_same_json(tmp_path, TINY, {"transformers_version"}, "generation_config.json")
    again = vlmkit.models.from_pretrained(tmp_path)
    assert again.cfg == model.cfg


def test_loaded_model_save_keeps_the_tokenizer_and_chat_settings(loaded, tmp_path):
    loaded.save_pretrained(tmp_path)
    assert (tmp_path / "qwen.tiktoken").read_text() == (TINY / "qwen.tiktoken").read_text()
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["chat_format"] == "chatml" and generation["max_window_size"] == 6144  # model.chat reads them
    assert load_model(str(tmp_path)).prompt_ids([{"role": "user", "content": "Hello there"}]) == REPORT["text_only_ids"]


def test_generate_takes_images_written_in_the_prompt(reference, photo_files, answer_text, capsys):
    """Qwen-VL's own way: `Picture N:<img>path</img>` in the text (the reference's query, with these paths)."""
    query = "".join(f"Picture {i}:<img>{path}</img>\n" for i, path in enumerate(photo_files, 1)) + QUESTION
    check_cli_answer("generate", TINY, [], query, capsys, len(reference["input_ids"]), answer_text)


def test_query_parts_render_back_to_the_query(loaded):
    from vlmkit.text.qwen_chat import query_parts

    parts, paths = query_parts(REPORT["query"])
    assert paths == ["astronaut.png", "coffee.png"] and parts[-1] == {"type": "text", "text": QUESTION}
    text = loaded.chat_template.render([{"role": "user", "content": parts}], add_generation_prompt=True)
    assert text == REPORT["prompt"].replace("astronaut.png", "<imgpad>").replace("coffee.png", "<imgpad>")
    with pytest.raises(ValueError, match="image tag without a path"):
        query_parts("Picture 1:<img></img>\nHi")


def test_inspect_reports_qwen_vl_parameters():
    check_inspect_report(FIXTURES / "real", "qwen", 9.6e9)  # the model card's "Qwen-VL 9.6B"


@pytest.mark.parametrize("change, message", [
    ({"no_bias": False}, "no_bias is false"),
    ({"kv_channels": 16}, "kv_channels 16 differs"),
    ({"visual": {"width": None}}, r"visual dict lacks \['width'\]"),
    ({"visual": {"output_dim": 64}}, "output_dim 64 differs from the LM's hidden_size 32"),
    ({"quantization_config": {"bits": 4, "quant_method": "gptq"}}, "holds gptq weights"),  # Qwen-VL-Chat-Int4's
])
def test_a_layout_the_reference_lacks_is_refused(tmp_path, change, message):
    config = json.loads((TINY / "config.json").read_text())
    for key, value in change.items():
        if isinstance(value, dict):
            config[key] = {k: v for k, v in {**config.get(key, {}), **value}.items() if v is not None}
        else:
            config[key] = value
    with pytest.raises(ValueError, match=message):
        vlmkit.models.from_pretrained(write_checkpoint(tmp_path, TINY, config))


def test_a_model_qwen_vl_cannot_hold_is_refused(tmp_path):
    from vlmkit.presets import get_preset

    cfg = get_preset("llava-1.5")
    with pytest.raises(ValueError, match="cannot save this model as model_type 'qwen'"):
        qwen_vl_config_to_hf(cfg)
