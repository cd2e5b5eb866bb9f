"""Video inputs of Qwen2-VL and Qwen2.5-VL (pixel_values_videos + video_grid_thw, frames paired in time,
M-RoPE time ids, <|video_pad|> placeholders) against transformers' Qwen2VLForConditionalGeneration and
Qwen2_5_VLForConditionalGeneration.

The clip: 8 frames cut from skimage's astronaut with the crop window sliding 12 px right and 6 px down
per frame, written as numbered PNGs, 5 of them sampled by image/video.py (an odd count: the last frame
is repeated to fill the third temporal patch) and planned by plan_video_dynamic (3 x 4 merged tokens
per temporal patch, 36 video tokens). Tiny random transformers models are saved and loaded by vlmkit;
both models read vlmkit's pixel rows (test_dynamic checks them against transformers' video processor).
Checked: M-RoPE positions against get_rope_index (Qwen2.5-VL with second_per_grid_ts 1.5, so time ids
step by 3 and run past the next text position), logits <= 1e-4 fp32 and 20 greedy tokens for a video
prompt and a mixed image + video prompt, and the placeholder-count errors.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_qwen2_vl_video.py
"""

from __future__ import annotations

import pytest
import skimage.data
import torch
import transformers
from PIL import Image
from qwen_vl_parity import END, IMAGE, START, TOKENS, TOL, VIDEO, text_config, widen

from vlmkit.generate import GenerationConfig, generate
from vlmkit.schemes.dynamic import plan_dynamic, plan_video_dynamic
from vlmkit.image.video import load_video_frames
from vlmkit.weights import from_pretrained
from vlmkit.models.mrope import mrope_positions
from vlmkit.schemes.dynamic import dynamic_inputs

FRAME_PIXELS = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 12)  # 84 x 112 px: 3 x 4 merged tokens
SECONDS = {"qwen2_vl": None, "qwen2_5_vl": torch.tensor([1.5])}  # Qwen2.5-VL: time ids step 2 * 1.5 = 3


def _hf_model(kind: str) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    if kind == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, num_heads=4, hidden_size=64, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2)
        model = transformers.Qwen2VLForConditionalGeneration(
            transformers.Qwen2VLConfig(vision_config=vision, text_config=text_config(), **TOKENS))
    else:  # windows of 2 x 2 merged tokens: the 3 x 4 grid has a short bottom row of windows
        vision = dict(depth=4, hidden_size=32, num_heads=4, intermediate_size=48, out_hidden_size=64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1, 3],
                      tokens_per_second=2)
        model = transformers.Qwen2_5_VLForConditionalGeneration(
            transformers.Qwen2_5_VLConfig(vision_config=vision, text_config=text_config(), **TOKENS))
    return widen(model)  # biases too; norm weights stay ones


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def models(request, tmp_path_factory):
    hf = _hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, from_pretrained(path)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """(video plan, image plan): the sliding-crop clip through image/video.py, and one astronaut still."""
    astronaut = Image.fromarray(skimage.data.astronaut())  # 512 x 512
    folder = tmp_path_factory.mktemp("frames")
    for k in range(8):
        astronaut.crop((12 * k, 6 * k, 12 * k + 336, 6 * k + 252)).save(folder / f"frame_{k}.png")
    clip = load_video_frames(folder, num_frames=5)
    assert clip.indices == [0, 1, 3, 4, 6]  # floor(k * 8 / 5)
    video = plan_video_dynamic(clip.frames, **FRAME_PIXELS)
    assert video.extra["video_grid_thw"] == (3, 6, 8) and video.num_tokens == 36
    image = plan_dynamic(astronaut.resize((140, 112)), max_pixels=28 * 28 * 20)  # 8 x 10 patches: 20 tokens
    return video, image


def _prompt(parts: list[tuple[int, int]], seed: int = 1) -> list[int]:
    """Random text with each (placeholder id, count) wrapped in vision start / end, then more text."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 280, (3,), generator=g).tolist()
    for token, n in parts:
        ids += [START] + [token] * n + [END] + torch.randint(3, 280, (2,), generator=g).tolist()
    return ids + torch.randint(3, 280, (5,), generator=g).tolist()


def _inputs(kind: str, media, mixed: bool) -> tuple[torch.Tensor, dict]:
    """(input_ids (1, T), forward inputs) for a video prompt, or an image then a video."""
    video, image = media
    plans = [image, video] if mixed else [video]
    ids = torch.tensor([_prompt([(IMAGE if "image_grid_thw" in p.extra else VIDEO, p.num_tokens) for p in plans])])
    inputs = dynamic_inputs(plans)
    if SECONDS[kind] is not None:
        inputs["second_per_grid_ts"] = SECONDS[kind]
    return ids, inputs


def _mm_types(ids: torch.Tensor) -> torch.Tensor:
    return (ids == IMAGE).int() + 2 * (ids == VIDEO).int()  # transformers' mm_token_type_ids: 1 image, 2 video


def test_dynamic_inputs_split_images_and_videos(media):
    video, image = media
    inputs = dynamic_inputs([image, video])
    assert set(inputs) == {"pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"}
    assert inputs["video_grid_thw"].tolist() == [[3, 6, 8]] and inputs["image_grid_thw"].tolist() == [[1, 8, 10]]
    assert torch.equal(inputs["pixel_values_videos"], video.pixel_values)  # (3 * 6 * 8, 1176)


@pytest.mark.parametrize("mixed", [False, True], ids=["video", "image+video"])
def test_positions_match_get_rope_index(models, media, mixed):
    kind, hf, ours = models
    ids, inputs = _inputs(kind, media, mixed)
    extra = {"second_per_grid_ts": inputs["second_per_grid_ts"]} if "second_per_grid_ts" in inputs else {}
    want, want_delta = hf.model.get_rope_index(ids, _mm_types(ids), image_grid_thw=inputs.get("image_grid_thw"),
                                               video_grid_thw=inputs["video_grid_thw"], **extra)
    intervals = ours.video_intervals(inputs["video_grid_thw"], inputs.get("second_per_grid_ts"))
    got, got_delta = mrope_positions(ids, inputs.get("image_grid_thw"), IMAGE, 2,
                                     video_grid_thw=inputs["video_grid_thw"], video_token_id=VIDEO,
                                     video_intervals=intervals)
    assert torch.equal(got, want) and torch.equal(got_delta, want_delta)
    first = int((ids[0] == VIDEO).nonzero()[0])
    step = 3 if kind == "qwen2_5_vl" else 1
    assert got[0, 0, first + 12].item() - got[0, 0, first].item() == step  # the next temporal patch's time id


@pytest.mark.parametrize("mixed", [False, True], ids=["video", "image+video"])
def test_logits_match(models, media, mixed):
    kind, hf, ours = models
    ids, inputs = _inputs(kind, media, mixed)
    with torch.no_grad():
        want = hf(input_ids=ids, mm_token_type_ids=_mm_types(ids), **inputs).logits
        got = ours(ids, **inputs).logits
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= TOL


@pytest.mark.parametrize("mixed", [False, True], ids=["video", "image+video"])
def test_greedy_generation_matches(models, media, mixed):
    kind, hf, ours = models
    ids, inputs = _inputs(kind, media, mixed)
    want = hf.generate(input_ids=ids, mm_token_type_ids=_mm_types(ids), **inputs, max_new_tokens=20,
                       do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    got = generate(ours, ids, GenerationConfig(max_new_tokens=20), prefill_inputs=inputs).token_ids[0]
    assert len(want) == 20 and len(set(want)) > 1  # meaningful only if the output is not one repeated token
    assert got == want


def test_video_count_errors(models, media):
    kind, _, ours = models
    ids, inputs = _inputs(kind, media, mixed=False)
    short = ids[:, ids[0] != VIDEO][:, :4]
    with pytest.raises(ValueError, match="0 video placeholder tokens but the videos give 36 features"):
        ours(short, **inputs)
    with pytest.raises(ValueError, match="video pixels need video_grid_thw"):
        ours(ids, pixel_values_videos=inputs["pixel_values_videos"])
    if kind == "qwen2_vl":
        with pytest.raises(ValueError, match="second_per_grid_ts spaces Qwen2.5-VL's"):
            ours(ids, **inputs, second_per_grid_ts=torch.tensor([1.0]))
    else:
        with pytest.raises(ValueError, match="one value per video"):
            ours(ids, **{**inputs, "second_per_grid_ts": torch.tensor([1.0, 2.0])})
