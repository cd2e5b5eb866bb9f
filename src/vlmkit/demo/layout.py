"""Text-block layout for the demo: find the lines of a paragraph image and stack them as 32-pixel rows.

The demo tower reads a 32-pixel-tall band as one row of tokens and its CTC head reads token rows in order,
so a paragraph is read like k lines one after another once each text line sits in its own band. This is
the image plan of a text block (classic OCR line finding, no learning), applied to every paragraph image in
training and evaluation alike:

1. ink = each pixel's largest channel distance from the channel medians (the background), > INK;
2. deskew: the angle in [-3, 3] degrees whose rotation makes the row profile of ink sharpest
   (largest sum of squared row counts), and the image is rotated back by it;
3. lines = runs of rows whose ink count exceeds LINE_FRACTION of the tallest peak, joined across gaps
   of at most 1 row, runs shorter than 3 rows dropped;
4. each line's rows (2 pixels of margin) are pasted, vertically centred, onto a background-coloured
   width x 32 strip (scaled down first when taller than 32) and the strips are stacked top to bottom.

    image = stack_lines(paragraph)       # width x 32k for k found lines, k at most max_lines
"""

from __future__ import annotations

import numpy as np
from PIL import Image

BAND = 32  # pixels per stacked line (one token row of the demo tower)
INK = 60  # grey levels from the background that count as ink
LINE_FRACTION = 0.08
ANGLES = np.linspace(-3.0, 3.0, 25)


def _ink(array: np.ndarray, background: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels far from the background colour."""
    return np.abs(array.astype(np.int16) - background.astype(np.int16)).max(axis=2) > INK


def deskew_angle(ink: np.ndarray) -> float:
    """The rotation (degrees, counter-clockwise, as PIL's rotate) that makes text rows horizontal.

    For these small angles a rotation moves pixel (x, y) to row y - x tan(angle) (about the image centre),
    so each candidate's row profile is a bincount of the sheared ink rows."""
    ys, xs = np.nonzero(ink)
    if len(ys) == 0:
        return 0.0
    H, W = ink.shape
    xs = xs - W / 2
    best, best_score = 0.0, -1.0
    for angle in ANGLES:
        rows = np.rint(ys - xs * np.tan(np.radians(angle))).astype(np.int64) + W  # shifted to be >= 0
        score = float((np.bincount(rows, minlength=H + 2 * W).astype(np.float64) ** 2).sum())
        if score > best_score:
            best, best_score = float(angle), score
    return best


def line_bands(ink: np.ndarray) -> list[tuple[int, int]]:
    """(top, bottom) row ranges (bottom exclusive) of the text lines in an (H, W) ink mask."""
    profile = ink.sum(axis=1).astype(np.float32)
    if profile.max() == 0:
        return []
    on = profile > LINE_FRACTION * profile.max()
    bands: list[list[int]] = []
    for y, value in enumerate(on):
        if not value:
            continue
        if bands and y - bands[-1][1] <= 1:  # a gap of at most one row joins
            bands[-1][1] = y + 1
        else:
            bands.append([y, y + 1])
    return [(a, b) for a, b in bands if b - a >= 3]


def stack_lines(image: Image.Image, max_lines: int = 4) -> Image.Image:
    """The paragraph's lines as a width x (32 * lines) image (see the module docstring); at least one band."""
    rgb = image.convert("RGB")
    array = np.asarray(rgb)
    background = np.median(array.reshape(-1, 3), axis=0).astype(np.uint8)
    fill = tuple(int(v) for v in background)
    angle = deskew_angle(_ink(array, background))
    if angle:
        rgb = rgb.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=fill)
        array = np.asarray(rgb)
    bands = line_bands(_ink(array, background))[:max_lines] or [(0, min(BAND, rgb.height))]
    width = rgb.width
    out = Image.new("RGB", (width, BAND * len(bands)), fill)
    for k, (top, bottom) in enumerate(bands):
        top, bottom = max(0, top - 2), min(rgb.height, bottom + 2)
        strip = rgb.crop((0, top, width, bottom))
        if strip.height > BAND:
            strip = strip.resize((max(1, round(width * BAND / strip.height)), BAND), Image.Resampling.BILINEAR)
        out.paste(strip, (0, k * BAND + (BAND - strip.height) // 2))
    return out
