"""Batched prefill in the server's batcher: requests admitted together go through one forward pass.

Three image schemes, small random models: pad (tiny-random: every image one 32 px view), anyres
(llava-next-small: a different number of views per image size) and dynamic (qwen2-vl-small: a
different number of patches per image size, M-RoPE positions). Five requests of different prompt
lengths: text only, one image, two images of other sizes, and one image shown again. They are
submitted while the batcher's lock is held, so that its worker admits them in one turn.

Oracles: the greedy tokens of each prompt generated alone (vlmkit.generate, one row, its own
pixels); the prefill logits of each prompt prefilled alone (prefill_batch=1, the batcher before
batched prefill), within 1e-5; the number of vision-tower calls counted by a forward hook.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_serve_prefill.py
"""

from __future__ import annotations

import asyncio
import dataclasses
import string
import time
from typing import Any

import pytest
import torch
from PIL import Image
from test_serve_batching import sharpen

from vlmkit.cli import build_parser
from vlmkit.generate import generate
from vlmkit.load import LoadedModel
from vlmkit.presets import build_model, get_preset
from vlmkit.sampling import GenerationConfig
from vlmkit.serve.batcher import PREFILL_BATCH, Batcher
from vlmkit.serve.image_cache import MB, CachedImageEncoder, ImageFeatureCache, plan_key
from vlmkit.text.chat import chat_template_for
from vlmkit.text.tokenizer import CharTokenizer

PRESETS = ["tiny-random", "llava-next-small", "qwen2-vl-small"]  # pad, anyres, dynamic
# (text, image sizes): prompts of different lengths, text only and with images of different sizes
REQUESTS = [("hi", []),
            ("What is in this picture, in a few words?", [(84, 56)]),
            ("x", [(56, 112), (70, 70)]),
            ("A longer question without any image, to pad the other rows of the batch a good deal.", []),
            ("Again?", [(84, 56)])]  # the image of request 1 again
MAX_NEW_TOKENS = 6


def small_vlm(preset: str) -> LoadedModel:
    """The preset's model with random weights (LM sharpened: answers depend on the prompt) and a character
    tokenizer."""
    tok = CharTokenizer(string.printable)
    cfg = get_preset(preset)
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, vocab_size=tok.vocab_size),
                              image_token_id=tok.token_to_id("<image>"))
    torch.manual_seed(0)
    return LoadedModel(preset, sharpen(build_model(cfg).eval()), tok, chat_template_for(tok))


def picture(size: tuple[int, int], seed: int) -> Image.Image:
    noise = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=noise).numpy())


def jobs_of(loaded: LoadedModel) -> list[tuple[list[int], list, GenerationConfig]]:
    """(prompt ids, image plans, greedy settings) of REQUESTS: the text's ids with each image's placeholders."""
    jobs = []
    for text, sizes in REQUESTS:
        plans = loaded.plan_images([picture(size, seed=sum(size)) for size in sizes])
        ids = loaded.tokenizer.encode(text[:1])
        for plan in plans:
            ids += [loaded.image_token_id] * plan.num_tokens + loaded.tokenizer.encode(" ")
        jobs.append((ids + loaded.tokenizer.encode(text[1:]), plans, GenerationConfig(max_new_tokens=MAX_NEW_TOKENS)))
    return jobs


class Passes:
    """Forward hooks: the last-position logits (B, V) of every prefill pass (a forward over an empty cache) and
    the number of vision-tower calls (calls of its patch embedding, the tower's first layer)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.prefills: list[torch.Tensor] = []
        self.vision_calls = 0
        self.handles = [model.register_forward_hook(self._model, with_kwargs=True),
                        model.vision.patch_embed.register_forward_hook(self._vision)]
        self._prefill = False
        self.handles.append(model.register_forward_pre_hook(self._before, with_kwargs=True))

    def _before(self, module, args, kwargs) -> None:
        self._prefill = kwargs["cache"].length == 0

    def _model(self, module, args, kwargs, output) -> None:
        if self._prefill:
            self.prefills.append(output.logits[:, -1].clone())

    def _vision(self, module, args, output) -> None:
        self.vision_calls += 1

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def admit_together(loaded: LoadedModel, jobs: list, prefill_batch: int, images: Any = None,
                   cancel: tuple[int, ...] = ()) -> tuple[list, Passes]:
    """Each job's GenerationResult (None if cancelled) from one Batcher that admits them all in one turn; the jobs
    in `cancel` are cancelled while they wait. images: the batcher's image function (default: the model's)."""
    passes = Passes(loaded.model)

    async def main() -> list:
        batcher = Batcher(loaded.model, loaded.tokenizer, max_batch_size=8, max_queue=8, prefill_batch=prefill_batch,
                          images=images)
        try:
            with batcher._wake:  # the worker cannot take the queue before every job is in it
                tickets = [batcher.submit(*job) for job in jobs]
                for i in cancel:
                    tickets[i].cancel()
            return await asyncio.gather(*(t.complete() for t in tickets), return_exceptions=True)
        finally:
            batcher.stop()
    try:
        return asyncio.run(main()), passes
    finally:
        passes.remove()


def alone(loaded: LoadedModel, ids: list[int], plans: list, cfg: GenerationConfig) -> list[int]:
    prefill = loaded.image_inputs(plans)
    return generate(loaded.model, [ids], cfg, prefill_inputs=prefill, tokenizer=loaded.tokenizer).token_ids[0]


@pytest.mark.parametrize("preset", PRESETS)
def test_batched_prefill_equals_each_request_alone_in_one_vision_call(preset):
    loaded = small_vlm(preset)
    jobs = jobs_of(loaded)
    assert len({len(ids) for ids, _, _ in jobs}) == len(jobs)  # every row is padded differently
    if preset != "tiny-random":  # images of different sizes give different token counts
        assert len({plans[0].num_tokens for _, plans, _ in jobs if plans}) > 1
    batched, passes = admit_together(loaded, jobs, prefill_batch=8)
    each, single = admit_together(loaded, jobs, prefill_batch=1)
    expected = [alone(loaded, *job) for job in jobs]
    assert [r.token_ids[0] for r in batched] == [r.token_ids[0] for r in each] == expected
    assert len({tuple(tokens) for tokens in expected[:4]}) == 4  # a mix-up of rows could not go unseen
    assert [p.shape[0] for p in passes.prefills] == [len(jobs)]  # one prefill pass for the five
    assert [p.shape[0] for p in single.prefills] == [1] * len(jobs)
    torch.testing.assert_close(passes.prefills[0], torch.cat(single.prefills), rtol=1e-5, atol=1e-5)
    assert (passes.vision_calls, single.vision_calls) == (1, 3)  # three requests have images


@pytest.mark.parametrize("preset", ["llava-next-small", "qwen2-vl-small"])
def test_with_the_image_cache_a_group_encodes_its_new_images_once(preset):
    loaded = small_vlm(preset)
    jobs = jobs_of(loaded)
    cache = ImageFeatureCache(64 * MB)
    encoder = CachedImageEncoder(loaded, cache)
    keyed = [(ids, [(plan_key(plan), plan) for plan in plans], cfg) for ids, plans, cfg in jobs]
    results, passes = admit_together(loaded, keyed, prefill_batch=8, images=encoder.prefill)
    assert [r.token_ids[0] for r in results] == [alone(loaded, *job) for job in jobs]
    assert passes.vision_calls == 1
    # as if the requests came one after another: request 4's image was encoded for request 1 (one hit)
    assert {k: cache.stats()[k] for k in ("entries", "hits", "misses")} == {"entries": 3, "hits": 1, "misses": 3}
    again, passes = admit_together(loaded, keyed, prefill_batch=8, images=encoder.prefill)
    assert [r.token_ids for r in again] == [r.token_ids for r in results]
    assert passes.vision_calls == 0  # every image is cached now


def test_an_error_or_a_cancellation_in_a_group_ends_only_its_own_request(caplog):
    loaded = small_vlm("llava-next-small")
    jobs = jobs_of(loaded)
    ids, plans, cfg = jobs[2]
    wrong = (ids[:-1] + [loaded.image_token_id] + ids[-1:], plans, cfg)  # one placeholder too many
    results, passes = admit_together(loaded, [jobs[0], jobs[1], wrong, jobs[3], jobs[4]], prefill_batch=8,
                                     cancel=(3,))
    assert isinstance(results[2], ValueError) and "placeholder tokens" in str(results[2])
    assert results[3] is None  # cancelled
    for i in (0, 1, 4):
        assert results[i].token_ids[0] == alone(loaded, *jobs[i])
    # the pass of the four together failed, then each was prefilled alone: three passes of one row got through
    assert "the prefill of 4 requests together failed" in caplog.text
    assert [p.shape[0] for p in passes.prefills] == [1, 1, 1]


def test_a_request_cancelled_after_its_prefill_leaves_the_others_alone():
    loaded = small_vlm("tiny-random")
    jobs = jobs_of(loaded)
    long = [(ids, plans, GenerationConfig(max_new_tokens=40)) for ids, plans, _ in jobs]

    async def main() -> list:
        batcher = Batcher(loaded.model, loaded.tokenizer, prefill_batch=8)
        loop = asyncio.get_running_loop()

        def give_up(module, args, kwargs, output) -> None:  # at the prefill pass, request 1's client goes away
            if kwargs["input_ids"].shape[1] > 1:  # decoding passes feed one token per row
                loop.call_soon_threadsafe(tickets[1].cancel)

        handle = loaded.model.register_forward_hook(give_up, with_kwargs=True)
        try:
            with batcher._wake:
                tickets = [batcher.submit(*job) for job in long]
            results = await asyncio.gather(*(t.complete() for t in tickets))
        finally:
            handle.remove()
            batcher.stop()
        assert batcher.cancelled_requests == 1
        return results
    results = asyncio.run(main())
    assert results[1] is None
    for i in (0, 2, 3, 4):
        assert results[i].token_ids[0] == alone(loaded, *long[i])


def test_prefill_flags():
    args = build_parser().parse_args(["serve", "--model", "tiny-random"])
    assert (args.prefill_batch, args.prefill_wait_ms) == (PREFILL_BATCH, 0)
    args = build_parser().parse_args(["serve", "--model", "tiny-random", "--prefill-batch", "1",
                                      "--prefill-wait-ms", "50"])
    assert (args.prefill_batch, args.prefill_wait_ms) == (1, 50)
    for wrong in (["--prefill-batch", "0"], ["--prefill-batch", "two"], ["--prefill-wait-ms", "-1"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--model", "tiny-random", *wrong])


def test_an_idle_batcher_waits_prefill_wait_for_requests_sent_together():
    """Requests arriving 30 ms apart: with a wait, one prefill pass; a lone request goes once the wait is over."""
    loaded = small_vlm("tiny-random")
    jobs = jobs_of(loaded)[:3]
    passes = Passes(loaded.model)

    async def main(wait: float, jobs: list) -> list:
        batcher = Batcher(loaded.model, loaded.tokenizer, prefill_batch=len(jobs) + 1, prefill_wait=wait)

        async def one(i: int):
            await asyncio.sleep(0.03 * i)
            return await batcher.submit(*jobs[i]).complete()
        try:
            return await asyncio.gather(*(one(i) for i in range(len(jobs))))
        finally:
            batcher.stop()
    try:
        results = asyncio.run(main(1.0, jobs))
        assert [p.shape[0] for p in passes.prefills] == [3]
        start = time.monotonic()
        asyncio.run(main(0.2, jobs[:1]))  # fewer than prefill_batch come: it waits 0.2 s, then prefills
        assert 0.2 <= time.monotonic() - start < 2
        assert [p.shape[0] for p in passes.prefills] == [3, 1]
    finally:
        passes.remove()
    assert [r.token_ids[0] for r in results] == [alone(loaded, *job) for job in jobs]
    with pytest.raises(ValueError, match="prefill_wait"):
        Batcher(loaded.model, loaded.tokenizer, prefill_wait=-1)


def test_padding_that_would_look_like_an_image_placeholder_is_refused():
    """Left padding is written with the pad id (0 here); were it the placeholder id, the scatter would fill it."""
    tok = CharTokenizer(string.printable)
    cfg = dataclasses.replace(get_preset("tiny-random"), image_token_id=0)
    model = build_model(dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, vocab_size=tok.vocab_size))).eval()
    with pytest.raises(ValueError, match="padding id 0 is one of the model's placeholder ids"):
        generate(model, [[5, 6, 7], [8]], GenerationConfig(max_new_tokens=2))
    assert len(generate(model, [[5, 6, 7]], GenerationConfig(max_new_tokens=2)).token_ids[0]) == 2  # no padding
