"""Video as uniformly sampled frames: which frame indices to take, and loading them.

Two ways to sample, exactly one per call:
    - `num_frames=N`: N frames evenly spaced by index, the k-th being floor(k * total / N), as
      transformers' `default_sample_indices_fn` and the Qwen2-VL video processor compute it
      (for a constant frame rate that is every duration / N seconds);
    - `fps=F`: one frame every 1/F seconds, at times 0, 1/F, 2/F ... before the end of the video
      (Qwen2-VL samples video at 2 fps). A frame is never returned twice: when samples are denser
      than the frames (F above the source rate, or a frame held a long time in a GIF), the samples
      falling on the same frame give it once.
An fps sample takes the frame on screen at that time. Times are exact fractions (a float rate or
duration is read to 1e-6, so 29.97 is 2997/100), so a sample time that falls on a frame boundary
picks the frame starting there.

Worked example: 30 frames at 10 fps (3 s) sampled at 2 fps -> times 0, 0.5, ... 2.5 s:

    >>> sample_frame_indices(30, fps_source=10, fps=2)
    [0, 5, 10, 15, 20, 25]
    >>> sample_frame_indices(10, num_frames=4)
    [0, 2, 5, 7]

Sources for `load_video_frames`: an animated image (GIF, WebP, APNG: anything Pillow reads with
several frames; its per-frame durations give the timing) or a directory of numbered image files
(`frame_001.png`, `frame_2.jpg` ... ordered by the last number in the name; give `source_fps`
for timing). Only the sampled frames are decoded.
"""

from __future__ import annotations

import math
import os
import re
from bisect import bisect_right
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from PIL import Image

from vlmkit.image.load import MAX_PIXELS, RGB, WHITE, ImageSource, load_image, open_image

_FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_LAST_NUMBER = re.compile(r"(\d+)(?!.*\d)")


@dataclass
class VideoFrames:
    """Sampled frames of a video.

    frames: RGB images, in time order; indices: their positions among the video's `total_frames`;
    timestamps: each frame's start time in seconds; duration: the whole video's length in seconds
    (both None when the source gives no timing).
    """

    frames: list[Image.Image]
    indices: list[int]
    timestamps: list[float] | None
    total_frames: int
    duration: float | None = None

    @property
    def sampled_fps(self) -> float | None:
        """Sampled frames per second of video: len(frames) / duration (transformers' VideoMetadata.sampled_fps,
        which Qwen2.5-VL's processor turns into seconds per temporal patch); None without timing."""
        return None if self.duration is None else len(self.frames) / self.duration


def sample_frame_indices(num_frames_total: int, fps_source: float | None = None, num_frames: int | None = None,
                         fps: float | None = None) -> list[int]:
    """Indices of the frames to take from a video of num_frames_total frames at a constant fps_source.

    Give exactly one of num_frames (N evenly spaced frames) or fps (one frame every 1/fps seconds,
    which needs fps_source). See the module docstring for the rule.

    >>> sample_frame_indices(7, num_frames=3)
    [0, 2, 4]
    >>> sample_frame_indices(31, fps_source=10, fps=2)  # 3.1 s: samples at 0, 0.5, ... 3.0 s
    [0, 5, 10, 15, 20, 25, 30]
    >>> sample_frame_indices(4, fps_source=2, fps=5)  # denser than the frames: each frame once
    [0, 1, 2, 3]
    """
    _check_request(num_frames_total, num_frames, fps)
    if num_frames is not None:
        return _evenly_spaced(num_frames_total, num_frames)
    if fps_source is None:
        raise ValueError(f"sampling at fps={fps} needs the video's own frame rate; pass fps_source "
                         "(or sample a fixed count with num_frames)")
    return _at_fps([1 / _positive_fraction(fps_source, "fps_source")] * num_frames_total, fps)


def sample_frame_indices_by_duration(durations: list[float] | list[Fraction], num_frames: int | None = None,
                                     fps: float | None = None) -> list[int]:
    """Indices of the frames to take from a video whose frame i is shown for durations[i] seconds.

    fps samples by time as in `sample_frame_indices`; num_frames ignores the durations and takes N
    frames evenly spaced by index, so exactly N distinct frames come back.

    >>> # frames start at 0, 1, 1.25, 1.5 s; samples at 0, 0.5, 1, 1.5 s see frames 0, 0, 1, 3
    >>> sample_frame_indices_by_duration([1.0, 0.25, 0.25, 0.5], fps=2)
    [0, 1, 3]
    >>> sample_frame_indices_by_duration([1.0, 0.25, 0.25, 0.5], num_frames=2)
    [0, 2]
    """
    _check_request(len(durations), num_frames, fps)
    if num_frames is not None:
        return _evenly_spaced(len(durations), num_frames)
    return _at_fps([_positive_fraction(d, f"duration of frame {i}") for i, d in enumerate(durations)], fps)


def _evenly_spaced(total: int, num_frames: int) -> list[int]:
    """floor(k * total / num_frames) for k < num_frames (transformers' default_sample_indices_fn)."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    if num_frames > total:
        raise ValueError(f"num_frames={num_frames} asks for more frames than the video has ({total}); "
                         f"ask for at most {total}")
    return [k * total // num_frames for k in range(num_frames)]


def _at_fps(lengths: list[Fraction], fps: float) -> list[int]:
    """The frames on screen at times 0, 1/fps, 2/fps ... before the end, each frame once."""
    starts = _starts(lengths)
    step = 1 / _positive_fraction(fps, "fps")
    total_time = starts[-1] + lengths[-1]
    times = [step * k for k in range(math.ceil(total_time / step))]
    return sorted({bisect_right(starts, t) - 1 for t in times})


def _starts(lengths: list[Fraction]) -> list[Fraction]:
    """Start time of each frame given how long each is shown."""
    starts = [Fraction(0)]
    for length in lengths[:-1]:
        starts.append(starts[-1] + length)
    return starts


def load_video_frames(source: ImageSource, num_frames: int | None = None, fps: float | None = None, *,
                      source_fps: float | None = None, background: RGB = WHITE,
                      max_pixels: int | None = MAX_PIXELS) -> VideoFrames:
    """Sample frames of an animated image or a directory of numbered images (see the module docstring).

    source_fps: the frame rate to assume; required for fps sampling of a directory, and overrides an
    animation's own frame durations. Without any timing, num_frames samples evenly by index.
    """
    if (num_frames is None) == (fps is None):
        raise ValueError(f"give exactly one of num_frames or fps (got num_frames={num_frames}, fps={fps})")
    if isinstance(source, (str, os.PathLike)) and not str(source).startswith("data:") and Path(source).is_dir():
        return _load_directory(Path(source), num_frames, fps, source_fps, background, max_pixels)
    with open_image(source, max_pixels) as opened:
        total = opened.num_frames
        if source_fps is not None:
            durations = [1 / _positive_fraction(source_fps, "source_fps")] * total
        else:
            millis = [opened.duration_ms(i) for i in range(total)]
            durations = None if None in millis else [Fraction(ms) / 1000 for ms in millis]
        if durations is None and fps is not None:
            raise ValueError(f"{opened.name}: its frames carry no durations, so fps={fps} sampling has no timing; "
                             "pass source_fps, or sample a fixed count with num_frames")
        indices = (sample_frame_indices_by_duration(durations, num_frames, fps) if durations is not None
                   else sample_frame_indices(total, num_frames=num_frames))
        frames = [opened.frame(i, background) for i in indices]
    return VideoFrames(frames, indices, _timestamps(durations, indices), total, _duration(durations))


def numbered_frame_files(directory: str | os.PathLike) -> list[Path]:
    """The image files of a directory ordered by the last number in their names (frame_2 before frame_10)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory of frame images")
    files = [p for p in directory.iterdir() if p.suffix.lower() in _FRAME_SUFFIXES and not p.name.startswith(".")]
    if not files:
        raise ValueError(f"{directory}: video has 0 frames (no {'/'.join(_FRAME_SUFFIXES)} files in it)")
    numbered: dict[int, Path] = {}
    for path in files:
        match = _LAST_NUMBER.search(path.stem)
        if match is None:
            raise ValueError(f"{directory}: frame file {path.name} has no number in its name; "
                             "name frames like frame_0001.png so their order is known")
        number = int(match.group(1))
        if number in numbered:
            raise ValueError(f"{directory}: frame files {numbered[number].name} and {path.name} share the number "
                             f"{number}; each frame needs its own")
        numbered[number] = path
    return [numbered[n] for n in sorted(numbered)]


def _load_directory(directory: Path, num_frames: int | None, fps: float | None, source_fps: float | None,
                    background: RGB, max_pixels: int | None) -> VideoFrames:
    files = numbered_frame_files(directory)
    if fps is not None and source_fps is None:
        raise ValueError(f"{directory}: a directory of frames carries no timing, so fps={fps} sampling needs "
                         "source_fps (the rate the frames were taken at), or sample a fixed count with num_frames")
    durations = None if source_fps is None else [1 / _positive_fraction(source_fps, "source_fps")] * len(files)
    indices = (sample_frame_indices_by_duration(durations, num_frames, fps) if durations is not None
               else sample_frame_indices(len(files), num_frames=num_frames))
    frames = [load_image(files[i], background=background, max_pixels=max_pixels) for i in indices]
    return VideoFrames(frames, indices, _timestamps(durations, indices), len(files), _duration(durations))


def _timestamps(durations: list[Fraction] | None, indices: list[int]) -> list[float] | None:
    if durations is None:
        return None
    starts = _starts(durations)
    return [float(starts[i]) for i in indices]


def _duration(durations: list[Fraction] | None) -> float | None:
    return None if durations is None else float(sum(durations))


def _check_request(num_frames_total: int, num_frames: int | None, fps: float | None) -> None:
    if isinstance(num_frames_total, bool) or not isinstance(num_frames_total, int):
        raise ValueError(f"the video's frame count must be an integer, got {num_frames_total!r}")
    if num_frames_total < 1:
        raise ValueError(f"video has {num_frames_total} frames; there is nothing to sample")
    if (num_frames is None) == (fps is None):
        raise ValueError(f"give exactly one of num_frames or fps (got num_frames={num_frames}, fps={fps})")


def _positive_fraction(value: float | Fraction, what: str) -> Fraction:
    """value as a Fraction (floats read to 1e-6, so 0.1 is 1/10 and 29.97 is 2997/100), refusing <= 0, NaN, inf."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Fraction)) or not math.isfinite(value) \
            or value <= 0:
        raise ValueError(f"{what} must be a positive finite number, got {value!r}")
    return Fraction(value).limit_denominator(1_000_000) if isinstance(value, float) else Fraction(value)
