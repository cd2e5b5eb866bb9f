"""vlmkit.image.load: every input kind, every mode, several formats, EXIF, animation, bombs and broken inputs.

Expected pixels are hand-computed (alpha compositing, 16-bit scaling) or Pillow's own conversion
where the module docstring says Pillow's conversion is used (CMYK).
"""

import base64
import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from vlmkit.image.load import MAX_PIXELS, ImageLoadError, load_frames, load_image

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def _pixel(image: Image.Image, xy=(0, 0)) -> tuple[int, int, int]:
    assert image.mode == "RGB"
    return image.getpixel(xy)


def _close(actual, expected, tol=1):
    return all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose pixel data is 10 bytes: decoding it must fail."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10))
            + chunk(b"IEND", b""))


def _noise(mode: str = "RGB") -> Image.Image:
    """A seeded 64x48 image of random pixels (compresses badly, so cutting its file loses pixel data)."""
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, len(mode)), dtype=np.uint8)  # (H, W, C)
    return Image.frombytes(mode, (64, 48), pixels.tobytes())


# ---- modes (PIL images in memory), exact expected pixels -------------------------------------------


def test_rgba_half_transparent_red_on_white_and_on_a_stated_background():
    image = Image.new("RGBA", (3, 2), (255, 0, 0, 128))
    assert _close(_pixel(load_image(image)), (255, 127, 127))  # 255 * (1 - 128/255) = 127
    assert _close(_pixel(load_image(image, background=(0, 0, 0))), (128, 0, 0))
    assert _close(_pixel(load_image(image, background=(0, 0, 255))), (128, 0, 127))


def test_la_alpha_composited():
    image = Image.new("LA", (2, 2), (100, 0))
    image.putpixel((1, 1), (100, 255))
    out = load_image(image, background=(10, 20, 30))
    assert _pixel(out, (0, 0)) == (10, 20, 30)  # fully transparent -> background
    assert _pixel(out, (1, 1)) == (100, 100, 100)  # opaque grey


def test_palette_with_transparent_index():
    image = Image.new("P", (2, 1))
    image.putpalette([*RED, *GREEN] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 1
    out = load_image(image, background=(7, 8, 9))
    assert _pixel(out, (0, 0)) == RED
    assert _pixel(out, (1, 0)) == (7, 8, 9)


@pytest.mark.parametrize("value, expected", [(65535, 255), (0, 0), (257, 1), (32896, 128), (128, 0), (129, 1)])
def test_sixteen_bit_scaled_by_257(value, expected):
    image = Image.fromarray(np.full((2, 3), value, dtype=np.uint16))
    assert image.mode == "I;16"
    assert _pixel(load_image(image)) == (expected,) * 3
    as_int32 = Image.fromarray(np.full((2, 3), value, dtype=np.int32))
    assert as_int32.mode == "I"
    assert _pixel(load_image(as_int32)) == (expected,) * 3


@pytest.mark.parametrize("value", [70000, -1])
def test_mode_i_outside_sixteen_bits_is_refused(value):
    image = Image.fromarray(np.full((2, 2), value, dtype=np.int32))
    with pytest.raises(ImageLoadError, match=r"PIL image \(I, 2x2\).*outside the 16-bit range"):
        load_image(image)


@pytest.mark.parametrize("value, expected", [(1.0, 255), (0.0, 0), (0.5, 128), (0.25, 64)])
def test_float_mode_read_as_unit_range(value, expected):
    image = Image.fromarray(np.full((2, 2), value, dtype=np.float32))
    assert image.mode == "F"
    assert _pixel(load_image(image)) == (expected,) * 3


@pytest.mark.parametrize("value", [2.0, -0.5, float("nan")])
def test_float_mode_outside_unit_range_is_refused(value):
    image = Image.fromarray(np.full((2, 2), value, dtype=np.float32))
    with pytest.raises(ImageLoadError, match=r"PIL image \(F, 2x2\)"):
        load_image(image)


def test_cmyk_equals_pillows_own_conversion():
    cmyk = _noise(mode="CMYK")
    assert np.array_equal(np.asarray(load_image(cmyk)), np.asarray(cmyk.convert("RGB")))


def test_bilevel_and_grey():
    assert _pixel(load_image(Image.new("1", (2, 2), 1))) == (255, 255, 255)
    assert _pixel(load_image(Image.new("L", (2, 2), 77))) == (77, 77, 77)


def test_background_must_be_three_bytes():
    with pytest.raises(ValueError, match="background"):
        load_image(Image.new("RGB", (2, 2)), background=(0, 0, 300))


# ---- formats on disk, every input kind --------------------------------------------------------------


def _quadrants(mode: str) -> tuple[Image.Image, list[tuple[int, int, int]]]:
    """A 32x32 image of four 16x16 blocks in `mode`, and the RGB each block must load as (on white)."""
    rgb = [RED, GREEN, BLUE, (255, 255, 255)]
    image = Image.new("RGB", (32, 32))
    for i, colour in enumerate(rgb):
        image.paste(colour, (16 * (i % 2), 16 * (i // 2), 16 * (i % 2) + 16, 16 * (i // 2) + 16))
    if mode == "RGB":
        return image, rgb
    if mode == "L":
        return image.convert("L"), [(v, v, v) for v in (76, 150, 29, 255)]  # ITU-R 601-2 luma, as Pillow
    if mode == "RGBA":
        out = image.convert("RGBA")
        out.putalpha(_alpha_blocks())
        return out, [RED, (255, 255, 255), BLUE, (255, 255, 255)]
    if mode == "P":
        out = image.quantize(4)
        index_of_green = out.getpixel((24, 8))
        out.info["transparency"] = index_of_green
        return out, [RED, (255, 255, 255), BLUE, (255, 255, 255)]
    if mode == "CMYK":
        out = image.convert("CMYK")
        return out, [tuple(out.convert("RGB").getpixel((16 * (i % 2) + 8, 16 * (i // 2) + 8))) for i in range(4)]
    if mode == "I;16":
        values = np.array([[0, 65535], [32896, 257]], dtype=np.uint16).repeat(16, 0).repeat(16, 1)
        return Image.fromarray(values), [(0,) * 3, (255,) * 3, (128,) * 3, (1,) * 3]
    if mode == "F":
        values = np.array([[0.0, 1.0], [0.5, 0.25]], dtype=np.float32).repeat(16, 0).repeat(16, 1)
        return Image.fromarray(values), [(0,) * 3, (255,) * 3, (128,) * 3, (64,) * 3]
    raise AssertionError(mode)


def _alpha_blocks() -> Image.Image:
    """Opaque except the top-right block (which must come out as the white background)."""
    alpha = np.full((32, 32), 255, dtype=np.uint8)
    alpha[:16, 16:] = 0
    return Image.fromarray(alpha)


FORMAT_CASES = [  # (format, suffix, mode, save options, tolerance)
    ("PNG", ".png", "RGB", {}, 0), ("PNG", ".png", "L", {}, 0), ("PNG", ".png", "RGBA", {}, 0),
    ("PNG", ".png", "P", {}, 0), ("PNG", ".png", "I;16", {}, 0),
    ("JPEG", ".jpg", "RGB", {"quality": 95}, 6), ("JPEG", ".jpg", "L", {"quality": 95}, 6),
    ("JPEG", ".jpg", "CMYK", {"quality": 95}, 6),
    ("GIF", ".gif", "P", {}, 0), ("GIF", ".gif", "RGB", {}, 0),
    ("WEBP", ".webp", "RGBA", {"lossless": True}, 0), ("WEBP", ".webp", "RGB", {"quality": 95}, 8),
    ("TIFF", ".tif", "CMYK", {}, 0), ("TIFF", ".tif", "I;16", {}, 0), ("TIFF", ".tif", "F", {}, 0),
    ("TIFF", ".tif", "RGBA", {}, 0),
    ("BMP", ".bmp", "RGB", {}, 0), ("BMP", ".bmp", "L", {}, 0),
]


@pytest.mark.parametrize("fmt, suffix, mode, options, tol", FORMAT_CASES,
                         ids=[f"{c[0]}-{c[2]}" for c in FORMAT_CASES])
def test_formats_and_input_kinds(tmp_path, fmt, suffix, mode, options, tol):
    image, expected = _quadrants(mode)
    data = _encode(image, fmt, **options)
    path = tmp_path / f"image{suffix}"
    path.write_bytes(data)
    media_type = "image/" + {"JPEG": "jpeg", "TIFF": "tiff"}.get(fmt, fmt.lower())
    sources = {"str path": str(path), "Path": path, "bytes": data, "bytearray": bytearray(data),
               "memoryview": memoryview(data), "data URL": _data_url(data, media_type), "PIL": Image.open(path)}
    for kind, source in sources.items():
        out = load_image(source)
        assert out.mode == "RGB" and out.size == (32, 32), kind
        for i, colour in enumerate(expected):
            centre = (16 * (i % 2) + 8, 16 * (i // 2) + 8)
            assert _close(out.getpixel(centre), colour, tol), (kind, i, out.getpixel(centre), colour)


def test_array_inputs():
    grey = np.array([[0, 255], [77, 128]], dtype=np.uint8)
    assert np.array_equal(np.asarray(load_image(grey)), np.repeat(grey[..., None], 3, axis=2))
    assert np.array_equal(np.asarray(load_image(grey[..., None])), np.repeat(grey[..., None], 3, axis=2))
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    assert np.array_equal(np.asarray(load_image(rgb)), rgb)
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 128)
    out = np.asarray(load_image(rgba, background=(255, 255, 255)))
    assert _close(out[0, 0], (255, 127, 127)) and (out[1, 1] == 255).all()  # alpha 0 -> white
    unit = np.array([[0.0, 1.0], [0.5, 0.25]], dtype=np.float64)
    assert np.array_equal(np.asarray(load_image(unit))[..., 0], [[0, 255], [128, 64]])
    assert np.array_equal(np.asarray(load_image(unit.astype(np.float16)))[..., 0], [[0, 255], [128, 64]])
    unit_rgb = np.stack([unit, np.zeros_like(unit), np.ones_like(unit)], axis=-1).astype(np.float32)
    assert np.array_equal(np.asarray(load_image(unit_rgb))[1, 0], (128, 0, 255))
    wide = np.array([[65535, 257]], dtype=np.uint16)
    assert np.array_equal(np.asarray(load_image(wide))[0, :, 0], [255, 1])
    mask = np.array([[True, False]])
    assert np.array_equal(np.asarray(load_image(mask))[0, :, 0], [255, 0])
    grey_alpha = np.array([[[200, 255], [200, 0]]], dtype=np.uint8)
    assert np.array_equal(np.asarray(load_image(grey_alpha, background=(0, 0, 0)))[0], [[200] * 3, [0] * 3])


@pytest.mark.parametrize("array, cause", [
    (np.zeros((0, 4, 3), dtype=np.uint8), "zero-size"),
    (np.zeros((4, 0), dtype=np.uint8), "zero-size"),
    (np.zeros((3, 8, 8), dtype=np.uint8), "channels first"),
    (np.zeros((2, 2, 5), dtype=np.uint8), "expected shape"),
    (np.zeros((2, 2), dtype=np.int64), "dtype int64 is not accepted"),
    (np.full((2, 2), 255.0), "floats must lie in"),
    (np.full((2, 2), np.nan), "NaN"),
])
def test_bad_arrays(array, cause):
    with pytest.raises(ImageLoadError, match=rf"array of shape \({', '.join(map(str, array.shape))}\).*{cause}"):
        load_image(array)


def test_real_photo_matches_plain_pillow():
    import matplotlib.cbook

    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    with Image.open(path) as reference:
        expected = np.asarray(reference.convert("RGB"))
    assert np.array_equal(np.asarray(load_image(path)), expected)


# ---- EXIF orientation ------------------------------------------------------------------------------


def test_exif_orientation_6_rotates_clockwise(tmp_path):
    # Stored 40 wide x 20 high, a red 8x8 mark in the stored top-left corner. Orientation 6 means
    # "the viewer rotates the stored pixels 90 degrees clockwise": shown 20 wide x 40 high, and the
    # stored top-left corner lands at the shown top-right.
    stored = Image.new("RGB", (40, 20), BLUE)
    stored.paste(RED, (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, "JPEG", quality=95, exif=exif.tobytes())
    for source in (path, path.read_bytes(), Image.open(path)):
        out = load_image(source)
        assert out.size == (20, 40)
        assert _close(out.getpixel((16, 3)), RED, 8)  # top-right
        assert _close(out.getpixel((3, 3)), BLUE, 8)  # top-left is no longer marked
        assert _close(out.getpixel((16, 36)), BLUE, 8)


@pytest.mark.parametrize("orientation, size, red_corner", [
    (1, (40, 20), (3, 3)), (3, (40, 20), (36, 16)), (8, (20, 40), (3, 36)), (2, (40, 20), (36, 3)),
])
def test_other_exif_orientations(tmp_path, orientation, size, red_corner):
    stored = Image.new("RGB", (40, 20), BLUE)
    stored.paste(RED, (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(stored, "PNG", exif=exif.tobytes())
    out = load_image(data)
    assert out.size == size
    assert out.getpixel(red_corner) == RED


# ---- animation ---------------------------------------------------------------------------------------


def _animation(fmt: str) -> bytes:
    frames = [Image.new("RGB", (8, 6), colour) for colour in (RED, GREEN, BLUE)]
    options = {"lossless": True} if fmt == "WEBP" else {}
    return _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=[100, 200, 300], loop=0,
                   **options)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_first_frame_and_all_frames(fmt):
    data = _animation(fmt)
    assert _pixel(load_image(data)) == RED
    frames = load_frames(data)
    assert [_pixel(f) for f in frames] == [RED, GREEN, BLUE]
    assert all(f.size == (8, 6) for f in frames)


def test_still_image_has_one_frame():
    assert [_pixel(f) for f in load_frames(Image.new("RGB", (2, 2), GREEN))] == [GREEN]


def test_animated_gif_with_transparency():
    first = Image.new("P", (4, 4), 1)
    first.putpalette([*RED, *GREEN, *BLUE] + [0] * 759)
    first.paste(0, (0, 0, 2, 4))
    second = Image.new("P", (4, 4), 2)
    second.putpalette([*RED, *GREEN, *BLUE] + [0] * 759)
    data = _encode(first, "GIF", save_all=True, append_images=[second], transparency=1, duration=100, disposal=2)
    frames = load_frames(data, background=(9, 9, 9))
    assert _pixel(frames[0], (0, 0)) == RED and _pixel(frames[0], (3, 3)) == (9, 9, 9)
    assert _pixel(frames[1], (3, 3)) == BLUE


def test_pil_source_keeps_its_frame_position():
    image = Image.open(io.BytesIO(_animation("GIF")))
    image.seek(2)
    assert len(load_frames(image)) == 3
    assert _pixel(load_image(image)) == RED
    assert image.tell() == 2


def test_too_many_frames_refused():
    with pytest.raises(ImageLoadError, match=r"bytes \(\d+ bytes\): has 3 frames, more than max_frames=2"):
        load_frames(_animation("GIF"), max_frames=2)


# ---- pixel limit ---------------------------------------------------------------------------------------


def test_pixel_limit_checked_before_decoding(monkeypatch):
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self) or None)
    header = _png_header_only(1000, 1000)
    with pytest.raises(ImageLoadError, match=rf"bytes \({len(header)} bytes\): 1000x1000 = 1000000 pixels "
                                             r"exceeds the limit of 10000"):
        load_image(header, max_pixels=10_000)
    assert decoded == []


def test_same_header_under_the_limit_fails_only_when_decoding():
    header = _png_header_only(1000, 1000)
    with pytest.raises(ImageLoadError, match="could not decode.*truncated"):
        load_image(header)


def test_pixel_limit_on_valid_images_and_arrays():
    data = _encode(Image.new("RGB", (100, 100)), "PNG")
    assert load_image(data, max_pixels=10_000).size == (100, 100)
    with pytest.raises(ImageLoadError, match="10000 pixels exceeds the limit of 9999"):
        load_image(data, max_pixels=9_999)
    with pytest.raises(ImageLoadError, match=r"array of shape \(100, 100\).*exceeds the limit of 9999"):
        load_image(np.zeros((100, 100), dtype=np.uint8), max_pixels=9_999)
    with pytest.raises(ImageLoadError, match=r"PIL image \(RGB, 100x100\).*exceeds"):
        load_image(Image.new("RGB", (100, 100)), max_pixels=9_999)


@pytest.mark.parametrize("side, cause", [
    (12_000, "exceeds the limit of"),  # above Pillow's warning threshold (~89 M pixels): warning must not leak
    (100_000, "decompression-bomb limit"),  # above Pillow's error threshold: its error becomes ours
])
def test_huge_header_is_refused_without_pillow_warnings(side, cause):
    assert side * side > MAX_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageLoadError, match=rf"bytes \(\d+ bytes\).*{cause}"):
            load_image(_png_header_only(side, side))
    assert [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)] == []


# ---- broken inputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_bytes(tmp_path, fmt):
    data = _encode(_noise(), fmt)
    cut = data[: len(data) // 2]
    with pytest.raises(ImageLoadError, match=rf"^bytes \({len(cut)} bytes\): could not decode.*truncated"):
        load_image(cut)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(cut)
    with pytest.raises(ImageLoadError, match=rf"^{path}: could not decode"):
        load_image(path)


def test_random_and_empty_bytes():
    noise = np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes()
    with pytest.raises(ImageLoadError, match=r"^bytes \(500 bytes\): not an image in a format Pillow can read"):
        load_image(noise)
    with pytest.raises(ImageLoadError, match=r"^bytes \(0 bytes\): is empty"):
        load_image(b"")


def test_text_file_and_unsupported_format(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    with pytest.raises(ImageLoadError, match=rf"^{text}: not an image"):
        load_image(text)
    svg = tmp_path / "drawing.svg"
    svg.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"><rect width="4" height="4"/></svg>')
    with pytest.raises(ImageLoadError, match=rf"^{svg}: not an image in a format Pillow can read"):
        load_image(svg)


def test_missing_file_directory_and_url(tmp_path):
    with pytest.raises(ImageLoadError, match=rf"^{tmp_path / 'absent.png'}: no such file"):
        load_image(tmp_path / "absent.png")
    with pytest.raises(ImageLoadError, match=rf"^{tmp_path}: is a directory"):
        load_image(str(tmp_path))
    with pytest.raises(ImageLoadError, match="URLs are not downloaded"):
        load_image("https://example.com/cat.png")


@pytest.mark.parametrize("url, cause", [
    ("data:image/png;base64,@@@@", "invalid base64"),
    ("data:image/png;base64", "no ','"),
    ("data:image/png,rawdata", "not base64-encoded"),
    ("data:text/plain;base64,aGVsbG8=", "not an image type"),
    ("data:image/png;base64,", "is empty"),
    ("data:image/png;base64,aGVsbG8gd29ybGQ=", "not an image in a format"),  # "hello world"
])
def test_bad_data_urls(url, cause):
    with pytest.raises(ImageLoadError, match=rf"^data URL \(.*\): .*{cause}"):
        load_image(url)


def test_data_url_truncated_png():
    data = _encode(_noise(), "PNG")
    with pytest.raises(ImageLoadError, match=r"^data URL \(image/png\): could not decode"):
        load_image(_data_url(data[: len(data) // 2]))


def test_zero_size_pil_image_and_unsupported_type():
    with pytest.raises(ImageLoadError, match=r"PIL image \(RGB, 0x0\): zero-size"):
        load_image(Image.new("RGB", (0, 0)))
    with pytest.raises(ImageLoadError, match="input of type int: not an image source"):
        load_image(42)


def test_error_is_a_value_error():
    assert issubclass(ImageLoadError, ValueError)
