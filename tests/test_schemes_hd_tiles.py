"""The Phi-3.5-vision `hd` and DeepSeek-VL2 `tiles` schemes and their feature layouts.

Oracles: the Phi-3-V token formula and hand-computed HD canvases; the HD layout Phi-3-vision's
`hd_feature_transform` (image_embedding_phi3_v.py on the Hugging Face Hub) produces, written token by token
from its description; DeepSeek-VL2's token formula, its select_best_resolution worked by hand, and
F.unfold/F.pad as its projector applies them.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlmkit.image.plan import ImagePlan
from vlmkit.schemes import hd, tiles
from vlmkit.schemes.hd import hd_layout
from vlmkit.schemes.tiles import downsample_2x2, tiles_layout


def _photo(width: int, height: int) -> Image.Image:
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        return Image.open(f).convert("RGB").resize((width, height))


# ---------------------------------------------------------------- hd: sizes and counts

def _phi3v_formula(h: int, w: int) -> int:
    """num_img_tokens of Phi-3-V's processor for an HD canvas of h x w pixels."""
    return int((h // 336 * w // 336 + 1) * 144 + 1 + (h // 336 + 1) * 12)


@pytest.mark.parametrize("side,n,expected", [(336, 1, 313), (672, 4, 757), (1344, 16, 2509)])
def test_hd_paper_counts(side, n, expected):
    assert hd.plan_size_tokens(side, side, n) == expected
    assert _phi3v_formula(side, side) == expected


def test_hd_n16_upsamples_small_squares():
    # the reference scales every square to floor(sqrt(N)) crops per side
    assert hd.hd_padded_size(336, 336, 16) == (1344, 1344)
    assert hd.hd_padded_size(100, 100, 9) == (1008, 1008)


@pytest.mark.parametrize("size,n,canvas", [
    ((1000, 500), 16, (1680, 1008)),   # scale 5 (5*ceil(2.5)=15 <= 16), 840 high -> padded to 1008
    ((500, 1000), 16, (1008, 1680)),   # tall: transposed
    ((3000, 100), 9, (3024, 336)),     # very wide: 9 crops in one row, 100.8 -> 336
    ((100, 3000), 9, (336, 3024)),     # very tall
    ((1344, 672), 9, (1344, 672)),     # 2:1, scale 4 (4*2=8 <= 9)
    ((20, 10), 1, (336, 336)),         # tiny
    ((1000, 750), 4, (672, 672)),      # scale 2, 504 -> 672
])
def test_hd_canvas_hand_computed(size, n, canvas):
    assert hd.hd_padded_size(*size, n) == canvas
    rows, cols = canvas[1] // 336, canvas[0] // 336
    assert rows * cols <= n
    assert hd.plan_size_tokens(*size, n) == _phi3v_formula(canvas[1], canvas[0])


def test_hd_plan_pixels_real_photo():
    image = _photo(500, 300)
    plan = hd.plan_hd(image, max_crops=4)
    # ratio 5/3: scale 2 (2*ceil(1.2)=4), 672 x int(672/(5/3)) = 403 -> padded to 672
    assert plan.grid == (2, 2) and plan.resized_size == (672, 403)
    assert plan.num_tokens == _phi3v_formula(672, 672) == 757
    assert plan.pixel_values.shape == (5, 3, 336, 336)
    # the oracle canvas: PIL bilinear resize, white padding 134 rows on top and 135 at the bottom
    resized = np.asarray(image.resize((672, 403), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    canvas = np.ones((672, 672, 3), dtype=np.float32)
    canvas[134:134 + 403] = resized
    canvas = (canvas - np.array(hd.CLIP_MEAN, dtype=np.float32)) / np.array(hd.CLIP_STD, dtype=np.float32)
    canvas = torch.from_numpy(canvas.transpose(2, 0, 1).copy())
    assert torch.allclose(plan.pixel_values[2], canvas[:, :336, 336:], atol=1e-5)   # crop (row 0, col 1)
    assert torch.allclose(plan.pixel_values[3], canvas[:, 336:, :336], atol=1e-5)   # crop (row 1, col 0)
    glb = F.interpolate(canvas[None], size=(336, 336), mode="bicubic")[0]
    assert torch.allclose(plan.pixel_values[0], glb, atol=1e-5)


@pytest.mark.parametrize("size,n", [((0, 10), 4), ((10, 0), 4), ((10, 10), 0)])
def test_hd_bad_input(size, n):
    with pytest.raises(ValueError):
        hd.hd_padded_size(*size, n)


# ---------------------------------------------------------------- hd: the layout, token by token
# The oracle is written from the layout's description (docs/references.md, Phi-3.5-vision: Phi3ImageEmbedding's
# hd_feature_transform in image_embedding_phi3_v.py), one token at a time, with none of the reshapes it checks.

def _merged(view: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """Block (i, j) of one view's 24 x 24 patches merged: its four patches concatenated in row-major order."""
    grid = view.view(24, 24, -1)
    return torch.cat([grid[2 * i, 2 * j], grid[2 * i, 2 * j + 1], grid[2 * i + 1, 2 * j], grid[2 * i + 1, 2 * j + 1]])


def _hd_layout_by_hand(features: torch.Tensor, rows: int, cols: int, sub_gn: torch.Tensor,
                       glb_gn: torch.Tensor) -> torch.Tensor:
    """[the crops' merged 12 x 12 maps stitched row-major, each of the rows*12 lines ending in sub_GN; glb_GN;
    the global view's (view 0) 12 lines, each ending in sub_GN]."""
    sub, glb = sub_gn.flatten(), glb_gn.flatten()
    tokens = []
    for line in range(rows * 12):
        for col in range(cols * 12):
            crop = 1 + (line // 12) * cols + col // 12  # crops follow the global view, row-major
            tokens.append(_merged(features[crop], line % 12, col % 12))
        tokens.append(sub)
    tokens.append(glb)
    for line in range(12):
        tokens.extend(_merged(features[0], line, col) for col in range(12))
        tokens.append(sub)
    return torch.stack(tokens)


@pytest.mark.parametrize("size,n", [((500, 300), 4), ((300, 700), 6), ((200, 200), 1)])
def test_hd_layout_token_by_token(size, n):
    torch.manual_seed(0)
    plan = hd.plan_hd(Image.new("RGB", size, (10, 20, 30)), max_crops=n)
    rows, cols = plan.grid
    features = torch.randn(1 + rows * cols, 576, 1024)
    sub_gn, glb_gn = torch.randn(1, 1, 1, 4096), torch.randn(1, 1, 4096)
    expected = _hd_layout_by_hand(features, rows, cols, sub_gn, glb_gn)
    ours = hd_layout(features, plan, sub_gn, glb_gn)
    assert ours.shape == (plan.num_tokens, 4096)
    assert torch.equal(ours, expected)


def test_hd_layout_count_mismatch_raises():
    plan = hd.plan_hd(Image.new("RGB", (672, 672)), max_crops=4)
    with pytest.raises(ValueError, match="5 views"):
        hd_layout(torch.zeros(3, 576, 8), plan, torch.zeros(32), torch.zeros(32))
    wrong = ImagePlan("hd", plan.pixel_values, plan.original_size, plan.resized_size, plan.grid, {"x": 700})
    with pytest.raises(ValueError, match="757.*700"):
        hd_layout(torch.zeros(5, 576, 8), wrong, torch.zeros(32), torch.zeros(32))


# ---------------------------------------------------------------- tiles: selection and counts

def _tiles_formula(rows: int, cols: int) -> int:
    # tokenize_with_images: h = w = ceil((384 // 14) / 2) = 14
    h = w = math.ceil((384 // 14) / 2)
    return h * (w + 1) + 1 + (rows * h) * (cols * w + 1)


@pytest.mark.parametrize("rows,cols,expected", [(1, 1, 421), (2, 2, 1023), (3, 3, 2017)])
def test_tiles_paper_counts(rows, cols, expected):
    assert tiles.tiles_num_tokens(rows, cols) == _tiles_formula(rows, cols) == expected


def test_candidates_are_all_grids_up_to_9():
    cands = tiles.candidate_resolutions()
    assert len(cands) == 23 and len(set(cands)) == 23
    assert all(w % 384 == 0 and h % 384 == 0 and (w // 384) * (h // 384) <= 9 for w, h in cands)


@pytest.mark.parametrize("size,best", [
    ((384, 384), (384, 384)),      # exact fit
    ((768, 768), (768, 768)),      # 2x2 exact
    ((1152, 1152), (1152, 1152)),  # 3x3 exact
    ((5000, 5000), (1152, 1152)),  # huge square: most pixels kept by the largest square
    ((100, 100), (384, 384)),      # tiny: every candidate keeps all 10000 pixels, 384x384 wastes least
    ((768, 384), (768, 384)),      # 2:1 exact
    ((800, 400), (1152, 768)),     # 768x384 keeps 294912 < 320000 pixels; 1152x768 is the smallest keeping all
    ((3456, 384), (3456, 384)),    # very wide
    ((384, 3000), (384, 3072)),    # very tall: 384x3072 keeps all pixels, wastes 27648
    ((2000, 300), (2304, 384)),    # wide: 2304x384 keeps all 600000 and wastes least
])
def test_select_best_resolution_worked_examples(size, best):
    assert tiles.select_best_resolution(size, tiles.candidate_resolutions()) == best


def test_tiles_plan_real_photo_and_tiling_off():
    image = _photo(800, 500)
    plan = tiles.plan_tiles(image)
    # 1152x768: scale min(1.44, 1.536) -> 1152x720 keeps all 400000 pixels; smaller candidates do not
    assert plan.resized_size == (1152, 768) and plan.grid == (2, 3)
    assert plan.num_tokens == _tiles_formula(2, 3) == 211 + 196 * 6 + 28
    assert plan.pixel_values.shape == (7, 3, 384, 384)
    # the global view: the image fitted into 384x240, centred with 72 rows of mean-grey above
    expected = np.asarray(image.resize((384, 240), Image.Resampling.BICUBIC), dtype=np.float32) / 255 * 2 - 1
    glb = plan.pixel_values[0].permute(1, 2, 0).numpy()
    assert np.abs(glb[72:312] - expected).max() <= 1e-5
    assert np.abs(glb[:72] - (127 / 255 * 2 - 1)).max() <= 1e-6
    off = tiles.plan_tiles(image, num_images=3)
    assert off.grid == (1, 1) and off.num_tokens == 421 and off.pixel_values.shape == (2, 3, 384, 384)
    assert tiles.plan_tiles(image, num_images=2).grid == (2, 3)


@pytest.mark.parametrize("call", [
    lambda: tiles.select_best_resolution((0, 5), tiles.candidate_resolutions()),
    lambda: tiles.candidate_resolutions(0),
    lambda: tiles.plan_tiles(Image.new("RGB", (10, 10)), num_images=0),
])
def test_tiles_bad_input(call):
    with pytest.raises(ValueError):
        call()


# ---------------------------------------------------------------- tiles: layout

def _reference_downsample(x):
    # MlpProjector "downsample_mlp_gelu" before its MLP: pad to even, F.unfold 2x2
    bs, hw, c = x.shape
    h = w = int(hw ** 0.5)
    pad = 2 - h % 2 if h % 2 else 0
    x = x.reshape(bs, h, w, c)
    if pad > 0:
        x = F.pad(x, (0, 0, 0, pad, 0, pad), "constant", 0)
    x = x.permute(0, 3, 1, 2)
    x = F.unfold(x, kernel_size=2, stride=2, padding=0)
    return x.permute(0, 2, 1)


def test_downsample_equals_reference_unfold():
    torch.manual_seed(0)
    x = torch.randn(3, 27 * 27, 16)
    assert torch.equal(downsample_2x2(x), _reference_downsample(x))
    assert downsample_2x2(x).shape == (3, 196, 64)


def _reference_tiles_layout(feats, rows, cols, newline, sep):
    # prepare_inputs_embeds of DeepSeek-VL2, global_view_pos "head"
    n, hw, d = feats.shape
    h = w = int(hw ** 0.5)
    g = torch.cat([feats[0].view(h, w, d), newline.view(1, 1, d).repeat(h, 1, 1)], dim=1).view(-1, d)
    loc = feats[1:].view(rows, cols, h, w, d).permute(0, 2, 1, 3, 4).reshape(rows * h, cols * w, d)
    loc = torch.cat([loc, newline.view(1, 1, d).repeat(rows * h, 1, 1)], dim=1).view(-1, d)
    return torch.cat([g, sep[None], loc])


@pytest.mark.parametrize("size", [(800, 500), (300, 1200), (384, 384)])
def test_tiles_layout_count_and_order(size):
    torch.manual_seed(0)
    plan = tiles.plan_tiles(Image.new("RGB", size))
    rows, cols = plan.grid
    feats = torch.randn(1 + rows * cols, 196, 8)
    newline, sep = torch.randn(8), torch.randn(8)
    ours = tiles_layout(feats, plan, newline, sep)
    assert ours.shape == (plan.num_tokens, 8)
    assert torch.equal(ours, _reference_tiles_layout(feats, rows, cols, newline, sep))
    assert torch.equal(ours[14], newline) and torch.equal(ours[210], sep)   # end of global row 0; separator
    assert torch.equal(ours[211], feats[1, 0])                              # first local token: tile 0, patch 0


def test_tiles_layout_mismatch_raises():
    plan = tiles.plan_tiles(Image.new("RGB", (384, 384)))
    with pytest.raises(ValueError, match="2 views"):
        tiles_layout(torch.zeros(3, 196, 4), plan, torch.zeros(4), torch.zeros(4))
    wrong = ImagePlan("tiles", plan.pixel_values, plan.original_size, plan.resized_size, plan.grid, {"x": 400})
    with pytest.raises(ValueError, match="421.*400"):
        tiles_layout(torch.zeros(2, 196, 4), wrong, torch.zeros(4), torch.zeros(4))
