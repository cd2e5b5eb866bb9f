"""Qwen2-VL's `dynamic` scheme: native resolution, 14-px patches, 2x2 merge, frames paired in time.

Reference: Qwen2-VL (Wang et al., "Qwen2-VL: Enhancing Vision-Language Model's Perception of the World at
Any Resolution", 2024, sec. 2.1 "naive dynamic resolution"), as transformers' Qwen2VLImageProcessor(Pil)
and Qwen2VLVideoProcessor do it (the reference for every number here); Qwen2.5-VL plans the same way.
The model side (vision tower with its merger, M-RoPE) is models/qwen2_vl.py. One pure function per step:

1. `smart_resize`: round height and width to multiples of 28 (patch 14 x merge 2),
   then scale into [min_pixels, max_pixels] keeping the aspect ratio.
2. bicubic resize (PIL), x / 255, (x - mean) / std with OpenAI CLIP's mean/std.
3. `patchify`: cut into 14x14 patches, pair frames along time (temporal patch 2; a
   single image, or the last frame of an odd-length clip, is repeated), and order the
   rows so that every 2x2 merge group is 4 consecutive rows -> (t*h*w, C*T*P*P).

    >>> from PIL import Image
    >>> plan = plan_dynamic(Image.new("RGB", (224, 224)))
    >>> plan.extra["image_grid_thw"], tuple(plan.pixel_values.shape), plan.num_tokens
    ((1, 16, 16), (256, 1176), 64)
    >>> plan.context_tokens, plan.text_parts
    (66, {'<|vision_start|>': 1, '<|vision_end|>': 1})

Token count. transformers' Qwen2VLProcessor expands each `<|image_pad|>` into
t*h*w / merge**2 copies, and the model scatters exactly that many merged patch
features into them; the chat template writes `<|vision_start|>` and `<|vision_end|>`
around the pad as ordinary text tokens, which get no image features. So a plan's
`num_tokens` (its `parts`) is the placeholder count the model fills (64 for 224x224),
which is what the prompt builder repeats and what the feature count is checked
against. The two wrapper tokens are `VISION_WRAPPER`, the plan's `text_parts`, so
`context_tokens` (= num_tokens + 2, 66 for 224x224) comes from
the same plan, for context-budget planning.

Forward inputs (`Dynamic.inputs`): image plans give pixel_values (N, C*T*P*P) and image_grid_thw (I, 3),
video plans pixel_values_videos and video_grid_thw, and Qwen2.5-VL's timed videos second_per_grid_ts (V,).
The encoder runs the tower (merger included) once over all images and splits the merged rows per image
by `merged_tokens`, the count every plan has.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from vlmkit.config import CLIP_MEAN, CLIP_STD
from vlmkit.image.overlay import Geometry, whole_box
from vlmkit.image.pixels import as_rgb, normalize_uint8, resize_work
from vlmkit.image.plan import ImagePlan
from vlmkit.image.video import VideoFrames
from vlmkit.models.mrope import grid_list
from vlmkit.schemes.base import Scheme, Video

if TYPE_CHECKING:
    from vlmkit.models.qwen2_vl import Qwen2VL, Qwen2VLConfig

PATCH_SIZE = 14            # ViT patch side in pixels
MERGE_SIZE = 2             # 2x2 neighbouring patches become one LLM token
TEMPORAL_PATCH_SIZE = 2    # frames per temporal patch (Conv3d depth)
MAX_ASPECT_RATIO = 200     # smart_resize refuses longer / shorter side above this

IMAGE_MIN_PIXELS = 56 * 56
IMAGE_MAX_PIXELS = 28 * 28 * 1280
VIDEO_MIN_PIXELS = 128 * 28 * 28   # Qwen2VLVideoProcessor's per-frame defaults
VIDEO_MAX_PIXELS = 768 * 28 * 28


VISION_WRAPPER = ("<|vision_start|>", "<|vision_end|>")  # text tokens around each image/video's pads
SECONDS_PER_GRID = "second_per_grid"  # a timed video plan's extra: seconds per temporal patch


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor` with min_pixels <= h*w <= max_pixels.

    Follows transformers' qwen2_vl `smart_resize`: round each side to the nearest
    multiple; if the area is too large, scale both sides down by sqrt(area / max_pixels)
    and floor; if too small, scale up by sqrt(min_pixels / area) and ceil.

        >>> smart_resize(224, 224)
        (224, 224)
        >>> smart_resize(480, 640)
        (476, 644)
        >>> smart_resize(1080, 1920)   # 1036x1848 would exceed max_pixels: scaled down
        (728, 1316)
        >>> smart_resize(10, 10)       # below min_pixels: scaled up
        (56, 56)
        >>> smart_resize(1, 201)
        Traceback (most recent call last):
        ...
        ValueError: aspect ratio 201.0 of a 1x201 image (height x width) exceeds 200; crop or pad it first
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width} (height x width)")
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels={min_pixels} exceeds max_pixels={max_pixels}; swap or fix them")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio {ratio} of a {height}x{width} image (height x width) exceeds "
                         f"{MAX_ASPECT_RATIO}; crop or pad it first")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(frames: torch.Tensor, patch_size: int = PATCH_SIZE, merge_size: int = MERGE_SIZE,
             temporal_patch_size: int = TEMPORAL_PATCH_SIZE) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(F, C, H, W) frames -> ((t*h*w, C*T*P*P) patch rows, (t, h, w) patch grid).

    Frames are grouped `temporal_patch_size` at a time; when F is not a multiple the
    last frame is repeated (one image becomes two identical frames). Rows are ordered
    (t, h/merge, w/merge, merge_row, merge_col), so each merge group is `merge**2`
    consecutive rows, and each row is laid out (C, T, P, P), as the reference does.

        >>> rows, thw = patchify(torch.zeros(1, 3, 56, 28))
        >>> tuple(rows.shape), thw
        ((8, 1176), (1, 4, 2))
        >>> x = torch.arange(16.).view(1, 1, 4, 4)   # one 1-channel 4x4 frame, patch 1, merge 2
        >>> patchify(x, patch_size=1, merge_size=2, temporal_patch_size=1)[0].flatten().tolist()
        [0.0, 1.0, 4.0, 5.0, 2.0, 3.0, 6.0, 7.0, 8.0, 9.0, 12.0, 13.0, 10.0, 11.0, 14.0, 15.0]
    """
    num_frames, channels, height, width = frames.shape
    unit = patch_size * merge_size
    if num_frames == 0:
        raise ValueError("patchify got 0 frames; pass at least one image")
    if height % unit or width % unit:
        raise ValueError(f"frame size {height}x{width} is not a multiple of patch*merge={unit}; "
                         f"resize with smart_resize first")
    if pad := -num_frames % temporal_patch_size:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])  # (F + pad, C, H, W)
    t = frames.shape[0] // temporal_patch_size
    h, w = height // patch_size, width // patch_size
    x = frames.reshape(t, temporal_patch_size, channels, h // merge_size, merge_size, patch_size,
                       w // merge_size, merge_size, patch_size)  # (t, T, C, h/m, m, P, w/m, m, P)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t, h/m, w/m, m, m, C, T, P, P)
    rows = x.reshape(t * h * w, channels * temporal_patch_size * patch_size * patch_size)  # (t*h*w, C*T*P*P)
    return rows, (t, h, w)


def patch_rows(frames: Sequence[Image.Image], size: tuple[int, int], mean: tuple[float, ...],
               std: tuple[float, ...]) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Bicubic-resize frames to size=(width, height), normalise and patchify them ->
    ((t*h*w, 3*T*P*P) rows, (t, h, w)), the same rows as `patchify` of the normalised frames.

    Done in the cheap order: the patch reordering runs on uint8 pixels with T = 1 (one byte
    per value, each frame once), one fused pass normalises, and only then is every frame
    copied into its temporal slot(s) (an image, or the last frame of an odd clip, into two).

        >>> rows, thw = patch_rows([Image.new("RGB", (64, 64), (255, 0, 0))], (56, 28), (0.5,) * 3, (0.5,) * 3)
        >>> tuple(rows.shape), thw, rows[0, :4].tolist(), rows[0, -1].item()
        ((8, 1176), (1, 2, 4), [1.0, 1.0, 1.0, 1.0], -1.0)
    """
    pixels = torch.from_numpy(np.stack([np.asarray(as_rgb(f).resize(size, Image.Resampling.BICUBIC))
                                        for f in frames]))  # (F, H, W, 3) uint8
    byte_rows, (num_frames, h, w) = patchify(pixels.permute(0, 3, 1, 2), temporal_patch_size=1)  # (F*h*w, 3*P*P)
    normalised = normalize_uint8(byte_rows.view(num_frames, h * w, 3, PATCH_SIZE * PATCH_SIZE, 1), mean, std)
    normalised = normalised.squeeze(-1)  # (F, h*w, C, P*P)
    t = -(-num_frames // TEMPORAL_PATCH_SIZE)
    if num_frames == 1:  # an image fills every temporal slot: a broadcast view, copied once below
        slots = normalised.expand(TEMPORAL_PATCH_SIZE, -1, -1, -1)  # (T, h*w, C, P*P)
    else:  # slots past the last frame repeat it, as patchify pads
        slots = normalised[torch.arange(t * TEMPORAL_PATCH_SIZE).clamp(max=num_frames - 1)]  # (t*T, h*w, C, P*P)
    slots = slots.view(t, TEMPORAL_PATCH_SIZE, h * w, 3, PATCH_SIZE * PATCH_SIZE)  # (t, T, h*w, C, P*P)
    rows = slots.permute(0, 2, 3, 1, 4).reshape(t * h * w, -1)  # (t*h*w, C*T*P*P)
    return rows, (t, h, w)


def _plan(frames: Sequence[Image.Image], modality: str, min_pixels: int, max_pixels: int,
          mean: tuple[float, ...], std: tuple[float, ...]) -> ImagePlan:
    """Shared body of plan_dynamic / plan_video_dynamic; modality is "image" or "video"."""
    width, height = frames[0].size
    new_h, new_w = smart_resize(height, width, PATCH_SIZE * MERGE_SIZE, min_pixels, max_pixels)
    rows, (t, h, w) = patch_rows(frames, (new_w, new_h), mean, std)
    return ImagePlan(
        scheme="dynamic", pixel_values=rows, original_size=(width, height), resized_size=(new_w, new_h),
        grid=(h, w), parts={f"{modality}_pad": merged_tokens((t, h, w))},
        text_parts={token: 1 for token in VISION_WRAPPER},
        extra={f"{modality}_grid_thw": (t, h, w), "merge_size": MERGE_SIZE})


def plan_dynamic(image: Image.Image, min_pixels: int = IMAGE_MIN_PIXELS, max_pixels: int = IMAGE_MAX_PIXELS,
                 mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD) -> ImagePlan:
    """Plan one image the Qwen2-VL way.

    pixel_values (t*h*w, 3*2*14*14) with t = 1; grid (h, w) in 14-px patches;
    parts {"image_pad": t*h*w/4}; text_parts the two vision wrapper tokens; extra
    {"image_grid_thw", "merge_size"} (see the module docstring).

        >>> plan = plan_dynamic(Image.new("RGB", (640, 480)))
        >>> plan.resized_size, plan.grid, plan.parts
        ((644, 476), (34, 46), {'image_pad': 391})
    """
    if image.width == 0 or image.height == 0:
        raise ValueError(f"image has zero size {image.width}x{image.height}; pass a non-empty image")
    return _plan([image], "image", min_pixels, max_pixels, mean, std)


def plan_video_dynamic(frames: Sequence[Image.Image], min_pixels: int = VIDEO_MIN_PIXELS,
                       max_pixels: int = VIDEO_MAX_PIXELS, mean: tuple[float, ...] = CLIP_MEAN,
                       std: tuple[float, ...] = CLIP_STD) -> ImagePlan:
    """Plan a clip of already-sampled, equally sized frames as one Qwen2-VL video.

    Frames are paired along time, grid_t = ceil(len(frames) / 2) (an odd count repeats
    the last frame); every frame is resized to the same smart_resize size with the
    video processor's per-frame pixel limits. parts {"video_pad": t*h*w/4}, extra
    {"video_grid_thw", ...}.

        >>> clip = [Image.new("RGB", (448, 448))] * 3
        >>> plan = plan_video_dynamic(clip)
        >>> plan.extra["video_grid_thw"], plan.num_tokens, plan.context_tokens
        ((2, 32, 32), 512, 514)
    """
    if not frames:
        raise ValueError("plan_video_dynamic got no frames; sample at least one frame from the video")
    sizes = {f.size for f in frames}
    if len(sizes) > 1:
        raise ValueError(f"video frames differ in size {sorted(sizes)}; all frames of a clip must match")
    if 0 in frames[0].size:
        raise ValueError(f"video frames have zero size {frames[0].size}; pass non-empty frames")
    return _plan(list(frames), "video", min_pixels, max_pixels, mean, std)


def dynamic_work(width: int, height: int, frames: int = 1, min_pixels: int = IMAGE_MIN_PIXELS,
                 max_pixels: int = IMAGE_MAX_PIXELS) -> int:
    """Bytes patch_rows allocates for `frames` width x height frames: each frame's resize to the smart_resize
    size (at most max_pixels), the uint8 frames and patch rows, the normalised rows and their temporal
    copies (float32). ValueError, as smart_resize, for an aspect ratio above 200."""
    new_h, new_w = smart_resize(height, width, PATCH_SIZE * MERGE_SIZE, min_pixels, max_pixels)
    pixels = new_h * new_w * 3
    slots = -(-frames // TEMPORAL_PATCH_SIZE) * TEMPORAL_PATCH_SIZE
    return (resize_work((width, height), (new_w, new_h)) + frames * 3 * pixels + frames * 4 * pixels
            + slots * 4 * pixels)


def merged_tokens(grid_thw: tuple[int, int, int], merge: int = MERGE_SIZE) -> int:
    """LLM tokens of one image or video of patch grid (t, h, w): t * h * w / merge**2.

        >>> merged_tokens((1, 16, 16)), merged_tokens((2, 32, 32))
        (64, 512)
    """
    t, h, w = grid_thw
    return t * h * w // merge**2


def dynamic_inputs(plans: Sequence[ImagePlan]) -> dict[str, torch.Tensor]:
    """Forward keyword tensors for `dynamic` plans in prompt order: image plans give pixel_values
    (N, C*T*P*P) and image_grid_thw (I, 3), video plans pixel_values_videos and video_grid_thw, and videos
    planned with their timing (Qwen2.5-VL) second_per_grid_ts (V,)."""
    out: dict[str, torch.Tensor] = {}
    for kind, pixels_key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        chosen = [p for p in plans if f"{kind}_grid_thw" in p.extra]
        if chosen:
            out[pixels_key] = torch.cat([p.pixel_values for p in chosen])  # (sum t*h*w, C*T*P*P)
            out[f"{kind}_grid_thw"] = torch.tensor([p.extra[f"{kind}_grid_thw"] for p in chosen])  # (n, 3)
    seconds = [p.extra[SECONDS_PER_GRID] for p in plans if SECONDS_PER_GRID in p.extra]
    if seconds:
        out["second_per_grid_ts"] = torch.tensor(seconds)  # (videos,)
    return out


class Dynamic(Scheme):
    """Qwen2-VL's and Qwen2.5-VL's scheme: patch rows of each image at its own resolution through the
    model's tower and merger; videos natively, as one clip with its own placeholder and time ids."""

    name = "dynamic"
    model_class = "Qwen2VL"
    reference_preset = "qwen2-vl"
    input_names = ("pixel_values", "image_grid_thw")
    position_inputs = ("image_grid_thw",)  # the M-RoPE positions come from each image's grid
    placeholders = {"vision_start_token_id": VISION_WRAPPER[0], "vision_end_token_id": VISION_WRAPPER[1],
                    "image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>"}
    prompt_format = "qwen2_vl"
    grid_unit = "14-px patches"

    def check_config(self, cfg: Qwen2VLConfig) -> None:
        """The config class (Qwen2VLConfig) checks itself; the plan uses the reference processor's geometry."""

    def work(self, cfg: Qwen2VLConfig, size: tuple[int, int], num_images: int = 1) -> int:
        return dynamic_work(*size)

    def video_work(self, cfg: Qwen2VLConfig, size: tuple[int, int], frames: int, num_images: int) -> int:
        """The clip is planned at once (plan_video_dynamic): all its frames at the video pixel limits."""
        return dynamic_work(*size, frames, VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS)

    def plan(self, cfg: Qwen2VLConfig, image: Image.Image, num_images: int = 1) -> ImagePlan:
        return plan_dynamic(image)

    def plan_video(self, cfg: Qwen2VLConfig, video: Video, num_images: int) -> list[ImagePlan]:
        """The clip's one plan (plan_video_dynamic); a model whose video time ids follow the clock (Qwen2.5-VL,
        cfg.timed_video) also gets extra[SECONDS_PER_GRID] = temporal patch / sampled fps."""
        frames = video.frames if isinstance(video, VideoFrames) else list(video)
        plan = plan_video_dynamic(frames)
        if cfg.timed_video:
            fps = video.sampled_fps if isinstance(video, VideoFrames) else None
            if fps is None:
                raise ValueError("Qwen2.5-VL spaces a video's time ids by its seconds per frame, but this video "
                                 "carries no timing; give a frame directory a source fps (--source-fps) or pass "
                                 "an animation with frame durations")
            plan.extra[SECONDS_PER_GRID] = TEMPORAL_PATCH_SIZE / fps
        return [plan]

    def inputs(self, plans: Sequence[ImagePlan]) -> dict[str, torch.Tensor]:
        return dynamic_inputs(plans)

    def encode(self, model: Qwen2VL, pixel_values: torch.Tensor, image_grid_thw: Any = None
               ) -> list[torch.Tensor]:
        """Each image's merged rows (T_i, C), in order: the vision tower runs once over them all."""
        if image_grid_thw is None:
            raise ValueError("image pixels need image_grid_thw (one (t, h, w) row per image, from its plan)")
        rows = model.vision(pixel_values, image_grid_thw)  # (F, C)
        return list(rows.split(self.row_counts(model.cfg, image_grid_thw)))  # I x (T_i, C)

    def row_counts(self, cfg: Qwen2VLConfig, grid_thw: Any) -> list[int]:
        """Merged tokens of each image of a grid (I, 3), the count its plan gives."""
        return [merged_tokens(g, cfg.vision.spatial_merge_size) for g in grid_list(grid_thw)]

    def check_embeds(self, cfg: Qwen2VLConfig, rows: Sequence[torch.Tensor], positions: dict[str, Any]) -> None:
        grid = positions.get("image_grid_thw")
        if grid is None:
            raise ValueError("image_embeds need image_grid_thw too: the M-RoPE positions come from each image's grid")
        counts = self.row_counts(cfg, grid)
        if [r.shape[0] for r in rows] != counts:
            raise ValueError(f"image_embeds have {[r.shape[0] for r in rows]} rows per image but image_grid_thw "
                             f"gives {counts}; pass each image's grid with its encode_images rows")

    def geometry(self, plan: ImagePlan) -> Geometry:
        rows, cols = plan.grid
        merge = plan.extra["merge_size"]
        return Geometry(whole_box(plan), rows // merge, cols // merge, "token", ())
