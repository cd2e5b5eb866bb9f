"""The Qwen2-VL dynamic scheme against transformers' Qwen2-VL image and video processors.

Images: transformers.Qwen2VLImageProcessorPil is the oracle for grids, token counts and
pixel values. Videos: transformers' Qwen2VLVideoProcessor module imports torchvision
(no CPU build here), so its `patchify` and `get_num_of_video_patches` methods are
compiled straight from the installed reference source file (see `_video_reference`)
and run on our resized frames; the resize itself is PIL bicubic, per frame.
"""

import ast
import math
from pathlib import Path

import matplotlib.cbook
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from vlmkit.schemes.dynamic import (
    VISION_WRAPPER,
    patchify,
    plan_dynamic,
    plan_video_dynamic,
    smart_resize,
)

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def _processor(**kwargs) -> transformers.Qwen2VLImageProcessorPil:
    return transformers.Qwen2VLImageProcessorPil(**kwargs)


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _grace_hopper() -> Image.Image:
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        return Image.open(f).convert("RGB")


def _skimage(name: str) -> Image.Image:
    data = pytest.importorskip("skimage.data")
    return Image.fromarray(getattr(data, name)()).convert("RGB")


# (width, height): tiny, odd, square, tall, wide, extreme aspect ratios, huge.
SIZES = [(224, 224), (1, 1), (10, 10), (28, 28), (56, 56), (29, 27), (1000, 100), (100, 1000),
         (200, 1), (1, 200), (640, 480), (1920, 1080), (1080, 1920), (3000, 4000), (777, 333),
         (389, 517), (2600, 13), (13, 2600), (1001, 999), (336, 336), (672, 672), (4000, 31),
         (6000, 1000), (57, 85)]


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_grid_and_token_count_match_processor(size):
    image = _noise(*size)
    expected = _processor()(images=image, return_tensors="np")
    t, h, w = (int(v) for v in expected["image_grid_thw"][0])
    plan = plan_dynamic(image)
    assert plan.extra["image_grid_thw"] == (t, h, w)
    assert plan.grid == (h, w)
    assert plan.num_tokens == t * h * w // 4
    assert plan.context_tokens == plan.num_tokens + 2
    assert tuple(plan.pixel_values.shape) == expected["pixel_values"].shape


def test_224_gives_64_tokens_plus_two_wrappers():
    """Qwen2-VL, Wang et al. 2024, sec. 2.1: a 224x224 image gives 256 patches -> 64 tokens + 2 = 66."""
    plan = plan_dynamic(_noise(224, 224))
    assert plan.pixel_values.shape[0] == 256
    assert plan.parts == {"image_pad": 64}
    assert plan.num_tokens == 64
    assert VISION_WRAPPER == ("<|vision_start|>", "<|vision_end|>")
    assert sum(plan.text_parts.values()) == 2 and plan.context_tokens == 66


PHOTOS = {"grace_hopper": _grace_hopper, "astronaut": lambda: _skimage("astronaut"),
          "coffee": lambda: _skimage("coffee"), "chelsea": lambda: _skimage("chelsea")}
# None keeps the photo's own size; small sizes are scaled up to min_pixels, large ones down to max_pixels.
PHOTO_SIZES = [None, (224, 224), (1000, 300), (50, 80), (1500, 1200)]


@pytest.mark.parametrize("name", list(PHOTOS))
@pytest.mark.parametrize("size", PHOTO_SIZES, ids=["native" if s is None else f"{s[0]}x{s[1]}" for s in PHOTO_SIZES])
def test_pixel_values_match_processor_on_photos(name, size):
    image = PHOTOS[name]()
    if size is not None:
        image = image.resize(size, Image.Resampling.BICUBIC)
    expected = _processor()(images=image, return_tensors="np")
    plan = plan_dynamic(image)
    assert plan.extra["image_grid_thw"] == tuple(int(v) for v in expected["image_grid_thw"][0])
    diff = np.abs(plan.pixel_values.numpy() - expected["pixel_values"]).max()
    assert diff <= 1e-5, f"max abs diff {diff}"


@pytest.mark.parametrize("min_pixels,max_pixels", [(256 * 28 * 28, 512 * 28 * 28), (4 * 28 * 28, 16 * 28 * 28)])
def test_custom_pixel_limits_match_processor(min_pixels, max_pixels):
    image = _grace_hopper()
    expected = _processor(min_pixels=min_pixels, max_pixels=max_pixels)(images=image, return_tensors="np")
    plan = plan_dynamic(image, min_pixels=min_pixels, max_pixels=max_pixels)
    new_w, new_h = plan.resized_size
    assert min_pixels <= new_w * new_h <= max_pixels
    assert plan.extra["image_grid_thw"] == tuple(int(v) for v in expected["image_grid_thw"][0])
    assert np.abs(plan.pixel_values.numpy() - expected["pixel_values"]).max() <= 1e-5


def test_smart_resize_edge_cases():
    # Hand-computed: nearest multiples of 28 when inside the limits.
    assert smart_resize(224, 224) == (224, 224)
    # 41x43 rounds to 28x56 = 1568 < 3136: beta = sqrt(3136 / 1763) = 1.334, so 41 * beta = 54.7 -> 56
    # and 43 * beta = 57.4 -> 84 (ceil to the next multiple of 28).
    assert smart_resize(41, 43) == (56, 84)
    # Below min_pixels: scaled up until the area reaches it.
    h, w = smart_resize(10, 10)
    assert (h, w) == (56, 56) and h * w >= 56 * 56
    # Above max_pixels: floor after scaling down; the result stays inside the limit.
    h, w = smart_resize(8000, 8000)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 28 * 28 * 1280
    assert (h, w) == (28 * math.floor(8000 / math.sqrt(8000 * 8000 / (28 * 28 * 1280)) / 28),) * 2
    # Aspect ratio 200 is allowed, 200.5 is not.
    assert smart_resize(1, 200) == (28, 812)
    with pytest.raises(ValueError, match="aspect ratio 200.5 .* exceeds 200"):
        smart_resize(2, 401)
    with pytest.raises(ValueError, match="aspect ratio"):
        plan_dynamic(Image.new("RGB", (1000, 3)))
    with pytest.raises(ValueError, match="must be positive"):
        smart_resize(0, 10)
    with pytest.raises(ValueError, match="exceeds max_pixels"):
        smart_resize(100, 100, min_pixels=5000, max_pixels=4000)


@pytest.mark.parametrize("size", [(1, 1), (13, 2600), (3000, 4000), (640, 480)])
def test_smart_resize_matches_reference(size):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference

    for min_pixels, max_pixels in [(56 * 56, 28 * 28 * 1280), (128 * 28 * 28, 768 * 28 * 28), (3136, 3136)]:
        assert smart_resize(*size, min_pixels=min_pixels, max_pixels=max_pixels) == reference(
            *size, min_pixels=min_pixels, max_pixels=max_pixels)


def test_patchify_keeps_merge_groups_consecutive():
    """Hand-derived: patch (r, c) of a 4x4 grid with patch 1 and merge 2 lands in row
    (r//2 * 2 + c//2) * 4 + (r%2) * 2 + c%2; every row has the same pixel twice (T=2)."""
    frame = torch.arange(16.0).view(1, 1, 4, 4)
    rows, thw = patchify(frame, patch_size=1, merge_size=2, temporal_patch_size=2)
    assert thw == (1, 4, 4) and rows.shape == (16, 2)
    for r in range(4):
        for c in range(4):
            row = (r // 2 * 2 + c // 2) * 4 + (r % 2) * 2 + c % 2
            assert rows[row].tolist() == [4 * r + c, 4 * r + c]
    with pytest.raises(ValueError, match="not a multiple"):
        patchify(torch.zeros(1, 3, 30, 28))


def _video_reference():
    """transformers' Qwen2VLVideoProcessor.patchify / get_num_of_video_patches, compiled from
    the installed source file (the module itself cannot be imported without torchvision)."""
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl

    path = Path(image_processing_pil_qwen2_vl.__file__).with_name("video_processing_qwen2_vl.py")
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Qwen2VLVideoProcessor")
    methods = [n for n in cls.body if isinstance(n, ast.FunctionDef)
               and n.name in ("patchify", "get_num_of_video_patches")]
    for m in methods:
        m.decorator_list = []
    namespace = {"torch": torch, "smart_resize": image_processing_pil_qwen2_vl.smart_resize}
    module = ast.fix_missing_locations(ast.Module(body=methods, type_ignores=[]))
    exec(compile(module, str(path), "exec"), namespace)
    return namespace["patchify"], namespace["get_num_of_video_patches"]


class _VideoDefaults:
    """The attributes get_num_of_video_patches reads from the processor (class defaults)."""

    size = {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}
    patch_size, merge_size, temporal_patch_size = 14, 2, 2

    def _merge_and_standardize_kwargs(self, **kwargs):
        """transformers >= 5.25 reads the defaults through this (5.24 read the attributes)."""
        defaults = {"size": self.size, "patch_size": self.patch_size, "merge_size": self.merge_size,
                    "temporal_patch_size": self.temporal_patch_size}
        return {**defaults, **kwargs}


@pytest.mark.parametrize("num_frames", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("size", [(320, 240), (448, 448), (1280, 720)])
def test_video_matches_reference_patchify(num_frames, size):
    frames = [_noise(*size, seed=i) for i in range(num_frames)]
    plan = plan_video_dynamic(frames)
    ref_patchify, ref_num_patches = _video_reference()
    w, h = size
    t_expected = (num_frames + 1) // 2  # hand-derived: frames paired, odd count padded by one
    n_patches = ref_num_patches(_VideoDefaults(), num_frames, h, w, {})
    new_w, new_h = plan.resized_size
    assert (new_h, new_w) == smart_resize(h, w, min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28)
    assert plan.extra["video_grid_thw"] == (t_expected, new_h // 14, new_w // 14)
    assert plan.pixel_values.shape[0] == n_patches
    assert plan.num_tokens == n_patches // 4 and plan.parts == {"video_pad": n_patches // 4}

    # Same resized, normalised frames through the reference patchify: identical rows and grid.
    resized = torch.stack([torch.from_numpy(
        ((np.asarray(f.resize((new_w, new_h), Image.Resampling.BICUBIC), dtype=np.float32) / 255 - MEAN) / STD)
        .astype(np.float32).transpose(2, 0, 1).copy()) for f in frames])  # (F, 3, H, W)
    expected, gt, gh, gw = ref_patchify(None, resized[None], 14, 2, 2)
    assert plan.extra["video_grid_thw"] == (gt, gh, gw)
    assert torch.allclose(plan.pixel_values, expected[0], atol=1e-5, rtol=0)


def test_video_odd_frame_count_repeats_last_frame():
    frames = [Image.new("RGB", (56, 56), (v, v, v)) for v in (0, 100, 200)]
    rows = plan_video_dynamic(frames, min_pixels=56 * 56).pixel_values.view(-1, 3, 2, 14, 14)  # (t*h*w, C, T, P, P)
    assert rows.shape[0] == 2 * 4 * 4
    second_pair = rows[16:]  # t = 1: frame 2 and its repeat
    assert torch.equal(second_pair[:, :, 0], second_pair[:, :, 1])
    grey = (200 / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(second_pair[0, :, 0, 0, 0], grey.float(), atol=1e-6)


def test_still_video_equals_image_processor():
    """Two identical frames make the same rows as the image processor's single image."""
    image = _grace_hopper()
    limits = dict(min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28)
    expected = _processor(**limits)(images=image, return_tensors="np")
    plan = plan_video_dynamic([image, image], **limits)
    assert plan.extra["video_grid_thw"] == tuple(int(v) for v in expected["image_grid_thw"][0])
    assert np.abs(plan.pixel_values.numpy() - expected["pixel_values"]).max() <= 1e-5


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="no frames"):
        plan_video_dynamic([])
    with pytest.raises(ValueError, match="differ in size"):
        plan_video_dynamic([Image.new("RGB", (56, 56)), Image.new("RGB", (28, 56))])
    with pytest.raises(ValueError, match="zero size"):
        plan_dynamic(Image.new("RGB", (0, 10)))
