r"""The Vary-style synthetic data engine: images with their exact answers, written as a LLaVA dataset.

    samples = synthesize("synth", {"lines": 1000, "shapes": 200}, seed=0, image_size=(256, 32))
    # synth/data.json + synth/images/lines-000000.png ...   (`vlmkit data synth` on the command line)

Kinds (`KINDS`), each a pure function of (random generator, image size) -> `SynthItem`:

| kind       | image                                          | answer                                  |
|------------|------------------------------------------------|-----------------------------------------|
| lines      | one line of 8-24 random characters             | the text                                |
| paragraphs | 2-3 such lines                                 | the lines joined with "\n"              |
| pages      | 2-4 paragraphs                                 | paragraphs joined with "\n\n"           |
| charts     | a bar, line or pie chart (matplotlib)          | the data as a Python dict string        |
| tables     | a ruled grid of words and numbers (PIL)        | the table as markdown                   |
| negatives  | a crop of a bundled photo                      | "This is a natural image."              |
| shapes     | one coloured circle / rectangle / triangle     | the shape or the colour word            |
| grounding  | 2-3 coloured shapes                            | `<ref>name</ref><box>(x1,y1),(x2,y2)</box>` |

Sample i of a kind draws from np.random.default_rng([seed, kind number, i]), so a sample does not
depend on the counts of other kinds and the same seed gives byte-identical files. The text kinds (lines,
paragraphs, pages) are English (DejaVu fonts from matplotlib) or, with lang="zh", Chinese (Noto CJK from
apt `fonts-noto-cjk`, not bundled; 4-12 characters a line, as a character is a full em wide); lang="both"
makes even indices English and odd ones Chinese.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np
from PIL import Image

from vlmkit.data.formats import Sample, write_llava_json
from vlmkit.data.synth_charts import chart_sample, table_sample
from vlmkit.data.synth_scenes import grounding_sample, negative_sample, shape_sample
from vlmkit.data.synth_text import line_sample, page_sample, paragraph_sample

READ_TEXT = "Read the text in the image."
DATASET_FILE = "data.json"
IMAGE_DIR = "images"


class SynthItem(NamedTuple):
    """One synthetic sample before it is written: the image, the user's instruction, the answer."""

    image: Image.Image
    question: str
    answer: str


def _text(make: Callable[..., tuple[Image.Image, str]]) -> Callable[[np.random.Generator, tuple[int, int]], SynthItem]:
    def generate(rng: np.random.Generator, size: tuple[int, int]) -> SynthItem:
        image, text = make(rng, size)
        return SynthItem(image, READ_TEXT, text)
    return generate


def _chart(rng: np.random.Generator, size: tuple[int, int]) -> SynthItem:
    image, kind, data = chart_sample(rng, size)
    return SynthItem(image, f"Convert the {kind} chart to a Python dict.", data)


def _table(rng: np.random.Generator, size: tuple[int, int]) -> SynthItem:
    image, markdown = table_sample(rng, size)
    return SynthItem(image, "Convert the table to markdown.", markdown)


def _question(make: Callable[..., tuple[Image.Image, str, str]]
              ) -> Callable[[np.random.Generator, tuple[int, int]], SynthItem]:
    def generate(rng: np.random.Generator, size: tuple[int, int]) -> SynthItem:
        return SynthItem(*make(rng, size))
    return generate


GENERATORS: dict[str, Callable[[np.random.Generator, tuple[int, int]], SynthItem]] = {
    "lines": _text(line_sample),
    "paragraphs": _text(paragraph_sample),
    "pages": _text(page_sample),
    "charts": _chart,
    "tables": _table,
    "negatives": _text(negative_sample),
    "shapes": _question(shape_sample),
    "grounding": _question(grounding_sample),
}
KINDS = tuple(GENERATORS)
CHINESE_GENERATORS = {kind: _text(partial(make, min_chars=4, max_chars=12, lang="zh")) for kind, make
                      in (("lines", line_sample), ("paragraphs", paragraph_sample), ("pages", page_sample))}
TEXT_LANGUAGES = ("en", "zh", "both")


def generate_item(kind: str, seed: int, index: int, image_size: tuple[int, int], lang: str = "en") -> SynthItem:
    """Sample index of kind for seed, on an image of image_size (width, height); lang ("en", "zh" or "both")
    is the language of the text kinds."""
    if kind not in GENERATORS:
        raise ValueError(f"unknown synthetic kind {kind!r}; choose from {', '.join(KINDS)}")
    if lang not in TEXT_LANGUAGES:
        raise ValueError(f"unknown text language {lang!r}; choose from {', '.join(TEXT_LANGUAGES)}")
    rng = np.random.default_rng([seed, KINDS.index(kind), index])
    chinese = kind in CHINESE_GENERATORS and (lang == "zh" or lang == "both" and index % 2 == 1)
    return (CHINESE_GENERATORS if chinese else GENERATORS)[kind](rng, image_size)


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' -> (width, height).

    >>> parse_size("256x32")
    (256, 32)
    """
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"image size {text!r} is not WIDTHxHEIGHT in positive pixels, e.g. 256x32")
    return int(parts[0]), int(parts[1])


T = TypeVar("T")


def _progress(items: Iterable[T], total: int, show: bool) -> Iterator[T]:
    """items with a progress bar: tqdm when installed, else a counter on stderr."""
    if not show:
        yield from items
        return
    try:
        from tqdm import tqdm
    except ImportError:
        for done, item in enumerate(items, start=1):
            yield item
            if done % 100 == 0 or done == total:
                print(f"\rsynthesized {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)
        return
    yield from tqdm(items, total=total, desc="synthesizing", unit="sample")


def synthesize(out_dir: str | os.PathLike, counts: Mapping[str, int], seed: int = 0,
               image_size: tuple[int, int] | Mapping[str, tuple[int, int]] = (256, 256),
               progress: bool = True, lang: str = "en") -> list[Sample]:
    """Write counts[kind] samples of each kind to out_dir: images/<kind>-<i>.png and data.json (LLaVA form).

    image_size: (width, height) for every kind, or a mapping kind -> (width, height) covering the
    kinds asked for. Each record is one exchange: user `<image>` + the instruction, assistant the answer.
    lang: the language of the text kinds, "en", "zh" or "both" (see the module docstring).
    Returns the samples in file order (kinds in KINDS order, then by index).
    """
    unknown = sorted(set(counts) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown synthetic kind(s) {unknown}; choose from {', '.join(KINDS)}")
    if lang not in TEXT_LANGUAGES:
        raise ValueError(f"unknown text language {lang!r}; choose from {', '.join(TEXT_LANGUAGES)}")
    if any(not isinstance(n, int) or n < 0 for n in counts.values()):
        raise ValueError(f"counts must be non-negative integers, got {dict(counts)}")
    sizes = {kind: _size_for(kind, image_size) for kind in KINDS if counts.get(kind, 0)}
    jobs = [(kind, i) for kind in KINDS for i in range(counts.get(kind, 0))]
    if not jobs:
        raise ValueError("nothing to synthesize: every count is 0; ask for at least one sample")
    out = Path(out_dir)
    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    samples = []
    for kind, i in _progress(jobs, len(jobs), progress):
        item = generate_item(kind, seed, i, sizes[kind], lang)
        path = (out / IMAGE_DIR / f"{kind}-{i:06d}.png").absolute()
        item.image.save(path)
        samples.append(Sample(
            id=f"{kind}-{i:06d}", images=[path],
            messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item.question}]},
                      {"role": "assistant", "content": [{"type": "text", "text": item.answer}]}]))
    write_llava_json(samples, out / DATASET_FILE)
    return samples


def _size_for(kind: str, image_size: tuple[int, int] | Mapping[str, tuple[int, int]]) -> tuple[int, int]:
    size = image_size.get(kind) if isinstance(image_size, Mapping) else image_size
    if size is None:
        raise ValueError(f"image_size has no entry for kind {kind!r}; give (width, height) for every kind asked for")
    if len(size) != 2 or any(not isinstance(s, int) or s < 16 for s in size):
        raise ValueError(f"image size for {kind!r} must be (width, height) of at least 16 pixels, got {size!r}")
    return int(size[0]), int(size[1])
