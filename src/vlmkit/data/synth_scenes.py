"""Picture samples for the synthetic data engine: natural-image negatives, shape questions, grounding.

- negatives (Vary's idea, Wei et al. 2023, sec. 3.2.2): random crops of the photos bundled with scikit-image
  (astronaut, coffee, chelsea) and matplotlib (grace_hopper.jpg), answered NEGATIVE_ANSWER;
- shapes (easy-vqa's idea, drawn here with PIL so nothing is downloaded): one coloured circle,
  rectangle or triangle on a light background, asked its shape or its colour;
- grounding: 2-3 shapes of distinct colours, asked where one is; the answer is Qwen-VL markup,
  `<ref>red circle</ref><box>(x1,y1),(x2,y2)</box>` on the 0..1000 grid (`format_ref_box`).

Shapes are drawn without anti-aliasing, so a shape's pixels are exactly its colour.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from vlmkit.text.grounding import format_ref_box

NEGATIVE_ANSWER = "This is a natural image."
PHOTOS = ("astronaut", "coffee", "chelsea", "grace_hopper")
SHAPES = ("circle", "rectangle", "triangle")
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 220),
           "yellow": (240, 200, 20), "purple": (140, 40, 170), "orange": (250, 130, 0)}
SHAPE_QUESTIONS = ("What shape is in the image?", "What color is the shape?")


@lru_cache(maxsize=len(PHOTOS))
def photo(name: str) -> Image.Image:
    """One of the bundled photos as an RGB image (needs scikit-image, and matplotlib for grace_hopper)."""
    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r}; choose one of {PHOTOS}")
    try:
        if name == "grace_hopper":
            import matplotlib.cbook
            with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
                return Image.open(f).convert("RGB")
        import skimage.data
        return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    except ImportError as e:
        raise ImportError("natural-image negatives need scikit-image and matplotlib: "
                          "pip install scikit-image matplotlib") from e


def negative_sample(rng: np.random.Generator, size: tuple[int, int]) -> tuple[Image.Image, str]:
    """A random crop (40-100% of the largest crop with the target's aspect) of a bundled photo, resized."""
    source = photo(PHOTOS[int(rng.integers(len(PHOTOS)))])
    aspect = size[0] / size[1]
    largest = min(source.width, source.height * aspect)
    crop_w = largest * float(rng.uniform(0.4, 1.0))
    crop_h = crop_w / aspect
    left = float(rng.uniform(0, source.width - crop_w))
    top = float(rng.uniform(0, source.height - crop_h))
    box = (left, top, left + crop_w, top + crop_h)
    return source.resize(size, Image.Resampling.BILINEAR, box=box), NEGATIVE_ANSWER


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int],
               colour: tuple[int, int, int]) -> None:
    """Fill shape inside box (x1, y1, x2, y2), inclusive pixel coordinates; the triangle points up."""
    x1, y1, x2, y2 = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "rectangle":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(x1, y2), (x2, y2), ((x1 + x2) / 2, y1)], fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def _shape_box(rng: np.random.Generator, shape: str, size: tuple[int, int], lo: float, hi: float
               ) -> tuple[int, int, int, int]:
    """A random inclusive box for shape whose side is lo..hi of the image's shorter side (circles are round)."""
    side = min(size)
    w = int(rng.uniform(lo, hi) * side)
    h = w if shape == "circle" else int(rng.uniform(lo, hi) * side)
    x1 = int(rng.integers(0, size[0] - w))
    y1 = int(rng.integers(0, size[1] - h))
    return x1, y1, x1 + w - 1, y1 + h - 1


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    """A light colour (every channel >= 205), unlike every colour in COLOURS (each has a channel below 205)."""
    return tuple(int(v) for v in rng.integers(205, 256, 3))


def shape_sample(rng: np.random.Generator, size: tuple[int, int]) -> tuple[Image.Image, str, str]:
    """One shape: (image, a question about its shape or colour, the one-word answer)."""
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    image = Image.new("RGB", size, _background(rng))
    draw_shape(ImageDraw.Draw(image), shape, _shape_box(rng, shape, size, 0.3, 0.7), COLOURS[colour])
    question = SHAPE_QUESTIONS[int(rng.integers(len(SHAPE_QUESTIONS)))]
    return image, question, shape if question == SHAPE_QUESTIONS[0] else colour


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return not (a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1])


def grounding_sample(rng: np.random.Generator, size: tuple[int, int]) -> tuple[Image.Image, str, str]:
    """2-3 shapes of distinct colours that do not touch: (image, "Where is the <ref>...</ref>?", answer).

    The answer is format_ref_box(name, box, size) for the asked shape, box being its pixel extent
    (x1, y1, x2 + 1, y2 + 1) with exclusive right and bottom edges.
    """
    count = int(rng.integers(2, 4))
    colours = [list(COLOURS)[int(i)] for i in rng.choice(len(COLOURS), size=count, replace=False)]
    image = Image.new("RGB", size, _background(rng))
    draw = ImageDraw.Draw(image)
    placed: list[tuple[str, tuple[int, int, int, int]]] = []
    for colour in colours:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        for _ in range(50):
            box = _shape_box(rng, shape, size, 0.15, 0.35)
            if not any(_overlap(box, other) for _, other in placed):
                draw_shape(draw, shape, box, COLOURS[colour])
                placed.append((f"{colour} {shape}", box))
                break
    name, (x1, y1, x2, y2) = placed[int(rng.integers(len(placed)))]
    return image, f"Where is the <ref>{name}</ref>?", format_ref_box(name, (x1, y1, x2 + 1, y2 + 1), size)
