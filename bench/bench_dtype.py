"""The step times behind `--dtype bfloat16`: prefill and decoding steps in fp32, in bf16, and in bf16 with a bf16
KV cache (what vlmkit does not do on a CPU, models/lm.py cache_dtype).

    python bench/bench_dtype.py                  # 12 x 768 LM (vary-tiny's), 1 thread, 7 repetitions
    python bench/bench_dtype.py --lm bench-tiny --threads 2 --reps 11

The model is bench_serve.py's: bench-tiny's 96-px ViT and mlp2x_gelu projector with an LM of the chosen preset
and the 107-character vocabulary, random weights. Timed, in-process, under torch.inference_mode:
- prefill: one prompt of 190 tokens holding one image (144 image tokens), the vision tower included;
- decode 1 / decode 8: one step of 1 or 8 rows over a cache holding 200 positions (one new token each).
Each repetition runs every configuration once, in turn (so machine noise hits all alike); medians are printed,
with the ratio of each time to fp32's.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import string
import time
from collections.abc import Callable

import torch

from vlmkit.config import ProjectorConfig
from vlmkit.models.lm import KVCache
from vlmkit.models.vlm import VLM
from vlmkit.presets import bench_tiny, get_preset
from vlmkit.text.tokenizer import CharTokenizer

PROMPT_TOKENS, IMAGE_TOKENS, CACHED = 190, 144, 200
CONFIGS = ("fp32", "bf16 (fp32 cache)", "bf16 (bf16 cache)")


def build(lm: str) -> tuple[VLM, CharTokenizer]:
    """The bench model with random weights (seed 0): bench-tiny's vision tower and mlp2x_gelu projector, the LM of
    preset lm ("bench-tiny" keeps its own) sized to the printable-ASCII character tokenizer. bench_serve.py
    serves the same model."""
    tokenizer = CharTokenizer(string.printable)
    cfg = bench_tiny()
    lm_cfg = cfg.lm if lm == "bench-tiny" else get_preset(lm).lm
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(lm_cfg, vocab_size=tokenizer.vocab_size),
                              projector=ProjectorConfig("mlp2x_gelu", cfg.vision.hidden_size, lm_cfg.hidden_size),
                              image_token_id=tokenizer.token_to_id("<image>"))
    torch.manual_seed(0)
    return VLM(cfg).eval(), tokenizer


def cache_for(model: VLM, config: str, rows: int, length: int) -> KVCache:
    if config == "bf16 (bf16 cache)":
        return KVCache(model.cfg.lm, rows, length, dtype=torch.bfloat16)
    return model.new_cache(rows, length)  # fp32 for both fp32 and bf16 weights on a CPU


def timers(model: VLM, config: str) -> dict[str, Callable[[], None]]:
    """name -> a function running the timed work once."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 90, (1, PROMPT_TOKENS), generator=g)  # characters, none the image placeholder
    ids[0, 2:2 + IMAGE_TOKENS] = model.cfg.image_token_id
    pixels = torch.randn(1, 3, 96, 96, generator=g)

    def prefill() -> None:
        model(input_ids=ids, pixel_values=pixels, cache=cache_for(model, config, 1, PROMPT_TOKENS + 1),
              logits_to_keep=1)

    def decoder(rows: int) -> Callable[[], None]:
        cache = cache_for(model, config, rows, CACHED + 1)
        model(input_ids=torch.randint(10, 90, (rows, CACHED), generator=g), cache=cache, logits_to_keep=1)
        token = torch.randint(10, 90, (rows, 1), generator=g)

        def step() -> None:
            model(input_ids=token, cache=cache, logits_to_keep=1)
            cache.length = CACHED  # the next repetition writes the same position again

        return step

    return {"prefill (1 image)": prefill, "decode 1 row": decoder(1), "decode 8 rows": decoder(8)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lm", default="vary-tiny", help="the language model's preset (default vary-tiny)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fp32 = build(args.lm)[0]
    bf16 = build(args.lm)[0].to(torch.bfloat16)
    with torch.inference_mode():
        runs = {c: timers(fp32 if c == "fp32" else bf16, c) for c in CONFIGS}
        times: dict[tuple[str, str], list[float]] = {}
        for rep in range(args.reps + 1):  # the first repetition warms up and is not counted
            for config, work in runs.items():
                for name, run in work.items():
                    start = time.perf_counter()
                    run()
                    if rep:
                        times.setdefault((config, name), []).append(time.perf_counter() - start)
    names = list(runs["fp32"])
    print(f"{args.lm} LM, {args.threads} thread(s), medians of {args.reps} (ms; ratio to fp32)")
    print(f"{'':<20}" + "".join(f"{n:>22}" for n in names))
    for config in CONFIGS:
        cells = []
        for name in names:
            ms = 1e3 * statistics.median(times[config, name])
            base = 1e3 * statistics.median(times["fp32", name])
            cells.append(f"{ms:9.2f} ({ms / base:4.2f}x)")
        print(f"{config:<20}" + "".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
