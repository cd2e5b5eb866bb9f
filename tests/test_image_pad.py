"""The LLaVA-1.5 pad scheme against transformers' LlavaImageProcessorPil (do_pad=True) on real photos."""

import numpy as np
import pytest
import transformers
from PIL import Image

from vlmkit.image.pixels import pad_to_square
from vlmkit.schemes.pad import preprocess_pad

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def _photo(width: int, height: int) -> Image.Image:
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        return Image.open(f).convert("RGB").resize((width, height))


def test_pad_to_square_centres_the_image():
    img = Image.new("RGB", (4, 2), (255, 255, 255))
    out = np.asarray(pad_to_square(img, (0, 0, 0)))
    assert out.shape == (4, 4, 3)
    assert out[0].sum() == 0 and out[3].sum() == 0  # one padded row above, one below
    assert (out[1:3] == 255).all()


@pytest.mark.parametrize("size", [(512, 600), (300, 120), (64, 64)])
def test_matches_llava_image_processor(size):
    processor = transformers.LlavaImageProcessorPil(
        do_pad=True, size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
        image_mean=list(MEAN), image_std=list(STD))
    image = _photo(*size)
    expected = processor(images=image, return_tensors="pt")["pixel_values"][0]
    ours = preprocess_pad(image, 336, MEAN, STD)
    assert ours.shape == (3, 336, 336)
    assert (ours - expected).abs().max().item() <= 1e-5
