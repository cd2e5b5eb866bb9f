"""The server's image-feature cache (vlmkit/serve/image_cache.py), through the real server and the openai client.

A uvicorn server on a free local port serves `tiny-random` (LM and projector sharpened, so answers depend
on the prompt and the image) or a tiny random transformers Qwen2-VL built as in test_chat_media_models.
Conversations resend their images every turn, as the web page and OpenAI clients do. Oracles:
- answers: vlmkit.generate on the same conversation from pixels, and the same server with the cache off
  (image_cache_bytes=0: the pixels go to forward, the path before the cache existed);
- how often an image is encoded: a forward hook on the vision tower's patch embedding counting the
  pixel rows it reads (images for tiny-random, patches for Qwen2-VL), not the app's own counters;
- the byte bound: an entry's size counted by hand (tokens x width x 4 bytes of float32);
- every other image scheme (no server): the logits of a prompt whose prefill the cache built (one image
  cached before, two encoded together) equal, bit for bit, those of forward encoding the pixels itself.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_serve_image_cache.py
"""

from __future__ import annotations

import base64
import dataclasses
import io
import string
import threading
from collections.abc import Iterator

import matplotlib.cbook
import openai
import pytest
import skimage.data
import torch
from PIL import Image, ImageOps
from test_chat_media_models import BUILDERS
from test_serve import SHAPES, Server, png_data_url, request
from test_serve_batching import sharpen

from vlmkit.cli import main
from vlmkit.generate import generate
from vlmkit.image.load import load_image
from vlmkit.load import LoadedModel, load_model
from vlmkit.presets import build_model, get_preset
from vlmkit.sampling import GenerationConfig
from vlmkit.serve import create_app
from vlmkit.serve.image_cache import MB, CachedImageEncoder, ImageFeatureCache, plan_key
from vlmkit.text.chat import chat_template_for
from vlmkit.text.tokenizer import CharTokenizer

MODEL = "tiny-random"
MAX_TOKENS = 16
# tiny-random: a 32 px image, patch 8 -> 16 tokens of the LM width 64, float32
ENTRY_BYTES = (32 // 8) ** 2 * 64 * 4
Turn = tuple[list[Image.Image], str, str | None]  # the user's images and question, the answer (None: not yet)


class TowerReads:
    """Counts the pixel rows the vision tower's patch embedding reads (a forward hook)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.rows = 0
        self.handle = model.vision.patch_embed.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.rows += len(args[0])


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    """tiny-random with its LM sharpened (test_serve_batching) and its projector's matrices redrawn at std 0.3:
    at the default init an image hardly changes the answer, which would hide an image answered from another's rows."""
    loaded = load_model(MODEL)
    sharpen(loaded.model)
    with torch.no_grad():
        for p in loaded.model.projector.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return loaded


@pytest.fixture
def tower(loaded) -> Iterator[TowerReads]:
    reads = TowerReads(loaded.model)
    yield reads
    reads.handle.remove()


@pytest.fixture(scope="module")
def shapes() -> Image.Image:
    return load_image(SHAPES)


_urls: dict[int, tuple[Image.Image, str]] = {}  # id -> (the image, kept alive so that its id stays its own; URL)


def url_of(image: Image.Image, url: str | None = None) -> str:
    """The image's data URL (PNG unless url is given), made once per image object: a resent image is the same
    base64 text."""
    return _urls.setdefault(id(image), (image, url or png_data_url(image)))[1]


def openai_messages(turns: list[Turn]) -> list[dict]:
    messages: list[dict] = []
    for images, question, answer in turns:
        parts = [{"type": "image_url", "image_url": {"url": url_of(image)}} for image in images]
        messages.append({"role": "user", "content": [*parts, {"type": "text", "text": question}]})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    return messages


def expected(loaded: LoadedModel, turns: list[Turn], max_tokens: int = MAX_TOKENS) -> str:
    """The oracle: vlmkit.generate on the conversation, every image planned together and encoded from pixels."""
    messages: list[dict] = []
    for images, question, answer in turns:
        messages.append({"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text",
                                                                                         "text": question}]})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    prompt = loaded.prompt(messages, loaded.plan_images([image for images, _, _ in turns for image in images]))
    result = generate(loaded.model, [prompt.ids], GenerationConfig(max_new_tokens=max_tokens),
                      prefill_inputs=loaded.image_inputs(prompt.plans), tokenizer=loaded.tokenizer)
    return result.texts[0]


def ask(s: Server, model: str, turns: list[Turn], stream: bool = False, max_tokens: int = MAX_TOKENS) -> str:
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
    settings = dict(model=model, messages=openai_messages(turns), max_tokens=max_tokens, temperature=0)
    if stream:
        chunks = client.chat.completions.create(stream=True, **settings)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return client.chat.completions.create(**settings).choices[0].message.content


def chat(s: Server, model: str, opening: list[Image.Image], later: list[Image.Image],
         max_tokens: int = MAX_TOKENS) -> list[Turn]:
    """Two turns (the second streamed), the first turn's images resent with the second: the finished turns."""
    turns: list[Turn] = [(opening, "What is in the picture?", None)]
    turns[0] = (*turns[0][:2], ask(s, model, turns, max_tokens=max_tokens))
    turns.append((later, "And what else?", None))
    turns[1] = (*turns[1][:2], ask(s, model, turns, stream=True, max_tokens=max_tokens))
    return turns


def cache_stats(s: Server) -> dict:
    return request(s.url + "/health")[1]["image_cache"]


def test_resent_image_is_encoded_once_with_the_answers_of_an_uncached_server(loaded, tower, shapes):
    cached, uncached = Server(create_app(loaded, model_name=MODEL)), Server(
        create_app(loaded, model_name=MODEL, image_cache_bytes=0))
    buffer = io.BytesIO()  # the same pixels in other PNG bytes
    shapes.save(buffer, format="PNG", compress_level=1)
    again = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    assert url_of(again, "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()) != url_of(shapes)
    mirrored = ImageOps.mirror(shapes)  # the same size, other pixels
    try:
        turns = chat(cached, MODEL, [shapes], [])
        assert tower.rows == 1  # one 32 px view, read once over two requests
        assert cache_stats(cached) == {"max_bytes": 256 * MB, "entries": 1, "bytes": ENTRY_BYTES, "hits": 1,
                                       "misses": 1, "evictions": 0}
        assert turns == chat(uncached, MODEL, [shapes], [])
        assert tower.rows == 3  # without the cache the image is encoded every turn
        assert cache_stats(uncached) == {"max_bytes": 0, "entries": 0, "bytes": 0, "hits": 0, "misses": 0,
                                         "evictions": 0}
        answer_again = ask(cached, MODEL, [([again], "Is there a circle?", None)])  # a hit
        assert tower.rows == 3 and cache_stats(cached)["hits"] == 2
        answer_mirrored = ask(cached, MODEL, [([mirrored], "Is there a circle?", None)])  # a miss
        assert tower.rows == 4
        assert cache_stats(cached) == {"max_bytes": 256 * MB, "entries": 2, "bytes": 2 * ENTRY_BYTES, "hits": 2,
                                       "misses": 2, "evictions": 0}
    finally:
        cached.stop()
        uncached.stop()
    assert turns[0][2] == expected(loaded, [(turns[0][0], turns[0][1], None)])
    assert turns[1][2] == expected(loaded, [turns[0], (turns[1][0], turns[1][1], None)])
    assert answer_again == expected(loaded, [([shapes], "Is there a circle?", None)])
    assert answer_mirrored == expected(loaded, [([mirrored], "Is there a circle?", None)])
    assert answer_mirrored != answer_again  # the image shows in the answer, so a wrong hit would


def test_concurrent_requests_with_one_new_image_encode_it_once(loaded, tower):
    image = Image.fromarray(skimage.data.astronaut()).resize((96, 64))
    questions = ["Who is this?", "What colour is the suit?", "Where is this?", "Describe it.", "Any flags?", "Hm?"]
    s = Server(create_app(loaded, model_name=MODEL))
    answers: list = [None] * len(questions)
    barrier = threading.Barrier(len(questions))

    def run(i: int) -> None:
        barrier.wait()
        answers[i] = ask(s, MODEL, [([image], questions[i], None)], stream=bool(i % 2))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(questions))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert tower.rows == 1
        stats = cache_stats(s)
        assert (stats["entries"], stats["hits"], stats["misses"]) == (1, len(questions) - 1, 1)
    finally:
        s.stop()
    assert answers == [expected(loaded, [([image], q, None)]) for q in questions]


def test_byte_bound_evicts_the_least_recently_used_image(loaded, tower, shapes):
    mirrored, flipped = ImageOps.mirror(shapes), ImageOps.flip(shapes)
    order = [shapes, mirrored, shapes, flipped, mirrored, shapes]
    bound = 2 * ENTRY_BYTES + ENTRY_BYTES // 2  # room for two images
    s = Server(create_app(loaded, model_name=MODEL, image_cache_bytes=bound))
    try:  # shapes, mirrored: misses; shapes: a hit; flipped evicts mirrored, mirrored evicts shapes, shapes misses
        answers = [ask(s, MODEL, [([image], "What is in the picture?", None)]) for image in order]
        assert cache_stats(s) == {"max_bytes": bound, "entries": 2, "bytes": 2 * ENTRY_BYTES, "hits": 1,
                                  "misses": 5, "evictions": 3}
        assert tower.rows == 5
    finally:
        s.stop()
    s = Server(create_app(loaded, model_name=MODEL, image_cache_bytes=ENTRY_BYTES - 1))  # smaller than one image
    try:
        question = [([shapes], "What is in the picture?", None)]
        twice = [ask(s, MODEL, question), ask(s, MODEL, question)]
        assert cache_stats(s) == {"max_bytes": ENTRY_BYTES - 1, "entries": 0, "bytes": 0, "hits": 0, "misses": 2,
                                  "evictions": 0}
    finally:
        s.stop()
    assert answers == [expected(loaded, [([image], "What is in the picture?", None)]) for image in order]
    assert twice == [answers[0]] * 2


def test_image_cache_mb_flag_sets_the_bound(monkeypatch):
    apps = []
    monkeypatch.setattr("vlmkit.commands.serve.run_server", lambda app, host, port: apps.append(app))
    assert main(["serve", "--model", MODEL, "--image-cache-mb", "0.5"]) == 0
    assert main(["serve", "--model", MODEL, "--image-cache-mb", "0"]) == 0
    assert [app.state.image_cache.max_bytes for app in apps] == [MB // 2, 0]


@pytest.fixture(scope="module")
def qwen2_vl(tmp_path_factory) -> LoadedModel:
    """A tiny random transformers Qwen2-VL (weights widened as in test_chat_media_models), saved and loaded."""
    make, special, template = BUILDERS["qwen2-vl"]
    tok = CharTokenizer(string.printable, special, chat_template=template)
    torch.manual_seed(0)
    model = make(tok).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    path = tmp_path_factory.mktemp("qwen2-vl")
    model.save_pretrained(path)
    tok.save(path / "tokenizer.json")
    return load_model(str(path))


def test_qwen2_vl_through_the_cache(qwen2_vl):
    """Turn 2 resends turn 1's image (a hit) and brings a second one (a miss): its rows and grids are put
    together from the cache and one encode, in placeholder order (the M-RoPE positions read the grids)."""
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = Image.open(f).convert("RGB").resize((112, 168))  # 4 x 6 merged tokens
    astronaut = Image.fromarray(skimage.data.astronaut()).resize((140, 84))  # 3 x 5
    patches = {id(hopper): 8 * 12, id(astronaut): 6 * 10}  # 14 px patches, merged 2 x 2
    tower = TowerReads(qwen2_vl.model)
    cached = Server(create_app(qwen2_vl, model_name="qwen"))
    uncached = Server(create_app(qwen2_vl, model_name="qwen", image_cache_bytes=0))
    try:
        turns = chat(cached, "qwen", [hopper], [astronaut], max_tokens=8)
        assert tower.rows == patches[id(hopper)] + patches[id(astronaut)]
        width = qwen2_vl.model.cfg.lm.hidden_size
        stats = cache_stats(cached)
        assert (stats["entries"], stats["hits"], stats["misses"]) == (2, 1, 2)
        assert stats["bytes"] == (24 + 15) * width * 4 + 2 * 3 * 8  # rows (float32) + a (1, 3) int64 grid each
        assert turns == chat(uncached, "qwen", [hopper], [astronaut], max_tokens=8)
    finally:
        tower.handle.remove()
        cached.stop()
        uncached.stop()
    assert turns[0][2] == expected(qwen2_vl, [(turns[0][0], turns[0][1], None)], max_tokens=8)
    assert turns[1][2] == expected(qwen2_vl, [turns[0], (turns[1][0], turns[1][1], None)], max_tokens=8)
    assert len(set(turns[1][2])) > 2  # a meaningful comparison: not one repeated character


def small_vlm(preset: str) -> LoadedModel:
    """A `-small` preset's model, random weights, with tiny-random's character tokenizer."""
    tok = CharTokenizer(string.printable)
    cfg = get_preset(preset)
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, vocab_size=tok.vocab_size),
                              image_token_id=tok.token_to_id("<image>"))
    torch.manual_seed(0)
    return LoadedModel(preset, build_model(cfg).eval(), tok, chat_template_for(tok))


# anyres, hd, tiles, dual (two towers), slices
@pytest.mark.parametrize("preset", ["llava-next-small", "phi-3.5-v-small", "deepseek-vl2-small", "vary-base-small",
                                    "minicpm-v-small"])
def test_prefill_from_the_cache_equals_pixels_for_every_scheme(preset, shapes):
    loaded = small_vlm(preset)
    image = shapes.resize((80, 60))
    images = [image, ImageOps.mirror(image), ImageOps.flip(image)]
    messages = [{"role": "user", "content": [{"type": "image"}] * 3 + [{"type": "text", "text": "hi"}]}]
    plans = loaded.plan_images(images)
    ids = torch.tensor([loaded.prompt_ids(messages, plans)])  # (1, T)
    encoder = CachedImageEncoder(loaded, ImageFeatureCache(64 * MB))
    keyed = [(plan_key(plan), plan) for plan in plans]
    with torch.inference_mode():
        encoder.prefill([keyed[:1]])
        cached = loaded.model(input_ids=ids, **encoder.prefill([keyed])).logits  # (1, T, V)
        pixels = loaded.model(input_ids=ids, **loaded.image_inputs(plans)).logits  # (1, T, V)
    assert torch.equal(cached, pixels)
    assert encoder.cache.stats()["entries"] == 3 and encoder.cache.stats()["hits"] == 1


def test_key_follows_the_plan_tiles_plans_differently_beside_two_other_images(shapes):
    """DeepSeek-VL2's tiles scheme tiles an image only when the prompt holds at most 2 images."""
    loaded = small_vlm("deepseek-vl2-small")
    wide = shapes.resize((640, 240))
    alone, beside_two = loaded.plan_images([wide])[0], loaded.plan_images([wide] * 3)[0]
    assert (alone.grid, beside_two.grid) == ((1, 2), (1, 1))  # two tiles vs none
    assert plan_key(alone) != plan_key(beside_two)
    assert plan_key(alone) == plan_key(loaded.plan_images([wide.copy()])[0])
