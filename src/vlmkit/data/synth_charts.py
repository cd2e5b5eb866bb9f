"""Chart and table samples for the synthetic data engine: the picture and its data as text.

Charts follow Vary (Wei et al. 2023, sec. 3.2.2; docs/references.md, Vary): bar, line and pie charts drawn with
matplotlib (Agg, in memory) whose ground truth is the data as a Python dict string, e.g. "{'ant': 3, 'bee': 5}"
(`ast.literal_eval` reads it back). Tables are grids drawn with PIL whose ground truth is markdown:

    | name | size |
    | --- | --- |
    | ant | 3 |

    image, answer = chart_sample(np.random.default_rng(0), (256, 256))
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from vlmkit.data.synth_text import load_font, contrasting_colours

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CHART_KINDS = ("bar", "line", "pie")
WORDS = ("ant", "bee", "cat", "dog", "elk", "fox", "gnu", "hen", "owl", "pig", "ram", "yak",
         "red", "sun", "sky", "tea", "oak", "ice", "map", "cup", "box", "pen", "key", "jam")


def _labels(rng: np.random.Generator, count: int) -> list[str]:
    return [WORDS[int(i)] for i in rng.choice(len(WORDS), size=count, replace=False)]


def chart_data(rng: np.random.Generator) -> dict[str, int]:
    """3-6 distinct short labels, each with an integer value in 1..20."""
    labels = _labels(rng, int(rng.integers(3, 7)))
    return {label: int(v) for label, v in zip(labels, rng.integers(1, 21, len(labels)))}


def chart_figure(kind: str, data: dict[str, int], size: tuple[int, int], colour: str = "C0") -> Figure:
    """A matplotlib Figure (Agg canvas, 100 dpi, size (width, height) pixels) plotting data as a bar, line or pie chart.

    Bars and pie wedges are labelled with their values, so the whole dict can be read off the image.
    """
    if kind not in CHART_KINDS:
        raise ValueError(f"unknown chart kind {kind!r}; choose one of {CHART_KINDS}")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("synthetic charts need matplotlib: pip install matplotlib") from e
    figure = Figure(figsize=(size[0] / 100, size[1] / 100), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    labels, values = list(data), list(data.values())
    if kind == "bar":
        axes.bar_label(axes.bar(labels, values, color=colour), fontsize=7)
    elif kind == "line":
        axes.plot(labels, values, marker="o", color=colour)
    else:
        total = sum(values)
        axes.pie(values, labels=labels, startangle=90, counterclock=False,
                 autopct=lambda percent: f"{round(percent * total / 100)}")  # the value, not the percentage
    if kind != "pie":
        axes.tick_params(labelsize=7)
    figure.tight_layout(pad=0.3)
    return figure


def draw_chart(kind: str, data: dict[str, int], size: tuple[int, int], colour: str = "C0") -> Image.Image:
    """chart_figure(kind, data, size, colour) rendered to a size (width, height) RGB image in memory."""
    buffer = io.BytesIO()
    chart_figure(kind, data, size, colour).savefig(buffer, format="png", dpi=100)
    buffer.seek(0)
    with Image.open(buffer) as image:
        return image.convert("RGB").resize(size, Image.Resampling.BILINEAR)


def chart_sample(rng: np.random.Generator, size: tuple[int, int]) -> tuple[Image.Image, str, str]:
    """A random bar, line or pie chart: (image, its kind, its data as a Python dict string)."""
    kind = CHART_KINDS[int(rng.integers(len(CHART_KINDS)))]
    data = chart_data(rng)
    colour = f"C{int(rng.integers(10))}"
    return draw_chart(kind, data, size, colour), kind, repr(data)


def markdown_table(rows: list[list[str]]) -> str:
    """Rows (the first is the header) -> a markdown table, one line per row.

    >>> print(markdown_table([["a", "b"], ["1", "2"]]))
    | a | b |
    | --- | --- |
    | 1 | 2 |
    """
    if not rows or not rows[0] or any(len(r) != len(rows[0]) for r in rows):
        raise ValueError("a table needs a header row and rows of the same length")
    lines = ["| " + " | ".join(rows[0]) + " |", "| " + " | ".join("---" for _ in rows[0]) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def draw_table(rows: list[list[str]], size: tuple[int, int], font_name: str = "DejaVuSans.ttf",
               ink: tuple[int, int, int] = (0, 0, 0), paper: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """rows drawn as a ruled grid filling a size (width, height) image, the text centred in each cell."""
    width, height = size
    n_rows, n_cols = len(rows), len(rows[0])
    cell_w, cell_h = (width - 1) // n_cols, (height - 1) // n_rows
    font_size = max(7, min(cell_h // 2, 32))
    font = load_font(font_name, font_size)
    while font_size > 7 and max(font.getlength(c) for r in rows for c in r) > cell_w - 8:
        font_size -= 1
        font = load_font(font_name, font_size)
    image = Image.new("RGB", size, paper)
    draw = ImageDraw.Draw(image)
    for i in range(n_rows + 1):
        draw.line((0, i * cell_h, n_cols * cell_w, i * cell_h), fill=ink, width=2 if i == 1 else 1)
    for j in range(n_cols + 1):
        draw.line((j * cell_w, 0, j * cell_w, n_rows * cell_h), fill=ink, width=1)
    for i, row in enumerate(rows):
        for j, cell in enumerate(row):
            centre = (j * cell_w + cell_w / 2, i * cell_h + cell_h / 2)
            draw.text(centre, cell, fill=ink, font=font, anchor="mm")
    return image


def table_sample(rng: np.random.Generator, size: tuple[int, int]) -> tuple[Image.Image, str]:
    """A random 2-4 column table with a header and 2-4 rows of words and numbers, and its markdown."""
    n_cols, n_rows = int(rng.integers(2, 5)), int(rng.integers(2, 5))
    header = _labels(rng, n_cols)
    numeric = rng.uniform(size=n_cols) < 0.5
    rows = [header] + [[str(int(rng.integers(0, 100))) if numeric[j] else WORDS[int(rng.integers(len(WORDS)))]
                        for j in range(n_cols)] for _ in range(n_rows)]
    ink, paper = contrasting_colours(rng)
    return draw_table(rows, size, ink=ink, paper=paper), markdown_table(rows)
