"""Load an image from any common input safely and return it as an 8-bit RGB PIL image.

Accepted inputs (`ImageSource`):
    - a path (str or Path) to an image file Pillow can read,
    - raw file bytes (bytes, bytearray, memoryview),
    - a base64 data URL string, `data:image/png;base64,iVBOR...`,
    - a PIL image (a lazily opened one is decoded here),
    - a numpy array, channels last: (H, W), (H, W, 1) grey, (H, W, 2) grey + alpha, (H, W, 3) RGB,
      (H, W, 4) RGBA, of dtype uint8 (0..255), uint16 (0..65535), bool, or float16/32/64 with every
      value finite and in [0, 1].

What comes out is always mode RGB:
    - the EXIF Orientation tag is applied (the pixels are turned upright, as a viewer shows them);
    - transparency (modes LA, La, PA, RGBA, RGBa, a P/L/RGB image with a `transparency` entry) is
      composited over `background` (white by default);
    - 16/32-bit integer modes (I;16*, I) are read as 16-bit data, 0..65535, and scaled to 0..255 by
      round(v / 257), so 65535 -> 255 and 257 -> 1; values outside 0..65535 are an error;
    - float mode F is read as 0..1, scaled by round(v * 255); values outside [0, 1] or NaN are an error;
    - every other mode (1, L, P, CMYK, YCbCr, LAB, HSV ...) uses Pillow's own `convert("RGB")`;
    - animated images give their first frame (`load_frames` gives them all).

Safety: the image header is read first and an image larger than `max_pixels`, or with a side above
MAX_SIDE (65535) pixels, is refused before any pixel is decoded (Pillow's own DecompressionBombWarning is silenced and its DecompressionBombError
becomes an ImageLoadError). Every failure (missing file, non-image or truncated data, zero-size
image, unsupported format or mode) raises `ImageLoadError`, a ValueError whose message starts with
the input ("photo.jpg", "bytes (1234 bytes)", "data URL (image/png)", "array of shape (0, 4)") and
says the cause.

    >>> import numpy as np
    >>> load_image(np.zeros((2, 3), dtype=np.uint8)).size
    (3, 2)
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_PIXELS = 64 * 1024 * 1024  # refuse larger images (decompression bombs)
MAX_SIDE = 65535  # refuse wider or taller images from the header (no scheme plans such a side within bounds)
MAX_FRAMES = 1024  # load_frames refuses animations with more frames (sample them with vlmkit.image.video)

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]
RGB = tuple[int, int, int]
WHITE: RGB = (255, 255, 255)

# Pillow signals broken data with any of these, depending on the format plugin (a multi-page TIFF whose
# later page lacks its size raises TypeError "Missing dimensions" while the pages are counted).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, TypeError,
                  NotImplementedError, OverflowError, AttributeError)
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# EXIF Orientation value -> the transpose that makes the pixels upright (EXIF 2.32, tag 0x0112).
_ORIENTATION_FIX = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION = 0x0112


class ImageLoadError(ValueError):
    """An input could not be read as an image; the message names the input and the cause."""


def load_image(source: ImageSource, background: RGB = WHITE, max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """Read source as an upright RGB PIL image (first frame of an animation; alpha over `background`).

    max_pixels: refuse images with more pixels than this (None: no limit of ours, Pillow's still applies).
    """
    background = _check_background(background)
    with open_image(source, max_pixels) as opened:
        return opened.frame(0, background)


def load_frames(source: ImageSource, background: RGB = WHITE, max_pixels: int | None = MAX_PIXELS,
                max_frames: int = MAX_FRAMES) -> list[Image.Image]:
    """Read every frame of source (one for a still image) as upright RGB PIL images.

    max_pixels applies to each frame; an animation with more than max_frames frames is refused.
    """
    background = _check_background(background)
    with open_image(source, max_pixels) as opened:
        if opened.num_frames > max_frames:
            raise ImageLoadError(f"{opened.name}: has {opened.num_frames} frames, more than max_frames={max_frames}; "
                                 "sample some with vlmkit.image.video.load_video_frames or raise max_frames")
        return [opened.frame(i, background) for i in range(opened.num_frames)]


def to_rgb(image: Image.Image, background: RGB = WHITE, name: str = "image") -> Image.Image:
    """Convert a decoded PIL image of any mode to RGB by the rules in the module docstring."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)  # (H, W)
        if values.min() < 0 or values.max() > 65535:
            raise ImageLoadError(f"{name}: mode {mode} values span {values.min()}..{values.max()}, outside the "
                                 "16-bit range 0..65535 this loader reads them as; rescale the data first")
        grey = Image.fromarray(np.rint(values / 257.0).astype(np.uint8))  # 65535 -> 255
        transparent = image.info.get("transparency")
        if isinstance(transparent, int):
            grey.putalpha(Image.fromarray(np.where(values == transparent, 0, 255).astype(np.uint8)))
        image, mode = grey, grey.mode
    elif mode == "F":
        values = np.asarray(image, dtype=np.float64)  # (H, W)
        _check_unit_range(values, name, f"mode {mode}")
        image, mode = Image.fromarray(np.rint(values * 255.0).astype(np.uint8)), "L"
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = (image.convert("LA") if mode == "La" else image).convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise ImageLoadError(f"{name}: cannot convert mode {mode} to RGB ({e})") from e


class OpenedImage:
    """An image whose header has been read and checked; frames are decoded one at a time on request.

    Made by `open_image`; `vlmkit.image.video` uses it to decode only the frames it samples.
    """

    def __init__(self, image: Image.Image, name: str, max_pixels: int | None):
        self.image = image
        self.name = name
        self.max_pixels = max_pixels
        with _translating_errors(name):
            _check_size(image.size, name, max_pixels)
            self.num_frames = int(getattr(image, "n_frames", 1))
            self.orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1))

    def frame(self, index: int, background: RGB = WHITE) -> Image.Image:
        """Decode frame `index` as an upright RGB image."""
        with _translating_errors(self.name):
            self._seek(index)
            _check_size(self.image.size, self.name, self.max_pixels)  # GIF frames may grow the canvas
            self.image.load()
            rgb = to_rgb(self.image, background, self.name)
        fix = _ORIENTATION_FIX.get(self.orientation)
        return rgb.transpose(fix) if fix is not None else rgb

    def duration_ms(self, index: int) -> float | None:
        """How many milliseconds frame `index` is shown, from the file (None when it gives none or 0)."""
        with _translating_errors(self.name):
            self._seek(index)
            if self.image.format == "WEBP":
                self.image.load()  # Pillow's WebP reader sets a frame's duration only once it is decoded
            duration = self.image.info.get("duration")
        return duration if isinstance(duration, (int, float)) and duration > 0 else None

    def _seek(self, index: int) -> None:
        if not 0 <= index < self.num_frames:
            raise ImageLoadError(f"{self.name}: frame {index} requested but it has {self.num_frames} frame(s)")
        if index != self.image.tell():
            self.image.seek(index)


@contextmanager
def open_image(source: ImageSource, max_pixels: int | None = MAX_PIXELS) -> Iterator[OpenedImage]:
    """Open source (reading only its header), check its size, and close it afterwards if it was opened here.

    A PIL image passed in is not closed; its current frame is restored on exit.
    """
    if isinstance(source, Image.Image):
        name = source_name(source)
        position = source.tell()
        try:
            yield OpenedImage(source, name, max_pixels)
        finally:
            if source.tell() != position:
                source.seek(position)
        return
    if isinstance(source, np.ndarray):
        name = source_name(source)
        yield OpenedImage(_array_to_image(source, name, max_pixels), name, max_pixels)
        return
    data, name = _read_source(source)
    with _translating_errors(name):
        image = Image.open(io.BytesIO(data))
    try:
        yield OpenedImage(image, name, max_pixels)
    finally:
        image.close()


def source_name(source: ImageSource) -> str:
    """How error messages name source: the path, "bytes (N bytes)", "data URL (image/png)", "array of shape ..."."""
    if isinstance(source, Image.Image):
        return f"PIL image ({source.mode}, {source.width}x{source.height})"
    if isinstance(source, np.ndarray):
        return f"array of shape {tuple(source.shape)} and dtype {source.dtype}"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"bytes ({len(source)} bytes)"
    if isinstance(source, str) and source.startswith("data:"):
        return f"data URL ({source[5:].split(',', 1)[0].split(';', 1)[0] or 'no media type'})"
    return str(source)


def _read_source(source: ImageSource) -> tuple[bytes, str]:
    """The encoded bytes of a path, bytes or data URL source, and its name for messages."""
    name = source_name(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, str) and source.startswith("data:"):
        data = _decode_data_url(source, name)
    elif isinstance(source, str) and source.startswith(("http://", "https://")):
        raise ImageLoadError(f"{source}: URLs are not downloaded; save the image to a file and pass its path")
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            raise ImageLoadError(f"{path}: is a directory, not an image file")
        try:
            data = path.read_bytes()
        except FileNotFoundError as e:
            raise ImageLoadError(f"{path}: no such file") from e
        except OSError as e:
            raise ImageLoadError(f"{path}: could not read the file ({e})") from e
    else:
        raise ImageLoadError(f"input of type {type(source).__name__}: not an image source; pass a path, bytes, "
                             "a base64 data URL, a PIL image or a numpy array")
    if not data:
        raise ImageLoadError(f"{name}: is empty (0 bytes), not an image")
    return data, name


def _decode_data_url(url: str, name: str) -> bytes:
    """The payload of a `data:[<media type>];base64,<data>` URL."""
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise ImageLoadError(f"{name}: has no ',' separating the header from the data; "
                             "expected data:image/<format>;base64,<data>")
    media_type, *params = header.split(";")
    if "base64" not in params:
        raise ImageLoadError(f"{name}: is not base64-encoded; expected data:image/<format>;base64,<data>")
    if media_type and not media_type.startswith("image/"):
        raise ImageLoadError(f"{name}: media type {media_type!r} is not an image type (image/...)")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except binascii.Error as e:
        raise ImageLoadError(f"{name}: invalid base64 data ({e})") from e


def _array_to_image(array: np.ndarray, name: str, max_pixels: int | None) -> Image.Image:
    """An 8-bit L, LA, RGB or RGBA PIL image from a channels-last array (rules in the module docstring)."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]  # (H, W)
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (2, 3, 4))):
        hint = " (channels first? transpose to (H, W, C))" if array.ndim == 3 and array.shape[0] in (1, 3, 4) else ""
        raise ImageLoadError(f"{name}: expected shape (H, W), (H, W, 1), (H, W, 2), (H, W, 3) or (H, W, 4){hint}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageLoadError(f"{name}: zero-size image ({array.shape[1]}x{array.shape[0]})")
    _check_size((array.shape[1], array.shape[0]), name, max_pixels)
    if array.dtype == np.uint8:
        pixels = array
    elif array.dtype == np.bool_:
        pixels = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        pixels = np.rint(array / 257.0).astype(np.uint8)  # 65535 -> 255
    elif np.issubdtype(array.dtype, np.floating):
        _check_unit_range(array, name, "float array")
        pixels = np.rint(array.astype(np.float64) * 255.0).astype(np.uint8)
    else:
        raise ImageLoadError(f"{name}: dtype {array.dtype} is not accepted; use uint8 (0..255), uint16 (0..65535), "
                             "bool, or float in [0, 1]")
    return Image.fromarray(np.ascontiguousarray(pixels))


def _check_unit_range(values: np.ndarray, name: str, what: str) -> None:
    if not np.isfinite(values).all():
        raise ImageLoadError(f"{name}: {what} contains NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
        raise ImageLoadError(f"{name}: {what} values span {low:g}..{high:g}; floats must lie in [0, 1] "
                             "(divide 0..255 data by 255, or pass uint8)")


def _check_size(size: tuple[int, int], name: str, max_pixels: int | None) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"{name}: zero-size image ({width}x{height})")
    if max(width, height) > MAX_SIDE:
        raise ImageLoadError(f"{name}: {width}x{height} has a side longer than {MAX_SIDE} pixels, more than any image "
                             "scheme plans; crop it or resize it first")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageLoadError(f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} "
                             "(max_pixels guards against decompression bombs; raise it if you trust the file)")


def _check_background(background: RGB) -> RGB:
    values = tuple(background)
    if len(values) != 3 or not all(isinstance(v, (int, np.integer)) and 0 <= v <= 255 for v in values):
        raise ValueError(f"background must be three integers in 0..255 (R, G, B), got {background!r}")
    return (int(values[0]), int(values[1]), int(values[2]))


@contextmanager
def _translating_errors(name: str) -> Iterator[None]:
    """Turn Pillow's decoding failures into ImageLoadError naming the input; silence its bomb warning."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except ImageLoadError:
        raise
    except UnidentifiedImageError as e:
        raise ImageLoadError(f"{name}: not an image in a format Pillow can read") from e
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"{name}: refused by Pillow's decompression-bomb limit ({e}); "
                             "raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file") from e
    except _DECODE_ERRORS as e:
        raise ImageLoadError(f"{name}: could not decode the image (truncated or corrupt? {type(e).__name__}: {e})") from e
