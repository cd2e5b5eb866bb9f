"""Open an image file safely: decode fully, apply EXIF orientation, convert to RGB.

Any failure (missing file, not an image, truncated data) raises ImageLoadError
naming the file and the cause, never a half-decoded image.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 64 * 1024 * 1024  # refuse larger images (decompression bombs)


class ImageLoadError(ValueError):
    """An input could not be read as an image; the message names the input and the cause."""


def load_image(path: str | Path) -> Image.Image:
    """Read path as an RGB PIL image (first frame of animations; alpha composited on white)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageLoadError(f"{path}: {img.width}x{img.height} exceeds the {MAX_PIXELS}-pixel limit")
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.width == 0 or img.height == 0:
                raise ImageLoadError(f"{path}: image has zero size {img.width}x{img.height}")
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return img.convert("RGB")
    except FileNotFoundError as e:
        raise ImageLoadError(f"{path}: no such file") from e
    except UnidentifiedImageError as e:
        raise ImageLoadError(f"{path}: not an image in a format Pillow can read") from e
    except (OSError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"{path}: could not decode the image ({e})") from e
