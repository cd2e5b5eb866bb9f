"""Rendered-text samples for the synthetic data engine: lines, paragraphs and pages with their exact text.

After Vary's document positives (Vary, Wei et al. 2023, sec. 3.2.2; docs/references.md, Vary), without PDFs:
random words from an alphabet are drawn with a DejaVu font (shipped with matplotlib) in a random style, and the
answer is the text itself.

    rng = np.random.default_rng(0)
    image, text = line_sample(rng, (256, 32))

Every sample is a pure function of the generator's state: a `TextStyle` is drawn first, then
`render_text(lines, style, size)` draws it, so the same style and lines give the same pixels.
Lines of a paragraph are joined with "\\n", paragraphs of a page with a blank line ("\\n\\n").
Chinese (`lang="zh"`): characters from CHINESE_ALPHABET without spaces, drawn with the simplified-Chinese
face of the system's Noto Sans / Serif CJK fonts (apt `fonts-noto-cjk`; vlmkit does not bundle them).
"""

from __future__ import annotations

import string
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DEFAULT_ALPHABET = string.ascii_letters + string.digits
FONT_FILES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf")
MIN_FONT_SIZE = 7
MIN_CONTRAST = 110  # least luminance difference (0..255) between text and background
CJK_FONT_FILES = ("NotoSansCJK-Regular.ttc", "NotoSansCJK-Bold.ttc", "NotoSerifCJK-Regular.ttc")
CJK_FONT_DIRS = ("/usr/share/fonts/opentype/noto", "/usr/share/fonts/noto-cjk", "/usr/share/fonts/google-noto-cjk",
                 "/usr/share/fonts/opentype/noto-cjk", "/usr/local/share/fonts", "~/.local/share/fonts")
CJK_INSTALL_HINT = "apt-get install fonts-noto-cjk (Debian/Ubuntu)"
# 543 frequent simplified Chinese characters (the head of modern text frequency lists).
CHINESE_ALPHABET = "".join(dict.fromkeys(
    "的一是不了在人有我他这个们中来上大为和国地到以说时要就出会可也你对生能而子那得于着下自之年过发后作里用道行所然"
    "家种事成方多经么去法学如都同现当没动面起看定天分还进好小部其些主样理心她本前开但因只从想实日军者意无力它与长把"
    "机十民第公此已工使情明性知全三又关点正业外将两高间由问很最重并物手应战向头文体政美相见被利什二等产或新己制身果"
    "加西斯月话合回特代内信表化老给世位次度门任常先海通教儿原东声提立及比员解水名真论处走义各入几口认条平系气题活"
    "尔更别打女变四神总何电数安少报才结反受目太量再感建务做接必场件计管期市直德资命山金指克许统区保至队形社便空决"
    "治展马科司五基眼书非则听白却界达光放强即像难且权思王象完设式色路记南品住告类求据程北边死张该交规万取拉格望觉"
    "术领共确传师观清今切院让识候带导争运笑飞风步改收根干造言联持组每济车亲极林服快办议往元英士证近失转夫令准布始"
    "怎呢存未远叫台单影具罗字爱击流备兵连调深商算质团集百需价花党华城石级整府离况亚请技际约示复病息究线似官火断精"
    "满支视消越器容照须九增研写称企八功吗包片史委乎查轻易早曾除农找装广显吧阿李标谈吃图念六引历首医局突专费号尽另"
    "周较注语仅考落青随选列武红响虽推势参希古众构房半节土投某案黑维革划敌致陈律足态护七兴派孩验责营星够章音跟志底"))
LANGUAGES = ("en", "zh")


@dataclass(frozen=True)
class TextStyle:
    """How a block of text is drawn.

    font: one of FONT_FILES; size: the largest font size tried (smaller ones are tried until the
    block fits); spacing: extra pixels between letters; leading: line height as a multiple of the
    font size; colours are RGB; angle in degrees (counter-clockwise); noise: Gaussian sigma in
    grey levels; offset: where the block sits in the free space, (0, 0) top-left to (1, 1) bottom-right;
    noise_seed seeds the noise.
    """

    font: str
    size: int
    spacing: int
    leading: float
    text_colour: tuple[int, int, int]
    background: tuple[int, int, int]
    angle: float
    noise: float
    offset: tuple[float, float]
    noise_seed: int


def font_path(name: str) -> Path:
    """The path of a DejaVu font file shipped with matplotlib (matplotlib is needed for synthesis), or of a
    Noto CJK font (a CJK_FONT_FILES name) in the system's font folders."""
    if name in CJK_FONT_FILES:
        for folder in CJK_FONT_DIRS:
            if (Path(folder).expanduser() / name).is_file():
                return Path(folder).expanduser() / name
        raise FileNotFoundError(f"Chinese text needs the Noto CJK font {name}, which is in none of {CJK_FONT_DIRS}; "
                                f"install it: {CJK_INSTALL_HINT}")
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("synthetic text needs matplotlib for its DejaVu fonts: pip install matplotlib") from e
    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name
    if not path.is_file():
        raise FileNotFoundError(f"font {path} not found; reinstall matplotlib")
    return path


@lru_cache(maxsize=256)
def load_font(name: str, size: int) -> ImageFont.FreeTypeFont:
    """A DejaVu font (a FONT_FILES name) or the simplified-Chinese face of a Noto CJK collection (a
    CJK_FONT_FILES name) at size pixels, cached."""
    path = font_path(name)
    if path.suffix != ".ttc":
        return ImageFont.truetype(str(path), size)
    for index in range(16):  # the faces of a Noto CJK collection: JP, KR, SC, TC, HK, ...
        font = ImageFont.truetype(str(path), size, index=index)
        if font.getname()[0].endswith(" SC"):
            return font
    raise ValueError(f"{path} has no simplified-Chinese (SC) face; reinstall it: {CJK_INSTALL_HINT}")


def random_text(rng: np.random.Generator, min_chars: int = 8, max_chars: int = 24,
                alphabet: str = DEFAULT_ALPHABET, separator: str = " ") -> str:
    """min_chars..max_chars characters: words of 1-8 letters from alphabet separated by single spaces
    (by separator: Chinese passes "", as it writes no spaces)."""
    if not 1 <= min_chars <= max_chars:
        raise ValueError(f"need 1 <= min_chars <= max_chars, got {min_chars} and {max_chars}")
    if not alphabet or " " in alphabet:
        raise ValueError(f"alphabet must be a non-empty string without spaces, got {alphabet!r}")
    length = int(rng.integers(min_chars, max_chars + 1))
    chars: list[str] = []
    while len(chars) < length:
        word = int(rng.integers(1, 9))
        chars.extend(alphabet[int(i)] for i in rng.integers(0, len(alphabet), word))
        if len(chars) < length - 1:
            chars.extend(separator)
    return "".join(chars[:length])  # a space is only added where a letter follows it


def _luminance(rgb: tuple[int, int, int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def contrasting_colours(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(text colour, background colour) whose luminances differ by at least MIN_CONTRAST."""
    background = tuple(int(v) for v in rng.integers(0, 256, 3))
    for _ in range(20):
        text = tuple(int(v) for v in rng.integers(0, 256, 3))
        if abs(_luminance(text) - _luminance(background)) >= MIN_CONTRAST:
            return text, background
    return ((0, 0, 0) if _luminance(background) >= 128 else (255, 255, 255)), background


def random_style(rng: np.random.Generator, size: tuple[int, int], num_lines: int = 1,
                 fonts: tuple[str, ...] = FONT_FILES) -> TextStyle:
    """A random style for num_lines lines on an image of size (width, height): font (one of fonts), size,
    colours, noise, tilt."""
    text_colour, background = contrasting_colours(rng)
    leading = float(rng.uniform(1.15, 1.5))
    largest = max(MIN_FONT_SIZE, int(size[1] / (num_lines * leading + 0.5)))
    return TextStyle(
        font=fonts[int(rng.integers(len(fonts)))],
        size=int(rng.integers(max(MIN_FONT_SIZE, largest * 6 // 10), largest + 1)),
        spacing=int(rng.integers(0, 3)),
        leading=leading,
        text_colour=text_colour,
        background=background,
        angle=float(rng.uniform(-2.0, 2.0)),
        noise=float(rng.uniform(0.0, 10.0)),
        offset=(float(rng.uniform()), float(rng.uniform())),
        noise_seed=int(rng.integers(2**31)),
    )


def _text_mask(lines: list[str], font: ImageFont.FreeTypeFont, spacing: int, leading: float) -> Image.Image:
    """The lines drawn white on black ("L"), left-aligned, letter by letter with extra spacing."""
    line_height = round(font.size * leading)
    widths = [sum(font.getlength(c) for c in line) + spacing * max(len(line) - 1, 0) for line in lines]
    ascent, descent = font.getmetrics()
    width = int(np.ceil(max(widths, default=0))) + 2
    height = line_height * (len(lines) - 1) + ascent + descent + 2
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    for row, line in enumerate(lines):
        x = 1.0
        for char in line:
            draw.text((x, 1 + row * line_height), char, fill=255, font=font)
            x += font.getlength(char) + spacing
    return mask


def render_text(lines: list[str], style: TextStyle, size: tuple[int, int]) -> Image.Image:
    """Draw lines (top to bottom) on a size (width, height) RGB image in style.

    The font shrinks from style.size until the tilted block fits inside a 2-pixel margin.
    Blank lines are kept as vertical space.
    """
    width, height = size
    for font_size in range(style.size, MIN_FONT_SIZE - 1, -1):
        mask = _text_mask(lines, load_font(style.font, font_size), style.spacing, style.leading)
        mask = mask.rotate(style.angle, resample=Image.Resampling.BICUBIC, expand=True)
        if mask.width <= width - 4 and mask.height <= height - 4:
            break
    else:
        longest = max(lines, key=len)
        raise ValueError(f"{len(lines)} line(s) of up to {len(longest)} characters do not fit a {width}x{height} "
                         f"image at font size {MIN_FONT_SIZE}; use a larger image or fewer characters")
    image = Image.new("RGB", size, style.background)
    x = 2 + round(style.offset[0] * (width - 4 - mask.width))
    y = 2 + round(style.offset[1] * (height - 4 - mask.height))
    image.paste(Image.new("RGB", mask.size, style.text_colour), (x, y), mask)
    if style.noise > 0:
        noise = np.random.default_rng(style.noise_seed).normal(0.0, style.noise, (height, width, 3))
        pixels = np.asarray(image, dtype=np.float32) + noise  # (H, W, 3)
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    return image


def _script(lang: str, alphabet: str | None) -> tuple[str, tuple[str, ...], str]:
    """(alphabet, fonts, word separator) of a language ("en" or "zh"); alphabet None = the language's own."""
    if lang not in LANGUAGES:
        raise ValueError(f"unknown language {lang!r}; choose from {', '.join(LANGUAGES)}")
    if lang == "zh":
        return alphabet or CHINESE_ALPHABET, CJK_FONT_FILES, ""
    return alphabet or DEFAULT_ALPHABET, FONT_FILES, " "


def line_sample(rng: np.random.Generator, size: tuple[int, int], min_chars: int = 8, max_chars: int = 24,
                alphabet: str | None = None, lang: str = "en") -> tuple[Image.Image, str]:
    """One rendered line of random words and its text (alphabet: default the language's)."""
    alphabet, fonts, separator = _script(lang, alphabet)
    text = random_text(rng, min_chars, max_chars, alphabet, separator)
    return render_text([text], random_style(rng, size, fonts=fonts), size), text


def paragraph_sample(rng: np.random.Generator, size: tuple[int, int], min_chars: int = 8, max_chars: int = 24,
                     alphabet: str | None = None, lang: str = "en") -> tuple[Image.Image, str]:
    """2-3 rendered lines and their text, lines joined with newlines."""
    alphabet, fonts, separator = _script(lang, alphabet)
    lines = [random_text(rng, min_chars, max_chars, alphabet, separator) for _ in range(int(rng.integers(2, 4)))]
    return render_text(lines, random_style(rng, size, len(lines), fonts), size), "\n".join(lines)


def page_sample(rng: np.random.Generator, size: tuple[int, int], min_chars: int = 8, max_chars: int = 24,
                alphabet: str | None = None, lang: str = "en") -> tuple[Image.Image, str]:
    """2-4 paragraphs of 2-3 lines, separated by a blank line, and their text (tilt kept under 1 degree)."""
    alphabet, fonts, separator = _script(lang, alphabet)
    paragraphs = [[random_text(rng, min_chars, max_chars, alphabet, separator) for _ in range(int(rng.integers(2, 4)))]
                  for _ in range(int(rng.integers(2, 5)))]
    lines = [line for i, p in enumerate(paragraphs) for line in ([""] if i else []) + p]
    style = random_style(rng, size, len(lines), fonts)
    style = replace(style, angle=style.angle / 2)
    return render_text(lines, style, size), "\n\n".join("\n".join(p) for p in paragraphs)
