"""Prompt building: plain and numbered image placeholders, videos as frames, tokenization, errors.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_prompt.py
"""

from __future__ import annotations

import string

import pytest
import torch
from matplotlib import cbook
from PIL import Image
from tokenizers import AddedToken, models, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer

from vlmkit.image.plan import ImagePlan
from vlmkit.schemes.dynamic import plan_video_dynamic
from vlmkit.image.video import load_video_frames
from vlmkit.load import LoadedModel, tiny_random_model
from vlmkit.schemes import image_inputs
from vlmkit.prompt import build_prompt, build_prompt_ids, placeholder_order
from vlmkit.text.chat import get_chat_template
from vlmkit.text.tokenizer import CharTokenizer, HFTokenizer

TOK = CharTokenizer(string.printable)
IMAGE_ID = TOK.token_to_id("<image>")


def _plan(tokens: int) -> ImagePlan:
    return ImagePlan("pad", torch.zeros(1, 3, 4, 4), (4, 4), (4, 4), (1, 1), {"features": tokens})


def _runs(ids: list[int], token: int) -> list[int]:
    """Lengths of the maximal runs of token in ids, in order."""
    runs, prev = [], None
    for t in ids:
        if t == token:
            runs[-1:] = [runs[-1] + 1] if prev == token else runs[-1:] + [1]
        prev = t
    return runs


def _user(*parts: dict) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def test_plain_placeholders_expand_in_order_and_leave_the_text():
    plans = [_plan(3), _plan(5)]
    messages = _user({"type": "image"}, {"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"})
    chatml = get_chat_template("chatml")
    prompt = build_prompt(TOK, chatml, messages, IMAGE_ID, plans)
    assert _runs(prompt.ids, IMAGE_ID) == [3, 5]
    assert prompt.plans == plans
    text = chatml.render(messages, add_generation_prompt=True)
    assert TOK.decode([t for t in prompt.ids if t != IMAGE_ID]) == text.replace("<image>", "")
    assert build_prompt_ids(TOK, chatml, messages, IMAGE_ID, plans) == prompt.ids


def test_numbered_placeholders_name_images_in_any_order_with_repeats():
    p1, p2 = _plan(2), _plan(4)
    messages = [{"role": "user", "content": "<|image_2|> vs <|image_1|>, again <|image_2|>"}]
    phi3 = get_chat_template("phi3")
    prompt = build_prompt(TOK, phi3, messages, IMAGE_ID, [p1, p2])
    assert _runs(prompt.ids, IMAGE_ID) == [4, 2, 4]
    assert [id(p) for p in prompt.plans] == [id(p2), id(p1), id(p2)]  # what image_inputs gets, prompt order
    assert TOK.decode([t for t in prompt.ids if t != IMAGE_ID]) == "<|user|>\n vs , again <|end|>\n<|assistant|>\n"
    with pytest.raises(ValueError, match="out of order or more than once"):
        build_prompt_ids(TOK, phi3, messages, IMAGE_ID, [p1, p2])


def test_phi3_template_numbers_image_parts_which_need_not_be_tokens():
    plans = [_plan(2), _plan(3)]
    messages = _user({"type": "image"}, {"type": "image"}, {"type": "text", "text": "hi"})
    prompt = build_prompt(TOK, get_chat_template("phi3"), messages, IMAGE_ID, plans)
    assert _runs(prompt.ids, IMAGE_ID) == [2, 3]
    assert TOK.decode(prompt.ids).count("|image_") == 0


@pytest.mark.parametrize("text, images, message", [
    ("<|image_1|> <|image_3|>", 2, r"placeholder <\|image_3\|> but only 2 image\(s\)"),
    ("<|image_2|>", 2, r"image\(s\) \[1\] were given but no <\|image_N\|> placeholder"),
    ("<image> <image>", 3, r"2 image placeholder\(s\) \(<image>\) but 3 image\(s\)"),
    ("<image> <|image_1|>", 1, "mixes plain <image> and numbered"),
])
def test_placeholder_errors_say_which(text: str, images: int, message: str):
    with pytest.raises(ValueError, match=message):
        placeholder_order(text, images, "<image>")


def test_images_for_a_text_only_model_raise():
    with pytest.raises(ValueError, match="text-only"):
        build_prompt(TOK, get_chat_template("chatml"), _user({"type": "image"}), None, [_plan(1)])


def _sentencepiece_like() -> HFTokenizer:
    """A BPE whose pre-tokenizer prefixes '▁' to the start of each encode (Metaspace 'first')."""
    chars = sorted(set(string.ascii_letters + " \n:<|>_"))
    vocab = {"<unk>": 0, "▁": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    backend = RustTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    return HFTokenizer(backend, unk_token="<unk>")


def test_prompt_is_tokenized_in_one_pass_like_the_llava_processor():
    tok = _sentencepiece_like()
    image_id = tok.token_to_id("<image>")
    messages = _user({"type": "image"}, {"type": "text", "text": "What is it?"})
    template = get_chat_template("llava")
    ids = build_prompt_ids(tok, template, messages, image_id, [_plan(3)])
    # transformers' LlavaProcessor: repeat the image token in the text, then tokenize the whole string.
    expanded = template.render(messages, add_generation_prompt=True).replace("<image>", "<image>" * 3)
    assert ids == tok.encode(expanded)
    assert tok.encode("\nWhat") != tok.encode("<image>\nWhat")[1:]  # segment-wise would differ here


def _photo_gif(path, sizes: list[tuple[int, int]]) -> str:
    photo = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    frames = [photo.crop((i * 40, i * 30, i * 40 + 300, i * 30 + 200)) for i in range(len(sizes))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return str(path)


def test_video_part_expands_per_frame_on_a_tiny_vlm(tmp_path):
    loaded: LoadedModel = tiny_random_model()
    video = load_video_frames(_photo_gif(tmp_path / "clip.gif", [(300, 200)] * 6), num_frames=3)
    assert video.indices == [0, 2, 4]
    image = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    plans = loaded.plan_images([video.frames, image])
    assert [len(plans[0]), isinstance(plans[1], ImagePlan)] == [3, True]
    messages = _user({"type": "video"}, {"type": "text", "text": "and"}, {"type": "image"},
                     {"type": "text", "text": "same?"})
    prompt = loaded.prompt(messages, plans)
    per_image = plans[1].num_tokens
    assert _runs(prompt.ids, loaded.model.image_token_id) == [per_image] * 4
    inputs = image_inputs(prompt.plans)
    assert tuple(inputs["pixel_values"].shape[:1]) == (4,)
    with torch.no_grad():
        logits = loaded.model(input_ids=torch.tensor([prompt.ids]), **inputs).logits
    assert logits.shape[1] == len(prompt.ids)
    with pytest.raises(ValueError, match="more video parts than the 0 video"):
        loaded.prompt(messages, [plans[1]])


def test_video_with_one_clip_plan_is_one_run(tmp_path):
    frames = load_video_frames(_photo_gif(tmp_path / "clip.gif", [(300, 200)] * 4), num_frames=4).frames
    clip = plan_video_dynamic(frames)
    t, h, w = clip.extra["video_grid_thw"]
    messages = _user({"type": "text", "text": "watch"}, {"type": "video"})
    prompt = build_prompt(TOK, get_chat_template("chatml"), messages, IMAGE_ID, [[clip]])
    assert _runs(prompt.ids, IMAGE_ID) == [t * h * w // 4] and t == 2
