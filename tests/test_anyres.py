"""The LLaVA-NeXT anyres scheme against transformers' LlavaNextProcessor and LlavaNextImageProcessorPil.

Oracles: the processor's placeholder count (llava-v1.6 settings: pinpoints of
336-px tiles, CLIP patch 14 with its CLS counted then dropped), its pixel_values
on a real photo, transformers' select_best_resolution / unpad_image, and the
hand-computed 672x672 -> 2928 (576 base + 48 x 48 tile features + 48 newlines).
"""

import matplotlib.cbook
import pytest
import tokenizers
import torch
import transformers
from PIL import Image
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution
from transformers.models.llava_next.modeling_llava_next import unpad_image

from vlmkit.config import LMConfig, ProjectorConfig, VisionConfig
from vlmkit.models.vlm import VLMConfig
from vlmkit.schemes.anyres import (LLAVA_V16_PINPOINTS, anyres_plan, plan_anyres, select_best_resolution,
                                         unpad_bounds)
from vlmkit.load import LoadedModel
from vlmkit.schemes.anyres import pack_anyres
from vlmkit.models.vlm import VLM
from vlmkit.schemes import image_inputs, plan_image
from vlmkit.text.chat import chat_template_for
from vlmkit.text.tokenizer import CharTokenizer

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
# (width, height): square, tall, wide, tiny, odd, exact pinpoints, extreme strips
SIZES = [(672, 672), (336, 336), (640, 480), (480, 640), (1024, 768), (800, 600), (1000, 1000), (337, 335),
         (1280, 720), (720, 1280), (500, 333), (333, 500), (1008, 336), (336, 1008), (300, 1200), (1500, 200),
         (2000, 100), (100, 2000), (60, 900), (1, 1), (5, 3), (14, 14), (3000, 50), (50, 3000), (123, 457)]


def _photo(width: int, height: int) -> Image.Image:
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        return Image.open(f).convert("RGB").resize((width, height))


@pytest.fixture(scope="module")
def processor():
    vocab = {"<unk>": 0, "<image>": 1, "hi": 2}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<image>"])
    image_processor = transformers.LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=[list(p) for p in LLAVA_V16_PINPOINTS], image_mean=list(MEAN), image_std=list(STD))
    return transformers.LlavaNextProcessor(
        image_processor=image_processor, tokenizer=transformers.PreTrainedTokenizerFast(tokenizer_object=tok),
        patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1)


def _plan(image: Image.Image):
    return plan_anyres(image, LLAVA_V16_PINPOINTS, 336, MEAN, STD, patch_size=14)


def test_672_square_costs_2928_tokens():
    plan = _plan(Image.new("RGB", (672, 672)))
    assert plan.parts == {"base": 576, "tiles": 2304, "newlines": 48} and plan.num_tokens == 2928
    assert plan.grid == (2, 2) and tuple(plan.pixel_values.shape) == (5, 3, 336, 336)


@pytest.mark.parametrize("size", SIZES)
def test_token_count_equals_llava_next_processor(processor, size):
    image = Image.new("RGB", size, (120, 60, 30))
    out = processor(images=image, text="<image> hi", return_tensors="pt")
    expected = int((out["input_ids"][0] == 1).sum())
    plan = _plan(image)
    assert plan.num_tokens == expected
    assert plan.pixel_values.shape[0] == out["pixel_values"].shape[1]  # same number of views
    assert list(out["image_sizes"][0]) == [size[1], size[0]]


@pytest.mark.parametrize("size", [(640, 480), (300, 1200), (1500, 200), (512, 512), (90, 70)])
def test_pixel_values_equal_image_processor(processor, size):
    image = _photo(*size)
    expected = processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
    got = _plan(image).pixel_values
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5


def test_select_best_resolution_equals_transformers():
    for w, h in SIZES + [(w * 7 + 3, h * 3 + 1) for w, h in SIZES]:
        assert select_best_resolution((h, w), LLAVA_V16_PINPOINTS) == \
            tuple(hf_select_best_resolution((h, w), [list(p) for p in LLAVA_V16_PINPOINTS]))


def test_unpad_bounds_equal_transformers_unpad_image():
    for (w, h) in SIZES:
        for grid in [(48, 48), (24, 72), (72, 24), (48, 24)]:
            features = torch.arange(grid[0] * grid[1]).view(1, *grid)
            top, bottom, left, right = unpad_bounds((h, w), grid)
            assert torch.equal(features[:, top:bottom, left:right], unpad_image(features, (h, w)))


def test_layout_rejects_a_plan_that_does_not_fit():
    plan = anyres_plan((64, 32), torch.zeros(3, 3, 32, 32), [(32, 64)], tile_size=32, patch_size=8)
    assert plan.num_tokens == 52
    with pytest.raises(ValueError, match="holds 2"):
        anyres_plan((64, 32), torch.zeros(2, 3, 32, 32), [(32, 64)], tile_size=32, patch_size=8)
    with pytest.raises(ValueError, match=r"2x2 tile grid \(5 views .* hold 3 views"):
        pack_anyres(torch.zeros(3, 16, 5), anyres_plan((64, 64), torch.zeros(5, 3, 32, 32), [(64, 64)], 32, 8),
                    torch.zeros(5))
    with pytest.raises(ValueError, match="produced 80 feature tokens but the plan counts 52"):
        pack_anyres(torch.zeros(3, 25, 5), plan, torch.zeros(5))  # 5x5 patches: 25 + 5 * (10 + 1) = 80, not 52


def _tiny_anyres_cfg(vocab_size: int, image_token_id: int) -> VLMConfig:
    vision = VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2,
                          num_heads=4)
    lm = LMConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2)
    return VLMConfig(vision=vision, projector=ProjectorConfig("mlp2x_gelu", 32, 32), lm=lm,
                     image_token_id=image_token_id, image_scheme="anyres",
                     grid_pinpoints=((32, 64), (64, 32), (64, 64)))


def test_config_validates_the_anyres_fields():
    cfg = _tiny_anyres_cfg(100, 99)
    assert VLMConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="multiples of the tower's image_size 32"):
        VLMConfig.from_dict({**cfg.to_dict(), "grid_pinpoints": [[32, 48]]})
    with pytest.raises(ValueError, match="needs grid_pinpoints"):
        VLMConfig.from_dict({**cfg.to_dict(), "grid_pinpoints": []})
    with pytest.raises(ValueError, match="image_scheme 'mosaic' unknown"):
        VLMConfig.from_dict({**cfg.to_dict(), "image_scheme": "mosaic"})
    with pytest.raises(ValueError, match="only used by image_scheme='anyres'"):
        VLMConfig.from_dict({**cfg.to_dict(), "image_scheme": "pad"})


def test_loaded_model_prompt_counts_come_from_the_plans():
    tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyz ")
    torch.manual_seed(0)
    model = VLM(_tiny_anyres_cfg(tokenizer.vocab_size, tokenizer.token_to_id("<image>"))).eval()
    loaded = LoadedModel("tiny-anyres", model, tokenizer, chat_template_for(tokenizer))
    images = [_photo(90, 30), _photo(40, 120)]
    plans = loaded.plan_images(images)
    assert [p.grid for p in plans] == [(1, 2), (2, 1)]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "hi"}]}]
    ids = loaded.prompt_ids(messages, plans)
    assert ids.count(model.image_token_id) == sum(p.num_tokens for p in plans)
    inputs = loaded.image_inputs(plans)
    assert tuple(inputs["pixel_values"].shape) == (2, 3, 3, 32, 32)
    assert inputs["image_sizes"].tolist() == [[30, 90], [120, 40]]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), **inputs).logits
    assert logits.shape == (1, len(ids), tokenizer.vocab_size)
    with pytest.raises(ValueError, match="2 image placeholder"):
        loaded.prompt_ids(messages, plans[:1])
    assert plan_image(model.cfg, images[0]).num_tokens == plans[0].num_tokens
    assert image_inputs([]) == {}
