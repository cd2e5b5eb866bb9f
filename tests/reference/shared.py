"""What the reference scripts phi3_v.py, minicpmv.py, qwen_vl_chat.py and vary.py share: their photos, their
command line and the check that a folder vlmkit saved reproduces the fixture's logits. The scripts run in
their own virtualenvs with older transformers: this file imports only the standard library, torch and PIL (and
scikit-image when a photo is made), nothing from vlmkit. The tests make their photos with photo() too."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

PHOTOS = {  # scikit-image's data: real photos of different sizes and aspect ratios
    "astronaut": lambda d: d.astronaut(),  # 512 x 512
    "coffee": lambda d: d.coffee(),  # 600 x 400, wide
    "chelsea": lambda d: d.chelsea(),  # 451 x 300
    "rocket": lambda d: d.rocket(),  # 427 x 640, tall
    "camera": lambda d: d.camera(),  # 512 x 512, grayscale
    "hubble": lambda d: d.hubble_deep_field(),  # 1000 x 872
    "coffee_strip": lambda d: d.coffee()[120:270],  # 600 x 150, wide
    "astronaut_tall": lambda d: d.astronaut()[:, 180:330],  # 150 x 512, tall
}


def photo(name: str) -> Image.Image:
    """The photo called name in PHOTOS, or coffee_big: coffee resized to 1400 x 1050."""
    import skimage.data

    if name == "coffee_big":
        return photo("coffee").resize((1400, 1050))
    return Image.fromarray(PHOTOS[name](skimage.data))


def photos(*names: str) -> dict[str, Image.Image]:
    """The photos called names, by name."""
    return {name: photo(name) for name in names}


def parse_args(doc: str, reference_help: str) -> argparse.Namespace:
    """The command line: the reference code's folder, and --check-saved DIR."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("reference", type=Path, help=reference_help)
    parser.add_argument("--check-saved", type=Path, metavar="DIR",
                        help="instead of writing fixtures, load DIR (the tiny model as vlmkit's save_pretrained wrote "
                        "it) with the reference code and compare its logits with the fixture's")
    return parser.parse_args()


def check_fixture_logits(folder: Path, logits: torch.Tensor, want: torch.Tensor) -> None:
    """Print how far the reference's logits for the saved folder are from the fixture's; exit if beyond 1e-5."""
    diff = (logits - want).abs().max().item()
    print(f"{folder}: loaded by the reference, logits max |diff| from the fixture {diff:.3g}")
    if diff > 1e-5:
        raise SystemExit("the saved folder does not reproduce the reference's logits")
