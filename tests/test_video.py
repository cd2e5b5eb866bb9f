"""vlmkit.image.video: frame indices (hand-computed and transformers' default sampler) and loading sampled frames."""

import io

import numpy as np
import pytest
from PIL import Image

from vlmkit.image.load import ImageLoadError
from vlmkit.image.video import (
    load_video_frames,
    numbered_frame_files,
    sample_frame_indices,
    sample_frame_indices_by_duration,
)


# ---- indices, hand-computed --------------------------------------------------------------------------


@pytest.mark.parametrize("total, n, expected", [
    (10, 4, [0, 2, 5, 7]),  # floor(k * 10 / 4): 0, 2.5, 5, 7.5
    (100, 8, [0, 12, 25, 37, 50, 62, 75, 87]),
    (7, 3, [0, 2, 4]),  # 0, 2.33, 4.67
    (5, 5, [0, 1, 2, 3, 4]),
    (1, 1, [0]),
    (9, 1, [0]),
])
def test_num_frames_evenly_spaced(total, n, expected):
    assert sample_frame_indices(total, num_frames=n) == expected
    assert sample_frame_indices(total, fps_source=25, num_frames=n) == expected  # the rate does not matter


@pytest.mark.parametrize("total, source, fps, expected", [
    (30, 10, 2, [0, 5, 10, 15, 20, 25]),  # 3 s at Qwen2-VL's 2 fps: samples at 0, 0.5, ... 2.5 s
    (120, 30, 2, [0, 15, 30, 45, 60, 75, 90, 105]),  # 4 s of 30 fps video at 2 fps
    (60, 29.97, 2, [0, 14, 29, 44, 59]),  # 2.002 s: samples at 0..2.0 s, index floor(t * 29.97)
    (31, 10, 2, [0, 5, 10, 15, 20, 25, 30]),  # 3.1 s: the sample at 3.0 s still lies inside
    (50, 10, 0.5, [0, 20, 40]),  # one frame every 2 s
    (3, 1, 1, [0, 1, 2]),  # samples exactly on frame starts take the frame starting there
    (4, 2, 5, [0, 1, 2, 3]),  # denser than the source: every frame once
    (1, 24, 2, [0]),
])
def test_fps_sampling(total, source, fps, expected):
    assert sample_frame_indices(total, fps_source=source, fps=fps) == expected


def test_by_duration_follows_the_clock():
    durations = [1.0, 0.25, 0.25, 0.5]  # frames start at 0, 1, 1.25, 1.5 s; 2 s in all
    assert sample_frame_indices_by_duration(durations, fps=2) == [0, 1, 3]  # t = 0, 0.5, 1, 1.5
    assert sample_frame_indices_by_duration(durations, fps=4) == [0, 1, 2, 3]  # t = 0, 0.25, ... 1.75
    assert sample_frame_indices_by_duration(durations, fps=1) == [0, 1]  # t = 0, 1
    assert sample_frame_indices_by_duration(durations, num_frames=2) == [0, 2]  # by index
    assert sample_frame_indices_by_duration([0.1] * 10, fps=5) == [0, 2, 4, 6, 8]


# ---- indices, against transformers ---------------------------------------------------------------------


def test_num_frames_matches_transformers_default_sampler():
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn

    for total in (1, 2, 7, 10, 16, 31, 100, 301):
        for n in sorted({1, 2, 3, 8, total // 2 or 1, total} & set(range(1, total + 1))):
            expected = default_sample_indices_fn(VideoMetadata(total_num_frames=total, fps=30.0), num_frames=n)
            assert sample_frame_indices(total, num_frames=n) == expected.tolist(), (total, n)


@pytest.mark.parametrize("total, source, fps", [(30, 10, 2), (120, 30, 2), (300, 25, 1), (48, 24, 0.5), (90, 30, 3)])
def test_fps_matches_transformers_when_the_duration_fits_whole_samples(total, source, fps):
    # transformers takes int(duration * fps) frames evenly spaced; when that product is whole, the
    # samples at k / fps seconds land on exactly those indices.
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn

    expected = default_sample_indices_fn(VideoMetadata(total_num_frames=total, fps=float(source)), fps=fps)
    assert sample_frame_indices(total, fps_source=source, fps=fps) == expected.tolist()


# ---- index errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"num_frames_total": 0, "num_frames": 1}, "video has 0 frames"),
    ({"num_frames_total": 10}, "exactly one of num_frames or fps"),
    ({"num_frames_total": 10, "num_frames": 2, "fps": 2, "fps_source": 10}, "exactly one of num_frames or fps"),
    ({"num_frames_total": 10, "fps": 2}, "pass fps_source"),
    ({"num_frames_total": 10, "num_frames": 11}, r"num_frames=11 asks for more frames than the video has \(10\)"),
    ({"num_frames_total": 10, "num_frames": 0}, "positive integer"),
    ({"num_frames_total": 10, "num_frames": 2.5}, "positive integer"),
    ({"num_frames_total": 10, "fps": -1, "fps_source": 10}, "fps must be a positive finite number"),
    ({"num_frames_total": 10, "fps": 2, "fps_source": 0}, "fps_source must be a positive finite number"),
    ({"num_frames_total": 10, "fps": float("inf"), "fps_source": 10}, "fps must be a positive finite number"),
])
def test_index_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_frame_indices(**kwargs)


def test_duration_errors():
    with pytest.raises(ValueError, match="video has 0 frames"):
        sample_frame_indices_by_duration([], fps=2)
    with pytest.raises(ValueError, match="duration of frame 1 must be a positive"):
        sample_frame_indices_by_duration([0.1, 0.0], fps=2)


# ---- loading ---------------------------------------------------------------------------------------------

GREYS = [0, 40, 80, 120, 160, 200]


def _animation(fmt: str, durations, greys=GREYS) -> bytes:
    frames = [Image.new("RGB", (8, 6), (g, g, g)) for g in greys]
    buffer = io.BytesIO()
    options = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:], duration=durations, loop=0, **options)
    return buffer.getvalue()


def _greys(video) -> list[int]:
    return [frame.getpixel((0, 0))[0] for frame in video.frames]


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_image_at_fps_uses_its_frame_durations(fmt):
    data = _animation(fmt, [100] * 6)  # 0.6 s at 10 fps
    video = load_video_frames(data, fps=5)  # samples at 0, 0.2, 0.4 s
    assert video.indices == [0, 2, 4]
    assert _greys(video) == [0, 80, 160]
    assert video.timestamps == pytest.approx([0.0, 0.2, 0.4])
    assert video.total_frames == 6
    assert all(frame.mode == "RGB" and frame.size == (8, 6) for frame in video.frames)


def test_animated_image_with_uneven_durations():
    data = _animation("GIF", [500, 100, 100, 100, 100, 100])  # starts 0, .5, .6, .7, .8, .9 s; 1 s in all
    video = load_video_frames(data, fps=4)  # samples at 0, .25, .5, .75 s -> frames 0, 0, 1, 3
    assert video.indices == [0, 1, 3]
    assert _greys(video) == [0, 40, 120]
    assert video.timestamps == pytest.approx([0.0, 0.5, 0.7])


def test_animated_image_num_frames_and_source_fps_override():
    data = _animation("GIF", [500, 100, 100, 100, 100, 100])
    video = load_video_frames(data, num_frames=3)  # by index: 0, 2, 4
    assert video.indices == [0, 2, 4] and _greys(video) == [0, 80, 160]
    assert video.timestamps == pytest.approx([0.0, 0.6, 0.8])
    video = load_video_frames(data, fps=1, source_fps=2)  # 3 s at 2 fps: samples at 0, 1, 2 s
    assert video.indices == [0, 2, 4]
    assert video.timestamps == pytest.approx([0.0, 1.0, 2.0])


def test_animation_without_durations():
    frames = [Image.new("RGB", (4, 4), (g, g, g)) for g in GREYS[:4]]
    buffer = io.BytesIO()
    frames[0].save(buffer, "TIFF", save_all=True, append_images=frames[1:])  # multi-page TIFF: no timing
    data = buffer.getvalue()
    video = load_video_frames(data, num_frames=2)
    assert video.indices == [0, 2] and _greys(video) == [0, 80] and video.timestamps is None
    with pytest.raises(ValueError, match="carry no durations.*pass source_fps"):
        load_video_frames(data, fps=2)


def test_still_image_is_a_one_frame_video():
    still = Image.new("RGB", (4, 4), (40, 40, 40))
    assert _greys(load_video_frames(still, num_frames=1)) == [40]
    with pytest.raises(ValueError, match=r"num_frames=2 asks for more frames than the video has \(1\)"):
        load_video_frames(still, num_frames=2)


def _write_frames(directory, numbers, suffix=".png"):
    for n in numbers:
        Image.new("RGB", (4, 4), (n * 20, n * 20, n * 20)).save(directory / f"frame_{n}{suffix}")


def test_directory_of_numbered_frames(tmp_path):
    _write_frames(tmp_path, range(1, 11))  # frame_1 ... frame_10: numeric order, not text order
    (tmp_path / "notes.txt").write_text("ignored")
    assert [p.name for p in numbered_frame_files(tmp_path)][:3] == ["frame_1.png", "frame_2.png", "frame_3.png"]
    video = load_video_frames(tmp_path, num_frames=5)
    assert video.indices == [0, 2, 4, 6, 8]
    assert _greys(video) == [20, 60, 100, 140, 180]  # frames 1, 3, 5, 7, 9
    assert video.timestamps is None and video.total_frames == 10
    video = load_video_frames(str(tmp_path), fps=2, source_fps=4)  # 2.5 s: samples at 0, 0.5, ... 2.0 s
    assert video.indices == [0, 2, 4, 6, 8]
    assert video.timestamps == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])


def test_directory_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="video has 0 frames"):
        load_video_frames(empty, num_frames=1)
    unnumbered = tmp_path / "unnumbered"
    unnumbered.mkdir()
    Image.new("RGB", (2, 2)).save(unnumbered / "cover.png")
    with pytest.raises(ValueError, match="cover.png has no number"):
        load_video_frames(unnumbered, num_frames=1)
    clash = tmp_path / "clash"
    clash.mkdir()
    _write_frames(clash, [1])
    Image.new("RGB", (2, 2)).save(clash / "frame_01.png")
    with pytest.raises(ValueError, match="share the number 1"):
        load_video_frames(clash, num_frames=1)
    fine = tmp_path / "fine"
    fine.mkdir()
    _write_frames(fine, [0, 1, 2])
    with pytest.raises(ValueError, match="needs source_fps"):
        load_video_frames(fine, fps=2)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        numbered_frame_files(tmp_path / "absent")


def test_loading_errors():
    data = _animation("GIF", [100] * 6)
    with pytest.raises(ValueError, match="exactly one of num_frames or fps"):
        load_video_frames(data)
    with pytest.raises(ValueError, match="exactly one of num_frames or fps"):
        load_video_frames(data, num_frames=2, fps=2)
    with pytest.raises(ImageLoadError, match=r"bytes \(\d+ bytes\): could not decode"):
        load_video_frames(data[: len(data) // 2], num_frames=3)  # the half file holds 3 frames, the last cut
    with pytest.raises(ImageLoadError, match=r"bytes \(5 bytes\): not an image"):
        load_video_frames(b"hello", num_frames=1)


def test_frames_are_arrays_of_the_right_values():
    video = load_video_frames(_animation("PNG", [100] * 6), num_frames=6)
    stacked = np.stack([np.asarray(f) for f in video.frames])  # (T, H, W, 3)
    assert stacked.shape == (6, 6, 8, 3)
    assert stacked[:, 0, 0, 0].tolist() == GREYS
