"""The Vary-base `dual` scheme in the VLM: CLIP and SAM branches, each projected, concatenated along channels.

A tiny dual VLM keeps Vary's geometry in miniature: CLIP 32 px / patch 8 -> 4 x 4 = 16 tokens, and
SAM 256 px / patch 16 -> 16 x 16 -> two stride-2 convs -> 4 x 4 = 16 tokens; 16 + 16 channels = LM width 32.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_glue_dual.py
"""

from __future__ import annotations

import json
import string

import pytest
import torch
from matplotlib import cbook
from PIL import Image

from vlmkit.models.sam import SamConfig
from vlmkit.config import LMConfig, ProjectorConfig, VisionConfig
from vlmkit.models.vlm import VLMConfig
from vlmkit.generate import generate, generate_naive
from vlmkit.load import LoadedModel
from vlmkit.schemes.dual import dual_rows
from vlmkit.models.vlm import VLM
from vlmkit.schemes import image_inputs
from vlmkit.sampling import GenerationConfig
from vlmkit.text.chat import get_chat_template
from vlmkit.text.tokenizer import CharTokenizer
from vlmkit.weights.hf import default_model_type, from_pretrained, save_pretrained

TOK = CharTokenizer(string.printable)
TOKENS = 16  # per image, both branches
MESSAGES = [{"role": "user", "content": [{"type": "text", "text": "<img>"}, {"type": "image"},
                                         {"type": "text", "text": "</img>Read the badge."}]}]


def _photo() -> Image.Image:
    return Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")  # 512 x 600


def _cfg(**changes) -> VLMConfig:
    vision = VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2,
                          num_heads=4, select_layer=-2)
    sam = SamConfig(image_size=256, patch_size=16, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    window_size=4, global_attn_indexes=(1,), output_channels=16, downsample="vary",
                    downsample_channels=(16, 24))
    lm = LMConfig(vocab_size=TOK.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, max_position_embeddings=512)
    fields = dict(vision=vision, projector=ProjectorConfig("linear", 32, 16), lm=lm,
                  image_token_id=TOK.token_to_id("<image>"), image_scheme="dual", vision_high=sam,
                  projector_high=ProjectorConfig("linear", 24, 16))
    return VLMConfig(**{**fields, **changes})


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel("tiny-dual", VLM(_cfg()).eval(), TOK, get_chat_template("chatml"))


def _hand_rows(model: VLM, plan) -> torch.Tensor:
    """Both branches run by hand from the plan's two views: CLIP's penultimate hidden state without CLS,
    SAM's neck + convs, each through its own linear, side by side along channels."""
    clip_fc, sam_fc = model.projector.mlp[0], model.projector_high.mlp[0]  # "linear": one nn.Linear each
    hidden = model.vision(plan.pixel_values, output_hidden_states=True).hidden_states[-2]  # (1, 1 + 16, 32)
    clip = hidden[0, 1:] @ clip_fc.weight.T + clip_fc.bias  # (16, 16)
    sam_map = model.vision_high(plan.extra["pixel_values_high"]).last_hidden_state  # (1, 16, 16, 16)
    sam_map = model.vision_high.downsample(sam_map)  # (1, 24, 4, 4)
    sam = sam_map[0].flatten(1).T @ sam_fc.weight.T + sam_fc.bias  # (16, 16)
    return torch.cat([clip, sam], dim=-1)  # (16, 32)


def _lm_inputs(model: VLM, ids: list[int], inputs: dict) -> torch.Tensor:
    """The inputs_embeds the VLM hands its language model."""
    seen = {}
    hook = model.lm.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), **inputs).logits
    hook.remove()
    assert logits.shape == (1, len(ids), TOK.vocab_size)
    return seen["inputs_embeds"][0]


def test_plan_views_follow_the_two_towers(loaded: LoadedModel):
    plan = loaded.plan_images([_photo()])[0]
    assert plan.scheme == "dual" and plan.parts == {"features": TOKENS} and plan.num_tokens == TOKENS
    assert plan.pixel_values.shape == (1, 3, 32, 32)
    assert plan.extra["pixel_values_high"].shape == (1, 3, 256, 256)
    inputs = image_inputs([plan, plan])
    assert inputs["pixel_values"].shape == (2, 3, 32, 32) and inputs["pixel_values_high"].shape == (2, 3, 256, 256)


def test_image_positions_hold_both_branches_side_by_side(loaded: LoadedModel):
    model = loaded.model
    plans = loaded.plan_images([_photo()])
    prompt = loaded.prompt(MESSAGES, plans)
    ids = torch.tensor(prompt.ids)
    is_image = ids == model.image_token_id
    assert int(is_image.sum()) == plans[0].num_tokens == TOKENS
    assert "<img>" in TOK.decode(prompt.ids[:int(is_image.nonzero()[0])])
    embeds = _lm_inputs(model, prompt.ids, image_inputs(prompt.plans))
    with torch.no_grad():
        expected = _hand_rows(model, plans[0])  # (16, 32)
    torch.testing.assert_close(embeds[is_image], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(embeds[~is_image], model.lm.embed(ids[~is_image]), rtol=0, atol=0)


def test_two_images_fill_their_runs_in_order(loaded: LoadedModel):
    model = loaded.model
    photo = _photo()
    images = [photo.crop((0, 100, 512, 300)), photo]
    plans = loaded.plan_images(images)
    with torch.no_grad():
        rows = model.encode_images(**image_inputs(plans))
        for got, plan in zip(rows, plans):
            torch.testing.assert_close(got, _hand_rows(model, plan), rtol=0, atol=1e-5)
    assert not torch.allclose(rows[0], rows[1])


def test_wrong_counts_raise_with_both_counts(loaded: LoadedModel):
    model = loaded.model
    plans = loaded.plan_images([_photo()])
    ids = loaded.prompt(MESSAGES, plans).ids
    ids.remove(model.image_token_id)
    with pytest.raises(ValueError, match=f"{TOKENS - 1} image placeholder tokens .* give {TOKENS} feature tokens"):
        model(input_ids=torch.tensor([ids]), **image_inputs(plans))
    with pytest.raises(ValueError, match="counts 16 tokens .* CLIP branch gives 16 and the SAM branch 9"):
        dual_rows(torch.zeros(16, 16), torch.zeros(9, 16), 16)
    with pytest.raises(ValueError, match="needs pixel_values_high"):
        model.encode_images(image_inputs(plans)["pixel_values"])
    with pytest.raises(ValueError, match="SAM encoder expects"):
        model.encode_images(plans[0].pixel_values, pixel_values_high=torch.zeros(1, 3, 128, 128))


def test_pixel_values_high_is_rejected_by_other_schemes():
    cfg = _cfg(image_scheme="pad", vision_high=None, projector_high=None,
               projector=ProjectorConfig("linear", 32, 32))
    model = VLM(cfg).eval()
    ids = torch.tensor([[TOK.token_to_id("<image>")] * TOKENS])
    with pytest.raises(ValueError, match="pixel_values_high is only used by image_scheme='dual'"):
        model(input_ids=ids, pixel_values=torch.zeros(1, 3, 32, 32), pixel_values_high=torch.zeros(1, 3, 256, 256))


def test_generation_prefills_both_views(loaded: LoadedModel):
    plans = loaded.plan_images([_photo()])
    prompt = loaded.prompt(MESSAGES, plans)
    inputs = image_inputs(prompt.plans)
    cfg = GenerationConfig(max_new_tokens=8)
    with torch.no_grad():
        cached = generate(loaded.model, [prompt.ids], cfg, prefill_inputs=inputs).token_ids[0]
        naive = generate_naive(loaded.model, [prompt.ids], cfg, prefill_inputs=inputs).token_ids[0]
        ids, expected = list(prompt.ids), []
        for _ in range(8):  # greedy by hand: full forward, argmax of the last position
            expected.append(int(loaded.model(input_ids=torch.tensor([ids]), **inputs).logits[0, -1].argmax()))
            ids.append(expected[-1])
    assert len(cached) == 8 and cached == naive == expected


def test_native_save_round_trip(loaded: LoadedModel, tmp_path):
    model = loaded.model
    assert default_model_type(model) == "vlmkit"
    mlp = _cfg(projector=ProjectorConfig("mlp2x_gelu", 32, 16), projector_high=ProjectorConfig("mlp2x_gelu", 24, 16))
    assert default_model_type(VLM(mlp)) == "vlmkit"  # not llava, whose config has no SAM branch
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "vlmkit" and config["vlmkit_config"]["image_scheme"] == "dual"
    reloaded = from_pretrained(tmp_path)
    assert isinstance(reloaded, VLM) and reloaded.cfg == model.cfg
    inputs = image_inputs(loaded.plan_images([_photo()]))
    with torch.no_grad():
        assert torch.equal(reloaded.encode_images(**inputs)[0], model.encode_images(**inputs)[0])


def test_config_validates_the_second_branch():
    cfg = _cfg()
    assert VLMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="needs vision_high"):
        _cfg(vision_high=None)
    with pytest.raises(ValueError, match="only used by image_scheme='dual'"):
        _cfg(image_scheme="pad")
    with pytest.raises(ValueError, match="CLIP branch gives 64 tokens .* SAM branch 16"):
        _cfg(vision=VisionConfig(image_size=32, patch_size=4, hidden_size=32, intermediate_size=64, num_layers=2,
                                 num_heads=4))
    with pytest.raises(ValueError, match=r"projector.out_dim 16 \+ projector_high.out_dim 8 != lm.hidden_size 32"):
        _cfg(projector_high=ProjectorConfig("linear", 24, 8))
    with pytest.raises(ValueError, match="projector_high.in_dim 16 != vision_high.feature_dim 24"):
        _cfg(projector_high=ProjectorConfig("linear", 16, 16))
    with pytest.raises(ValueError, match="downsample='vary'"):
        _cfg(vision_high=SamConfig(image_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                   global_attn_indexes=(1,), output_channels=16))
    with pytest.raises(ValueError, match="must be 'linear' or 'mlp"):
        _cfg(projector_high=ProjectorConfig("qwen_resampler4q", 24, 16))
