"""The MiniCPM-V `slices` and Vary `dual` schemes.

Oracles: transformers' MiniCPMV4_6ImageProcessorPil (same slicing rule as MiniCPM-V 2.6; its views
are sized in multiples of 56 instead of 14, so the pixel comparison sets size_multiple=56), hand-computed
grids and counts, and transformers' CLIPImageProcessorPil for Vary's CLIP branch.
"""

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from vlmkit.schemes import dual, slices


def _photo(width: int, height: int) -> Image.Image:
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        return Image.open(f).convert("RGB").resize((width, height))


SIZES = [(448, 448), (449, 449), (1344, 896), (896, 1344), (3000, 500), (500, 3000), (1000, 1000),
         (1920, 1080), (1080, 1920), (640, 480), (50, 40), (10, 2000), (2000, 10), (800, 801), (1300, 1300),
         (4000, 3000), (700, 600), (900, 450)]


@pytest.mark.parametrize("size", SIZES)
def test_grid_equals_transformers_minicpmv(size):
    oracle = transformers.MiniCPMV4_6ImageProcessorPil()
    expected = oracle.get_sliced_grid((size[1], size[0]), 9, 448)
    ours = slices.sliced_grid(*size)
    assert ours == (tuple(expected) if expected is not None else None)


@pytest.mark.parametrize("size,grid,tokens", [
    ((448, 448), None, 66),         # 1 view: 2 wrappers + 64 queries
    ((300, 200), None, 66),         # tiny: upsampled source only
    ((1344, 896), (2, 3), 463),     # 6 slices: 7 views * 66 + 1 row break
    ((896, 1344), (3, 2), 464),     # tall: 7 * 66 + 2 row breaks
    ((1000, 1000), (2, 2), 331),    # 4.98 -> 5: candidates 4 (2x2 exact), 5, 6 -> 5 * 66 + 1
    ((3000, 500), (1, 7), 528),     # log 6 is nearest log 7 among 7, 8, 9 slices: 8 * 66 + 0
])
def test_slice_counts_hand_computed(size, grid, tokens):
    assert slices.sliced_grid(*size) == grid
    assert slices.plan_size_tokens(*size) == tokens


def test_parts_and_query_num():
    parts = slices.slice_parts(2, 3, query_num=96, row_breaks=False)
    assert parts == ({"source_queries": 96, "slice_queries": 576},
                     {"source_wrappers": 2, "slice_wrappers": 12})
    assert slices.plan_size_tokens(1344, 896, query_num=96, row_breaks=False) == 7 * 98


@pytest.mark.parametrize("size", [(1344, 896), (500, 1200), (300, 200), (1600, 500)])
def test_pixels_equal_transformers_minicpmv(size):
    image = _photo(*size)
    oracle = transformers.MiniCPMV4_6ImageProcessorPil()
    out = oracle(images=image, return_tensors="np")
    plan = slices.plan_slices(image, size_multiple=56)
    views = []
    for view, (w, h) in zip(plan.pixel_values, plan.extra["view_sizes"]):
        views.append(oracle.reshape_by_patch(view[:, :h, :w].numpy(), 14))
    assert [tuple(t) for t in out["target_sizes"].tolist()] == plan.extra["tgt_sizes"]
    assert np.abs(np.concatenate(views, axis=-1) - out["pixel_values"][0]).max() <= 1e-5


def test_plan_layout_real_photo():
    plan = slices.plan_slices(_photo(1344, 896))
    assert plan.grid == (2, 3) and plan.resized_size == (1344, 896)
    assert plan.extra["view_sizes"] == [(546, 364)] + [(448, 448)] * 6
    assert plan.num_tokens == 7 * 64 and plan.context_tokens == 463
    assert plan.pixel_values.shape == (7, 3, 448, 546)
    assert (plan.pixel_values[1, :, :, 448:] == 0).all()   # a slice is zero-padded to the widest view


@pytest.mark.parametrize("call", [
    lambda: slices.sliced_grid(0, 10),
    lambda: slices.sliced_grid(10, 10, max_slices=0),
    lambda: slices.plan_slices(Image.new("RGB", (10, 10)), query_num=0),
])
def test_slices_bad_input(call):
    with pytest.raises(ValueError):
        call()


# ---------------------------------------------------------------- dual (Vary)

@pytest.mark.parametrize("size", [(640, 480), (480, 640), (224, 224), (1000, 300), (30, 90)])
def test_clip_view_equals_clip_image_processor(size):
    image = _photo(*size)
    expected = transformers.CLIPImageProcessorPil()(images=image, return_tensors="pt")["pixel_values"][0]
    assert (dual.clip_view(image) - expected).abs().max().item() <= 1e-5


def test_dual_plan():
    image = _photo(800, 600)
    plan = dual.plan_dual(image)
    assert plan.parts == {"features": 256} and plan.num_tokens == 16 * 16
    assert plan.pixel_values.shape == (1, 3, 224, 224)
    high = plan.extra["pixel_values_high"]
    assert high.shape == (1, 3, 1024, 1024)
    expected = np.asarray(image.resize((1024, 1024), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    expected = (expected - np.array(dual.CLIP_MEAN, dtype=np.float32)) / np.array(dual.CLIP_STD, dtype=np.float32)
    assert np.abs(high[0].permute(1, 2, 0).numpy() - expected).max() <= 1e-5
    assert "pixel_values_high" not in plan.summary()


def test_dual_bad_input():
    with pytest.raises(ValueError, match="both must match"):
        dual.plan_dual(Image.new("RGB", (10, 10)), clip_size=336)
    with pytest.raises(ValueError, match="zero size"):
        dual.clip_view(Image.new("RGB", (0, 10)))
    assert torch.is_tensor(dual.sam_view(Image.new("RGB", (5, 5)), size=32))
