"""The model side of the MiniCPM-V `slices` scheme, and the vision tower on non-square inputs.

A tiny VLM (32-px tower of 8-px patches, a perceiver4q_1x32 resampler) takes real photos of
different aspect ratios; the prompt is built through vlmkit.prompt with MiniCPM-V's wrappers as
text. The oracle for the rows is the tower and the resampler run by hand on each view cropped to
its own size; for the non-square tower it is transformers' CLIPVisionModel / SiglipVisionModel
with interpolate_pos_encoding=True.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_glue_slices.py
"""

from __future__ import annotations

import string

import pytest
import torch
from matplotlib import cbook
from PIL import Image

from vlmkit.config import LMConfig, ProjectorConfig, VisionConfig
from vlmkit.models.image_model import scatter_rows
from vlmkit.models.vlm import VLMConfig
from vlmkit.image.plan import ImagePlan
from vlmkit.weights import from_pretrained, save_pretrained
from vlmkit.schemes.slices import slices_layout, slices_num_tokens
from vlmkit.models.resampler import PerceiverResampler
from vlmkit.models.vlm import VLM
from vlmkit.schemes import image_inputs, plan_image
from vlmkit.prompt import build_prompt
from vlmkit.text.chat import get_chat_template
from vlmkit.text.tokenizer import DEFAULT_SPECIAL_TOKENS, CharTokenizer

transformers = pytest.importorskip("transformers")

TOL = 1e-4
SIZE, PATCH, QUERIES = 32, 8, 4
WRAPPERS = ("<im_start>", "<im_end>", "<slice>", "</slice>")
TOK = CharTokenizer(string.printable, special_tokens=DEFAULT_SPECIAL_TOKENS + WRAPPERS)
IMAGE_ID = TOK.token_to_id("<image>")
# Crops of the photo (left, top, right, bottom): square-ish 3x3, wide 2x4, tall 8x1, tiny and unsliced.
CROPS = {"full": (0, 0, 512, 600), "wide": (0, 150, 512, 320), "tall": (180, 0, 300, 600),
         "tiny": (200, 200, 220, 230)}


def photo(name: str) -> Image.Image:
    image = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    return image.crop(CROPS[name])


def tiny_cfg(**overrides) -> VLMConfig:
    vision = VisionConfig(image_size=SIZE, patch_size=PATCH, hidden_size=32, intermediate_size=64, num_layers=2,
                          num_heads=4, select_layer=-1)
    lm = LMConfig(vocab_size=TOK.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2)
    fields = dict(vision=vision, projector=ProjectorConfig(f"perceiver{QUERIES}q_1x32", 32, 32), lm=lm,
                  image_token_id=IMAGE_ID, image_scheme="slices")
    return VLMConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def model() -> VLM:
    torch.manual_seed(0)
    return VLM(tiny_cfg()).eval()


def minicpm_text(plan: ImagePlan) -> tuple[str, list[ImagePlan]]:
    """MiniCPM-V 2.6's rendering of one image with one <image> per view, and the per-view plans
    (query_num placeholders each) that build_prompt expands them with."""
    rows, cols = plan.grid
    per_view = plan.parts["source_queries"]
    views = [ImagePlan("slices", plan.pixel_values[v:v + 1], plan.original_size, plan.resized_size, plan.grid,
                       {"queries": per_view}) for v in range(plan.pixel_values.shape[0])]
    text = "<im_start><image><im_end>"
    if rows:
        text += "\n".join("<slice><image></slice>" * cols for _ in range(rows))
    return text, views


def prompt_for(plans: list[ImagePlan]) -> tuple[list[int], list[ImagePlan]]:
    texts, views = zip(*(minicpm_text(p) for p in plans))
    messages = [{"role": "user", "content": "".join(texts) + "Who is this?"}]
    prompt = build_prompt(TOK, get_chat_template("chatml"), messages, IMAGE_ID, [v for vs in views for v in vs])
    return prompt.ids, prompt.plans


def by_hand(model: VLM, plan: ImagePlan) -> torch.Tensor:
    """Tower at each view's own size (the plan's zero padding cropped away), resampler, views in order."""
    rows = []
    for v, (w, h) in enumerate(plan.extra["view_sizes"]):
        view = plan.pixel_values[v, :, :h, :w]  # (3, h, w)
        assert plan.pixel_values[v, :, h:].abs().sum() == 0 and plan.pixel_values[v, :, :, w:].abs().sum() == 0
        features = model.vision.features(view[None], interpolate_pos_encoding=True)  # (1, h/P * w/P, D)
        assert features.shape[1] == (h // PATCH) * (w // PATCH)
        rows.append(model.projector(features)[0])  # (Q, C)
    return torch.cat(rows)


def test_plan_takes_its_geometry_from_the_config(model):
    plan = plan_image(model.cfg, photo("wide"))
    assert model.cfg.max_crops == 9
    assert plan.scheme == "slices" and plan.grid == (2, 4)
    assert plan.parts == {"source_queries": QUERIES, "slice_queries": 8 * QUERIES}
    assert plan.extra["view_sizes"][:2] == [(56, 16), (40, 24)]  # ~32**2 px, multiples of the 8-px patch
    assert plan.num_tokens == slices_num_tokens(9, QUERIES) == 36


def test_prompt_positions_and_rows_match_the_views_run_by_hand(model):
    plans = [plan_image(model.cfg, photo(name), 4) for name in ("full", "wide", "tall", "tiny")]
    assert [p.grid for p in plans] == [(3, 3), (2, 4), (8, 1), (0, 0)]
    ids, _ = prompt_for(plans)

    assert ids.count(IMAGE_ID) == sum(p.num_tokens for p in plans) == (10 + 9 + 9 + 1) * QUERIES
    wrapper_ids = {TOK.token_to_id(t) for t in WRAPPERS}
    first = ids.index(TOK.token_to_id("<im_start>"))
    last = max(i for i, t in enumerate(ids) if t in wrapper_ids)
    assert last + 1 - first == sum(p.context_tokens for p in plans)  # placeholders + wrappers + row breaks
    assert sum(t in wrapper_ids for t in ids) == sum(
        p.text_parts["source_wrappers"] + p.text_parts.get("slice_wrappers", 0) for p in plans)

    inputs = image_inputs(plans)
    assert tuple(inputs["pixel_values"].shape) == (4, 10, 3, 72, 56)
    assert inputs["image_sizes"][3].tolist() == [[40, 24]] + [[0, 0]] * 9
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        rows = model.encode_images(**inputs)
        assert [r.shape[0] for r in rows] == [p.num_tokens for p in plans]
        merged = scatter_rows(input_ids, model.lm.embed(input_ids), rows, model.image_token_id)  # (1, T, C)
        want = torch.cat([by_hand(model, p) for p in plans])  # (sum T_i, C)
        got = merged[input_ids == IMAGE_ID]  # (sum T_i, C)
        assert (got - want).abs().max().item() <= 1e-5
        text = input_ids != IMAGE_ID
        assert torch.equal(merged[text], model.lm.embed(input_ids)[text])
        logits = model(input_ids, **inputs).logits
    assert logits.shape == (1, len(ids), TOK.vocab_size) and torch.isfinite(logits).all()


def test_uncropped_padding_would_change_the_rows(model):
    """The check above can fail: the source view of the tall crop run padded to 72x56 differs."""
    plan = plan_image(model.cfg, photo("tall"))
    with torch.no_grad():
        padded = model.projector(model.vision.features(plan.pixel_values[:1], interpolate_pos_encoding=True))[0]
        assert (padded - by_hand(model, plan)[:QUERIES]).abs().max().item() > 1e-3


def test_wrong_counts_raise(model):
    plan = plan_image(model.cfg, photo("wide"))
    inputs = image_inputs([plan])
    with torch.no_grad():
        views = list(by_hand(model, plan).split(QUERIES))
    with pytest.raises(ValueError, match=r"gives 32 tokens .* plan has 36"):
        slices_layout(views[:-1], plan.num_tokens)

    other = VLM(tiny_cfg()).eval()
    other.projector = PerceiverResampler(32, 32, num_queries=3, hidden_size=32, num_layers=1, num_heads=1,
                                         intermediate_size=128)
    with torch.no_grad(), pytest.raises(ValueError, match=r"gives 27 tokens .* plan has 36"):
        other.encode_images(**inputs)

    ids, _ = prompt_for([plan])
    short = torch.tensor([ids[:ids.index(IMAGE_ID)] + ids[ids.index(IMAGE_ID) + 1:]])  # one placeholder less
    with torch.no_grad(), pytest.raises(ValueError, match=r"35 image placeholder tokens .* 36 feature tokens"):
        model(short, **inputs)


@pytest.mark.parametrize("change, message", [
    (lambda x: {**x, "image_sizes": None}, r"needs image_sizes of shape \(1, 9, 2\)"),
    (lambda x: {**x, "pixel_values": x["pixel_values"][0]}, r"\(images, views, 3, H_max, W_max\)"),
    (lambda x: {**x, "image_sizes": torch.cat([torch.zeros(1, 1, 2, dtype=torch.long), x["image_sizes"][:, 1:]],
                                              dim=1)}, r"present views must come first"),
    (lambda x: {**x, "image_sizes": x["image_sizes"] * 2}, r"must fit in pixel_values' 24x56"),
    (lambda x: {**x, "image_sizes": x["image_sizes"] - 1}, r"multiples of the patch size 8"),
])
def test_bad_inputs_raise(model, change, message):
    inputs = image_inputs([plan_image(model.cfg, photo("wide"))])
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        model.encode_images(**change(inputs))


@pytest.mark.parametrize("overrides, message", [
    ({"projector": ProjectorConfig("mlp2x_gelu", 32, 32)}, r"perceiver\{Q\}q.*not 'mlp2x_gelu'"),
    ({"projector": ProjectorConfig("qwen_resampler4q", 32, 32)}, r"square patch grids"),
    ({"max_crops": 0}, r"max_crops is 0"),
    ({"grid_pinpoints": ((32, 64),)}, r"grid_pinpoints are only used by image_scheme='anyres'"),
])
def test_config_rejects(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_cfg(**overrides)


def test_save_and_load_round_trip(model, tmp_path):
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path).eval()
    inputs = image_inputs([plan_image(model.cfg, photo("tall"))])
    assert loaded.cfg == model.cfg
    with torch.no_grad():
        assert torch.equal(loaded.encode_images(**inputs)[0], model.encode_images(**inputs)[0])


def test_max_crops_is_max_slices():
    cfg = tiny_cfg(max_crops=4)
    plan = plan_image(cfg, photo("full"))
    assert plan.grid[0] * plan.grid[1] <= 4 and VLMConfig.from_dict(cfg.to_dict()) == cfg


# ---- the tower on non-square inputs, against transformers ------------------------------------------

def hf_tower(kind: str) -> torch.nn.Module:
    """A seeded tiny transformers vision model with perturbed norms and biases."""
    torch.manual_seed(0)
    common = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  image_size=SIZE, patch_size=PATCH)
    if kind == "clip":
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**common))
    else:
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**common, vision_use_head=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("height, width", [(24, 40), (40, 24), (16, 64), (32, 48)])
def test_non_square_tower_matches_transformers(tmp_path, kind, height, width):
    ref = hf_tower(kind)
    ref.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    torch.manual_seed(1)
    x = torch.randn(2, 3, height, width)
    with torch.no_grad():
        want = ref(x, output_hidden_states=True, interpolate_pos_encoding=True)
        got = ours(x, output_hidden_states=True, interpolate_pos_encoding=True)
    assert got.last_hidden_state.shape[1] == (height // PATCH) * (width // PATCH) + (kind == "clip")
    for g, w in zip(got.hidden_states, want.hidden_states, strict=True):
        assert (g - w).abs().max().item() <= TOL
    assert (got.last_hidden_state - want.last_hidden_state).abs().max().item() <= TOL
    assert (got.pooler_output - want.pooler_output).abs().max().item() <= TOL
    with pytest.raises(ValueError, match="square.*interpolate_pos_encoding=True"):
        ours(x)
