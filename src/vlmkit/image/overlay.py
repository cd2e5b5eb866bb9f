"""Draw an ImagePlan over its image: where each local view falls, what the global view sees, the padding.

`draw_plan(image, plan, geometry)` returns a picture for `vlmkit tokens --overlay out.png`; the geometry
(a `Geometry`: the local grid's canvas and the global views, in original-image coordinates) is the plan's
scheme's, `get_scheme(plan.scheme).geometry(plan)` (vlmkit.schemes). The picture shows:

- the original image, with the scheme's padding around it where the scheme pads (drawn grey and
  hatched, whatever colour the scheme fills it with), all mapped back from the resized canvas to
  original-image coordinates;
- the local grid in yellow over the part of the image each tile / crop / slice covers, cells
  numbered in the order the model reads them (row-major); for Qwen2-VL's `dynamic` scheme the
  grid is one cell per LLM token (2x2 patches of 14 px);
- each global view (LLaVA-NeXT's base view, Phi-3.5-V's and DeepSeek-VL2's global view,
  MiniCPM-V's source view, LLaVA-1.5's single view, Vary's CLIP and SAM views) as a dashed
  rectangle around the region it shows, plus a labelled inset thumbnail of what the model sees
  (e.g. the whole image squashed to 336 x 336);
- a caption strip below with the scheme, sizes, grid and the token counts per part.

The drawing (image + padding) is scaled so its longer side is `size` pixels (768 by default); the
PNG is max(drawing width, 640) wide and the drawing's height plus the caption strip tall.

    >>> from vlmkit.presets import get_preset
    >>> from vlmkit.schemes import get_scheme, plan_image
    >>> image = Image.new("RGB", (672, 336), "white")
    >>> plan = plan_image(get_preset("llava-next"), image)
    >>> geometry = get_scheme(plan.scheme).geometry(plan)
    >>> geometry.canvas, (geometry.rows, geometry.cols), geometry.views[0].label
    ((0.0, 0.0, 672.0, 336.0), (1, 2), 'base (squashed)')
    >>> draw_plan(image, plan, geometry).width
    768
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from vlmkit.image.plan import ImagePlan

Box = tuple[float, float, float, float]  # (left, top, right, bottom) in original-image pixels

DISPLAY_SIZE = 768
MIN_WIDTH = 640
THUMB = 96
MARGIN = 8
PADDING_GREY = (112, 112, 112)
HATCH_GREY = (140, 140, 140)
GRID_YELLOW = (255, 221, 0)
OUTLINE = (0, 0, 0)
VIEW_COLOURS = ((255, 0, 255), (0, 230, 255))
CAPTION_BACKGROUND = (24, 24, 24)
CAPTION_TEXT = (235, 235, 235)


@dataclass(frozen=True)
class View:
    """A global view: the region of the original image it shows and the size the model sees it at."""

    box: Box
    size: tuple[int, int]  # (width, height) of the view the vision tower gets
    label: str


@dataclass(frozen=True)
class Geometry:
    """Where a plan's views fall on the original image (coordinates may leave it where the scheme pads)."""

    canvas: Box | None  # the region cut into the local grid (None: no local views)
    rows: int
    cols: int
    cell: str  # what one grid cell is: "tile", "crop", "slice" or "token"
    views: tuple[View, ...]


def fit_box(width: int, height: int, canvas_w: int, canvas_h: int) -> Box:
    """The region of a width x height image that a canvas_w x canvas_h canvas covers when the image is
    scaled to fit inside it and centred (the rest of the canvas being padding).

    >>> fit_box(200, 100, 300, 300)   # a wide image on a square canvas: padding above and below
    (0.0, -50.0, 200.0, 150.0)
    """
    scale = min(canvas_w / width, canvas_h / height)
    box_w, box_h = canvas_w / scale, canvas_h / scale
    return ((width - box_w) / 2, (height - box_h) / 2, (width + box_w) / 2, (height + box_h) / 2)


def whole_box(plan: ImagePlan) -> Box:
    """The whole original image as a box."""
    width, height = plan.original_size
    return (0.0, 0.0, float(width), float(height))


def draw_plan(image: Image.Image, plan: ImagePlan, geometry: Geometry, size: int = DISPLAY_SIZE) -> Image.Image:
    """The image with plan's padding, local grid and global views (geometry: the plan's scheme's
    `geometry(plan)`) drawn on it, and a caption strip below."""
    if tuple(image.size) != tuple(plan.original_size):
        raise ValueError(f"the image is {image.width}x{image.height} but the plan was made for "
                         f"{plan.original_size[0]}x{plan.original_size[1]}; pass the image the plan came from")
    if size < 16:
        raise ValueError(f"overlay size {size} is too small; use at least 16 pixels (default {DISPLAY_SIZE})")
    boxes = [whole_box(plan), *(v.box for v in geometry.views)] + ([geometry.canvas] if geometry.canvas else [])
    left, top = min(b[0] for b in boxes), min(b[1] for b in boxes)
    right, bottom = max(b[2] for b in boxes), max(b[3] for b in boxes)
    scale = size / max(right - left, bottom - top)

    def to_px(box: Box) -> tuple[float, float, float, float]:
        return ((box[0] - left) * scale, (box[1] - top) * scale, (box[2] - left) * scale, (box[3] - top) * scale)

    drawing = _padding_background(round((right - left) * scale), round((bottom - top) * scale))
    x0, y0, x1, y1 = to_px(whole_box(plan))
    shown = image.convert("RGB").resize((max(1, round(x1 - x0)), max(1, round(y1 - y0))), Image.Resampling.LANCZOS)
    drawing.paste(shown, (round(x0), round(y0)))
    draw = ImageDraw.Draw(drawing)
    font = ImageFont.load_default(size=14)
    if geometry.canvas is not None and geometry.rows and geometry.cols:
        _draw_grid(draw, to_px(geometry.canvas), geometry.rows, geometry.cols, numbered=geometry.cell != "token",
                   font=font)
    for i, view in enumerate(geometry.views):
        inset = 2 + 5 * i
        bx0, by0, bx1, by1 = to_px(view.box)
        _dashed_rectangle(draw, (bx0 + inset, by0 + inset, bx1 - inset - 1, by1 - inset - 1), VIEW_COLOURS[i], 3)
    caption = _caption(image, plan, geometry, max(drawing.width, MIN_WIDTH), font)
    out = Image.new("RGB", (caption.width, drawing.height + caption.height), CAPTION_BACKGROUND)
    out.paste(drawing, ((out.width - drawing.width) // 2, 0))
    out.paste(caption, (0, drawing.height))
    return out


def _pads(plan: ImagePlan, geometry: Geometry) -> bool:
    """Whether the canvas or a global view reaches beyond the image (more than rounding)."""
    width, height = plan.original_size
    boxes = [v.box for v in geometry.views] + ([geometry.canvas] if geometry.canvas else [])
    return any(b[0] < -0.5 or b[1] < -0.5 or b[2] > width + 0.5 or b[3] > height + 0.5 for b in boxes)


def _padding_background(width: int, height: int) -> Image.Image:
    """A grey canvas with diagonal hatching: what shows through where the scheme pads the image."""
    background = Image.new("RGB", (max(1, width), max(1, height)), PADDING_GREY)
    draw = ImageDraw.Draw(background)
    for start in range(-height, width, 12):
        draw.line((start, height, start + height, 0), fill=HATCH_GREY, width=2)
    return background


def _draw_grid(draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float], rows: int, cols: int,
               numbered: bool, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> None:
    """Cell boundaries of a rows x cols grid over box (pixels), cells numbered row-major when they are large."""
    x0, y0, x1, y1 = box
    cell_w, cell_h = (x1 - x0) / cols, (y1 - y0) / rows
    bold = min(cell_w, cell_h) >= 48
    xs = [x0 + k * cell_w for k in range(cols + 1)]
    ys = [y0 + k * cell_h for k in range(rows + 1)]
    segments = [(x, y0, x, y1) for x in xs] + [(x0, y, x1, y) for y in ys]
    if bold:
        for segment in segments:
            draw.line(segment, fill=OUTLINE, width=5)
    for segment in segments:
        draw.line(segment, fill=GRID_YELLOW, width=3 if bold else 1)
    if numbered and min(cell_w, cell_h) >= 40:
        for r in range(rows):
            for c in range(cols):
                draw.text((xs[c] + 6, ys[r] + 4), str(r * cols + c + 1), fill=GRID_YELLOW, font=font,
                          stroke_width=2, stroke_fill=OUTLINE)


def _dashed_rectangle(draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float], colour: tuple[int, int, int],
                      width: int, dash: float = 14.0) -> None:
    """A rectangle outline drawn as dashes of `dash` pixels with equal gaps."""
    x0, y0, x1, y1 = box
    for ax, ay, bx, by in ((x0, y0, x1, y0), (x1, y0, x1, y1), (x1, y1, x0, y1), (x0, y1, x0, y0)):
        length = max(abs(bx - ax), abs(by - ay))
        steps = max(1, int(length // dash))
        for k in range(0, steps, 2):
            t0, t1 = k / steps, min(1.0, (k + 1) / steps)
            draw.line((ax + (bx - ax) * t0, ay + (by - ay) * t0, ax + (bx - ax) * t1, ay + (by - ay) * t1),
                      fill=colour, width=width)


def _view_thumbnail(image: Image.Image, view: View) -> Image.Image:
    """What the model sees of a global view, at most THUMB pixels on a side: the region (padding grey) at
    the view's aspect ratio."""
    x0, y0, x1, y1 = (round(v) for v in view.box)
    region = Image.new("RGB", (max(1, x1 - x0), max(1, y1 - y0)), PADDING_GREY)
    region.paste(image.convert("RGB"), (-x0, -y0))
    view_w, view_h = view.size
    scale = THUMB / max(view_w, view_h)
    return region.resize((max(1, round(view_w * scale)), max(1, round(view_h * scale))), Image.Resampling.LANCZOS)


def caption_lines(plan: ImagePlan, geometry: Geometry) -> list[str]:
    """The caption's text: scheme and sizes, grid, model-filled parts, text parts and totals."""
    width, height = plan.original_size
    new_w, new_h = plan.resized_size
    rows, cols = geometry.rows, geometry.cols
    grid = f"grid {rows}x{cols} {geometry.cell}s" if rows and cols else "no local views"
    model = " + ".join(f"{name} {count}" for name, count in plan.parts.items())
    lines = [f"{plan.scheme}: {width}x{height} -> {new_w}x{new_h}, {grid}",
             f"model-filled: {model} = {plan.num_tokens} tokens"]
    if plan.text_parts:
        text = " + ".join(f"{name} {count}" for name, count in plan.text_parts.items())
        lines.append(f"text: {text}; context {plan.context_tokens} tokens")
    return lines


def _caption(image: Image.Image, plan: ImagePlan, geometry: Geometry, width: int,
             font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> Image.Image:
    """The strip under the drawing: view thumbnails on the left, wrapped caption text and legend on the right."""
    thumbs = [(_view_thumbnail(image, v), v) for v in geometry.views]
    text_left = MARGIN + len(thumbs) * (THUMB + MARGIN) + (MARGIN if thumbs else 0)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = [piece for line in caption_lines(plan, geometry)
             for piece in _wrap(line, font, width - text_left - MARGIN, probe)]
    legend: list[tuple[tuple[int, int, int], str]] = []
    if geometry.canvas is not None and geometry.rows and geometry.cols:
        legend.append((GRID_YELLOW, f"{geometry.cell}s" + (" (row-major)" if geometry.cell != "token" else "")))
    legend += [(VIEW_COLOURS[i], f"{v.label} {v.size[0]}x{v.size[1]}") for i, v in enumerate(geometry.views)]
    if _pads(plan, geometry):
        legend.append((PADDING_GREY, "padding (outside the image)"))
    line_h = 18
    text_h = line_h * (len(lines) + len(legend))
    height = 2 * MARGIN + max(text_h, (THUMB + line_h) if thumbs else 0)
    strip = Image.new("RGB", (width, height), CAPTION_BACKGROUND)
    draw = ImageDraw.Draw(strip)
    x = MARGIN
    for i, (thumb, view) in enumerate(thumbs):
        strip.paste(thumb, (x + (THUMB - thumb.width) // 2, MARGIN + (THUMB - thumb.height) // 2))
        draw.rectangle((x - 1, MARGIN - 1, x + THUMB, MARGIN + THUMB), outline=VIEW_COLOURS[i], width=1)
        draw.text((x, MARGIN + THUMB + 2), f"{view.size[0]}x{view.size[1]}", fill=VIEW_COLOURS[i], font=font)
        x += THUMB + MARGIN
    y = MARGIN
    for line in lines:
        draw.text((text_left, y), line, fill=CAPTION_TEXT, font=font)
        y += line_h
    for colour, label in legend:
        draw.rectangle((text_left, y + 3, text_left + 12, y + 13), fill=colour, outline=CAPTION_TEXT)
        draw.text((text_left + 18, y), label, fill=CAPTION_TEXT, font=font)
        y += line_h
    return strip


def _wrap(line: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int,
          draw: ImageDraw.ImageDraw) -> list[str]:
    """Break line before each " + " / " = " and after each ", " so that each piece fits in width pixels
    (a single long chunk stays whole); continuation lines are indented."""
    pieces: list[str] = []
    current = ""
    for word in re.split(r" (?=[+=] )|(?<=,) ", line):
        candidate = f"{current} {word}" if current else word
        if current and draw.textlength(candidate, font=font) > width:
            pieces.append(current)
            current = "  " + word
        else:
            current = candidate
    pieces.append(current)
    return pieces
