"""DeepSeek-VL2 checkpoints in their own layout (`deepseek_vl_v2`), against DeepSeek's code.

The oracle is DeepSeek's reference implementation (GitHub deepseek-ai/DeepSeek-VL2), run by
tests/reference/deepseek_vl2.py in its own virtualenv; its outputs are the fixtures under
tests/fixtures/deepseek_vl2/: three tiny random checkpoints in the original layout (`tiny`: DeepSeekMoE with
multi-head attention, as DeepSeek-VL2-Tiny; `small`: latent attention, as -Small; `base`: latent attention and
noaux_tc sigmoid routing with the correction bias, as DeepSeek-VL2), the reference's logits and
20 greedy tokens for a prompt with two photos, its processor's pixels, tile grids and token counts on 7
photos, and its prompt text. The real configs of deepseek-vl2-tiny, -small and deepseek-vl2 (real_configs/)
check `vlmkit inspect` against the model cards' parameter totals.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import skimage.data
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from test_serve import Server, png_data_url

from vlmkit.cli import main
from vlmkit.generate import generate
from vlmkit.load import load_model
from vlmkit.models import from_pretrained
from vlmkit.sampling import GenerationConfig
from vlmkit.serve import create_app
from vlmkit.text.grounding import (
    draw_groundings,
    parse_grounding,
    strip_grounding,
    to_pixels,
)
from vlmkit.weights.hf import save_pretrained

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "deepseek_vl2"
MODELS = ("tiny", "small", "base")
BOS = "<｜begin▁of▁sentence｜>"
# The model cards' totals: DeepSeek-VL2-Tiny 3.37B, -Small 16.1B, DeepSeek-VL2 27.5B (paper, Table 1)
CARD_PARAMETERS = {"deepseek-vl2-tiny": 3.37e9, "deepseek-vl2-small": 16.1e9, "deepseek-vl2": 27.5e9}


def photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


@pytest.fixture(scope="module")
def loaded():
    torch.manual_seed(0)
    return {name: load_model(str(FIXTURES / name)) for name in MODELS}


@pytest.fixture(scope="module")
def prompts():
    return {name: json.loads((FIXTURES / name / "prompts.json").read_text()) for name in MODELS}


def expected(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / name / "expected.safetensors"))


def _prompt(loaded, prompts, name):
    images = [photo(p) for p in prompts[name]["prompt_photos"]]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                             {"type": "text", "text": prompts[name]["question"]}]}]
    model = loaded[name]
    prompt = model.prompt(messages, model.plan_images(images))
    return model, prompt, messages


@pytest.mark.parametrize("name", MODELS)
def test_checkpoint_logits_and_greedy_tokens_match_the_reference(loaded, prompts, name):
    model, prompt, _ = _prompt(loaded, prompts, name)
    ref = expected(name)
    assert type(model.model).__name__ == "VLM" and model.model.cfg.image_scheme == "tiles"
    assert prompt.ids == ref["input_ids"].tolist()  # BOS, the template, 2 x the processor's image token runs
    inputs = model.image_inputs(prompt.plans)
    with torch.no_grad():
        logits = model.model(input_ids=torch.tensor([prompt.ids]), **inputs).logits[0]  # (T, V) fp32
    positions = ref["text_positions"]
    assert (logits[positions] - ref["text_logits"]).abs().max().item() < 1e-4
    assert (logits.double().sum(-1) - ref["logit_sums"]).abs().max().item() < 1e-3  # every position, images too
    result = generate(model.model, [prompt.ids], GenerationConfig(max_new_tokens=20), prefill_inputs=inputs,
                      tokenizer=model.tokenizer)
    assert result.token_ids[0] == ref["greedy_tokens"].tolist()


@pytest.mark.parametrize("name", MODELS)
def test_checkpoint_loads_with_from_pretrained(name):
    model = from_pretrained(FIXTURES / name)
    cfg = model.cfg
    assert (cfg.image_token_id, cfg.max_crops, cfg.vision.image_size) == (360, 9, 378)
    assert bool(cfg.lm.kv_lora_rank) == (name != "tiny")  # tiny: multi-head attention; small, base: MLA
    routing = (cfg.lm.moe_topk_method, cfg.lm.moe_scoring, cfg.lm.norm_topk_prob, cfg.lm.routed_scaling_factor)
    assert routing == (("noaux_tc", "sigmoid", True, 2.0) if name == "base" else ("greedy", "softmax", False, 1.0))
    assert cfg.lm.num_experts == 8 and cfg.lm.dense_layers == (0,)


def test_checkpoint_prompt_text_equals_the_reference(loaded, prompts):
    model, _, messages = _prompt(loaded, prompts, "tiny")
    text = model.chat_template.render(messages, add_generation_prompt=True)
    assert text == BOS + prompts["tiny"]["sft_format"]  # the processor puts BOS first as an id
    # a two-turn conversation: the ids of the reference's format_messages_v2
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]},
             {"role": "assistant", "content": "A tabby cat."}, {"role": "user", "content": "Where is the cat?"}]
    ids = model.prompt(turns, model.plan_images([photo(prompts["tiny"]["prompt_photos"][0])])).ids
    assert ids == expected("tiny")["two_turn_input_ids"].tolist()


def _processor_cases() -> list[str]:
    with safe_open(str(FIXTURES / "processor.safetensors"), "pt") as f:
        return sorted({k.split(".")[0] for k in f.keys()})


@pytest.mark.parametrize("case", _processor_cases())
def test_checkpoint_processor_matches_the_reference(loaded, case):
    ref = load_file(str(FIXTURES / "processor.safetensors"))
    name, _, shown = case.partition("@")
    names = ["astronaut", "chelsea", "coffee"] if shown else [name]  # "@3": one of three images, tiling off
    plans = loaded["tiny"].plan_images([photo(n) for n in names])
    plan = plans[names.index(name)]
    cols, rows = ref[f"{case}.spatial_crop"].tolist()
    assert plan.grid == (rows, cols) and plan.num_tokens == ref[f"{case}.num_tokens"].item()
    views = plan.pixel_values  # (1 + rows*cols, 3, 384, 384)
    assert views.shape == (1 + rows * cols, 3, 384, 384)
    assert (views[:, :, ::16, ::16] - ref[f"{case}.subsample"]).abs().max().item() < 1e-5
    # every pixel: the 0-255 values the views were normalised from, checksummed exactly
    u8 = torch.round((views * 0.5 + 0.5) * 255).to(torch.int64).flatten(1)  # (views, 3*384*384)
    assert torch.equal(u8.sum(1), ref[f"{case}.u8_sums"])
    assert torch.equal((u8 * (torch.arange(u8.shape[1]) % 9973)).sum(1), ref[f"{case}.u8_weighted"])
    # float32 rounding of (x / 255 - 0.5) / 0.5 differs by ~1e-7 per value, summed over 442k values
    assert torch.allclose(views.double().sum(dim=(1, 2, 3)), ref[f"{case}.view_sums"], atol=0.1, rtol=0)
    assert torch.allclose(views.double().pow(2).sum(dim=(1, 2, 3)), ref[f"{case}.view_sq_sums"], atol=0.1, rtol=0)
    if f"{case}.pixels_u8" in ref:
        full = (ref[f"{case}.pixels_u8"].float() / 255 - 0.5) / 0.5
        assert (views - full).abs().max().item() < 1e-5


def test_checkpoint_save_pretrained_writes_the_original_layout(tmp_path):
    for name in MODELS:
        source = FIXTURES / name
        model = from_pretrained(source)
        save_pretrained(model, tmp_path / name)
        original, saved = load_file(str(source / "model.safetensors")), load_file(str(tmp_path / name / "model.safetensors"))
        assert sorted(saved) == sorted(original)
        for key, tensor in original.items():
            assert saved[key].shape == tensor.shape and torch.equal(saved[key].to(tensor.dtype), tensor), key
        config = json.loads((source / "config.json").read_text())
        written = json.loads((tmp_path / name / "config.json").read_text())
        for key in ("model_type", "candidate_resolutions", "tile_tag", "global_view_pos"):
            assert written[key] == config[key], key
        for part in ("vision_config", "projector_config"):
            for key, value in config[part].items():
                assert written[part][key] == value, (part, key)
        language = config["language_config"]
        skip = {"architectures", "lm_head", "rm_head", "torch_dtype"}
        if not language["use_mla"]:  # the latent-attention sizes mean nothing without latent attention
            skip |= {"kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"}
        for key, value in language.items():
            if key not in skip:
                assert written["language_config"][key] == value, ("language_config", key)
        for file in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(source / file, tmp_path / name / file)
        again = from_pretrained(tmp_path / name)
        assert again.cfg == model.cfg


def test_checkpoint_grounding_answer_parses_and_draws():
    # the answer format of DeepSeek-VL2's visual grounding (web_demo.py / inference.py prompts with <|ref|>)
    answer = ("<|ref|>The cat<|/ref|><|det|>[[121, 54, 710, 998]]<|/det|> sits next to "
              "<|ref|>two mugs<|/ref|><|det|>[[0, 0, 120, 333], [800, 400, 999, 999]]<|/det|>.")
    found, problems = parse_grounding(answer)
    assert problems == []
    assert [(g.ref, g.points) for g in found] == [
        ("The cat", ((121, 54), (710, 998))), ("two mugs", ((0, 0), (120, 333))), ("two mugs", ((800, 400), (999, 999)))]
    image = photo("chelsea")  # 451 x 300
    # DeepSeek-VL2's parse_ref_bbox draws int(x / 999 * width), int(y / 999 * height)
    assert [tuple(int(v) for xy in to_pixels(g, image.size) for v in xy) for g in found] == [
        (54, 16, 320, 299), (0, 0, 54, 100), (361, 120, 451, 300)]
    assert strip_grounding(answer) == "The cat sits next to two mugs."
    drawn = draw_groundings(image, found)
    assert drawn.size == image.size and drawn.getpixel((54, 160)) != image.getpixel((54, 160))  # the cat's left edge
    bad = parse_grounding("<|ref|>x<|/ref|><|det|>[[5, 6, 1000, 7]]<|/det|>").problems
    assert len(bad) == 1 and "outside the 0..999 grid" in bad[0].message


def _direct(model, image: Image.Image, text: str, tokens: int) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    plans = model.plan_images([image])
    ids = model.prompt_ids(messages, plans)
    return generate(model.model, [ids], GenerationConfig(max_new_tokens=tokens), prefill_inputs=model.image_inputs(plans),
                    tokenizer=model.tokenizer).texts[0]


def test_checkpoint_generate_chat_and_serve_answer(loaded, tmp_path, capsys):
    folder = str(FIXTURES / "tiny")
    image_file = tmp_path / "coins.png"  # 384 x 303: the global view and one tile, 421 image tokens
    photo("coins").save(image_file)
    oracle = _direct(loaded["tiny"], photo("coins"), "Where is the cat?", 6)
    out = subprocess.run([sys.executable, "-m", "vlmkit.cli", "generate", "--model", folder, "--image", str(image_file),
                          "--prompt", "Where is the cat?", "--max-new-tokens", "6", "--json"],
                         check=False, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["text"] == oracle
    assert main(["chat", "--model", folder, "--image", str(image_file), "--prompt", "Where is the cat?",
                 "--max-new-tokens", "6", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"] == oracle
    server = Server(create_app(loaded["tiny"], model_name="deepseek-vl2-tiny-fixture"))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="deepseek-vl2-tiny-fixture", max_tokens=6, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url(photo("coins"))}},
                                         {"type": "text", "text": "Where is the cat?"}]}])
    finally:
        server.stop()
    assert reply.choices[0].message.content == oracle


@pytest.mark.parametrize("name", sorted(CARD_PARAMETERS))
def test_checkpoint_inspect_real_configs_match_the_model_cards(name, tmp_path, capsys):
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(FIXTURES / "real_configs" / f"{name}.json", folder / "config.json")
    for file in ("tokenizer.json", "tokenizer_config.json"):  # the <image> id comes from the tokenizer
        shutil.copy(FIXTURES / "tiny" / file, folder / file)
    main(["inspect", str(folder), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["model_type"] == "deepseek_vl_v2"
    assert abs(report["parameters"] / CARD_PARAMETERS[name] - 1) < 0.02, report["parameters"]


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(candidate_resolutions=[[384, 384], [768, 768]]), "are not the tilings"),
    (lambda c: c.update(tile_tag="1D"), "tile_tag='1D'"),
    (lambda c: c["projector_config"].update(projector_type="mlp_gelu"), "downsample_mlp_gelu"),
    (lambda c: c["language_config"].pop("topk_method"), "set topk_method"),
])
def test_checkpoint_config_errors_say_what_to_do(tmp_path, change, message):
    folder = tmp_path / "model"
    shutil.copytree(FIXTURES / "tiny", folder)
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        from_pretrained(folder)


def test_checkpoint_without_tokenizer_is_refused_clearly(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for file in ("config.json", "model.safetensors"):
        shutil.copy(FIXTURES / "tiny" / file, folder / file)
    with pytest.raises(ValueError, match="needs its tokenizer.json"):
        from_pretrained(folder)
    # transformers' tokenizer_config.json names the added tokens too
    decoder = {"360": {"content": "<image>", "special": True}}
    (folder / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))
    assert from_pretrained(folder).cfg.image_token_id == 360
