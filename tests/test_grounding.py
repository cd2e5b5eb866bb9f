"""Tests for vlmkit.text.grounding: Qwen-VL `<ref>`/`<box>`/`<quad>` formatting, parsing, stripping and drawing.

Oracles: the task strings of the Qwen-VL paper's multi-task pre-training formats (Bai et al. 2023, appendix;
docs/references.md, Qwen-VL) with their coordinates read off by hand, and hand-computed grid values.
"""

import random

import pytest
from PIL import Image

from vlmkit.text.grounding import (
    Grounding,
    draw_groundings,
    format_box,
    format_quad,
    format_ref_box,
    parse_grounding,
    strip_grounding,
    to_pixels,
)

# Two of the Qwen-VL paper's multi-task pre-training examples: caption with grounding, OCR with grounding.
SEED_CAPTION = (
    "<img>coyo700m/1.jpg</img>Generate the caption in English with grounding: Beautiful shot of "
    "<ref>bees</ref><box>(661,612), (833,812)</box> gathering nectars from "
    "<ref>an apricot flower</ref><box>(224,13), (399,313)</box><eos>"
)
SEED_OCR = (
    "<img>synthdog/1.jpg</img>OCR with grounding: <ref>It is managed</ref> "
    "<quad>(568,121), (625,131), (624,182), (567,172)</quad>...<eos>"
)


# ---------------------------------------------------------------- formatting

def test_format_box_hand_values():
    # 1/3 of 300 -> 333.33 -> 333; 2/3 -> 666.67 -> 667; x = 0.5 of a grid step rounds up
    assert format_box((100, 0, 200, 150), (300, 150)) == "<box>(333,0),(667,1000)</box>"
    assert format_box((0.5, 0, 1, 1), (1000, 1)) == "<box>(1,0),(1,1000)</box>"
    assert format_box((0.49, 0, 1, 1), (1000, 1)) == "<box>(0,0),(1,1000)</box>"


def test_format_clamps_and_validates():
    assert format_box((-50, -1, 9999, 20), (100, 10)) == "<box>(0,0),(1000,1000)</box>"
    with pytest.raises(ValueError, match="x1 > x2"):
        format_box((50, 0, 10, 5), (100, 10))
    with pytest.raises(ValueError, match="x1 > x2 or y1 > y2"):
        format_box((0, 8, 10, 5), (100, 10))
    with pytest.raises(ValueError, match="image_size"):
        format_box((0, 0, 1, 1), (0, 10))
    with pytest.raises(ValueError, match="4 numbers|got 3"):
        format_box((0, 0, 1), (10, 10))
    with pytest.raises(ValueError, match="finite"):
        format_box((0, 0, float("nan"), 1), (10, 10))
    with pytest.raises(ValueError, match="markup"):
        format_ref_box("a <box>", (0, 0, 1, 1), (10, 10))
    with pytest.raises(ValueError, match="four"):
        format_quad([(0, 0), (1, 1), (2, 2)], (10, 10))


@pytest.mark.parametrize("size", [(640, 480), (1920, 200), (150, 2000), (7, 5), (1, 1), (3000, 3000)])
def test_round_trip_within_half_a_grid_step(size):
    rng = random.Random(size[0] * 10007 + size[1])
    width, height = size
    for _ in range(50):
        x1, x2 = sorted(rng.uniform(0, width) for _ in range(2))
        y1, y2 = sorted(rng.uniform(0, height) for _ in range(2))
        text = format_ref_box("thing", (x1, y1, x2, y2), size)
        found, problems = parse_grounding(text, strict=True)
        assert problems == [] and len(found) == 1 and found[0].ref == "thing"
        (px1, py1), (px2, py2) = to_pixels(found[0], size)
        step_x, step_y = width / 1000, height / 1000
        for got, want, step in ((px1, x1, step_x), (px2, x2, step_x), (py1, y1, step_y), (py2, y2, step_y)):
            assert abs(got - want) <= step / 2 + 1e-9  # rounding to nearest: half a step, so within one


def test_quad_round_trip():
    corners = [(56.8, 12.1), (62.5, 13.1), (62.4, 18.2), (56.7, 17.2)]
    found, _ = parse_grounding(format_quad(corners, (100, 100)), strict=True)
    assert found[0].kind == "quad" and found[0].points == ((568, 121), (625, 131), (624, 182), (567, 172))
    for (gx, gy), (x, y) in zip(to_pixels(found[0], (100, 100)), corners):
        assert abs(gx - x) <= 0.05 + 1e-9 and abs(gy - y) <= 0.05 + 1e-9


# ---------------------------------------------------------------- parsing

def test_seed_caption_with_grounding():
    found, problems = parse_grounding(SEED_CAPTION, strict=True)
    assert problems == []
    assert [(g.ref, g.kind, g.points) for g in found] == [
        ("bees", "box", ((661, 612), (833, 812))),
        ("an apricot flower", "box", ((224, 13), (399, 313))),
    ]
    for g in found:
        assert SEED_CAPTION[g.span[0] : g.span[1]].startswith("<box>")
        assert SEED_CAPTION[g.span[0] : g.span[1]].endswith("</box>")
        assert SEED_CAPTION[g.ref_span[0] : g.ref_span[1]] == f"<ref>{g.ref}</ref>"
    assert to_pixels(found[0], (1000, 500)) == ((661.0, 306.0), (833.0, 406.0))


def test_seed_ocr_quad_after_whitespace():
    found, problems = parse_grounding(SEED_OCR, strict=True)
    assert problems == []
    assert len(found) == 1
    g = found[0]
    assert (g.ref, g.kind) == ("It is managed", "quad")
    assert g.points == ((568, 121), (625, 131), (624, 182), (567, 172))


def test_seed_grounded_captioning_and_referring():
    found, _ = parse_grounding("<img>VG_100K_2/4.jpg</img><ref>This</ref><box>(360,542), (476,705)</box> is Yellow")
    assert [(g.ref, g.points) for g in found] == [("This", ((360, 542), (476, 705)))]
    found, _ = parse_grounding("<img>VG_100K_2/3.jpg</img><ref>the ear on a giraffe</ref><box>(176,106), (232,160)</box>")
    assert [(g.ref, g.points) for g in found] == [("the ear on a giraffe", ((176, 106), (232, 160)))]


def test_several_boxes_per_ref_bare_boxes_and_refs_without_boxes():
    text = (
        "Find <ref>the cat</ref>. <ref>dogs</ref><box>(0,0),(10,10)</box>\n<box> ( 20 ,20 ) ,( 30, 30 ) </box>"
        " and also <box>(1,1),(2,2)</box>"
    )
    found, problems = parse_grounding(text, strict=True)
    assert problems == []
    assert [(g.ref, g.points) for g in found] == [
        ("dogs", ((0, 0), (10, 10))),
        ("dogs", ((20, 20), (30, 30))),
        (None, ((1, 1), (2, 2))),  # text in between ends the ref
    ]
    assert found[2].ref_span is None


def test_img_content_is_opaque():
    found, problems = parse_grounding("<img>boxes/<ref>.jpg</img><box>(0,0),(1,1)</box>", strict=True)
    assert problems == [] and [(g.ref, g.points) for g in found] == [(None, ((0, 0), (1, 1)))]
    with pytest.raises(ValueError, match=r"unclosed <img> at character 2: '<img>a.jpg <box>\(0,0\),\(1,1\)</box>'"):
        parse_grounding("x <img>a.jpg <box>(0,0),(1,1)</box>", strict=True)


@pytest.mark.parametrize(
    "text, fragment, position, message",
    [
        ("ok <box>(1,2),(3,4)", "<box>(1,2),(3,4)", 3, "unclosed <box>"),
        ("<ref>cat <box>(1,2),(3,4)", "<ref>cat ", 0, "unclosed <ref>"),
        ("x </box>", "</box>", 2, "stray </box>"),
        ("<box>(1,2),(3,4.5)</box>", "<box>(1,2),(3,4.5)</box>", 0, "bad number '4.5'"),
        ("<box>(a,2),(3,4)</box>", "<box>(a,2),(3,4)</box>", 0, "bad number 'a'"),
        ("<box>(-1,2),(3,4)</box>", "<box>(-1,2),(3,4)</box>", 0, "bad number '-1'"),
        ("ab<box>(1,2),(3,1001)</box>", "<box>(1,2),(3,1001)</box>", 2, "coordinate 1001"),
        ("<box>(50,2),(3,4)</box>", "<box>(50,2),(3,4)</box>", 0, "x1 > x2"),
        ("<box>(1,2,3),(3,4)</box>", "<box>(1,2,3),(3,4)</box>", 0, "exactly two numbers"),
        ("<box>(1,2)</box>", "<box>(1,2)</box>", 0, "needs 2 points, got 1"),
        ("<box>1,2,3,4</box>", "<box>1,2,3,4</box>", 0, "not a list of (x,y) points"),
        ("<quad>(1,1),(2,2),(3,3)</quad>", "<quad>(1,1),(2,2),(3,3)</quad>", 0, "needs 4 points, got 3"),
    ],
)
def test_malformed_strict_raises_lenient_reports(text, fragment, position, message):
    with pytest.raises(ValueError) as info:
        parse_grounding(text, strict=True)
    assert repr(fragment) in str(info.value)
    assert f"at character {position}" in str(info.value)
    assert message in str(info.value)

    found, problems = parse_grounding(text)
    assert found == []
    assert len(problems) >= 1
    assert (problems[0].fragment, problems[0].position) == (fragment, position)
    assert message in problems[0].message


def test_box_after_an_unclosed_ref_is_kept_without_the_ref():
    found, problems = parse_grounding("<ref>cat <box>(1,2),(3,4)</box>")
    assert [(g.ref, g.points) for g in found] == [(None, ((1, 2), (3, 4)))]
    assert [(p.message, p.position) for p in problems] == [("unclosed <ref>", 0)]


def test_lenient_keeps_the_good_ones_around_bad_ones():
    text = "<ref>a</ref><box>(1,2),(3,9999)</box><box>(5,5),(6,6)</box> then <quad>(1,1)</quad> <box>(7,7),(8,8)"
    found, problems = parse_grounding(text)
    assert [(g.ref, g.points) for g in found] == [("a", ((5, 5), (6, 6)))]
    assert [p.position for p in problems] == [text.index("<box>(1,2)"), text.index("<quad>"), text.rindex("<box>")]
    assert "coordinate 9999" in problems[0].message
    assert "needs 4 points, got 1" in problems[1].message
    assert problems[2].message == "unclosed <box>"


def test_long_fragment_is_truncated():
    text = "<box>" + "(1,1)," * 40
    _, problems = parse_grounding(text)
    assert len(problems[0].fragment) == 60 and problems[0].fragment.endswith("...")


# ---------------------------------------------------------------- strip

def test_strip_grounding():
    assert strip_grounding(SEED_CAPTION) == (
        "Generate the caption in English with grounding: Beautiful shot of bees gathering nectars from "
        "an apricot flower<eos>"
    )
    assert strip_grounding(SEED_OCR) == "OCR with grounding: It is managed ...<eos>"
    assert strip_grounding("plain <ref>text") == "plain text"
    assert strip_grounding("no markup") == "no markup"


# ---------------------------------------------------------------- drawing

def test_draw_changes_the_outline_and_leaves_far_pixels():
    size = (400, 300)
    image = Image.new("RGB", size, (128, 128, 128))
    text = "<ref>cat</ref><box>(250,500),(500,800)</box><ref>sign</ref><quad>(700,100),(900,150),(880,300),(690,250)</quad>"
    found, _ = parse_grounding(text, strict=True)
    out = draw_groundings(image, found)
    assert out.size == size and image.getpixel((100, 150)) == (128, 128, 128)  # input untouched

    # box in pixels: x 100..200, y 150..240; outline pixels change
    for point in [(100, 200), (200, 200), (150, 150), (150, 240), (100, 240)]:
        assert out.getpixel(point) != (128, 128, 128), point
    # the box interior away from the outline and label is unchanged
    assert out.getpixel((150, 200)) == (128, 128, 128)
    # far from every region and label: unchanged
    for point in [(5, 295), (395, 295), (50, 290), (330, 280)]:
        assert out.getpixel(point) == (128, 128, 128), point
    # the quad's outline: its first edge's midpoint (320, 37.5) is coloured; the two refs differ in colour
    assert out.getpixel((320, 38)) != (128, 128, 128)
    assert out.getpixel((100, 200)) != out.getpixel((356, 60))  # left edge of box vs. right edge of quad


def test_draw_bare_regions_and_tiny_image():
    found, _ = parse_grounding("<box>(0,0),(1000,1000)</box><box>(0,0),(500,500)</box>", strict=True)
    out = draw_groundings(Image.new("L", (8, 6), 0), found)
    assert out.mode == "RGB" and out.size == (8, 6)
    assert out.getpixel((0, 0)) != (0, 0, 0)


def test_draw_handwritten_grounding():
    g = Grounding(ref="x", kind="box", points=((0, 0), (1000, 1000)), span=(0, 0))
    out = draw_groundings(Image.new("RGB", (50, 50), (255, 255, 255)), [g], labels=False)
    assert out.getpixel((49, 25)) != (255, 255, 255) and out.getpixel((25, 25)) == (255, 255, 255)
