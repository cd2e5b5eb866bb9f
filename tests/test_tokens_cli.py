"""`vlmkit tokens`, the token-budget planner, run as a subprocess the way a user runs it.

The expected counts are the published figures (docs/references.md), written as literals: LLaVA-1.5 576,
LLaVA-NeXT 672x672 -> 2928 (transformers' LlavaNextProcessor), Phi-3.5-V HD-16 1344x1344 -> 2509
(the Phi-3-V formula), Qwen2-VL 224x224 -> 64 merged tokens + 2 wrappers, DeepSeek-VL2 1 / 2x2 / 3x3
tiles -> 421 / 1023 / 2017, MiniCPM-V 2.6 1344x896 -> 7 views x 64 queries, 463 in context, Vary 256.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SOURCE_COLOUR = (30, 60, 90)
GRID_YELLOW = (255, 221, 0)


def vlmkit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlmkit.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """Solid-colour PNGs named by their size, e.g. 336x336.png."""
    folder = tmp_path_factory.mktemp("images")
    for width, height in ((336, 336), (672, 672), (1344, 1344), (224, 224), (384, 384), (768, 768),
                          (1152, 1152), (1344, 896), (640, 480)):
        Image.new("RGB", (width, height), SOURCE_COLOUR).save(folder / f"{width}x{height}.png")
    return folder


def plans(image_dir: Path, scheme: str, *names: str, extra: tuple[str, ...] = ()) -> list[dict]:
    out = vlmkit("tokens", *(str(image_dir / n) for n in names), "--scheme", scheme, "--json", *extra)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("scheme, name, num_tokens, context_tokens", [
    ("pad", "336x336.png", 576, 576),          # LLaVA-1.5: 24 x 24 patches, CLS dropped
    ("anyres", "672x672.png", 2928, 2928),     # LLaVA-NeXT: 576 base + 48 x 48 tiles + 48 newlines
    ("hd", "1344x1344.png", 2509, 2509),       # Phi-3.5-V HD-16: (16 + 1) * 144 + 1 + 5 * 12
    ("dynamic", "224x224.png", 64, 66),        # Qwen2-VL: 16 x 16 patches / 4, + vision start/end
    ("tiles", "384x384.png", 421, 421),        # DeepSeek-VL2: one tile
    ("slices", "1344x896.png", 448, 463),      # MiniCPM-V 2.6: 2x3 slices + source, 64 queries each
    ("dual", "640x480.png", 256, 258),         # Vary: 256 positions between <img> and </img>
])
def test_published_counts(image_dir, scheme, name, num_tokens, context_tokens):
    [plan] = plans(image_dir, scheme, name)
    assert plan["scheme"] == scheme
    assert plan["num_tokens"] == num_tokens and plan["context_tokens"] == context_tokens
    assert sum(plan["parts"].values()) == num_tokens
    assert sum(plan["text_parts"].values()) == context_tokens - num_tokens


def test_tiles_grids_and_tiling_off_above_two_images(image_dir):
    names = ("384x384.png", "768x768.png", "1152x1152.png")
    as_two_prompts = plans(image_dir, "tiles", *names, extra=("--num-images-in-prompt", "1"))
    assert [p["num_tokens"] for p in as_two_prompts] == [421, 1023, 2017]  # 1, 2x2, 3x3 tiles
    assert [p["grid"] for p in as_two_prompts] == [[1, 1], [2, 2], [3, 3]]
    one_prompt = plans(image_dir, "tiles", *names)  # three images in the prompt: one tile each
    assert [p["num_tokens"] for p in one_prompt] == [421, 421, 421]


def test_anyres_json_shape(image_dir):
    [plan] = plans(image_dir, "anyres", "672x672.png")
    assert plan["image"] == str(image_dir / "672x672.png")
    assert plan["original_size"] == [672, 672] and plan["resized_size"] == [672, 672] and plan["grid"] == [2, 2]
    assert plan["parts"] == {"base": 576, "tiles": 2304, "newlines": 48} and plan["text_parts"] == {}
    assert plan["pixel_values_shape"] == [5, 3, 336, 336]
    assert plan["canvas_size"] == [672, 672]


def test_text_output_lists_parts_and_total(image_dir):
    out = vlmkit("tokens", str(image_dir / "224x224.png"), str(image_dir / "224x224.png"), "--scheme", "dynamic")
    assert out.returncode == 0, out.stderr
    assert "original size   224x224" in out.stdout and "resized size    224x224" in out.stdout
    assert "grid            16x16" in out.stdout
    assert "image_pad 64 = 64" in out.stdout and "<|vision_start|> 1 + <|vision_end|> 1 = 2" in out.stdout
    assert out.stdout.rstrip().splitlines()[-1] == "total: 2 image(s), 128 model-filled tokens, 132 context tokens"


def test_overlay_png_draws_the_tile_grid(image_dir, tmp_path):
    out_path = tmp_path / "plan.png"
    out = vlmkit("tokens", str(image_dir / "672x672.png"), str(image_dir / "336x336.png"), "--scheme", "anyres",
                 "--overlay", str(out_path))
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan-1.png", "plan.png"]
    with Image.open(out_path) as png:
        assert png.format == "PNG"
        png.verify()
    pixels = np.asarray(Image.open(out_path).convert("RGB")).astype(int)  # (H, W, 3)
    # 672 x 672 with no padding, drawn at 768 x 768; the caption strip goes below it
    assert pixels.shape[1] == 768 and pixels.shape[0] > 768 + 40
    source = np.array(SOURCE_COLOUR)
    assert np.abs(pixels[200, 200] - source).max() <= 2  # inside a tile: the image itself
    assert np.abs(pixels[300, 384] - np.array(GRID_YELLOW)).max() <= 2  # the vertical line between tiles
    assert np.abs(pixels[384, 300] - np.array(GRID_YELLOW)).max() <= 2  # the horizontal one
    between = pixels[100:700, 380:389]  # a band across the vertical line differs from the source image
    assert (np.abs(between - source).max(axis=-1) > 100).any(axis=1).all()


def test_overlay_shows_padding(image_dir, tmp_path):
    out_path = tmp_path / "pad.png"
    out = vlmkit("tokens", str(image_dir / "640x480.png"), "--scheme", "pad", "--overlay", str(out_path))
    assert out.returncode == 0, out.stderr
    pixels = np.asarray(Image.open(out_path).convert("RGB")).astype(int)  # (H, W, 3)
    # the 640 x 480 image sits in its 640 x 640 padded square, drawn at 768 x 768: 96 padded rows above
    assert pixels.shape[1] == 768
    assert np.abs(pixels[40, 300] - np.array(SOURCE_COLOUR)).max() > 20  # padding, not image
    assert np.abs(pixels[384, 300] - np.array(SOURCE_COLOUR)).max() <= 2  # image


@pytest.mark.parametrize("args, message", [
    (["/no/such.png", "--scheme", "pad"], "no such file"),
    ([__file__, "--scheme", "pad"], "not an image"),
    (["IMAGE", "--scheme", "mosaic"], "unknown image scheme 'mosaic'; valid schemes: pad, anyres, hd"),
    (["IMAGE", "--scheme", "hd", "--num-images-in-prompt", "2"], "does not apply to --scheme hd"),
    (["IMAGE", "--scheme", "tiles", "--num-images-in-prompt", "0"], "num_images is 0"),
    (["IMAGE", "--scheme", "pad", "--overlay", "plan.jpg"], "give a path ending in .png"),
])
def test_bad_input_is_a_clear_error(image_dir, args, message):
    args = [str(image_dir / "224x224.png") if a == "IMAGE" else a for a in args]
    out = vlmkit("tokens", *args)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
