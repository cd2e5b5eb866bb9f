r"""Grounding markup in text: Qwen-VL's `<ref>`, `<box>`, `<quad>` (and `<img>`), DeepSeek-VL2's `<|ref|>`, `<|det|>`.

Qwen-VL writes regions into plain text (Qwen-VL, Bai et al. 2023, sec. 2.2 "Inputs and Outputs", and
the multi-task pre-training formats in the paper's appendix; docs/references.md, Qwen-VL):

    <img>VG_100K_2/3.jpg</img><ref>the ear on a giraffe</ref><box>(176,106), (232,160)</box>
    OCR with grounding: <ref>It is managed</ref> <quad>(568,121), (625,131), (624,182), (567,172)</quad>

- `<box>(x1,y1),(x2,y2)</box>`: top-left and bottom-right corners.
- `<quad>(x1,y1),(x2,y2),(x3,y3),(x4,y4)</quad>`: four corners of an OCR text region.
- `<ref>...</ref>`: the words a region refers to; it applies to every box/quad that
  follows it with only whitespace in between (`<ref>cats</ref><box>..</box><box>..</box>`).
- `<img>...</img>`: an image path or placeholder; its content is not grounding markup.

Coordinates are integers on a 0..1000 grid, normalised to the image's width (x) and
height (y). The paper gives the grid but no rounding rule; vlmkit uses

    grid  = floor(pixel / size * 1000 + 0.5), clamped to [0, 1000]   (round half up)
    pixel = grid / 1000 * size                                        (exact, a float)

so a pixel coordinate survives format -> parse -> to_pixels within half a grid step
(size / 2000 pixels). Qwen-VL's own drawing code truncates the inverse with int(),
which stays within one grid step of this. Image sizes are (width, height), as in PIL.

DeepSeek-VL2 writes a region as `<|ref|>the cat<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>`: one
`<|det|>` may hold several boxes of its ref, each [x1, y1, x2, y2] on a 0..999 grid (DeepSeek-VL2's
deepseek_vl2/serve/app_modules/utils.py `parse_ref_bbox` draws int(x / 999 * width)). The same parser
reads both dialects; each Grounding carries its grid (1000 or 999), which to_pixels divides by, and a
`<|ref|>` attaches to the `<|det|>` after it as `<ref>` does to `<box>`.

    groundings, problems = parse_grounding(model_output)
    boxes = [to_pixels(g, image.size) for g in groundings]
    draw_groundings(image, groundings).save("regions.png")
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from PIL import Image, ImageDraw, ImageFont

GRID = 1000
DET_GRID = 999  # DeepSeek-VL2's <|det|> boxes
POINTS_PER_KIND = {"box": 2, "quad": 4}

# Qwen-VL's tags <ref> <box> <quad> <img>, DeepSeek-VL2's <|ref|> <|det|>; a tag's name keeps the bars ("|det|")
_TAG_RE = re.compile(r"<(/?)(ref|box|quad|img)>|<\|(/?)(ref|det)\|>")
_DET_BOX_RE = re.compile(r"\[([^\[\]]*)\]")
_DET_LIST_RE = re.compile(r"\s*\[\s*\[[^\[\]]*\](?:\s*,\s*\[[^\[\]]*\])*\s*\]\s*")
_POINT_RE = re.compile(r"\(([^()]*)\)")
_POINT_LIST_RE = re.compile(r"\s*\([^()]*\)(?:\s*,?\s*\([^()]*\))*\s*")
_INT_RE = re.compile(r"\d+")
_FRAGMENT_CHARS = 60

# Distinct, saturated colours (Tableau 10 order); cycled when there are more refs.
_PALETTE = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)


@dataclass(frozen=True)
class Grounding:
    """One region found in text.

    ref: the `<ref>` text it belongs to, or None for a bare box/quad.
    kind: "box" (2 points: top-left, bottom-right) or "quad" (4 corner points).
    points: (x, y) pairs on the 0..1000 grid.
    span: (start, end) character offsets of the `<box>`/`<quad>` (or `<|det|>`) element, end exclusive.
    ref_span: (start, end) of the `<ref>` element, or None.
    grid: the coordinates' grid, 1000 (Qwen-VL) or 999 (DeepSeek-VL2's `<|det|>`).
    """

    ref: str | None
    kind: Literal["box", "quad"]
    points: tuple[tuple[int, int], ...]
    span: tuple[int, int]
    ref_span: tuple[int, int] | None = None
    grid: int = GRID


@dataclass(frozen=True)
class GroundingProblem:
    """A piece of malformed markup: what is wrong, where it starts, and the text itself."""

    message: str
    position: int
    fragment: str

    def __str__(self) -> str:
        return f"{self.message} at character {self.position}: {self.fragment!r}"


class ParsedGrounding(NamedTuple):
    """What parse_grounding returns: the well-formed regions and the malformed pieces."""

    groundings: list[Grounding]
    problems: list[GroundingProblem]


def _check_image_size(image_size: Sequence[int]) -> tuple[int, int]:
    if len(image_size) != 2 or any(not isinstance(s, int) or s <= 0 for s in image_size):
        raise ValueError(f"image_size must be (width, height) in positive integer pixels, got {image_size!r}")
    return image_size[0], image_size[1]


def _to_grid(value: float, size: int) -> int:
    if not math.isfinite(value):
        raise ValueError(f"pixel coordinate {value!r} is not a finite number")
    return min(GRID, max(0, math.floor(value / size * GRID + 0.5)))


def _format_points(points: Sequence[tuple[int, int]]) -> str:
    return ",".join(f"({x},{y})" for x, y in points)


def format_box(box_xyxy: Sequence[float], image_size: Sequence[int]) -> str:
    """A pixel box (x1, y1, x2, y2) -> `<box>(x1,y1),(x2,y2)</box>` on the 0..1000 grid.

    Coordinates are rounded half up and clamped to [0, 1000]; corners must be ordered.

    >>> format_box((64, 48, 320, 240), (640, 480))
    '<box>(100,100),(500,500)</box>'
    >>> format_box((-5, 0, 700, 479.9), (640, 480))
    '<box>(0,0),(1000,1000)</box>'
    """
    if len(box_xyxy) != 4:
        raise ValueError(f"a box is (x1, y1, x2, y2) in pixels, got {len(box_xyxy)} numbers: {box_xyxy!r}")
    width, height = _check_image_size(image_size)
    x1, y1, x2, y2 = box_xyxy
    if x1 > x2 or y1 > y2:
        raise ValueError(f"box {tuple(box_xyxy)!r} has x1 > x2 or y1 > y2; pass (left, top, right, bottom)")
    points = ((_to_grid(x1, width), _to_grid(y1, height)), (_to_grid(x2, width), _to_grid(y2, height)))
    return f"<box>{_format_points(points)}</box>"


def format_quad(quad_points: Sequence[tuple[float, float]], image_size: Sequence[int]) -> str:
    """Four pixel corners -> `<quad>(x1,y1),...,(x4,y4)</quad>` on the 0..1000 grid (same rounding as boxes).

    >>> format_quad([(10, 5), (90, 5), (90, 15), (10, 15)], (100, 50))
    '<quad>(100,100),(900,100),(900,300),(100,300)</quad>'
    """
    if len(quad_points) != 4 or any(len(p) != 2 for p in quad_points):
        raise ValueError(f"a quad is four (x, y) pixel corners, got {quad_points!r}")
    width, height = _check_image_size(image_size)
    points = [(_to_grid(x, width), _to_grid(y, height)) for x, y in quad_points]
    return f"<quad>{_format_points(points)}</quad>"


def format_ref_box(text: str, box_xyxy: Sequence[float], image_size: Sequence[int]) -> str:
    """`<ref>text</ref><box>...</box>`: a phrase and its pixel box on the 0..1000 grid.

    >>> format_ref_box("the cat", (0, 0, 50, 25), (100, 100))
    '<ref>the cat</ref><box>(0,0),(500,250)</box>'
    """
    if _TAG_RE.search(text):
        raise ValueError(f"ref text {text!r} contains grounding markup; pass the plain phrase")
    return f"<ref>{text}</ref>{format_box(box_xyxy, image_size)}"


def _fragment(text: str, start: int, end: int) -> str:
    piece = text[start:end]
    return piece if len(piece) <= _FRAGMENT_CHARS else piece[: _FRAGMENT_CHARS - 3] + "..."


def _parse_points(kind: str, content: str) -> tuple[tuple[tuple[int, int], ...], str | None]:
    """Points of a box/quad element's content, or an error message."""
    if not _POINT_LIST_RE.fullmatch(content):
        return (), f"<{kind}> content is not a list of (x,y) points"
    points = []
    for match in _POINT_RE.finditer(content):
        parts = [p.strip() for p in match.group(1).split(",")]
        if len(parts) != 2:
            return (), f"point ({match.group(1)}) in <{kind}> needs exactly two numbers"
        for part in parts:
            if not _INT_RE.fullmatch(part):
                return (), f"bad number {part!r} in <{kind}>: grid coordinates are integers 0..{GRID}"
            if int(part) > GRID:
                return (), f"coordinate {part} in <{kind}> is outside the 0..{GRID} grid"
        points.append((int(parts[0]), int(parts[1])))
    expected = POINTS_PER_KIND[kind]
    if len(points) != expected:
        return (), f"a <{kind}> needs {expected} points, got {len(points)}"
    if kind == "box" and (points[0][0] > points[1][0] or points[0][1] > points[1][1]):
        return (), "box corners out of order: x1 > x2 or y1 > y2"
    return tuple(points), None


def _parse_det(content: str) -> tuple[list[tuple[tuple[int, int], ...]], str | None]:
    """The boxes of a `<|det|>` element's content `[[x1, y1, x2, y2], ...]` (0..999 grid), or an error message."""
    if not _DET_LIST_RE.fullmatch(content):
        return [], "<|det|> content is not a list of [x1, y1, x2, y2] boxes"
    boxes = []
    for match in _DET_BOX_RE.finditer(content):
        parts = [p.strip() for p in match.group(1).split(",")]
        if len(parts) != 4:
            return [], f"box [{match.group(1)}] in <|det|> needs exactly four numbers"
        for part in parts:
            if not _INT_RE.fullmatch(part):
                return [], f"bad number {part!r} in <|det|>: grid coordinates are integers 0..{DET_GRID}"
            if int(part) > DET_GRID:
                return [], f"coordinate {part} in <|det|> is outside the 0..{DET_GRID} grid"
        x1, y1, x2, y2 = (int(p) for p in parts)
        if x1 > x2 or y1 > y2:
            return [], "box corners out of order: x1 > x2 or y1 > y2"
        boxes.append(((x1, y1), (x2, y2)))
    return boxes, None


def _tag(match: re.Match) -> tuple[bool, str]:
    """(closing, name) of a tag match: name "ref", "box", "quad", "img", or DeepSeek-VL2's "|ref|", "|det|"."""
    if match.group(2) is not None:
        return match.group(1) == "/", match.group(2)
    return match.group(3) == "/", f"|{match.group(4)}|"


def parse_grounding(text: str, *, strict: bool = False) -> ParsedGrounding:
    """Every `<box>`/`<quad>` in text, with the `<ref>` it belongs to, plus the malformed markup.

    Whitespace inside and between elements is tolerated. Malformed markup (unclosed or
    stray tags, bad numbers, coordinates past 1000, unordered box corners, a wrong
    number of points) is never dropped silently: with strict=True the first problem
    raises ValueError naming the fragment and its character position; otherwise it is
    listed in `problems` and parsing goes on with the next tag.

    >>> found, problems = parse_grounding("<ref>cats</ref><box>(1,2),(30,40)</box> <box>( 5 , 6 ), (7,8)</box>")
    >>> [(g.ref, g.kind, g.points, g.span) for g in found]
    [('cats', 'box', ((1, 2), (30, 40)), (15, 39)), ('cats', 'box', ((5, 6), (7, 8)), (40, 67))]
    >>> problems
    []
    >>> parse_grounding("a <box>(1,2),(3,4) b")[1][0].message
    'unclosed <box>'
    >>> [(g.ref, g.points, g.grid) for g in parse_grounding("<|ref|>cat<|/ref|><|det|>[[1, 2, 30, 40]]<|/det|>")[0]]
    [('cat', ((1, 2), (30, 40)), 999)]
    """
    tags = list(_TAG_RE.finditer(text))
    groundings: list[Grounding] = []
    problems: list[GroundingProblem] = []
    pending_ref: tuple[str, tuple[int, int]] | None = None
    pending_end = 0  # where the text after the pending ref (and its regions so far) starts

    def report(message: str, start: int, end: int) -> None:
        problem = GroundingProblem(message, start, _fragment(text, start, end))
        if strict:
            raise ValueError(f"malformed grounding markup: {problem}")
        problems.append(problem)

    i = 0
    while i < len(tags):
        tag = tags[i]
        closing, name = _tag(tag)
        following = tags[i + 1] if i + 1 < len(tags) else None
        if closing:
            report(f"stray {tag.group(0)} without an opening <{name}>", tag.start(), tag.end())
            pending_ref = None
            i += 1
            continue
        if name == "img":  # opaque: an image path or placeholder may hold anything up to </img>
            close = next((j for j in range(i + 1, len(tags)) if tags[j].group(0) == "</img>"), None)
            if close is None:
                report("unclosed <img>", tag.start(), len(text))
                i += 1
            else:
                i = close + 1
            pending_ref = None
            continue
        if following is None or _tag(following) != (True, name):
            report(f"unclosed <{name}>", tag.start(), following.start() if following else len(text))
            pending_ref = None
            i += 1
            continue
        start, end = tag.start(), following.end()
        content = text[tag.end() : following.start()]
        i += 2
        if name in ("ref", "|ref|"):
            pending_ref, pending_end = (content, (start, end)), end
        else:
            attached = pending_ref is not None and not text[pending_end:start].strip()
            if not attached:
                pending_ref = None
            if name == "|det|":
                boxes, error = _parse_det(content)
                found = [("box", points, DET_GRID) for points in boxes]
            else:
                points, error = _parse_points(name, content)
                found = [(name, points, GRID)]
            if error is not None:
                report(error, start, end)
            else:
                ref, ref_span = pending_ref if pending_ref is not None else (None, None)
                groundings += [Grounding(ref, kind, points, (start, end), ref_span, grid)  # type: ignore[arg-type]
                               for kind, points, grid in found]
            pending_end = end
    return ParsedGrounding(groundings, problems)


def to_pixels(grounding: Grounding, image_size: Sequence[int]) -> tuple[tuple[float, float], ...]:
    """The grounding's points in pixels of an image of image_size (width, height): grid / 1000 * size.

    >>> g = parse_grounding("<box>(100,250),(500,1000)</box>").groundings[0]
    >>> to_pixels(g, (640, 480))
    ((64.0, 120.0), (320.0, 480.0))
    """
    width, height = _check_image_size(image_size)
    grid = grounding.grid
    return tuple((x / grid * width, y / grid * height) for x, y in grounding.points)


def strip_grounding(text: str) -> str:
    """The plain text: `<box>`, `<quad>` and `<img>` elements removed, `<ref>` tags removed but their text kept.

    Stray or unclosed tags are removed too (only the tag; the text around it stays).
    An `<img>` element is removed whole, whatever it holds.
    Whitespace around removed elements is left as it was.

    >>> strip_grounding("<img>a.jpg</img>Shot of <ref>bees</ref><box>(661,612), (833,812)</box> on a flower")
    'Shot of bees on a flower'
    >>> strip_grounding("<|ref|>The cat<|/ref|><|det|>[[10, 20, 300, 400]]<|/det|> sleeps")
    'The cat sleeps'
    """
    text = re.sub(r"<img>.*?</img>", "", text, flags=re.DOTALL)
    text = re.sub(r"<(box|quad)>[^<]*</\1>", "", text)
    text = re.sub(r"<\|det\|>[^<]*<\|/det\|>", "", text)
    return _TAG_RE.sub("", text)


def _label_colours(groundings: Sequence[Grounding]) -> list[tuple[int, int, int]]:
    """One palette colour per distinct ref (boxes of one ref share it); each bare region gets its own."""
    keys: dict[object, int] = {}
    colours = []
    for index, g in enumerate(groundings):
        key = ("ref", g.ref) if g.ref is not None else ("bare", index)
        keys.setdefault(key, len(keys))
        colours.append(_PALETTE[keys[key] % len(_PALETTE)])
    return colours


def _text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever contrasts more with background (ITU-R BT.601 luma)."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def draw_groundings(image: Image.Image, groundings: Sequence[Grounding], *, labels: bool = True) -> Image.Image:
    """A copy of image (RGB) with each box/quad outlined and its ref written on a filled tag.

    Line width and font size scale with the image. Labels are black or white on a tag
    of the region's colour, so they read on any background; a label sits above the
    region's top-left corner, or inside it when there is no room above.
    """
    canvas = image.convert("RGB")
    width, height = canvas.size
    draw = ImageDraw.Draw(canvas)
    line = max(1, round(min(width, height) / 200))
    font = ImageFont.load_default(size=max(10, round(min(width, height) / 40)))
    for g, colour in zip(groundings, _label_colours(groundings)):
        # grid 1000 is the image's far edge; the last pixel row/column is size - 1
        points = [(min(x, width - 1), min(y, height - 1)) for x, y in to_pixels(g, canvas.size)]
        if g.kind == "box":
            (x1, y1), (x2, y2) = points
            draw.rectangle((x1, y1, x2, y2), outline=colour, width=line)
        else:
            draw.polygon(points, outline=colour, width=line)
        if not labels or not g.ref:
            continue
        left = min(x for x, _ in points)
        top = min(y for _, y in points)
        l, t, r, b = draw.textbbox((0, 0), g.ref, font=font)
        tag_w, tag_h = r - l + 2 * line, b - t + 2 * line
        tag_top = top - tag_h if top - tag_h >= 0 else top
        draw.rectangle((left, tag_top, left + tag_w, tag_top + tag_h), fill=colour)
        draw.text((left + line - l, tag_top + line - t), g.ref, fill=_text_colour(colour), font=font)
    return canvas
