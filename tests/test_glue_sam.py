"""Vary-tiny's `sam` scheme in the VLM: the SAM branch alone, no CLIP tower.

The model is the `vary-tiny-small` preset (SAM at the real 1024 px / patch 16 with Vary's two stride-2 convs ->
16 x 16 = 256 tokens, 32 wide, 2 layers; a 64-wide LM), with the image placeholder moved to the test
tokenizer's `<image>` id. The oracles: the SAM view is recomputed with numpy from PIL's bicubic resize and
CLIP's mean / std; the image rows are the SAM neck map, Vary's two convs and the projector's Linear applied
by hand.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_glue_sam.py
"""

from __future__ import annotations

import dataclasses
import json
import string

import numpy as np
import pytest
import torch
from matplotlib import cbook
from PIL import Image

from vlmkit.models.sam import SamConfig
from vlmkit.config import LMConfig, ProjectorConfig, VisionConfig
from vlmkit.models.vlm import VLMConfig
from vlmkit.load import LoadedModel
from vlmkit.models.vlm import VLM
from vlmkit.schemes import image_inputs, plan_image
from vlmkit.presets import build_model, get_preset, plan_tokens
from vlmkit.text.chat import get_chat_template
from vlmkit.text.tokenizer import CharTokenizer
from vlmkit.weights.hf import default_model_type, from_pretrained, save_pretrained

TOK = CharTokenizer(string.printable, special_tokens=("<pad>", "<s>", "</s>", "<unk>", "<image>", "<img>", "</img>",
                                                      "<|im_start|>", "<|im_end|>"))
TOKENS = 256  # 1024 px / 16 = 64 patches a side -> 32 -> 16
MESSAGES = [{"role": "user", "content": [{"type": "text", "text": "<img>"}, {"type": "image"},
                                         {"type": "text", "text": "</img>Who is this?"}]}]


def _photo() -> Image.Image:
    return Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")  # 512 x 600


def _cfg() -> VLMConfig:
    return dataclasses.replace(get_preset("vary-tiny-small"), image_token_id=TOK.token_to_id("<image>"))


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel("vary-tiny-small", VLM(_cfg()).eval(), TOK, get_chat_template("chatml"))


def _hand_rows(model: VLM, pixel_values: torch.Tensor) -> torch.Tensor:
    """SAM neck map -> Vary's conv1, conv2 -> row-major tokens -> the projector's Linear, by hand."""
    fc = model.projector.mlp[0]  # "linear": one nn.Linear
    neck = model.vision_high(pixel_values).last_hidden_state  # (1, 16, 64, 64)
    conv1, conv2 = model.vision_high.downsample.conv1, model.vision_high.downsample.conv2
    y = torch.nn.functional.conv2d(neck, conv1.weight, stride=2, padding=1)  # (1, 16, 32, 32)
    y = torch.nn.functional.conv2d(y, conv2.weight, stride=2, padding=1)  # (1, 32, 16, 16)
    tokens = y[0].reshape(y.shape[1], -1).T  # (256, 32)
    return tokens @ fc.weight.T + fc.bias  # (256, 64)


def _lm_inputs(model: VLM, ids: list[int], inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits, and the inputs_embeds the VLM hands its language model."""
    seen = {}
    hook = model.lm.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), **inputs).logits  # (1, T, V)
    hook.remove()
    return logits, seen["inputs_embeds"][0]


def test_plan_is_one_sam_view_of_256_tokens(loaded: LoadedModel):
    photo = _photo()
    plan = loaded.plan_images([photo])[0]
    assert plan.scheme == "sam" and plan.parts == {"features": TOKENS} and plan.num_tokens == TOKENS
    assert plan.text_parts == {"<img>": 1, "</img>": 1} and plan.context_tokens == TOKENS + 2
    assert plan.original_size == (512, 600) and plan.resized_size == (1024, 1024)
    assert plan.pixel_values.shape == (1, 3, 1024, 1024)
    # BlipImageEvalProcessor(1024): bicubic resize ignoring the aspect ratio, then CLIP mean / std.
    pixels = np.asarray(photo.resize((1024, 1024), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
    expected = torch.from_numpy(((pixels - mean) / std).transpose(2, 0, 1))  # (3, 1024, 1024)
    torch.testing.assert_close(plan.pixel_values[0], expected, rtol=0, atol=1e-5)
    assert set(image_inputs([plan, plan])) == {"pixel_values"}
    assert image_inputs([plan, plan])["pixel_values"].shape == (2, 3, 1024, 1024)


def test_forward_on_a_photo_fills_the_run_with_sam_rows(loaded: LoadedModel):
    model = loaded.model
    assert model.vision is None and not any(n.startswith("vision.") for n, _ in model.named_parameters())
    plans = loaded.plan_images([_photo()])
    prompt = loaded.prompt(MESSAGES, plans)
    ids = torch.tensor(prompt.ids)
    is_image = ids == model.image_token_id
    where = is_image.nonzero()[:, 0]
    assert int(is_image.sum()) == TOKENS and int(where[-1] - where[0]) == TOKENS - 1  # one contiguous run
    assert int(ids[where[0] - 1]) == TOK.token_to_id("<img>")  # the plan's text_parts wrap the run
    assert ids[where[-1] + 1:where[-1] + 3].tolist() == TOK.encode("\n</img>")  # chatml: a newline after an image
    logits, embeds = _lm_inputs(model, prompt.ids, image_inputs(prompt.plans))
    assert logits.shape == (1, len(prompt.ids), 512) and torch.isfinite(logits).all()
    with torch.no_grad():
        expected = _hand_rows(model, plans[0].pixel_values)  # (256, 64)
        rows = model.encode_images(**image_inputs(plans))
    torch.testing.assert_close(embeds[is_image], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(rows[0], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(embeds[~is_image], model.lm.embed(ids[~is_image]), rtol=0, atol=0)


def test_wrong_inputs_raise(loaded: LoadedModel):
    model = loaded.model
    plans = loaded.plan_images([_photo()])
    ids = loaded.prompt(MESSAGES, plans).ids
    ids.remove(model.image_token_id)
    with pytest.raises(ValueError, match=f"{TOKENS - 1} image placeholder tokens .* give {TOKENS} feature tokens"):
        model(input_ids=torch.tensor([ids]), **image_inputs(plans))
    with pytest.raises(ValueError, match="SAM encoder expects"):
        model.encode_images(torch.zeros(1, 3, 512, 512))
    with pytest.raises(ValueError, match=r"\(num_images, 3, S, S\)"):
        model.encode_images(plans[0].pixel_values[0])
    with pytest.raises(ValueError, match="pixel_values_high is only used by image_scheme='dual'"):
        model(input_ids=torch.tensor([ids]), pixel_values=plans[0].pixel_values, pixel_values_high=plans[0].pixel_values)


def test_full_vary_tiny_on_meta():
    cfg = get_preset("vary-tiny")
    assert cfg.vision is None and cfg.image_scheme == "sam" and cfg.vision_high.downsample == "vary"
    assert (cfg.vision_high.hidden_size, cfg.vision_high.num_layers, cfg.vision_high.image_size) == (768, 12, 1024)
    assert (cfg.lm.num_layers, cfg.lm.hidden_size, cfg.lm.num_heads, cfg.lm.vocab_size) == (12, 768, 12, 50272)
    with torch.device("meta"):
        model = build_model(cfg)
    assert all(p.is_meta for p in model.parameters()) and model.vision is None
    assert tuple(model.projector.mlp[0].weight.shape) == (768, 1024)  # Vary-tiny's Linear 1024 -> 768
    for size in ((800, 600), (1024, 1024), (37, 911)):
        assert plan_tokens(cfg, size) == 256  # Vary, sec. 3.2.1: 256 tokens of 1024 for any image
    assert plan_image(cfg, Image.new("RGB", (800, 600))).pixel_values.shape == (1, 3, 1024, 1024)


def test_native_save_round_trip(loaded: LoadedModel, tmp_path):
    model = loaded.model
    assert default_model_type(model) == "vlmkit"
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["vlmkit_config"]["image_scheme"] == "sam" and config["vlmkit_config"]["vision"] is None
    reloaded = from_pretrained(tmp_path)
    assert isinstance(reloaded, VLM) and reloaded.cfg == model.cfg
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def _sam_cfg(**changes) -> VLMConfig:
    sam = SamConfig(image_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, window_size=4,
                    global_attn_indexes=(1,), output_channels=16, downsample="vary", downsample_channels=(16, 24))
    lm = LMConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4)
    fields = dict(vision=None, projector=ProjectorConfig("linear", 24, 32), lm=lm, image_token_id=63,
                  image_scheme="sam", vision_high=sam)
    return VLMConfig(**{**fields, **changes})


def test_config_validates_the_sam_scheme():
    cfg = _sam_cfg()
    assert VLMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert plan_image(cfg, Image.new("RGB", (40, 30))).num_tokens == 16  # 256 / 16 = 16 -> 8 -> 4, squared
    with pytest.raises(ValueError, match="has no CLIP tower: set vision=None"):
        _sam_cfg(vision=VisionConfig())
    with pytest.raises(ValueError, match="needs vision_high"):
        _sam_cfg(vision_high=None)
    with pytest.raises(ValueError, match="remove projector_high"):
        _sam_cfg(projector_high=ProjectorConfig("linear", 24, 32))
    with pytest.raises(ValueError, match="projector.in_dim 16 != vision_high.feature_dim 24"):
        _sam_cfg(projector=ProjectorConfig("linear", 16, 32))
    with pytest.raises(ValueError, match="must be 'linear' or 'mlp"):
        _sam_cfg(projector=ProjectorConfig("merge2x2_mlp2x_gelu", 96, 32))
    with pytest.raises(ValueError, match=r"projector.out_dim 16 != lm.hidden_size 32"):
        _sam_cfg(projector=ProjectorConfig("linear", 24, 16))
    with pytest.raises(ValueError, match="image_scheme='pad' needs a vision tower"):
        _sam_cfg(image_scheme="pad", vision_high=None)
    with pytest.raises(ValueError, match="only used by image_scheme='dual'"):
        VLMConfig(vision_high=cfg.vision_high)
