"""Batched prefill in the server: 8 concurrent image requests, prefilled together against one at a time.

    python bench/bench_serve_prefill.py                    # default: 5 repetitions, 1 torch thread, 32 tokens, 100 ms
    python bench/bench_serve_prefill.py --reps 7 --threads 2 --lm vary-tiny --json bench/results/prefill.json

Three `vlmkit serve` apps (uvicorn, bench_serve.py's server process) run side by side on free
127.0.0.1 ports, serving the same bench model (bench_serve.py: bench-tiny's vision tower, 96 px,
and the LM of `--lm`, random weights, character vocabulary), one per mode:
- one at a time: `--prefill-batch 1`, each request prefilled alone (the server before batched prefill);
- batched: `--prefill-batch 8` (the default): the requests the batcher finds waiting when it
  turns go through one prefill pass, their images through one vision batch;
- batched, wait: the same with `--prefill-wait-ms` (this bench's, default 100): an idle server waits
  that long for 8 requests, since requests sent together arrive spread over their parsing (each
  decodes a PNG) and would otherwise be prefilled in two or three groups.
Only one of them works at a time. Each run sends 8 streamed greedy requests at once from 8 client threads,
each a different question about its own image (bench_serve.py's crops, flips and turns of
examples/shapes.png: 144 image tokens, prompts of ~190 tokens), with the image-feature cache
emptied first, so every run encodes its 8 images. Repetitions alternate the two servers, and which
goes first, so machine noise hits both alike.

Then, with the servers stopped, the same 8 prompts' prefill work in this process, no HTTP: each
prompt's prefill pass (decoding.prefill_batch, its images encoded in it) one at a time, against one
pass of the 8 left-padded prompts with their 8 images in one vision batch, alternating, --reps times.

Reported, medians over the repetitions: time to first token (from the release of the 8 clients to
a request's first streamed text; per run the median and the largest of the 8), and total completion
tokens / wall time; then the median of each repetition's ratio to one at a time (steadier on a busy
machine: the runs of a repetition are seconds apart). The same 8 answers are expected from every
server (greedy, float32: a batched prefill's last bits differ from a single row's, which could flip
an exact tie only); answers that differ are listed.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from bench_serve import CLEAR_ROUTE, CLIENTS, MODELS, QUESTIONS, cache_stats, free_port, image_urls

BASELINE = "one at a time"


def modes(wait_ms: float) -> dict[str, tuple[int, float]]:
    """name -> the server's --prefill-batch and --prefill-wait-ms."""
    return {BASELINE: (1, 0.0), "batched": (8, 0.0), f"batched, wait {wait_ms:g} ms": (8, wait_ms)}


def start(port: int, prefill_batch: int, wait_ms: float, args: argparse.Namespace) -> subprocess.Popen:
    script = Path(__file__).resolve().parent / "bench_serve.py"
    return subprocess.Popen([sys.executable, str(script), "--serve-port", str(port), "--threads", str(args.threads),
                             "--max-tokens", str(args.max_tokens), "--lm", args.lm,
                             "--prefill-batch", str(prefill_batch), "--prefill-wait-ms", str(wait_ms)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_ready(port: int, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
            return
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server on port {port} did not start")
            time.sleep(0.2)


def ask(client, question: str, image_url: str, max_tokens: int, start: list[float]) -> tuple[str, int, float]:
    """One streamed request: (answer, completion tokens, seconds from start[0] to the first text)."""
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                             {"type": "text", "text": question}]}]
    first, text, tokens = None, [], 0
    for chunk in client.chat.completions.create(model="bench-tiny", messages=messages, max_tokens=max_tokens,
                                                temperature=0, stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first if first is not None else time.perf_counter() - start[0]
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return "".join(text), tokens, first


def run(client, urls: list[str], max_tokens: int) -> tuple[float, list[tuple[str, int, float]]]:
    """The 8 requests sent at once from 8 threads: (wall seconds, each (answer, tokens, time to first text))."""
    answers: list = [None] * CLIENTS
    barrier = threading.Barrier(CLIENTS + 1)
    start = [0.0]

    def one(i: int) -> None:
        barrier.wait()
        answers[i] = ask(client, QUESTIONS[i], urls[i], max_tokens, start)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    start[0] = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    return time.perf_counter() - start[0], answers


def prefill_passes(args: argparse.Namespace) -> dict[str, list[float]]:
    """Seconds of the 8 prompts' prefill work in this process, per repetition: one at a time and batched."""
    import io

    import torch
    from PIL import Image

    from bench_dtype import build
    from vlmkit.decoding import prefill_batch
    from vlmkit.generate import new_row, pad_id
    from vlmkit.load import LoadedModel
    from vlmkit.sampling import GenerationConfig
    from vlmkit.text.chat import chat_template_for

    torch.set_num_threads(args.threads)
    model, tokenizer = build(args.lm)
    loaded = LoadedModel("bench-tiny", model, tokenizer, chat_template_for(tokenizer))
    images = [Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2]))).convert("RGB") for url in image_urls()]
    plans = [loaded.plan_images([image]) for image in images]
    prompts = [loaded.prompt_ids([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], p)
               for q, p in zip(QUESTIONS, plans)]
    config, pad = GenerationConfig(max_new_tokens=1), pad_id(tokenizer)

    def alone() -> None:
        for ids, p in zip(prompts, plans):
            prefill_batch(model, [new_row(ids, config)], len(ids), loaded.image_inputs(p), pad)

    def together() -> None:
        rows = [new_row(ids, config) for ids in prompts]
        prefill_batch(model, rows, max(map(len, prompts)), loaded.image_inputs([q for p in plans for q in p]), pad)

    seconds: dict[str, list[float]] = {BASELINE: [], "batched": []}
    with torch.inference_mode():
        alone(), together()  # warm-up
        for rep in range(args.reps):
            for name, work in ((BASELINE, alone), ("batched", together))[::1 if rep % 2 == 0 else -1]:
                start = time.perf_counter()
                work()
                seconds[name].append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="repetitions of each mode (medians are reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server process")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request")
    parser.add_argument("--lm", choices=list(MODELS), default="bench-tiny",
                        help="whose language model to serve (the vision tower is bench-tiny's either way)")
    parser.add_argument("--prefill-wait-ms", type=float, default=100.0,
                        help="the third server's --prefill-wait-ms (default 100)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    import openai

    mode_options = modes(args.prefill_wait_ms)
    ports = {mode: free_port() for mode in mode_options}
    servers = {mode: start(ports[mode], n, wait, args) for mode, (n, wait) in mode_options.items()}
    figures: dict[str, dict[str, list[float]]] = {m: {"ttft_median": [], "ttft_max": [], "tokens_per_s": []}
                                                   for m in mode_options}
    differing: list[str] = []
    try:
        for mode in mode_options:
            wait_ready(ports[mode], servers[mode])
        clients = {m: openai.OpenAI(base_url=f"http://127.0.0.1:{ports[m]}/v1", api_key="unused", max_retries=0)
                   for m in mode_options}
        urls = image_urls()
        shapes = "data:image/png;base64," + base64.b64encode(
            (Path(__file__).resolve().parent.parent / "examples" / "shapes.png").read_bytes()).decode()
        for mode in mode_options:
            run(clients[mode], [shapes] * CLIENTS, 4)  # warm-up, on an image the timed runs do not use
        reference: dict[int, str] = {}
        for rep in range(args.reps):
            names = list(mode_options)
            order = names[rep % len(names):] + names[:rep % len(names)]  # each mode goes first in turn
            for mode in order:
                before = cache_stats(ports[mode], CLEAR_ROUTE, "POST")  # every run encodes its 8 images
                seconds, answers = run(clients[mode], urls, args.max_tokens)
                misses = cache_stats(ports[mode])["misses"] - before["misses"]
                if misses != CLIENTS:
                    raise SystemExit(f"{mode}: {misses} images were encoded, expected {CLIENTS}")
                for i, (text, _, _) in enumerate(answers):
                    if reference.setdefault(i, text) != text:
                        differing.append(f"rep {rep + 1}, {mode}, request {i + 1}: {text!r} vs {reference[i]!r}")
                firsts = [first for _, _, first in answers]
                tokens = sum(n for _, n, _ in answers)
                figures[mode]["ttft_median"].append(statistics.median(firsts))
                figures[mode]["ttft_max"].append(max(firsts))
                figures[mode]["tokens_per_s"].append(tokens / seconds)
                print(f"rep {rep + 1} {mode:<22} time to first token median {statistics.median(firsts) * 1000:6.0f} "
                      f"ms, max {max(firsts) * 1000:6.0f} ms; {tokens} tokens in {seconds:.2f} s = "
                      f"{tokens / seconds:.1f} tokens/s", flush=True)
    finally:
        for server in servers.values():
            server.terminate()
        for server in servers.values():
            server.wait(timeout=30)
    passes = prefill_passes(args)
    medians = {m: {k: statistics.median(v) for k, v in f.items()} for m, f in figures.items()}
    print(f"\n{MODELS[args.lm]} in float32, {CLIENTS} concurrent streamed greedy requests, each with its own image "
          f"(144 image tokens), {args.max_tokens} max new tokens, {args.threads} torch thread(s) per server, "
          f"image cache emptied before each run, medians of {args.reps}")
    print(f"{'mode':<24} {'TTFT median':>12} {'TTFT max':>9} {'tokens/s':>9}   ratios to {BASELINE} (median of "
          "each repetition's)")
    off = figures[BASELINE]
    paired = {mode: {k: statistics.median(a / b for a, b in zip(figures[mode][k], off[k])) for k in off}
              for mode in mode_options}
    for mode in mode_options:
        m, r = medians[mode], paired[mode]
        print(f"{mode:<24} {m['ttft_median'] * 1000:>9.0f} ms {m['ttft_max'] * 1000:>6.0f} ms "
              f"{m['tokens_per_s']:>9.1f}   TTFT median x{r['ttft_median']:.2f}, max x{r['ttft_max']:.2f}, "
              f"tokens/s x{r['tokens_per_s']:.2f}")
    ratio = statistics.median(b / a for a, b in zip(passes[BASELINE], passes["batched"]))
    one, batched = (statistics.median(passes[m]) * 1000 for m in (BASELINE, "batched"))
    print(f"prefill work of the 8 prompts alone (this process, no HTTP), medians: one at a time {one:.0f} ms, "
          f"batched {batched:.0f} ms (x{ratio:.2f}, median of each repetition's ratio)")
    print("answers: the same in every mode" if not differing else
          f"answers that differ from the first run's ({len(differing)}):\n  " + "\n  ".join(differing))
    if args.json is not None:
        args.json.write_text(json.dumps({"model": MODELS[args.lm], "clients": CLIENTS, "max_tokens": args.max_tokens,
                                         "threads": args.threads, "reps": args.reps, "modes": mode_options,
                                         "medians": medians, "median_paired_ratio": paired,
                                         "prefill_pass_seconds": passes,
                                         "all": figures, "differing": differing}, indent=2))


if __name__ == "__main__":
    main()
