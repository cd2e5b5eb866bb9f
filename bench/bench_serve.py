"""Batched serving: 8 concurrent streaming clients vs the same 8 requests one after another.

    python bench/bench_serve.py                       # default: 5 repetitions, 1 torch thread, 128 tokens
    python bench/bench_serve.py --reps 7 --threads 2 --max-tokens 64 --json bench/results/serve.json
    python bench/bench_serve.py --lm vary-tiny --workload text --reps 3   # a 12-layer, 768-wide LM
    python bench/bench_serve.py --image-cache-mb 0    # the server's image-feature cache off
    python bench/bench_serve.py --lm vary-tiny --dtype bfloat16   # served in bf16 (vlmkit serve --dtype)

A real `vlmkit serve` app (uvicorn) runs in a subprocess on a free 127.0.0.1 port, serving the
`bench-tiny` preset's model (CLIP-style ViT 96 px, patch 8, 192 wide, 4 layers; mlp2x_gelu; Llama LM
256 wide, 4 layers) with random weights and the printable-ASCII character tokenizer of `tiny-random`
(so the LM's vocabulary is that tokenizer's, 107 ids, instead of the preset's 4096). `--lm vary-tiny`
swaps in the `vary-tiny` preset's language model (12 layers, 768 wide, 113M parameters: the size
where a CPU decoding step is bound by reading the weights, so batching pays), same vocabulary. The 8 requests
are different questions, greedy, `max_tokens` new tokens, streamed with the official `openai`
client; the completion tokens come from each stream's `usage`. Three workloads:
- one image: every question about the same image, examples/shapes.png (144 image tokens, a prompt
  of ~190 tokens);
- 8 images: each question about its own image (crops, flips and turns of shapes.png);
- text only: the same questions without an image.
The server keeps encoded images in its image-feature cache (`--image-cache-mb`, default the server's);
the bench empties it (a route its own server process adds) before every timed run, so each run
starts cold: under "one image" the first request runs the vision tower and the other 7 hit the
cache, under "8 images" every request runs it (no hit is possible), in both modes. The cache's hit
and miss counts of every run (from /health) are checked against that.
For each workload, alternating the two modes every repetition (so machine noise hits both alike):

- sequential: the 8 requests one after another, each waiting for the previous answer;
- concurrent: 8 client threads send them at once; the server decodes them as one batch.

Reported: total completion tokens / wall time for each mode (medians over --reps), their ratio, and
the median of the per-repetition ratios (steadier on a busy machine: the two runs of a repetition
are seconds apart).
Both modes must give the same 8 answers, or the run stops. In bfloat16 a batched matrix product
rounds differently from a single row's (the kernels block the sums differently), so a greedy answer can
take the other branch at a near-tie: there an answer may differ from the first run's after at least
MIN_BF16_AGREEMENT equal characters (a wrong row, cache or position would differ from the start), and every
such run is listed at the end. Requests the server admits together are prefilled together (its
--prefill-batch, `--prefill-batch` here; bench_serve_prefill.py measures that against one at a
time). With bench-tiny (a 96 px tower) encoding an image is a small part of a 128-token answer, so
"8 images" (8 encodes per run) and "one image" (1 encode) come out alike, within the noise of a run;
a bigger tower or shorter answers would separate them.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

CLIENTS = 8
QUESTIONS = ["What is in the picture?", "Which colours do you see?", "How many shapes are there?",
             "Describe the image in detail.", "Is there a circle?", "What is at the top left?",
             "Write a caption.", "What would you call this scene?"]
IMAGE = Path(__file__).resolve().parent.parent / "examples" / "shapes.png"
MIN_BF16_AGREEMENT = 16  # bf16: answers of the two modes must agree on at least this many characters (see above)
CLEAR_ROUTE = "/bench/clear-image-cache"  # added by serve() below, not part of vlmkit's server
WORKLOADS = {"one image": "image", "8 images": "images", "text only": "text"}  # name -> --workload value
MODELS = {"bench-tiny": "bench-tiny (char vocabulary)",
          "vary-tiny": "bench-tiny's vision + vary-tiny's LM (12 x 768, char vocabulary)"}


def serve(port: int, threads: int, max_tokens: int, lm: str, image_cache_mb: float | None, dtype: str,
          prefill_batch: int | None = None, prefill_wait_ms: float = 0.0) -> None:
    """The server process: the bench model behind create_app, run by uvicorn (until killed), plus a route that
    empties the image-feature cache between timed runs. prefill_batch, prefill_wait_ms: the server's options
    (prefill_batch None: its default)."""
    import torch

    from bench_dtype import build  # the same model (bench/ is this script's import path)
    from vlmkit.load import LoadedModel
    from vlmkit.serve import Limits, create_app, run_server
    from vlmkit.serve.image_cache import MB
    from vlmkit.text.chat import chat_template_for

    torch.set_num_threads(threads)
    model, tokenizer = build(lm)
    model.to(getattr(torch, dtype))
    loaded = LoadedModel("bench-tiny", model, tokenizer, chat_template_for(tokenizer))
    options = {} if image_cache_mb is None else {"image_cache_bytes": int(image_cache_mb * MB)}  # {}: the default
    if prefill_batch is not None:
        options["prefill_batch"] = prefill_batch
    options["prefill_wait"] = prefill_wait_ms / 1000
    app = create_app(loaded, limits=Limits(max_tokens=max_tokens), **options)

    @app.post(CLEAR_ROUTE)
    def clear() -> dict:
        app.state.image_cache.clear()
        return app.state.image_cache.stats()

    run_server(app, port=port)


def image_urls() -> list[str]:
    """8 different images as PNG data URLs: the four quarter-overlapping crops, two flips and two turns of
    examples/shapes.png (no downloads)."""
    import base64
    import io

    from PIL import Image, ImageOps

    shapes = Image.open(IMAGE).convert("RGB")
    w, h = shapes.size
    crops = [shapes.crop((x, y, x + 3 * w // 4, y + 3 * h // 4)) for x in (0, w // 4) for y in (0, h // 4)]
    images = crops + [ImageOps.mirror(shapes), ImageOps.flip(shapes), shapes.rotate(90, expand=True),
                      shapes.rotate(270, expand=True)]
    urls = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    assert len(set(urls)) == CLIENTS
    return urls


def cache_stats(port: int, route: str = "/health", method: str = "GET") -> dict:
    """The server's image-cache counters (after emptying the cache when route is CLEAR_ROUTE)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{route}", method=method,  # a POST must be JSON
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        body = json.loads(response.read())
    return body.get("image_cache", body)


def agreement(answers: list[tuple[str, int]], reference: list[tuple[str, int]]) -> tuple[int, int]:
    """(how many answers equal the reference's, the shortest common prefix in characters of those that differ)."""
    differing = [(a, r) for (a, _), (r, _) in zip(answers, reference) if a != r]
    shortest = min((len(os.path.commonprefix([a, r])) for a, r in differing), default=0)
    return len(answers) - len(differing), shortest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ask(client, question: str, image_url: str | None, max_tokens: int) -> tuple[str, int]:
    """One streamed request, with the image if image_url is given: (answer text, completion tokens)."""
    image = [{"type": "image_url", "image_url": {"url": image_url}}] if image_url else []
    messages = [{"role": "user", "content": [*image, {"type": "text", "text": question}]}]
    chunks = list(client.chat.completions.create(model="bench-tiny", messages=messages, max_tokens=max_tokens,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks[-1].usage.completion_tokens


def sequential(client, urls: list[str | None], max_tokens: int) -> tuple[float, list[tuple[str, int]]]:
    """The 8 requests (question i with urls[i]) one after another."""
    start = time.perf_counter()
    answers = [ask(client, q, url, max_tokens) for q, url in zip(QUESTIONS, urls)]
    return time.perf_counter() - start, answers


def concurrent(client, urls: list[str | None], max_tokens: int) -> tuple[float, list[tuple[str, int]]]:
    """The 8 requests sent at once from 8 threads."""
    answers: list = [None] * CLIENTS
    barrier = threading.Barrier(CLIENTS + 1)

    def run(i: int) -> None:
        barrier.wait()
        answers[i] = ask(client, QUESTIONS[i], urls[i], max_tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - start, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="repetitions of each mode (medians are reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server process")
    parser.add_argument("--max-tokens", type=int, default=128, help="max_tokens of every request")
    parser.add_argument("--lm", choices=["bench-tiny", "vary-tiny"], default="bench-tiny",
                        help="whose language model to serve (the vision tower is bench-tiny's either way)")
    parser.add_argument("--workload", choices=["all", *WORKLOADS.values()], default="all",
                        help="questions about one image, about 8 different images, text only, or all three")
    parser.add_argument("--image-cache-mb", type=float, default=None,
                        help="size of the server's image-feature cache, 0 = off (default: vlmkit serve's default)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="the served model's weights, activations and KV cache (vlmkit serve --dtype)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    parser.add_argument("--prefill-batch", type=int, default=None,
                        help="the server's --prefill-batch, 1 = each request prefilled alone (default: the server's; "
                             "bench_serve_prefill.py compares the two)")
    parser.add_argument("--prefill-wait-ms", type=float, default=0.0,
                        help="the server's --prefill-wait-ms (default 0)")
    parser.add_argument("--serve-port", type=int, default=None, help=argparse.SUPPRESS)  # the server subprocess
    args = parser.parse_args()
    if args.serve_port is not None:
        serve(args.serve_port, args.threads, args.max_tokens, args.lm, args.image_cache_mb, args.dtype,
              args.prefill_batch, args.prefill_wait_ms)
        return

    import base64

    import openai

    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve-port", str(port), "--threads", str(args.threads),
                               "--max-tokens", str(args.max_tokens), "--lm", args.lm, "--dtype", args.dtype,
                               *(["--image-cache-mb", str(args.image_cache_mb)] if args.image_cache_mb is not None
                                 else []),
                               *(["--prefill-batch", str(args.prefill_batch)] if args.prefill_batch is not None
                                 else []), "--prefill-wait-ms", str(args.prefill_wait_ms)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the server did not start")
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        image_url = "data:image/png;base64," + base64.b64encode(IMAGE.read_bytes()).decode()
        all_urls = {"one image": [image_url] * CLIENTS, "8 images": image_urls(), "text only": [None] * CLIENTS}
        workloads = {w: u for w, u in all_urls.items() if args.workload in ("all", WORKLOADS[w])}
        cache_on = args.image_cache_mb != 0
        for urls in workloads.values():
            ask(client, QUESTIONS[0], urls[0], 4)  # warm-up
        rates = {(w, m): [] for w in workloads for m in ("sequential", "concurrent")}
        references: dict[str, list] = {}
        diverged: list[str] = []
        for rep in range(args.reps):
            for workload, urls in workloads.items():
                for mode, run in (("sequential", sequential), ("concurrent", concurrent)):
                    before = cache_stats(port, CLEAR_ROUTE, "POST")  # every run starts with an empty cache
                    seconds, answers = run(client, urls, args.max_tokens)
                    after = cache_stats(port)
                    hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
                    distinct = len({u for u in urls if u is not None})
                    wanted = (len([u for u in urls if u]) - distinct, distinct) if cache_on else (0, 0)
                    if (hits, misses) != wanted:
                        raise SystemExit(f"{workload}, {mode}: the image cache had {hits} hits and {misses} misses, "
                                         f"expected {wanted[0]} and {wanted[1]}")
                    reference = references.setdefault(workload, answers)
                    same, shortest = agreement(answers, reference)
                    if same < CLIENTS and (args.dtype == "float32" or shortest < MIN_BF16_AGREEMENT):
                        raise SystemExit(f"{workload}, {mode}: the answers differ from the first run's: "
                                         f"{answers} vs {reference}")
                    if same < CLIENTS:
                        diverged.append(f"{workload}, {mode}, rep {rep + 1}: {CLIENTS - same} answers differ "
                                        f"after {shortest}+ equal characters")
                    tokens = sum(n for _, n in answers)
                    rates[workload, mode].append(tokens / seconds)
                    print(f"rep {rep + 1} {workload:<9} {mode:<10} {tokens} tokens in {seconds:.2f} s = "
                          f"{tokens / seconds:.1f} tokens/s (image cache: {hits} hits, {misses} misses)", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    medians = {key: statistics.median(values) for key, values in rates.items()}
    size = "default size" if args.image_cache_mb is None else f"{args.image_cache_mb:g} MB"
    cache = f"image cache on ({size}), emptied before each run" if cache_on else "image cache off"
    print(f"\n{MODELS[args.lm]} in {args.dtype}, {CLIENTS} streamed greedy requests of {args.max_tokens} "
          "max new tokens, "
          f"{args.threads} torch thread(s) in the server, {cache}, medians of {args.reps}; total completion tokens/s")
    print(f"{'workload':<10} {'sequential':>11} {f'{CLIENTS} concurrent':>13} {'ratio':>7}   median of each "
          "repetition's ratio (its two modes ran back to back)")
    paired = {w: statistics.median(c / s for s, c in zip(rates[w, "sequential"], rates[w, "concurrent"]))
              for w in workloads}
    for workload in workloads:
        seq, conc = medians[workload, "sequential"], medians[workload, "concurrent"]
        print(f"{workload:<10} {seq:>11.1f} {conc:>13.1f} {conc / seq:>6.2f}x   {paired[workload]:.2f}x")
    if diverged:
        print(f"bf16 answers that differed from the first run's ({len(diverged)} runs):")
        print("\n".join(f"  {line}" for line in diverged))
    if args.json is not None:
        args.json.write_text(json.dumps({
            "model": MODELS[args.lm], "dtype": args.dtype, "diverged": diverged, "clients": CLIENTS,
            "max_tokens": args.max_tokens,
            "threads": args.threads, "reps": args.reps, "image_cache_mb": args.image_cache_mb,
            "tokens_per_s": {f"{w} / {m}": v for (w, m), v in medians.items()},
            "ratio": {w: medians[w, "concurrent"] / medians[w, "sequential"] for w in workloads},
            "median_paired_ratio": paired,
            "all_tokens_per_s": {f"{w} / {m}": v for (w, m), v in rates.items()}}, indent=2))


if __name__ == "__main__":
    main()
