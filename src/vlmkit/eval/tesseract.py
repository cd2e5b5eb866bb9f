"""Tesseract OCR as a baseline reader: the `tesseract` command line run on one image at a time.

    if tesseract_available():
        text = tesseract_read(load_image("line.png"), psm=7)

Tesseract is an optional system program (Debian/Ubuntu: `apt-get install tesseract-ocr`), never a
Python dependency. Each image is written to a temporary PNG and read with
`tesseract IMAGE stdout -l eng --psm N`; reading from a file rather than stdin works with every
Leptonica build. The page segmentation mode matters: `--psm 7` treats the image as one text line
(the synthetic `lines` kind), `--psm 6` as one uniform block (paragraphs, pages), `--psm 3`
(Tesseract's default) runs full layout analysis. Tesseract ends its output with a newline and, on
some versions, a form feed; both are stripped, as is trailing space on each line.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from PIL import Image

TESSERACT = "tesseract"
INSTALL_HINT = "install it with `apt-get install tesseract-ocr` (Debian/Ubuntu) or `brew install tesseract` (macOS)"
PSM_MODES = range(0, 14)  # Tesseract's page segmentation modes 0..13


class TesseractError(RuntimeError):
    """The tesseract program is missing or failed on an image."""


def tesseract_available() -> bool:
    """True when a `tesseract` program is on PATH."""
    return shutil.which(TESSERACT) is not None


def tesseract_read(image: Image.Image | str | Path, psm: int = 7, lang: str = "eng", timeout: float = 60.0) -> str:
    """The text Tesseract reads in an image (a PIL image or an image file), trailing whitespace stripped.

    psm is the page segmentation mode: 7 = a single text line (default), 6 = a uniform block of text,
    3 = automatic layout. Raises TesseractError when tesseract is not installed or fails.
    """
    if psm not in PSM_MODES:
        raise ValueError(f"psm must be a Tesseract page segmentation mode 0..13, got {psm!r}")
    program = shutil.which(TESSERACT)
    if program is None:
        raise TesseractError(f"Tesseract is not installed (no `{TESSERACT}` on PATH); {INSTALL_HINT}")
    with tempfile.TemporaryDirectory(prefix="vlmkit-tesseract-") as folder:
        if isinstance(image, Image.Image):
            path = Path(folder) / "image.png"
            image.convert("RGB").save(path)
        else:
            path = Path(image)
            if not path.is_file():
                raise FileNotFoundError(f"image {path} not found")
        done = subprocess.run([program, str(path), "stdout", "-l", lang, "--psm", str(psm)],
                              capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise TesseractError(f"tesseract failed on {path.name} (exit {done.returncode}): {done.stderr.strip()}")
    lines = [line.rstrip() for line in done.stdout.replace("\f", "").splitlines()]
    return "\n".join(lines).strip("\n")
