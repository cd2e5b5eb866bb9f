"""Presets: every one builds, the -small twins run a forward pass on an image planned through their own
scheme, the published token counts and parameter totals come out of the presets, and `vlmkit presets --json`
has its documented shape. Full-size models are only ever built on the meta device."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.cli import main
from vlmkit.models.vlm import VLMConfig
from vlmkit.schemes.dynamic import plan_dynamic
from vlmkit.models.projectors import parse_projector_type
from vlmkit.models.qwen2_vl import Qwen2VLConfig
from vlmkit.schemes import image_inputs, plan_image
from vlmkit.presets import (PRESETS, PUBLISHED, SUMMARY_SIZES, build_model, count_parameters, get_preset,
                            plan_tokens)

SMALL = [f"{name}-small" for name in PUBLISHED] + ["tiny-random", "bench-tiny"]


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_registry_names_and_unknown_name():
    expected = {"llava-1.5", "llava-next", "phi-3.5-v", "vary-base", "vary-tiny", "qwen-vl", "qwen2-vl",
                "qwen2.5-vl", "deepseek-vl", "deepseek-vl2", "minicpm-v", "tiny-random", "bench-tiny"}
    assert expected <= set(PRESETS)
    assert all(f"{name}-small" in PRESETS for name in PUBLISHED)
    with pytest.raises(ValueError, match="valid presets: .*llava-1.5"):
        get_preset("llava-1.5-7b")


# Vary-tiny is SAM-B (~90M) with a decoder of OPT-125M's size; every other published model has billions.
MIN_PARAMETERS = {"vary-tiny": 2e8}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_full_size_builds_on_meta(name):
    cfg = get_preset(name)
    with torch.device("meta"):
        model = build_model(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert count_parameters(cfg) > MIN_PARAMETERS.get(name, 1e9)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_small_twin_keeps_structure(name):
    full, small = get_preset(name), get_preset(f"{name}-small")
    assert type(small) is type(full)
    for size in SUMMARY_SIZES:
        assert plan_tokens(small, size) == plan_tokens(full, size)
    if isinstance(full, VLMConfig):
        assert small.image_scheme == full.image_scheme and small.grid_pinpoints == full.grid_pinpoints
        assert small.max_crops == full.max_crops
        assert (small.vision is None) == (full.vision is None)
        if full.vision is not None:
            assert (small.vision.image_size, small.vision.patch_size) == (full.vision.image_size,
                                                                          full.vision.patch_size)
        spec, small_spec = parse_projector_type(full.projector.type), parse_projector_type(small.projector.type)
        assert (small_spec.family, small_spec.merge, small_spec.queries) == (spec.family, spec.merge, spec.queries)
        assert (small.vision_high is None) == (full.vision_high is None)
        if full.vision_high is not None:
            high, small_high = full.vision_high, small.vision_high
            assert (small_high.image_size, small_high.patch_size, small_high.downsample) == (
                high.image_size, high.patch_size, high.downsample)
    assert count_parameters(small) < 1e6


# Image sizes the forward test plans: small enough to run fast, each giving a real multi-part plan.
FORWARD_SIZES = {"llava-next-small": (500, 300), "deepseek-vl2-small": (384, 384), "qwen2-vl-small": (224, 224),
                 "qwen2.5-vl-small": (224, 224)}


@pytest.mark.parametrize("name", SMALL)
def test_small_preset_runs_forward(name):
    torch.manual_seed(0)
    cfg = get_preset(name)
    model = build_model(cfg).eval()
    image = noise_image(*FORWARD_SIZES.get(name, (336, 336)))
    if isinstance(cfg, Qwen2VLConfig):
        plan = plan_dynamic(image)
        inputs = {"pixel_values": plan.pixel_values, "image_grid_thw": [plan.extra["image_grid_thw"]]}
    else:
        plan = plan_image(cfg, image)
        inputs = image_inputs([plan])
    ids = torch.tensor([[1, 2] + [cfg.image_token_id] * plan.num_tokens + [3]])  # (1, T)
    with torch.inference_mode():
        logits = model(ids, **inputs).logits  # (1, T, V)
    assert logits.shape == (1, plan.num_tokens + 3, cfg.lm.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name, size, tokens", [
    ("llava-1.5", (336, 336), 576),        # LLaVA-1.5: 24 x 24 patches, CLS dropped, for any image
    ("llava-1.5", (1344, 672), 576),
    ("llava-1.5", (37, 911), 576),
    ("llava-next", (672, 672), 2928),      # 576 base + 48 x 48 tiles + 48 newlines
    ("phi-3.5-v", (1344, 1344), 2509),     # HD-16: 4 x 4 crops
    ("qwen2-vl", (224, 224), 64),          # Qwen2-VL, sec. 2.1: 256 patches -> 64 merged tokens
    ("qwen2.5-vl", (224, 224), 64),        # the same patches and 2x2 merger as Qwen2-VL
    ("deepseek-vl2", (384, 384), 421),     # 14 x 15 global + 1 separator + 14 x 15 tile
    ("deepseek-vl", (336, 336), 576),      # DeepSeek-VL, sec. 3.1: SigLIP 384 / 16 = 24 x 24 = SAM's 24 x 24 x 1024
    ("deepseek-vl", (1344, 672), 576),     # any image: resized and padded to 1024 and 384 squares
    ("vary-base", (800, 600), 256),        # Vary, sec. 3.3.1: 256 <imgpad>
    ("vary-tiny", (800, 600), 256),        # Vary, sec. 3.2.1: the same SAM branch alone, 256 tokens of 1024
    ("qwen-vl", (800, 600), 256),          # Qwen-VL, sec. 2.1: 256 resampler queries
])
def test_published_token_counts(name, size, tokens):
    assert plan_tokens(get_preset(name), size) == tokens


@pytest.mark.parametrize("name, published, tolerance", [
    ("llava-1.5", 7.06e9, 0.01e9),   # LLaVA-1.5-7B: ~7.06B
    ("phi-3.5-v", 4.2e9, 0.1e9),     # Phi-3.5-vision: "4.2B", given to one decimal
    ("qwen2.5-vl", 8.29e9, 0.01e9),  # Qwen2.5-VL-7B-Instruct's model card: 8.29B
    ("qwen-vl", 9.6e9, 0.1e9),       # Qwen-VL's model card: "Qwen-VL 9.6B", given to one decimal
    ("deepseek-vl2", 27.5e9, 0.05e9),  # DeepSeek-VL2 paper, Table 1: 27.5B total (4.5B activated)
])
def test_parameter_counts_match_published(name, published, tolerance):
    assert abs(count_parameters(get_preset(name)) - published) <= tolerance


def test_cli_presets_json(capsys):
    assert main(["presets", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(PRESETS)
    for r in rows:
        assert set(r) == {"name", "vision", "scheme", "projector", "lm", "parameters", "tokens", "recipe"}
        assert isinstance(r["parameters"], int) and r["parameters"] > 0
        assert set(r["tokens"]) == {"336x336", "1344x672"}
    by_name = {r["name"]: r for r in rows}
    assert by_name["llava-1.5"]["tokens"] == {"336x336": 576, "1344x672": 576}
    assert by_name["qwen2-vl"]["scheme"] == "dynamic"
    assert by_name["qwen2-vl"]["tokens"]["1344x672"] == 1152  # 96 x 48 patches, 2x2 merged
    assert by_name["vary-base"]["scheme"] == "dual" and "SAM" in by_name["vary-base"]["vision"]
    assert by_name["vary-tiny"]["scheme"] == "sam" and by_name["vary-tiny"]["vision"].startswith("SAM 1024px/16")
    assert by_name["vary-tiny"]["tokens"] == {"336x336": 256, "1344x672": 256}
    assert by_name["qwen2.5-vl"]["scheme"] == "dynamic" and "Qwen2.5-VL" in by_name["qwen2.5-vl"]["vision"]
    assert by_name["qwen2.5-vl"]["tokens"]["1344x672"] == 1152
    assert by_name["deepseek-vl"]["scheme"] == "hybrid" and "SAM 1024px/16" in by_name["deepseek-vl"]["vision"]
    assert by_name["deepseek-vl"]["tokens"] == {"336x336": 576, "1344x672": 576}
    assert "MoE 72e top6 MLA" in by_name["deepseek-vl2"]["lm"]


def test_cli_presets_text(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS)
