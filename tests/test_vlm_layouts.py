"""The hd (Phi-3.5-V) and tiles (DeepSeek-VL2) layouts in the VLM glue, on tiny random models and real photos.

The tiny towers keep the schemes' real view geometry (hd: 336-px crops of 14-px patches; tiles: 384-px
tiles of which the 14-px patch conv reads 378 px) because the schemes count tokens for those grids;
they are tiny in width and depth (32 wide, 2 layers), and max_crops = 4 keeps the views few.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_vlm_layouts.py
"""

from __future__ import annotations

import string

import pytest
import torch
from matplotlib import cbook
from PIL import Image

from vlmkit.config import LMConfig, ProjectorConfig, VisionConfig
from vlmkit.models.vlm import VLMConfig
from vlmkit.schemes.hd import hd_num_tokens
from vlmkit.schemes.tiles import tiles_num_tokens
from vlmkit.load import LoadedModel
from vlmkit.schemes.hd import hd_layout
from vlmkit.schemes.tiles import downsample_2x2, tiles_layout
from vlmkit.models.vlm import VLM
from vlmkit.schemes import image_inputs
from vlmkit.text.chat import get_chat_template
from vlmkit.text.tokenizer import CharTokenizer

TOK = CharTokenizer(string.printable)


def _photos() -> list[Image.Image]:
    """Grace Hopper (512x600) cut to wide, tall and near-square shapes."""
    photo = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    return [photo.crop((0, 100, 512, 300)), photo.crop((150, 0, 330, 600)), photo]


def _cfg(scheme: str) -> VLMConfig:
    siglip = scheme == "tiles"
    vision = VisionConfig(image_size=378 if siglip else 336, patch_size=14, hidden_size=32, intermediate_size=64,
                          num_layers=2, num_heads=4, use_cls_token=not siglip, pre_layernorm=not siglip,
                          select_layer=-1 if siglip else -2, hidden_act="gelu_pytorch_tanh" if siglip else "quick_gelu")
    lm = LMConfig(vocab_size=TOK.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, max_position_embeddings=8192)
    return VLMConfig(vision=vision, projector=ProjectorConfig("merge2x2_mlp2x_gelu", 128, 32), lm=lm,
                     image_token_id=TOK.token_to_id("<image>"), image_scheme=scheme, max_crops=4)


def _loaded(scheme: str) -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel(f"tiny-{scheme}", VLM(_cfg(scheme)).eval(), TOK, get_chat_template("phi3"))


def _expected_rows(model: VLM, plan) -> torch.Tensor:
    """The scheme's layout function run on the tower features of the plan's own views."""
    if plan.scheme == "hd":
        features = model.vision.features(plan.pixel_values)  # (V, 576, 32)
        return model.projector.mlp(hd_layout(features, plan, model.sub_gn, model.glb_gn))
    # DeepSeek-VL2's tower output is its last layer after the final LayerNorm (siglip_vit.py forward_features)
    features = model.vision.post_norm(model.vision.features(plan.pixel_values[..., :378, :378]))  # (V, 729, 32)
    projected = model.projector.mlp(downsample_2x2(features))  # (V, 196, 32)
    return tiles_layout(projected, plan, model.image_newline, model.view_separator)


def _lm_inputs(model: VLM, ids: list[int], inputs: dict) -> torch.Tensor:
    """The inputs_embeds the VLM hands its language model."""
    seen = {}
    hook = model.lm.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), **inputs).logits
    hook.remove()
    assert logits.shape == (1, len(ids), TOK.vocab_size)
    return seen["inputs_embeds"][0]


@pytest.mark.parametrize("scheme", ["hd", "tiles"])
def test_image_positions_hold_exactly_the_layout(scheme: str):
    loaded = _loaded(scheme)
    model = loaded.model
    photos = _photos()[:2]
    plans = loaded.plan_images(photos)
    assert plans[0].grid[1] > plans[0].grid[0] and plans[1].grid[0] > plans[1].grid[1]  # wide, tall
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "?"}]}]
    prompt = loaded.prompt(messages, plans)
    ids = torch.tensor(prompt.ids)
    is_image = ids == model.image_token_id
    assert int(is_image.sum()) == sum(p.num_tokens for p in plans)
    embeds = _lm_inputs(model, prompt.ids, image_inputs(prompt.plans))
    with torch.no_grad():
        expected = torch.cat([_expected_rows(model, p) for p in plans])  # (sum T_i, C)
        torch.testing.assert_close(embeds[is_image], expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(embeds[~is_image], model.lm.embed(ids[~is_image]), rtol=0, atol=0)


def test_hd_rows_follow_phi3v_order():
    """[local map with sub_GN per row, glb_GN, global 12 x (12 + 1)], counted by hand from the grid."""
    loaded = _loaded("hd")
    model = loaded.model
    plan = loaded.plan_images(_photos()[:1])[0]
    rows, cols = plan.grid
    assert plan.num_tokens == hd_num_tokens(rows, cols)
    embeds = model.encode_images(**image_inputs([plan]))[0]  # (T, C)
    with torch.no_grad():
        newline, separator = model.projector.mlp(model.sub_gn), model.projector.mlp(model.glb_gn)
    line = 12 * cols + 1
    local = 12 * rows * line
    for r in range(12 * rows):
        torch.testing.assert_close(embeds[r * line + line - 1], newline)
    torch.testing.assert_close(embeds[local], separator)
    for r in range(12):
        torch.testing.assert_close(embeds[local + 1 + r * 13 + 12], newline)
    assert embeds.shape[0] == local + 1 + 12 * 13


def test_tiles_rows_follow_deepseek_vl2_order_and_tiling_turns_off_for_three_images():
    loaded = _loaded("tiles")
    model = loaded.model
    plans = loaded.plan_images(_photos())
    assert [p.grid for p in plans] == [(1, 1)] * 3 and all(p.num_tokens == 421 for p in plans)
    plan = loaded.plan_images(_photos()[:1])[0]
    rows, cols = plan.grid
    assert plan.num_tokens == tiles_num_tokens(rows, cols)
    embeds = model.encode_images(**image_inputs([plan]))[0]  # (T, C)
    for r in range(14):
        assert torch.equal(embeds[r * 15 + 14], model.image_newline)
    assert torch.equal(embeds[210], model.view_separator)
    line = 14 * cols + 1
    for r in range(14 * rows):
        assert torch.equal(embeds[211 + r * line + line - 1], model.image_newline)
    assert embeds.shape[0] == 211 + 14 * rows * line


@pytest.mark.parametrize("scheme", ["hd", "tiles"])
def test_concatenated_views_equal_padded_views(scheme: str):
    loaded = _loaded(scheme)
    plans = loaded.plan_images(_photos()[:2])
    padded = image_inputs(plans)
    flat = torch.cat([p.pixel_values for p in plans])  # (sum V, 3, S, S)
    with torch.no_grad():
        a = loaded.model.encode_images(**padded)
        b = loaded.model.encode_images(flat, padded["image_sizes"])
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("scheme", ["hd", "tiles"])
def test_wrong_placeholder_count_raises_with_both_counts(scheme: str):
    loaded = _loaded(scheme)
    plans = loaded.plan_images(_photos()[:1])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
    ids = loaded.prompt(messages, plans).ids
    ids.remove(loaded.model.image_token_id)
    n = plans[0].num_tokens
    with pytest.raises(ValueError, match=f"{n - 1} image placeholder tokens .* give {n} feature tokens"):
        loaded.model(input_ids=torch.tensor([ids]), **image_inputs(plans))
    sizes = image_inputs(plans)["image_sizes"]
    with pytest.raises(ValueError, match="not a canvas of whole"):
        loaded.model.encode_images(image_inputs(plans)["pixel_values"], sizes + 1)


def test_config_validates_hd_and_tiles():
    cfg = _cfg("hd")
    assert VLMConfig.from_dict(cfg.to_dict()) == cfg
    assert _cfg("tiles").max_crops == 4
    base = cfg.to_dict()
    with pytest.raises(ValueError, match="'merge2x2_mlp\\{N\\}x_gelu' projector"):
        VLMConfig.from_dict({**base, "projector": {"type": "mlp2x_gelu", "in_dim": 128, "out_dim": 32}})
    with pytest.raises(ValueError, match="vision.patch_size=14 and vision.image_size=336"):
        VLMConfig.from_dict({**base, "vision": {**base["vision"], "image_size": 392}})
    with pytest.raises(ValueError, match="vision.image_size=378"):
        VLMConfig.from_dict({**base, "image_scheme": "tiles"})
    with pytest.raises(ValueError, match="positive int"):
        VLMConfig.from_dict({**base, "max_crops": 0})
    with pytest.raises(ValueError, match="max_crops is only used"):
        VLMConfig.from_dict({**base, "image_scheme": "pad"})
    assert VLMConfig.from_dict({**base, "max_crops": None}).max_crops == 16
