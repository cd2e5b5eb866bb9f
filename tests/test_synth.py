"""Tests for the synthetic data engine (vlmkit.data.synth*) and `vlmkit data synth`."""

from __future__ import annotations

import ast
import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from vlmkit.cli import main
from vlmkit.data.formats import load_dataset
from vlmkit.data.synth import DATASET_FILE, KINDS, READ_TEXT, generate_item, parse_size, synthesize
from vlmkit.data.synth_charts import CHART_KINDS, chart_figure, draw_chart
from vlmkit.data.synth_scenes import COLOURS, NEGATIVE_ANSWER, SHAPE_QUESTIONS, SHAPES
from vlmkit.data import synth_text
from vlmkit.data.synth_text import (CHINESE_ALPHABET, CJK_FONT_FILES, font_path, load_font, random_style,
                                     random_text, render_text)
from vlmkit.text.grounding import parse_grounding, to_pixels

SIZES = {"lines": (256, 32), "paragraphs": (256, 80), "pages": (320, 320), "charts": (200, 160),
         "tables": (200, 120), "negatives": (96, 64), "shapes": (64, 64), "grounding": (160, 120)}
COUNTS = {kind: 2 for kind in KINDS}


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the True pixels of an (H, W) mask, right/bottom exclusive."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _ink_box(image: Image.Image, background: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """The box of the pixels that are not the background colour."""
    return _mask_box(np.any(np.asarray(image) != np.array(background, dtype=np.uint8), axis=-1))  # (H, W)


def test_same_seed_same_files_other_seed_differs(tmp_path):
    a = synthesize(tmp_path / "a", COUNTS, seed=3, image_size=SIZES, progress=False)
    b = synthesize(tmp_path / "b", COUNTS, seed=3, image_size=SIZES, progress=False)
    c = synthesize(tmp_path / "c", COUNTS, seed=4, image_size=SIZES, progress=False)
    assert (tmp_path / "a" / DATASET_FILE).read_bytes() == (tmp_path / "b" / DATASET_FILE).read_bytes()
    for x, y in zip(a, b):
        assert x.images[0].read_bytes() == y.images[0].read_bytes(), x.id
    assert (tmp_path / "a" / DATASET_FILE).read_bytes() != (tmp_path / "c" / DATASET_FILE).read_bytes()
    for x, z in zip(a, c):  # every kind varies with the seed (negatives in their pixels, not their answer)
        assert x.images[0].read_bytes() != z.images[0].read_bytes(), x.id


def test_a_sample_does_not_depend_on_the_other_counts():
    alone = generate_item("shapes", 5, 1, (64, 64))
    assert alone.answer == generate_item("shapes", 5, 1, (64, 64)).answer
    assert np.array_equal(np.asarray(alone.image), np.asarray(generate_item("shapes", 5, 1, (64, 64)).image))


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_has_the_size_and_an_answer(kind):
    for index in range(3):
        item = generate_item(kind, 0, index, SIZES[kind])
        assert item.image.size == SIZES[kind] and item.image.mode == "RGB"
        assert item.question.strip() and item.answer.strip()
        assert len(np.unique(np.asarray(item.image).reshape(-1, 3), axis=0)) > 1  # not a blank image


def test_text_answers_follow_the_layout_rules():
    for index in range(5):
        line = generate_item("lines", 1, index, SIZES["lines"]).answer
        assert 8 <= len(line) <= 24 and line == line.strip() and "  " not in line and "\n" not in line
        lines = generate_item("paragraphs", 1, index, SIZES["paragraphs"]).answer.split("\n")
        assert 2 <= len(lines) <= 3 and all(8 <= len(x) <= 24 for x in lines)
        paragraphs = generate_item("pages", 1, index, SIZES["pages"]).answer.split("\n\n")
        assert 2 <= len(paragraphs) <= 4 and all(2 <= len(p.split("\n")) <= 3 for p in paragraphs)
    assert generate_item("lines", 1, 0, SIZES["lines"]).question == READ_TEXT


def test_line_image_is_its_text_rendered():
    """Replaying the generator's draws (text, then style) and rendering gives the sample's pixels."""
    item = generate_item("lines", 7, 2, (256, 32))
    rng = np.random.default_rng([7, KINDS.index("lines"), 2])
    text = random_text(rng)
    assert text == item.answer
    assert np.array_equal(np.asarray(render_text([text], random_style(rng, (256, 32)), (256, 32))),
                          np.asarray(item.image))


def test_ink_grows_with_the_text():
    style = replace(random_style(np.random.default_rng(0), (256, 48)), angle=0.0, noise=0.0, offset=(0.0, 0.0))
    widths = [_ink_box(render_text([t], style, (256, 48)), style.background) for t in ("ab", "abcdef", "abcdefghijkl")]
    assert widths[0][2] < widths[1][2] < widths[2][2]  # the right edge moves right
    two = _ink_box(render_text(["abc", "abc"], style, (256, 48)), style.background)
    assert two[3] - two[1] > widths[0][3] - widths[0][1]  # a second line adds height


def test_text_too_long_for_the_image_is_refused():
    style = random_style(np.random.default_rng(0), (32, 16))
    with pytest.raises(ValueError, match="do not fit"):
        render_text(["x" * 40], style, (32, 16))


@pytest.mark.parametrize("kind", CHART_KINDS)
def test_chart_figure_plots_the_data(kind):
    data = {"ant": 3, "bee": 7, "cat": 12}
    axes = chart_figure(kind, data, (200, 160)).axes[0]
    if kind == "bar":
        assert [p.get_height() for p in axes.patches] == [3, 7, 12]
    elif kind == "line":
        assert list(axes.lines[0].get_ydata()) == [3, 7, 12]
    else:
        spans = [w.theta2 - w.theta1 for w in axes.patches]  # each wedge's angle in degrees
        assert np.allclose(spans, [360 * v / 22 for v in data.values()])
        assert {t.get_text() for t in axes.texts} >= {"3", "7", "12", "ant", "bee", "cat"}


def test_chart_answer_is_the_plotted_dict():
    for index in range(6):
        item = generate_item("charts", 2, index, SIZES["charts"])
        data = ast.literal_eval(item.answer)
        assert isinstance(data, dict) and 3 <= len(data) <= 6
        assert all(isinstance(k, str) and isinstance(v, int) and 1 <= v <= 20 for k, v in data.items())
        kind = item.question.split()[2]
        assert kind in CHART_KINDS
        pixels = np.asarray(item.image)
        redrawn = [np.asarray(draw_chart(kind, data, SIZES["charts"], f"C{c}")) for c in range(10)]
        assert any(np.array_equal(pixels, r) for r in redrawn), "the image is not this data drawn"


def test_table_answer_is_markdown_of_a_grid():
    for index in range(4):
        rows = generate_item("tables", 0, index, SIZES["tables"]).answer.split("\n")
        cells = [r.strip("|").split("|") for r in rows]
        assert rows[0].startswith("| ") and set(rows[1].replace("|", "").split()) == {"---"}
        assert len({len(c) for c in cells}) == 1 and 2 <= len(cells[0]) <= 4 and 2 <= len(rows) - 2 <= 4


def test_negatives_and_shapes():
    for index in range(4):
        assert generate_item("negatives", 0, index, (96, 64)).answer == NEGATIVE_ANSWER
        item = generate_item("shapes", 0, index, (64, 64))
        assert item.question in SHAPE_QUESTIONS
        if item.question == SHAPE_QUESTIONS[1]:
            colour = np.array(COLOURS[item.answer], dtype=np.uint8)
            assert np.all(np.asarray(item.image) == colour, axis=-1).sum() > 100  # the named colour is drawn
        else:
            assert item.answer in SHAPES


def test_grounding_box_covers_the_shape():
    size = SIZES["grounding"]
    step = (size[0] / 1000, size[1] / 1000)
    for index in range(10):
        item = generate_item("grounding", 0, index, size)
        found = parse_grounding(item.answer, strict=True).groundings
        assert len(found) == 1 and f"<ref>{found[0].ref}</ref>" in item.question
        (x1, y1), (x2, y2) = to_pixels(found[0], size)
        colour_name, shape = found[0].ref.split()
        assert shape in SHAPES
        left, top, right, bottom = _mask_box(np.all(np.asarray(item.image) == COLOURS[colour_name], axis=-1))
        assert abs(left - x1) <= step[0] and abs(right - x2) <= step[0], (item.answer, (left, right))
        assert abs(top - y1) <= step[1] and abs(bottom - y2) <= step[1], (item.answer, (top, bottom))


def test_written_dataset_loads_back(tmp_path):
    samples = synthesize(tmp_path, COUNTS, seed=0, image_size=SIZES, progress=False)
    loaded, problems = load_dataset(tmp_path / DATASET_FILE, check_images=True)
    assert problems == [] and loaded == samples
    assert [s.id for s in loaded] == [f"{k}-{i:06d}" for k in KINDS for i in range(2)]
    first = json.loads((tmp_path / DATASET_FILE).read_text())[0]
    assert first["image"] == "images/lines-000000.png"
    assert first["conversations"][0] == {"from": "human", "value": f"<image>\n{READ_TEXT}"}


def test_bad_requests_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown synthetic kind"):
        synthesize(tmp_path, {"poems": 1}, progress=False)
    with pytest.raises(ValueError, match="every count is 0"):
        synthesize(tmp_path, {"lines": 0}, progress=False)
    with pytest.raises(ValueError, match="no entry for kind 'shapes'"):
        synthesize(tmp_path, {"shapes": 1}, image_size={"lines": (256, 32)}, progress=False)
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_size("256x")


def test_cli_writes_the_dataset(tmp_path, capsys):
    out = tmp_path / "synth"
    code = main(["data", "synth", "--out", str(out), "--lines", "3", "--shapes", "2", "--grounding", "1",
                 "--seed", "1", "--image-size", "256x64"])
    assert code == 0 and "wrote 6 samples" in capsys.readouterr().out
    samples, problems = load_dataset(out / DATASET_FILE, check_images=True)
    assert problems == [] and len(samples) == 6
    assert all(Image.open(s.images[0]).size == (256, 64) for s in samples)
    assert main(["data", "synth", "--out", str(out), "--lines", "1", "--image-size", "wide"]) == 2


# ---- Chinese text (Noto CJK from apt fonts-noto-cjk) ---------------------------------------------------

PRIVATE_USE = "\ue000"  # a code point no font draws: its mask is the font's "tofu" (.notdef) box


def test_chinese_glyphs_are_drawn_not_tofu():
    """Noto CJK draws every character of the alphabet as its own glyph; DejaVu Sans, which lacks CJK, draws
    them all as its tofu box (which shows the check can fail)."""
    text = generate_item("lines", 0, 0, (256, 32), lang="zh").answer
    cjk, latin = load_font(CJK_FONT_FILES[0], 24), load_font("DejaVuSans.ttf", 24)

    def bitmap(font, char):
        mask = font.getmask(char)
        return mask.size, bytes(mask)

    assert all(bitmap(latin, c) == bitmap(latin, PRIVATE_USE) for c in text)  # tofu
    assert all(bitmap(cjk, c) != bitmap(cjk, PRIVATE_USE) for c in set(CHINESE_ALPHABET))
    assert len({bitmap(cjk, c) for c in set(text)}) == len(set(text))  # distinct characters, distinct glyphs
    assert cjk.getname()[0].endswith(" SC")  # the simplified-Chinese face of the collection


def test_chinese_line_has_ink_and_its_text():
    item = generate_item("lines", 0, 3, (256, 32), lang="zh")
    assert 4 <= len(item.answer) <= 12 and set(item.answer) <= set(CHINESE_ALPHABET)  # no spaces in Chinese
    style = replace(random_style(np.random.default_rng(0), (256, 32), fonts=CJK_FONT_FILES[:1]),
                    angle=0.0, noise=0.0)
    drawn = render_text([item.answer], style, (256, 32))
    box = _ink_box(drawn, style.background)
    assert box[2] - box[0] > 4 * (box[3] - box[1])  # a line of several square glyphs, wider than high
    paragraph = generate_item("paragraphs", 0, 1, (256, 96), lang="zh").answer.split("\n")
    assert 2 <= len(paragraph) <= 3 and all(set(x) <= set(CHINESE_ALPHABET) for x in paragraph)


def test_chinese_text_round_trips_through_the_dataset(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "zh"), "--lines", "2", "--paragraphs", "1",
                 "--shapes", "1", "--image-size", "256x96", "--lang", "both"]) == 0
    capsys.readouterr()
    samples, problems = load_dataset(tmp_path / "zh" / DATASET_FILE, check_images=True)
    answers = {s.id: s.messages[1]["content"][0]["text"] for s in samples}
    assert problems == [] and answers["lines-000001"] == generate_item("lines", 0, 1, (256, 96), lang="zh").answer
    assert set(answers["lines-000001"]) <= set(CHINESE_ALPHABET)  # odd indices Chinese under --lang both
    assert answers["lines-000000"] == generate_item("lines", 0, 0, (256, 96)).answer  # even ones English
    assert answers["shapes-000000"] == generate_item("shapes", 0, 0, (256, 96)).answer  # other kinds unchanged


def test_missing_cjk_font_names_the_apt_package(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(synth_text, "CJK_FONT_DIRS", (str(tmp_path),))
    load_font.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="apt-get install fonts-noto-cjk"):
            font_path(CJK_FONT_FILES[0])
        assert main(["data", "synth", "--out", str(tmp_path / "zh"), "--lines", "1", "--lang", "zh"]) == 2
        assert "fonts-noto-cjk" in capsys.readouterr().err
    finally:
        load_font.cache_clear()
    with pytest.raises(ValueError, match="unknown text language 'fr'"):
        generate_item("lines", 0, 0, (256, 32), lang="fr")
