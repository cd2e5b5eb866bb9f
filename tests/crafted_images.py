"""Hand-made hostile image files (issue 14, sec. 3), written byte by byte so a test knows exactly what it sends.

    wide_png(20000)          a 20000 x 1 PNG (about 100 bytes): few pixels, a very long side
    png(2, 16777219)         any size of one-colour PNG, built from its chunks
    tall_tiff_header()       the header of a 2 x 16,777,219 TIFF (no pixel data behind it)
    missing_dimensions_tiff  a 188-byte two-page TIFF whose second page has no ImageWidth: Pillow raises
                             TypeError("Missing dimensions") while counting its pages
"""

from __future__ import annotations

import struct
import zlib


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, grey: int = 200) -> bytes:
    """A width x height 8-bit greyscale PNG of one colour (each row: filter byte 0, then the pixels)."""
    row = b"\0" + bytes([grey]) * width
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit, colour type 0 (grey), no interlace
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(row * height, 9))
            + _chunk(b"IEND", b""))


def wide_png(width: int) -> bytes:
    """A width x 1 PNG: the issue's 20000 x 1 (158 bytes in its report) and 65500 x 1 images."""
    return png(width, 1)


# TIFF field types
_SHORT, _LONG = 3, 4


def _ifd(entries: list[tuple[int, int, int]], next_ifd: int) -> bytes:
    """A little-endian TIFF image file directory: (tag, type, one value) entries sorted by tag, then the
    offset of the next directory (0: none)."""
    out = struct.pack("<H", len(entries))
    for tag, kind, value in sorted(entries):
        packed = struct.pack("<HH", value, 0) if kind == _SHORT else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, kind, 1) + packed
    return out + struct.pack("<I", next_ifd)


def tall_tiff_header(width: int = 2, height: int = 16_777_219) -> bytes:
    """A one-page uncompressed 8-bit grey TIFF header claiming width x height pixels, with no pixel data:
    the issue's 2 x 16,777,219 image (33.5 M pixels, under the 64 M pixel limit)."""
    entries = [(256, _LONG, width), (257, _LONG, height), (258, _SHORT, 8), (259, _SHORT, 1), (262, _SHORT, 1),
               (273, _LONG, 8 + 2 + 8 * 12 + 4), (278, _LONG, height), (279, _LONG, width * height)]
    return b"II*\0" + struct.pack("<I", 8) + _ifd(entries, 0)


def missing_dimensions_tiff() -> bytes:
    """188 bytes: page 1 a valid 1 x 1 grey TIFF page (its one pixel byte is the file's first byte), page 2
    the same without ImageWidth (tag 256) and RowsPerStrip, so Pillow's TIFF reader raises
    TypeError("Missing dimensions") when it reaches page 2 (as load_image does when it counts the frames)."""
    first = [(256, _SHORT, 1), (257, _SHORT, 1), (258, _SHORT, 8), (259, _SHORT, 1), (262, _SHORT, 1),
             (273, _LONG, 0), (278, _SHORT, 1), (279, _LONG, 1)]
    second = [e for e in first if e[0] not in (256, 278)]
    second_at = 8 + 2 + len(first) * 12 + 4
    data = b"II*\0" + struct.pack("<I", 8) + _ifd(first, second_at) + _ifd(second, 0)
    assert len(data) == 188, len(data)
    return data
